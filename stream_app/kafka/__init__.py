"""Kafka plumbing shared by the worker and the tools: the local KRaft broker launcher, topic
admin and offset ranges. (Publishing files into the input topics is a tool: it reads dataset
rows, so it lives in ``stream_app.tools.publish``.)"""
