"""Shared learning in one process: the offline replay of what a ``learning=shared`` deployment
emits, with no broker and no worker.

A shared deployment scores each event with the version of its time (``core.learning.Epochs``)
and learns in a trainer that cuts versions on an event-time grid, in one canonical order. Both
depend only on the stream, never on timing or on the number of workers, so one processor over
the whole stream, with a :class:`~stream_app.core.learning.SharedTrainer` beside it fed the
same example batches a worker would send, emits the same change trail per customer as a live
deployment of any size (``tests/unit/test_one_process_trainer.py`` holds it to the live
pipeline; ``tests/integration/test_delivery_from_outside.py`` to a real worker on Kafka).

The step mirrors the live pipeline's ``_may_score``: an event's time becomes the stream's clock,
time-driven work fires as far as the versions that score it are final, and while the event's own
version is not final the stream's examples and promise go to the trainer, which cuts it.
"""

from __future__ import annotations

import math
from typing import Final

from stream_app.contracts.events import SegmentChange
from stream_app.core.learning import (
    EXAMPLES_FORMAT,
    EXAMPLES_VERSION,
    CollectedLearning,
    Epochs,
    ExampleBatch,
    ModelShelf,
    SharedTrainer,
)
from stream_app.core.model_format import record_version
from stream_app.core.models import SegmentModels
from stream_app.core.processor import Processor

SOURCE: Final = "p0"  # the whole stream is one source: the partitioning does not matter
VERSIONS_KEPT_EPOCHS: Final = 2  # one stream: nothing before its promise scores again


class OneProcessTrainer:
    """Makes `processor` learn as a shared deployment does: examples collected, learned by an
    in-process trainer on the epoch grid, every event scored by the version of its time."""

    def __init__(self, processor: Processor, epochs: Epochs, warm: bool = False) -> None:
        """`warm`: the processor's models are a bootstrap's. A deployment then scores with
        that record until the first version, stamped with its id, and its trainer continues
        from it; otherwise everything starts untrained."""
        self.processor = processor
        start = SegmentModels(processor.s)
        if warm:  # as a worker and the trainer restore it: the record's bytes, with its id
            record = processor.models.snapshot()
            processor.use_models(_decoded(processor, record))
            start = _decoded(processor, record)  # the trainer's own copy: it learns on
        self.learning = CollectedLearning(processor.models)
        processor.learning = self.learning
        self.shelf = ModelShelf(processor.models, epochs)
        self.trainer = SharedTrainer(start, epochs, 1)
        processor.model_at = self.shelf.at
        processor.use_models(self.shelf.newest)
        self._batch = 0
        self._promised = -math.inf
        self.versions = 0  # versions cut
        self.waits_expired = 0  # events scored before their version was final (never expected)

    def before(self, t: float) -> list[SegmentChange]:
        """The next event is at `t`: the time-driven changes before it, once its version is
        final (the trainer is fed until it is)."""
        proc, shelf = self.processor, self.shelf
        if t < proc.watermark or proc.is_future(t, None):
            return []  # late or far ahead: the processor refuses it, the clock stays
        proc.declare(t)
        changes: list[SegmentChange] = []
        while True:
            changes += proc.advance(min(proc.watermark, shelf.scoreable_until()))
            if shelf.ready(t) and proc.promise >= proc.watermark:
                return changes
            if not self._send():
                break
        self.waits_expired += 1
        return changes + proc.advance(proc.watermark)

    def finish(self) -> list[SegmentChange]:
        """The end of the stream: what falls due up to its newest event, scored with the
        newest versions the stream completes."""
        proc = self.processor
        changes: list[SegmentChange] = []
        while True:
            changes += proc.advance(min(proc.watermark, self.shelf.scoreable_until()))
            if not self._send():
                break
        return changes + proc.advance(proc.max_event_time)

    def _send(self) -> bool:
        """One example batch with the stream's promise to the trainer, as a worker sends it
        after a batch; true when it made more versions final."""
        proc, shelf = self.processor, self.shelf
        examples = self.learning.drain()
        promise = proc.promise
        promised = promise != -math.inf and promise > self._promised
        if not examples and not promised:
            return False
        if promised:
            self._promised = promise
        batch = ExampleBatch.model_construct(
            format=EXAMPLES_FORMAT,
            version=EXAMPLES_VERSION,
            source=SOURCE,
            batch=self._batch,
            examples=examples,
            promise=promise if promised else None,
            idle=False,
        )
        known = shelf.known_until
        for data in self.trainer.read(batch, self._batch):
            models = _decoded(proc, data)
            made = models.trainer
            if made is not None and made.valid_from is not None:
                self.versions += made.valid_from == made.closed_until
            shelf.offer(models)
        self._batch += 1
        if shelf.known_until == known:
            return False
        if proc.promise > -math.inf:  # due work before the watermark still needs its versions
            shelf.forget_before(proc.promise - VERSIONS_KEPT_EPOCHS * shelf.epochs.epoch_s)
        proc.use_models(shelf.newest)
        return True


def _decoded(processor: Processor, data: bytes) -> SegmentModels:
    """A record as a worker reads it from the models topic (the same bytes, decoded)."""
    models = SegmentModels(processor.s)
    models.restore(data)
    models.stamp = record_version(data)
    return models
