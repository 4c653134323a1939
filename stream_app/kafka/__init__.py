"""Kafka plumbing shared by the worker and the tools: the local KRaft broker launcher, topic
admin, publishing and offset ranges."""
