"""What engineers and operators run around the worker: replay, shadow, compare, rewind, the
reference subscriber, the demo, dataset adapters, progress bars and preflight checks."""
