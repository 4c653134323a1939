"""`kafka.ranges.watermarks` against a consumer that fails as a just-created topic does."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_app.kafka.ranges import watermarks


class Flaky:
    """Answers with `errors` first (raised as librdkafka raises them), then the watermarks."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 3, 17


def test_a_partition_whose_leader_is_not_known_yet_is_asked_again() -> None:
    """Seen in CI right after `topics create`: NOT_LEADER_FOR_PARTITION, which is retriable."""
    consumer = Flaky(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.NOT_LEADER_FOR_PARTITION)
    slept: list[float] = []
    assert watermarks(consumer, "t", 0, sleep=slept.append) == (3, 17)
    assert consumer.calls == 3 and len(slept) == 2


def test_an_error_that_is_not_retriable_is_raised_at_once() -> None:
    consumer = Flaky(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, sleep=lambda s: None)
    assert consumer.calls == 1
