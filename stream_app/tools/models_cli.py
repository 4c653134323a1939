"""`stream-app models list|show|pin|unpin`: the model versions on the models topic, and a pin.

Everything here reads the models topic from its start (``live.model_log``): the newest version
(key ``<app_id>``), the trainer's history (``<app_id>/history/<version>``) and the pin
(``<app_id>/pin``). Each record is checked as a worker checks it (``live.trainer.decode_version``:
format, digest, signature, knobs), so what the list calls good is what a worker would score
with. "Following" is what every worker scores with once its follower has read the topic: the
pinned version while a pin is set, else the newest.

``pin`` writes a copy of the version's record under the pin key (so it outlives the history)
and ``unpin`` a tombstone; the trainer keeps learning and publishing meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from confluent_kafka import KafkaException, Producer

from stream_app.core.model_format import (
    SnapshotError,
    is_progress_record,
    record_version,
    version_boundary,
)
from stream_app.errors import UserError
from stream_app.kafka.topics import require_topics
from stream_app.live.model_log import (
    PUBLISHED_HEADER,
    LogRecord,
    is_history_key,
    newest_key,
    pin_key,
    read_model_log,
)
from stream_app.live.trainer import decode_version
from stream_app.settings import Settings

TIMEOUT_S: Final = 5.0


@dataclass(slots=True)
class VersionInfo:
    """One version the topic holds, and what it says about itself."""

    version: str
    record: bytes
    published_ms: int | None
    offset: int
    held_as: list[str] = field(default_factory=list)  # "newest", "history", "pin"
    refused: str | None = None
    examples: int | None = None
    purchase: dict[str, Any] = field(default_factory=dict)
    churn: dict[str, Any] = field(default_factory=dict)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    following: bool = False
    pinned: bool = False
    tiered: bool = False  # purchase tiers assigned (not `unscored` for everyone)
    clusters_seeded: bool = False  # clusters out of their warm-up (not all in cluster 0)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "published": _iso(self.published_ms),
            "examples": self.examples,
            "purchase": self.purchase,
            "churn": self.churn,
            "following": self.following,
            "pinned": self.pinned,
            "held_as": self.held_as,
            "refused": self.refused,
            "tiered": self.tiered,
            "clusters_seeded": self.clusters_seeded,
        }

    def details(self) -> dict[str, Any]:
        return {**self.summary(), "clusters": self.clusters, "bytes": len(self.record)}


@dataclass(slots=True)
class Catalogue:
    """The versions, oldest first; the newest (app key) and the pinned one, by id."""

    versions: list[VersionInfo]
    newest: str | None
    pinned: str | None
    pinned_at_ms: int | None

    @property
    def following(self) -> str | None:
        return next((v.version for v in self.versions if v.following), None)

    def find(self, ref: str, topic: str) -> VersionInfo:
        """The version `ref` names: its whole id, or the start or the end of it (the 12 hex)."""
        exact = [v for v in self.versions if v.version == ref]
        found = exact or [
            v
            for v in self.versions
            if ref and (v.version.endswith(ref) or v.version.startswith(ref))
        ]
        if not found:
            raise UserError(
                f"model version {ref!r} is not on {topic} (it holds {len(self.versions)}: "
                "see `stream-app models list`)"
            )
        if len(found) > 1:
            raise UserError(f"{ref!r} matches {len(found)} model versions: give more of it")
        return found[0]


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    at = datetime.fromtimestamp(ms / 1000, UTC).replace(microsecond=0)
    return at.isoformat().replace("+00:00", "Z")


def _published_ms(record: LogRecord) -> int | None:
    raw = record.headers.get(PUBLISHED_HEADER)
    if raw is not None:
        try:
            return int(raw)
        except ValueError:
            return record.timestamp_ms
    return record.timestamp_ms


def catalogue(settings: Settings, records: Iterable[LogRecord]) -> Catalogue:
    """What the topic holds for this app, from its records (oldest first), each checked."""
    app = settings.app_id
    newest: LogRecord | None = None
    pin: LogRecord | None = None
    history: dict[bytes, LogRecord] = {}
    for record in records:
        if record.key == newest_key(app):
            # The newest version: a trainer's progress record is not one (nothing scores with
            # it), and a version re-cut after a takeover is not newer than a later boundary.
            if record.value is not None and not is_progress_record(record.value):
                later = newest is None or version_boundary(record.value) >= version_boundary(
                    newest.value or b""
                )
                newest = record if later else newest
        elif record.key == pin_key(app):
            pin = record if record.value is not None else None
        elif is_history_key(app, record.key):
            assert record.key is not None
            history.pop(record.key, None)
            if record.value is not None:
                history[record.key] = record
    held: list[tuple[str, LogRecord]] = [("history", r) for r in history.values()]
    if newest is not None:
        held.append(("newest", newest))
    if pin is not None:
        held.append(("pin", pin))
    versions: dict[str, VersionInfo] = {}
    for role, record in held:
        assert record.value is not None
        try:
            version = record_version(record.value)
        except Exception:
            version = f"unreadable@{record.offset}"
        info = versions.get(version)
        if info is None:
            info = versions[version] = _describe(settings, version, record)
        elif role != "pin" and record.offset < info.offset:
            info.published_ms, info.offset = record.timestamp_ms, record.offset
        info.held_as.append(role)
    newest_id = next((v.version for v in versions.values() if "newest" in v.held_as), None)
    pinned = next((v for v in versions.values() if "pin" in v.held_as), None)
    for info in versions.values():
        info.pinned = info is pinned
    following = pinned if pinned is not None and pinned.refused is None else None
    if following is None and newest_id is not None and versions[newest_id].refused is None:
        following = versions[newest_id]
    if following is not None:
        following.following = True
    ordered = sorted(
        versions.values(),
        key=lambda v: (v.published_ms if v.published_ms is not None else 2**62, v.offset),
    )
    return Catalogue(
        versions=ordered,
        newest=newest_id,
        pinned=None if pinned is None else pinned.version,
        pinned_at_ms=None if pin is None else pin.timestamp_ms,
    )


def _describe(settings: Settings, version: str, record: LogRecord) -> VersionInfo:
    assert record.value is not None
    info = VersionInfo(
        version=version,
        record=record.value,
        published_ms=_published_ms(record),
        offset=record.offset,
    )
    try:
        models = decode_version(settings, record.value)
    except SnapshotError as exc:
        info.refused = str(exc)
        return info
    info.examples = None if models.trainer is None else models.trainer.examples
    info.purchase = models.purchase.quality()
    info.churn = models.churn.quality()
    purchase, warm_up = models.purchase, settings.segmentation.tier_warm_up_labels
    info.tiered = purchase.warmed_up and purchase.labels >= warm_up  # as the Processor tiers
    clusters = models.clusters
    info.clusters_seeded = not clusters.warming_up
    info.clusters = [
        {"cluster": cid, "name": clusters.profile(cid).name, "size": int(size)}
        for cid, size in enumerate(clusters.sizes)
    ]
    return info


def load(settings: Settings) -> Catalogue:
    """The catalogue of the live topic (UserError: no broker, no topic, or nothing on it)."""
    topic = settings.model_snapshots_topic
    require_topics(settings, [topic], timeout=TIMEOUT_S)
    try:
        found = catalogue(settings, read_model_log(settings, timeout=TIMEOUT_S))
    except KafkaException as exc:
        raise UserError(f"could not read {topic}: {exc.args[0].str()}") from None
    if not found.versions:
        raise UserError(
            f"no model versions on {topic} yet (with learning=shared the trainer cuts one "
            f"every {settings.model_epoch_s:g} s of event time, once every partition is past it)"
        )
    return found


# --- rendering -----------------------------------------------------------------------------------


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _auc(quality: dict[str, Any]) -> str:
    auc = quality.get("roc_auc")
    return "-" if auc is None else f"{auc:.3f}"


def _state(info: VersionInfo) -> str:
    words = [w for w, on in (("following", info.following), ("pinned", info.pinned)) if on]
    if "newest" in info.held_as:
        words.append("newest")
    if info.refused is not None:
        words.append(f"REFUSED: {info.refused}")
    return ", ".join(words)


def render_list(found: Catalogue) -> str:
    header = ["version", "published (UTC)", "examples", "purchase labels", "auc", "churn labels"]
    header += ["auc", ""]
    rows: list[list[str]] = [header]
    for v in found.versions:
        rows.append(
            [
                v.version,
                _iso(v.published_ms) or "-",
                _count(v.examples),
                _count(v.purchase.get("labels")),
                _auc(v.purchase),
                _count(v.churn.get("labels")),
                _auc(v.churn),
                _state(v),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    if found.pinned is not None:
        lines.append(
            f"pinned to {found.pinned} since {_iso(found.pinned_at_ms) or '?'}: workers ignore "
            "newer versions until `stream-app models unpin`"
        )
    else:
        lines.append("no pin: workers follow the newest version")
    return "\n".join(lines)


def render_show(info: VersionInfo) -> str:
    def quality(q: dict[str, Any]) -> str:
        if not q:
            return "-"
        return (
            f"{_count(q.get('labels'))} labels, positive rate {q.get('positive_rate')}, "
            f"AUC {_auc(q)}, log loss {q.get('log_loss')}"
        )

    lines = [
        f"version: {info.version}",
        f"published: {_iso(info.published_ms) or '-'}",
        f"examples learned: {_count(info.examples)}",
        f"purchase: {quality(info.purchase)}",
        f"churn: {quality(info.churn)}",
        f"following: {'yes' if info.following else 'no'}",
        f"pinned: {'yes' if info.pinned else 'no'}",
        f"held as: {', '.join(info.held_as)}",
        f"size: {len(info.record):,} bytes",
    ]
    if info.refused is not None:
        lines.append(f"refused by the workers: {info.refused}")
    lines += [f"cluster {c['cluster']}: {c['name']} ({c['size']:,} members)" for c in info.clusters]
    return "\n".join(lines)


# --- pin and unpin -------------------------------------------------------------------------------


def _write(settings: Settings, key: bytes, value: bytes | None, headers: list[Any]) -> None:
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())

    producer = Producer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "message.timeout.ms": int(TIMEOUT_S * 2000),
            "message.max.bytes": 16 * 1024 * 1024,
        }
    )
    topic = settings.model_snapshots_topic
    producer.produce(
        topic, key=key, value=value, partition=0, headers=headers, on_delivery=delivered
    )
    if producer.flush(TIMEOUT_S * 3) or errors:
        why = errors[0] if errors else "no acknowledgement from the broker"
        raise UserError(f"could not write to {topic}: {why}")


def step_back(current: VersionInfo | None, target: VersionInfo) -> str | None:
    """What switching from `current` to `target` would do to every customer at once, if
    anything: a version before the tier warm-up makes every tier `unscored` at the customer's
    next event, one in its cluster warm-up puts everyone in cluster 0."""
    if current is None:
        return None
    if current.tiered and not target.tiered:
        labels = _count(target.purchase.get("labels"))
        return (
            f"its purchase model learned {labels} labels, too few for tiers "
            "(segmentation.tier_warm_up_labels): every customer would turn `unscored`"
        )
    if current.clusters_seeded and not target.clusters_seeded:
        return "its clusters are still warming up: every customer would move to cluster 0"
    return None


def pin(settings: Settings, ref: str, force: bool = False) -> str:
    found = load(settings)
    info = found.find(ref, settings.model_snapshots_topic)
    if info.refused is not None:
        raise UserError(
            f"model version {info.version} would be refused by the workers: {info.refused}"
        )
    if found.pinned == info.version:
        return f"already pinned to {info.version}"
    current = next((v for v in found.versions if v.following), None)
    harm = step_back(current, info)
    if harm is not None and not force:
        raise UserError(f"not pinning {info.version}: {harm} (--force pins it anyway)")
    headers = [] if info.published_ms is None else [(PUBLISHED_HEADER, str(info.published_ms))]
    _write(settings, pin_key(settings.app_id), info.record, headers)
    return (
        f"pinned {info.version}: every worker scores with it from its next batch and ignores "
        "newer versions until `stream-app models unpin` (the trainer keeps learning)"
    )


def unpin(settings: Settings) -> str:
    found = load(settings)
    if found.pinned is None:
        return f"no pin set: workers follow the newest version {found.newest}"
    _write(settings, pin_key(settings.app_id), None, [])
    return f"unpinned {found.pinned}: workers follow the newest version {found.newest} again"


def run_models_command(
    action: str, ref: str | None, as_json: bool, settings: Settings, force: bool = False
) -> int:
    if action == "list":
        found = load(settings)
        if as_json:
            body = {
                "versions": [v.summary() for v in found.versions],
                "newest": found.newest,
                "pinned": found.pinned,
                "following": found.following,
            }
            print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        else:
            print(render_list(found))
    elif action == "show":
        assert ref is not None
        info = load(settings).find(ref, settings.model_snapshots_topic)
        if as_json:
            print(orjson.dumps(info.details(), option=orjson.OPT_INDENT_2).decode())
        else:
            print(render_show(info))
    elif action == "pin":
        assert ref is not None
        print(pin(settings, ref, force))
    else:
        print(unpin(settings))
    return 0
