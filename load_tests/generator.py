"""Seeded, realistic traffic for the load harness, and the paced confluent-kafka producer loop.

The traffic model (:class:`TrafficGenerator`) is pure: given a seed it yields the same sequence of
records (topic, key, value) for the same sequence of clock readings. Customers browse in sessions
that follow a purchase funnel (entry from a page view, an email or a push open; product views and
searches; cart adds; checkout; purchase; sometimes a refund a while later). Sessions come from a
pool of returning customers, from brand-new customers, and from anonymous visitors, some of whom
log in mid-session (the events after the login carry the customer id and the anonymous id). A
configurable share of messages is malformed (bad JSON, not an object, an unknown event type, a
float amount) so the dead-letter path is loaded too.

Values are built as plain dicts and serialised with orjson (no pydantic per event: the generator
shares the machine with the broker and the worker); a unit test checks that every valid record
decodes with :func:`stream_app.contracts.events.decode_event`.

The event time of a record is the wall-clock time at which it is handed to the producer, so a
segment change's ``event_time`` (the trigger's event time) gives the end-to-end latency a
subscriber sees. With a ``time_scale`` above 1 (:class:`EventClock`) event time runs that many
times faster than the wall clock, from far enough in the past that it reaches now only at the
end of the run: labels mature, customers go at risk and the trainer cuts versions during a run
of minutes, and the send time of a record is still known from its event time (the inverse).
Pacing (:class:`Pacer`) is a pure function of elapsed time, tested without sleeps.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as StopFlag
from typing import Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["click", "transaction"]
MALFORMED_KINDS: Final = ("invalid_json", "not_an_object", "unknown_type", "invalid_field")
# How each malformed kind is reported by the worker (stream_app.contracts.events.DeadLetterReason).
MALFORMED_REASON: Final[dict[str, str]] = {
    "invalid_json": "invalid_json",
    "not_an_object": "not_an_object",
    "unknown_type": "unknown_type",
    "invalid_field": "invalid_field",
}
CURRENCY: Final = "EUR"


class TrafficConfig(BaseModel):
    """Shape of the generated traffic. Every probability is per session unless stated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 7
    run_id: str = Field("lt", pattern=r"^[A-Za-z0-9_-]{1,24}$")
    # Customer ids are `<customer_prefix>-c<n>` (default the run id): a history generated for a
    # bootstrap and the run after it share the returning customers by sharing the prefix.
    customer_prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,24}$")
    returning_customers: int = Field(20_000, ge=1)
    new_customer_share: float = Field(0.2, ge=0, le=1)
    anonymous_share: float = Field(0.15, ge=0, le=1)
    login_share: float = Field(0.5, ge=0, le=1)  # of anonymous sessions
    email_entry_share: float = Field(0.1, ge=0, le=1)
    push_entry_share: float = Field(0.05, ge=0, le=1)
    mean_views: float = Field(4.0, ge=1)
    search_share: float = Field(0.25, ge=0, le=1)  # per browsing step
    cart_share: float = Field(0.3, ge=0, le=1)
    checkout_share: float = Field(0.6, ge=0, le=1)  # of sessions with a cart
    purchase_share: float = Field(0.8, ge=0, le=1)  # of checkouts
    refund_share: float = Field(0.05, ge=0, le=1)  # of purchases
    refund_delay_events: int = Field(2_000, ge=1)  # a refund comes this many records later
    malformed_rate: float = Field(0.005, ge=0, le=1)  # per record
    concurrent_sessions: int = Field(200, ge=1)
    categories: int = Field(30, ge=1)
    products: int = Field(2_000, ge=1)

    @model_validator(mode="after")
    def _entry_shares(self) -> TrafficConfig:
        if self.email_entry_share + self.push_entry_share > 1:
            raise ValueError("email_entry_share + push_entry_share must not exceed 1")
        if self.new_customer_share + self.anonymous_share > 1:
            raise ValueError("new_customer_share + anonymous_share must not exceed 1")
        return self


