"""The domain: behavioural features, the River models, the segment policy and the processor step
``(state, event) -> (state, changes)``. Pure: no Kafka, no Faust, no I/O; event time is passed
in and randomness is seeded. Replay, tests and the live agents all call it (the import rule is
tested in tests/unit/test_layout.py)."""
