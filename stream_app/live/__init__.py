"""The running worker: the Faust app and agents, the live step around the core (decode, ordered
merge, batching, outbox and delivery markers), sinks, health and metrics."""