@dataclass(frozen=True, slots=True)
class Record:
    """One message to produce. ``malformed`` names the corruption, or is None for a valid event."""

    kind: Kind
    key: bytes
    value: bytes
    event_id: str
    event_type: str
    session: int
    malformed: str | None = None


@dataclass(slots=True)
class _Step:
    kind: Kind
    event_type: str
    fields: dict[str, Any]
    refund_later: bool = False  # a purchase that will be refunded after refund_delay_events


@dataclass(slots=True)
class _Session:
    number: int
    customer: str
    anonymous: str | None
    steps: deque[_Step] = field(default_factory=deque)


class TrafficGenerator:
    """Deterministic traffic: the same seed and the same clock readings give the same bytes."""

    def __init__(self, config: TrafficConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._sessions: list[_Session] = []
        self._session_count = 0
        self._new_customers = 0
        self._anonymous = 0
        self._records = 0
        self._orders = 0
        self._refunds: list[tuple[int, int, str, _Step]] = []  # (due record, tiebreak, customer)
        self.customers_seen: set[str] = set()
        while len(self._sessions) < config.concurrent_sessions:
            self._sessions.append(self._new_session())

    @property
    def records(self) -> int:
        return self._records

    def _customer_id(self, n: int) -> str:
        """A returning customer's id (n below `returning_customers`), or a new one's (new to
        this run, so under the run id even when the returning ones are shared)."""
        cfg = self.config
        shared = n < cfg.returning_customers and cfg.customer_prefix is not None
        return f"{cfg.customer_prefix if shared else cfg.run_id}-c{n}"

    def _new_session(self) -> _Session:
        cfg, rng = self.config, self._rng
        self._session_count += 1
        draw = rng.random()
        anonymous: str | None = None
        if draw < cfg.new_customer_share:
            customer = self._customer_id(cfg.returning_customers + self._new_customers)
            self._new_customers += 1
        else:
            customer = self._customer_id(rng.randrange(cfg.returning_customers))
            if draw < cfg.new_customer_share + cfg.anonymous_share:
                self._anonymous += 1
                anonymous = f"{cfg.run_id}-a{self._anonymous}"
        session = _Session(self._session_count, customer, anonymous)
        session.steps.extend(self._funnel(session))
        return session

    def _funnel(self, session: _Session) -> Iterator[_Step]:
        """The session's steps in funnel order: entry, browse, cart, checkout, purchase."""
        cfg, rng = self.config, self._rng
        sid = f"{cfg.run_id}-s{session.number}"
        entry = rng.random()
        if entry < cfg.email_entry_share:
            yield _Step("click", "email_open", {"session_id": sid})
        elif entry < cfg.email_entry_share + cfg.push_entry_share:
            yield _Step("click", "push_open", {"session_id": sid})
        else:
            yield _Step("click", "page_view", {"session_id": sid})
        views = 1 + min(int(rng.expovariate(1 / cfg.mean_views)), 40)
        login_at = (
            rng.randrange(views + 1)
            if session.anonymous is not None and rng.random() < cfg.login_share
            else None
        )
        cart: list[tuple[str, str, int]] = []
        wants_cart = rng.random() < cfg.cart_share
        for step in range(views):
            if step == login_at:
                yield _Step("click", "login", {"session_id": sid})
            category = f"cat-{rng.randrange(cfg.categories)}"
            if rng.random() < cfg.search_share:
                yield _Step(
                    "click",
                    "search",
                    {"session_id": sid, "search_query": f"q{rng.randrange(500)}"},
                )
            product = f"p-{rng.randrange(cfg.products)}"
            cents = rng.randrange(199, 25_000)
            yield _Step(
                "click",
                "product_view",
                {
                    "session_id": sid,
                    "product_id": product,
                    "category": category,
                    "price": _money(cents),
                    "currency": CURRENCY,
                },
            )
            if wants_cart and (rng.random() < 0.5 or (step == views - 1 and not cart)):
                cart.append((product, category, cents))
                yield _Step(
                    "click",
                    "cart_add",
                    {
                        "session_id": sid,
                        "product_id": product,
                        "category": category,
                        "price": _money(cents),
                        "currency": CURRENCY,
                    },
                )
        if login_at == views:
            yield _Step("click", "login", {"session_id": sid})
        if not cart or rng.random() >= cfg.checkout_share:
            return
        yield _Step("click", "checkout", {"session_id": sid})
        if rng.random() >= cfg.purchase_share:
            return
        self._orders += 1
        order = f"{cfg.run_id}-o{self._orders}"
        total = sum(cents for _, _, cents in cart)
        categories = sorted({category for _, category, _ in cart})
        purchase = {
            "order_id": order,
            "amount": _money(total),
            "currency": CURRENCY,
            "item_count": len(cart),
            "categories": categories,
        }
        yield _Step("transaction", "purchase", purchase, rng.random() < cfg.refund_share)

    def next(self, now: float) -> Record:
        """The next record, stamped with event time ``now`` (seconds since the epoch)."""
        self._records += 1
        cfg, rng = self.config, self._rng
        if self._refunds and self._refunds[0][0] <= self._records:
            _, _, customer, step = heapq.heappop(self._refunds)
            return self._render(step, customer, None, 0, now)
        index = rng.randrange(len(self._sessions))
        session = self._sessions[index]
        step = session.steps.popleft()
        if step.event_type == "login" and session.anonymous is not None:
            # From now on the session is identified; the login links both ids.
            anonymous, session.anonymous = session.anonymous, None
            record = self._render(step, session.customer, anonymous, session.number, now)
        else:
            record = self._render(
                step, session.anonymous or session.customer, None, session.number, now
            )
        if step.refund_later:
            refund = _Step("transaction", "refund", step.fields)
            due = self._records + cfg.refund_delay_events
            # By the identified customer, even if the session began anonymously.
            heapq.heappush(self._refunds, (due, self._records, session.customer, refund))
        if not session.steps:
            self._sessions[index] = self._new_session()
        if cfg.malformed_rate and rng.random() < cfg.malformed_rate:
            return self._corrupt(record, rng.choice(MALFORMED_KINDS))
        return record

    def _render(
        self, step: _Step, customer: str, anonymous: str | None, session: int, now: float
    ) -> Record:
        self.customers_seen.add(customer)
        event_id = f"{self.config.run_id}-e{self._records}"
        body: dict[str, Any] = {
            "event_id": event_id,
            "customer_id": customer,
            "event_time": datetime.fromtimestamp(now, UTC).isoformat(),
            "event_type": step.event_type,
            **step.fields,
        }
        if anonymous is not None:
            body["anonymous_id"] = anonymous
        return Record(
            step.kind, customer.encode(), orjson.dumps(body), event_id, step.event_type, session
        )

    def _corrupt(self, record: Record, how: str) -> Record:
        body = orjson.loads(record.value)
        if how == "invalid_json":
            value = record.value[: len(record.value) // 2]
        elif how == "not_an_object":
            value = orjson.dumps([body])
        elif how == "unknown_type":
            value = orjson.dumps({**body, "event_type": "hover"})
        elif record.kind == "transaction":
            value = orjson.dumps({**body, "amount": 12.5})  # a float: cents would be lost
        else:
            value = orjson.dumps({**body, "event_time": "yesterday"})
        return Record(
            record.kind,
            record.key,
            value,
            record.event_id,
            record.event_type,
            record.session,
            malformed=how,
        )


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


# --- pacing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    """From ``start_s`` (seconds after the run started) on, produce ``rate`` events/s."""

    start_s: float
    rate: float
    name: str = "steady"


@dataclass(frozen=True)
class RateSchedule:
    """A piecewise-constant target rate over ``duration_s`` seconds."""

    phases: tuple[Phase, ...]
    duration_s: float

    def __post_init__(self) -> None:
        if not self.phases or self.phases[0].start_s != 0:
            raise ValueError("a schedule starts with a phase at 0 s")
        starts = [phase.start_s for phase in self.phases]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError("phases must start at increasing times")
        if any(phase.rate < 0 for phase in self.phases):
            raise ValueError("rates must not be negative")
        if self.duration_s <= 0:
            raise ValueError("duration must be positive")

    def phase_at(self, t: float) -> Phase:
        current = self.phases[0]
        for phase in self.phases:
            if phase.start_s > t:
                break
            current = phase
        return current

    def rate_at(self, t: float) -> float:
        return self.phase_at(t).rate if t < self.duration_s else 0.0

    def expected(self, t: float) -> float:
        """Events that should have been produced by ``t`` seconds (the integral of the rate)."""
        t = min(max(t, 0.0), self.duration_s)
        total = 0.0
        for i, phase in enumerate(self.phases):
            end = self.phases[i + 1].start_s if i + 1 < len(self.phases) else self.duration_s
            if t <= phase.start_s:
                break
            total += phase.rate * (min(t, end) - phase.start_s)
        return total

    @property
    def total(self) -> int:
        return math.floor(self.expected(self.duration_s) + 1e-9)


@dataclass
class Pacer:
    """How many records to send now so that the count follows the schedule.

    ``max_batch`` bounds one burst (so a slow moment is caught up over several polls rather than
    in one flood); ``behind_s`` says how far the sender trails the schedule, in seconds of the
    current rate. The generator reports itself as not keeping up when that exceeds
    ``tolerance_s``.
    """

    schedule: RateSchedule
    max_batch: int = 500
    tolerance_s: float = 0.5
    sent: int = 0

    def due(self, elapsed: float) -> int:
        """Records to send now (never negative, at most ``max_batch``)."""
        owed = math.floor(self.schedule.expected(elapsed) + 1e-9) - self.sent
        return max(0, min(owed, self.max_batch))

    def record_sent(self, count: int) -> None:
        self.sent += count

    def behind_s(self, elapsed: float) -> float:
        owed = self.schedule.expected(elapsed) - self.sent
        rate = self.schedule.rate_at(elapsed) or 1.0
        return max(0.0, owed / rate)

    def keeping_up(self, elapsed: float) -> bool:
        return self.behind_s(elapsed) <= self.tolerance_s

    def sleep_for(self, elapsed: float) -> float:
        """How long to wait before the next record is due (0 if one is due now)."""
        if self.due(elapsed) > 0:
            return 0.0
        rate = self.schedule.rate_at(elapsed)
        if rate <= 0:
            return 0.01
        next_at = (self.sent + 1 - self.schedule.expected(elapsed)) / rate
        return min(max(next_at, 0.0), 0.01)


# --- the producer process -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventClock:
    """Event time against the wall clock: `scale` event seconds per wall second, at
    `origin` (event time) when the wall clock reads `start_at`."""

    start_at: float
    origin: float
    scale: float = 1.0

    @classmethod
    def ending_now(cls, start_at: float, duration_s: float, scale: float) -> EventClock:
        """A clock that reaches the wall clock's time at the end of the run, never before (no
        event from the future), and runs `scale` times faster until then."""
        return cls(start_at, start_at - duration_s * (scale - 1.0), scale)

    def event_time(self, wall: float) -> float:
        """Never after `wall`: a record sent after the run's end is stamped now, not later."""
        return min(self.origin + (wall - self.start_at) * self.scale, wall)

    def wall_time(self, event_time: float) -> float:
        """When a record of this event time was sent (for the latency a subscriber sees)."""
        return self.start_at + (event_time - self.origin) / self.scale


class GeneratorJob(BaseModel):
    """Everything the generator process needs (it is spawned, so this must pickle)."""

    model_config = ConfigDict(frozen=True)

    bootstrap: str
    clickstream_topic: str
    transactions_topic: str
    traffic: TrafficConfig
    phases: list[tuple[float, float, str]]
    duration_s: float
    start_at: float  # wall-clock time (time.time()) at which second 0 begins
    linger_ms: float = 5.0
    tolerance_s: float = 0.5
    count: int | None = None  # produce exactly this many records, as fast as possible
    time_scale: float = Field(1.0, ge=1.0)  # event seconds per wall second (EventClock)

    def event_clock(self) -> EventClock:
        return EventClock.ending_now(self.start_at, self.duration_s, self.time_scale)


@dataclass(frozen=True, slots=True)
class Tick:
    """What the generator did in one wall-clock second of the run."""

    second: int
    sent: int
    malformed: int
    target: float
    behind_s: float
    delivery_errors: int
    customers: int
    cpu_s: float
    done: bool = False


def schedule_of(job: GeneratorJob) -> RateSchedule:
    return RateSchedule(
        tuple(Phase(start, rate, name) for start, rate, name in job.phases), job.duration_s
    )


def produce_paced(
    job: GeneratorJob,
    send: Callable[[Record], None],
    poll: Callable[[], None],
    report: Callable[[Tick], None],
    stop: Callable[[], bool],
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    cpu: Callable[[], float] = time.process_time,
    errors: Callable[[], int] = lambda: 0,
) -> int:
    """The paced loop (I/O injected, so tests drive it with a fake clock). Returns records sent."""
    generator = TrafficGenerator(job.traffic)
    pacer = Pacer(schedule_of(job), tolerance_s=job.tolerance_s)
    event_time = job.event_clock().event_time
    while clock() < job.start_at and not stop():
        sleep(min(job.start_at - clock(), 0.05))
    second, sent_in_second, malformed_in_second, behind = 0, 0, 0, 0.0
    cpu_before = cpu()

    def flush_tick(done: bool = False) -> None:
        nonlocal sent_in_second, malformed_in_second, behind, cpu_before
        used = cpu()
        report(
            Tick(
                second,
                sent_in_second,
                malformed_in_second,
                pacer.schedule.rate_at(second),
                round(behind, 3),
                errors(),
                len(generator.customers_seen),
                used - cpu_before,
                done,
            )
        )
        sent_in_second, malformed_in_second, behind, cpu_before = 0, 0, 0.0, used

    while not stop():
        now = clock()
        elapsed = now - job.start_at
        while elapsed >= second + 1:
            flush_tick()
            second += 1
        if job.count is not None:
            if pacer.sent >= job.count:
                break
            count = min(pacer.max_batch, job.count - pacer.sent)
        elif elapsed >= job.duration_s:
            count = pacer.due(job.duration_s)  # what the last poll left owed, then stop
            if count == 0:
                break
        else:
            count = pacer.due(elapsed)
        if count == 0:
            poll()
            sleep(pacer.sleep_for(elapsed))
            continue
        for _ in range(count):
            record = generator.next(event_time(clock()))
            send(record)
            if record.malformed is not None:
                malformed_in_second += 1
        pacer.record_sent(count)
        sent_in_second += count
        behind = max(behind, pacer.behind_s(clock() - job.start_at))
        poll()
    flush_tick(done=True)
    return pacer.sent


def run_generator(job: GeneratorJob, stop: StopFlag, ticks: Queue[Tick]) -> None:
    """Entry point of the generator process: produce ``job`` into Kafka, report a Tick a second."""
    import signal

    from confluent_kafka import Producer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
    failures = [0]

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures[0] += 1

    producer = Producer(
        {
            "bootstrap.servers": job.bootstrap,
            # The same murmur2 as Java and aiokafka (Faust): keys land where the worker expects.
            "partitioner": "murmur2_random",
            "linger.ms": job.linger_ms,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
            "enable.idempotence": True,
            "delivery.report.only.error": True,
            "on_delivery": delivered,
            "log_level": 3,  # not the warnings of an idempotent producer on a fresh broker
        }
    )
    topics = {"click": job.clickstream_topic, "transaction": job.transactions_topic}

    def send(record: Record) -> None:
        while True:
            try:
                producer.produce(topics[record.kind], key=record.key, value=record.value)
                return
            except BufferError:
                producer.poll(0.01)  # local queue full: the broker is not taking it fast enough

    try:
        produce_paced(
            job,
            send,
            lambda: producer.poll(0),
            ticks.put,
            stop.is_set,
            errors=lambda: failures[0],
        )
    finally:
        producer.flush(30)


def count_by(records: Sequence[Record], attribute: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        value = str(getattr(record, attribute))
        counts[value] = counts.get(value, 0) + 1
    return counts
