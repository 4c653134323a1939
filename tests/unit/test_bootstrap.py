"""`stream-app bootstrap` without a broker: the records it writes are what the worker reads, the
`--until` filter, and its refusals (one line, exit 2).

The worker's side is the real one: the records go into a dict, the same mapping the worker's
:class:`TableStore` reads (Faust's RocksDB recovery stores a changelog record's raw key and
value bytes), and a :class:`LivePipeline` over it processes live events."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from stream_app import cli
from stream_app.contracts.events import MessageOrigin, Origin
from stream_app.core.processor import MemoryStore, Processor
from stream_app.kafka.local import free_ports
from stream_app.live.pipeline import LivePipeline
from stream_app.live.store import Delivery, TableStore, decode_record, partition_of
from stream_app.settings import Settings
from stream_app.tools import bootstrap
from stream_app.tools.bootstrap import changelog_record, history
from stream_app.tools.datasets import RowError
from stream_app.tools.replay import replay_offline

T0 = datetime(2024, 3, 1, tzinfo=UTC)
UNTIL = T0 + timedelta(days=10)
PARTITIONS = 2
CUSTOMERS = [f"c{i}" for i in range(8)]


def view(customer: str, at: datetime, origin: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": f"{customer}-view-{at.isoformat()}",
        "customer_id": customer,
        "event_time": at.isoformat(),
        "event_type": "product_view",
    }
    if origin is not None:
        event["origin"] = origin
    return event


def purchase(customer: str, at: datetime) -> dict[str, Any]:
    return {
        "event_id": f"{customer}-buy-{at.isoformat()}",
        "customer_id": customer,
        "event_time": at.isoformat(),
        "event_type": "purchase",
        "order_id": f"o-{customer}-{at.isoformat()}",
        "amount": "12.50",
        "currency": "GBP",
    }


@pytest.fixture
def history_file(tmp_path: Path) -> Path:
    """Eight customers over the first days, one line of garbage, and two events after UNTIL
    (one of them says it is live)."""
    lines = [b"{not json"]
    for i, customer in enumerate(CUSTOMERS):
        lines.append(orjson.dumps(view(customer, T0 + timedelta(hours=i))))
        lines.append(orjson.dumps(purchase(customer, T0 + timedelta(days=1, hours=i))))
        lines.append(orjson.dumps(view(customer, T0 + timedelta(days=2, hours=i), "live")))
    lines.append(orjson.dumps(view("c0", UNTIL)))
    lines.append(orjson.dumps(purchase("late", UNTIL + timedelta(days=1))))
    path = tmp_path / "history.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def settings() -> Settings:
    return Settings(state_dir="/nonexistent", partitions=PARTITIONS)


def replayed(path: Path, until: datetime | None = UNTIL) -> Processor:
    outside = Counter[str]()
    _, processor, _ = replay_offline(
        history(path, "events", until, outside), settings().segmentation
    )
    return processor


def states(processor: Processor) -> list[Any]:
    store = processor.store
    assert isinstance(store, MemoryStore)
    return list(store)


def test_until_keeps_only_earlier_events_all_marked_replay(history_file: Path) -> None:
    outside = Counter[str]()
    items = list(history(history_file, "events", UNTIL, outside))
    errors = [item for item in items if isinstance(item, RowError)]
    events = [item for item in items if not isinstance(item, RowError)]
    assert [e.reason for e in errors] == ["invalid_json"]
    assert len(events) == 3 * len(CUSTOMERS)
    assert all(e.event_time < UNTIL for e in events)
    assert {e.origin for e in events} == {Origin.REPLAY}  # also those the file called live
    assert outside == {"outside_window": 2}
    everything = [
        i for i in history(history_file, "events", None, Counter()) if not isinstance(i, RowError)
    ]
    assert len(everything) == 3 * len(CUSTOMERS) + 2


def test_a_record_is_the_worker_envelope_on_the_customers_input_partition(
    history_file: Path,
) -> None:
    bootstrapped = states(replayed(history_file))
    assert {st.customer_id for st in bootstrapped} == set(CUSTOMERS)
    assert {partition_of(c, PARTITIONS) for c in CUSTOMERS} == {0, 1}  # both partitions used
    for state in bootstrapped:
        partition, key, value = changelog_record(state, PARTITIONS)
        assert partition == partition_of(state.customer_id, PARTITIONS)
        assert key == state.customer_id.encode()
        stored, delivery = decode_record(value)
        assert delivery == Delivery()  # no outbox (history is delivered), no input offsets
        assert stored.origin is Origin.LIVE  # the deployment's own timers speak live
        assert state.origin is Origin.REPLAY  # the replayed state itself is left alone
        assert stored == replace(state, origin=Origin.LIVE)
        assert stored.sequence >= 1 and stored.membership is not None
        assert stored.due_at is not None


class Sinks:
    def __init__(self) -> None:
        self.changes: list[dict[str, Any]] = []

    async def change(self, customer_id: str, value: bytes) -> None:
        self.changes.append(orjson.loads(value))

    async def membership(self, customer_id: str, value: bytes) -> None:
        pass

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        raise AssertionError(orjson.loads(value))

    async def reroute(self, topic: str, key: bytes, value: bytes) -> None:
        raise AssertionError(f"rerouted {key!r}")


async def live_run(table: dict[bytes, bytes], processor: Processor, customer: str) -> Sinks:
    """A live worker over `table` with the bootstrapped models: one live event of `customer`,
    50 days after the history."""
    sinks = Sinks()
    pipeline = LivePipeline(
        settings(),
        lambda partition: TableStore(table, partition, PARTITIONS, cache_size=0),
        sinks,
        models=processor.models,
        clock=lambda: T0 + timedelta(days=365),
    )
    value = orjson.dumps(view(customer, T0 + timedelta(days=60), "live"))
    origin = MessageOrigin(
        topic=pipeline.settings.clickstream_topic,
        partition=partition_of(customer, PARTITIONS),
        offset=0,
    )
    await pipeline.handle(customer.encode(), value, origin)
    return sinks


def test_a_worker_over_the_records_continues_each_customer_and_runs_their_timers(
    history_file: Path,
) -> None:
    processor = replayed(history_file)
    bootstrapped = {st.customer_id: st for st in states(processor)}
    table: dict[bytes, bytes] = {}
    for state in bootstrapped.values():
        _, key, value = changelog_record(state, PARTITIONS)
        table[key] = value
    customer = CUSTOMERS[0]
    partition = partition_of(customer, PARTITIONS)
    neighbours = {c for c in CUSTOMERS if partition_of(c, PARTITIONS) == partition}

    changes = asyncio.run(live_run(table, processor, customer)).changes

    assert changes, "a live event 50 days on moves the known customer's lifecycle"
    assert all(c["component"] != "entry" for c in changes)  # known: no second entry
    by_customer: dict[str, list[int]] = {}
    for change in changes:
        by_customer.setdefault(change["customer_id"], []).append(change["sequence"])
        assert change["origin"] == "live"
    assert set(by_customer) == neighbours  # the silent ones' timers fired too (due index)
    for known, sequences in by_customer.items():
        start = bootstrapped[known].sequence + 1  # continues: no sequence used twice
        assert sequences == list(range(start, start + len(sequences)))
    timers = [c for c in changes if c["reason"]["trigger_event_type"] == "time_passed"]
    assert {c["customer_id"] for c in timers} >= neighbours - {customer}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Traceback" not in captured.err
    return code, captured.err.splitlines()


def test_a_missing_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.csv.gz"
    code, err = run(["bootstrap", str(missing), "--format", "online-retail"], capsys)
    assert code == 2
    assert err == [f"error: no such file: {missing}"]


def test_a_bad_until_is_refused_in_one_line(
    history_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["bootstrap", str(history_file), "--format", "events", "--until", "x"], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: --until must be an ISO 8601 date")


def test_an_unreachable_broker_is_refused_in_one_line(
    history_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (port,) = free_ports(1)  # nobody listens there
    monkeypatch.setenv("STREAM_APP_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
    monkeypatch.setattr(bootstrap, "BROKER_WAIT_S", 0.5)
    code, err = run(["bootstrap", str(history_file), "--format", "events"], capsys)
    assert code == 2
    assert err == [
        f"error: Kafka at 127.0.0.1:{port} did not answer within 0.5s "
        "(start it with `stream-app kafka start` or `docker compose up`)"
    ]
