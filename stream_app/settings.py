"""Configuration: the only module that reads the environment.

Every knob is an environment variable with the prefix ``STREAM_APP_``; nested segmentation knobs
use a double underscore, e.g. ``STREAM_APP_SEGMENTATION__PURCHASE_HORIZON_DAYS=14``. A command
loads them with `load_settings`, which refuses an unknown ``STREAM_APP_*`` variable (naming the
closest known one) and turns an invalid value into one line naming its variable.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from stream_app.errors import UserError

if TYPE_CHECKING:
    from stream_app.core.learning import Epochs

ENV_PREFIX: Final = "STREAM_APP_"
NESTED_DELIMITER: Final = "__"
# Variables with the prefix that are not settings but belong to the project (the test command's
# own); the unknown-variable check lets them pass and the tests keep them.
NOT_SETTINGS: Final = frozenset({"STREAM_APP_TEST_BOOTSTRAP", "STREAM_APP_TEST_RUN_DIR"})
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


MIN_SIGNING_KEY_CHARS: Final = 32


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "stream_app"


class SegmentationSettings(BaseModel):
    """Domain knobs: features, models, lifecycle thresholds and segment policy (no I/O)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 42
    # Lifecycle stages, in days of event time.
    new_customer_days: float = Field(30.0, gt=0)
    at_risk_after_days: float = Field(30.0, gt=0)
    lapsed_after_days: float = Field(90.0, gt=0)
    reactivated_days: float = Field(30.0, gt=0)
    session_gap_minutes: float = Field(30.0, gt=0)
    # Propensity: delayed labels.
    purchase_horizon_days: float = Field(30.0, gt=0)
    churn_horizon_days: float = Field(60.0, gt=0)
    snapshot_interval_hours: float = Field(24.0, gt=0)
    max_pending_snapshots: int = Field(4, ge=1, le=32)
    learning_rate: float = Field(0.01, gt=0)
    # Propensity tiers with hysteresis: enter a tier above `enter`, leave it below `leave`.
    # Measured on Online Retail (issue 13): the scores carried by tier changes rank purchases
    # with AUC 0.70+ and entering high > medium > low, high >= 2x low (docs/how-it-works.md).
    high_enter: float = Field(0.65, gt=0, lt=1)
    high_leave: float = Field(0.55, gt=0, lt=1)
    medium_enter: float = Field(0.30, gt=0, lt=1)
    medium_leave: float = Field(0.20, gt=0, lt=1)
    # A tier is held at least this long before it changes again (0: no dwell), so a regular
    # buyer does not go high at each order and down at the next re-scoring.
    tier_min_dwell_days: float = Field(7.0, ge=0)
    # Tiers stay `unscored` until the purchase model has learned from this many matured labels
    # (its score is reported from WARM_UP_LABELS on): an early model's tier changes ranked
    # outcomes no better than AUC 0.59 on Online Retail (labels 200 to ~5,000, its first 2 months).
    tier_warm_up_labels: int = Field(6000, ge=0)
    # Behavioural clusters.
    cluster_count: int = Field(6, ge=2, le=32)
    # Floor under a centre's step: 0.0005 moved 2.2% of event-time probes per 10% checkpoint on
    # Online Retail, 0.0002 moves 2.0% (load_tests/bench_offline.py).
    cluster_min_step: float = Field(0.0002, gt=0, le=1)
    cluster_warmup: int = Field(5000, ge=10)  # measured: max 1.7% probe ids moved per 10% step
    # The scaler also needs enough event time: frozen on a clickstream's first hours, it called a
    # 20-hour gap "dormant" (issue 13). A week covers the weekly rhythm.
    cluster_warmup_days: float = Field(7.0, ge=0)
    # A centre whose share of recent observations falls below this is dead: it is re-seeded by
    # splitting the cluster that spreads most (Spark StreamingKMeans' rule). Measured on Online
    # Retail: at 0.005 a split restructures 7% of customers at once (stability 7.3% in that
    # step); at 0.002 nothing real is split and ids move <= 1.65% per step (bench_offline).
    cluster_min_share: float = Field(0.002, ge=0, lt=0.5)
    cluster_min_dwell_hours: float = Field(24.0, ge=0)
    cluster_confirmations: int = Field(2, ge=1, le=100)
    # Ordering and idempotency.
    allowed_lateness_seconds: float = Field(300.0, ge=0)
    # Event time is untrusted: an event more than this far ahead of the clock (live: the
    # worker's wall clock; offline: the stream's own progress) is dead-lettered as future_event.
    max_future_skew_seconds: float = Field(300.0, ge=0)
    # Offline there is no wall clock: the stream's progress (newest accepted event time) is the
    # clock, and quiet periods in real data are long (Online Retail: 12 days at Christmas).
    offline_max_gap_days: float = Field(365.0, gt=0)
    recent_event_ids: int = Field(32, ge=1, le=1024)
    top_categories: int = Field(5, ge=1, le=20)

    @model_validator(mode="after")
    def _check_thresholds(self) -> SegmentationSettings:
        if not self.high_leave < self.high_enter:
            raise ValueError("high_leave must be below high_enter")
        if not self.medium_leave < self.medium_enter:
            raise ValueError("medium_leave must be below medium_enter")
        if not self.medium_enter <= self.high_leave:
            raise ValueError("medium_enter must not exceed high_leave")
        if not self.at_risk_after_days < self.lapsed_after_days:
            raise ValueError("at_risk_after_days must be below lapsed_after_days")
        return self

    @cached_property
    def version(self) -> str:
        """Segment-definition version: changes whenever a knob that shapes segments changes."""
        digest = hashlib.sha256(orjson.dumps(self.model_dump(), option=orjson.OPT_SORT_KEYS))
        return f"seg-1.{digest.hexdigest()[:10]}"


class Settings(BaseSettings):
    """Effective settings of a stream_app process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, frozen=True, extra="forbid"
    )

    # Broker.
    kafka_port: int = Field(19092, ge=1024, le=65535)
    kafka_controller_port: int = Field(19093, ge=1024, le=65535)
    bootstrap_servers: str = ""
    kafka_version: str = "3.9.1"
    kafka_heap: str = "512m"
    kafka_start_timeout_s: float = Field(90.0, gt=0)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    state_dir: Path = Path(".stream_app")
    # Topics.
    clickstream_topic: str = "clickstream"
    transactions_topic: str = "transactions"
    segment_changes_topic: str = "segment-changes"
    segment_membership_topic: str = "segment-membership"
    dead_letters_topic: str = "dead-letters"
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)
    # Worker.
    app_id: str = "stream-app"
    web_host: str = "127.0.0.1"
    web_port: int = Field(6066, ge=1024, le=65535)
    max_event_bytes: int = Field(65536, ge=256, le=10 * 1024 * 1024)
    model_snapshot_interval_s: float = Field(30.0, gt=0)
    # Where the models learn (docs/how-it-works.md, "One model for every worker"). "shared":
    # workers score with the newest version one trainer publishes and send it what to learn
    # from; "in_process": each worker learns as it scores (deterministic: one worker on one
    # partition equals the offline replay; snapshots every model_snapshot_interval_s).
    learning: Literal["shared", "in_process"] = "shared"
    # Shared learning in event-time epochs (docs/how-it-works.md): the trainer cuts a version
    # at every multiple of `model_epoch_s` of event time (all examples before it, none after),
    # and an event at time t is scored by the newest version cut at least `model_lag_s` before
    # t. A worker whose partitions run ahead of the slowest one holds their events until that
    # version is final (at most `model_wait_max_s`, then it scores with what it has and counts
    # it in `model_waits_expired`), so the segments do not depend on the number of workers.
    model_epoch_s: float = Field(86400.0, gt=0)
    model_lag_s: float = Field(86400.0, ge=0)
    model_wait_max_s: float = Field(30.0, gt=0)
    # A partition with nothing unread and nothing held for this long tells the trainer it is
    # idle (Flink's idleness): versions are cut without waiting for it, so one quiet partition
    # does not hold back every other one (and the model). When it gets events again, its
    # examples older than what was cut meanwhile are late: dropped and counted.
    model_idle_after_s: float = Field(10.0, gt=0)
    # Besides the newest version (under the app id key, which compaction replaces), the trainer
    # keeps a history for `stream-app models`: the first version, then at most one version per
    # this many seconds, each under its own key `<app_id>/history/<version>` (compaction keeps
    # them), the newest `model_history_keep` of them (older ones get tombstones).
    model_history_interval_s: float = Field(3600.0, gt=0)
    model_history_keep: int = Field(168, ge=1)
    # And so that compaction never takes a version a restarted worker needs (events it reads
    # again are scored by the version of their own time): every version also goes under
    # `<app_id>/recent/<epoch number mod model_recent_keep>`, so the newest this many epochs'
    # versions survive compaction. It must cover the event time a worker's uncommitted input
    # spans (a backlog read at 25,000x covers about a day per commit interval).
    model_recent_keep: int = Field(32, ge=2)
    # With a key, model records (docs/operations.md, "Model records") are signed with
    # HMAC-SHA256 and a record without a valid signature is refused. The previous key only
    # verifies, so records written before a key rotation still load; it never signs.
    # At least 32 characters (e.g. `openssl rand -hex 32`); never printed.
    model_signing_key: SecretStr | None = None
    model_signing_previous_key: SecretStr | None = None
    rocksdb_block_cache_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    stream_buffer_maxsize: int = Field(16384, ge=64)
    producer_linger_s: float = Field(0.005, ge=0)
    merge_max_wait_s: float = Field(1.0, gt=0)
    # How long the group waits for a silent (crashed) worker before handing its partitions on.
    consumer_session_timeout_s: float = Field(10.0, ge=6, le=300)
    # Faust stalls every stream while more than this many table-changelog records await sending
    # (its default, 100, cost ~70 ms per stall; faust-streaming issue 173).
    producer_buffer_max_messages: int = Field(10_000, ge=100)
    # aiokafka's per-partition batch size in bytes. Faust's default, 16 KiB, fills after ~15
    # customer states, so a batch of table writes became many small produce requests; 256 KiB
    # measured 7-9% less worker CPU per event on bench_live's backlog (two paired runs).
    producer_max_batch_size: int = Field(262_144, ge=1024, le=16 * 1024 * 1024)
    # Most events the agent processes as one batch (states written once per customer per batch;
    # 1 = per event). A batch is only what Faust has already buffered, so it never waits. 5000
    # cost ~10% less CPU per event on a backlog, but holds acks and the loop ~5x longer.
    batch_max_events: int = Field(1000, ge=1, le=100_000)
    # Customer states kept decoded in memory per partition (saves a table read and a decode per
    # event of a recently seen customer; ~2-4 KB each). 0 disables it.
    state_cache_size: int = Field(20_000, ge=0)
    # Compression of everything the worker produces ("lz4"/"zstd" use cramjam, a dependency).
    # On loopback, lz4 measured slower (the CPU it costs exceeds the socket time it saves).
    producer_compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    log_level: str = "INFO"  # one of LOG_LEVELS, any case (stored upper-case)
    # /ready answers 503 when input is waiting but nothing was processed for this long, or the
    # broker has not answered a probe for this long.
    ready_stall_s: float = Field(30.0, gt=0)
    broker_probe_interval_s: float = Field(5.0, gt=0)
    # Repeated identical log lines (e.g. connection errors) are written once per interval, with
    # the number suppressed.
    log_repeat_interval_s: float = Field(30.0, gt=0)
    segmentation: SegmentationSettings = Field(default_factory=SegmentationSettings)

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_name(cls, value: object) -> object:
        if isinstance(value, str) and value.upper() in LOG_LEVELS:
            return value.upper()
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}")

    @field_validator("model_signing_key", "model_signing_previous_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SIGNING_KEY_CHARS:
            raise ValueError(f"must be at least {MIN_SIGNING_KEY_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _previous_key_needs_a_key(self) -> Settings:
        if self.model_signing_previous_key is not None and self.model_signing_key is None:
            previous, key = env_name("model_signing_previous_key"), env_name("model_signing_key")
            raise ValueError(f"{previous} is set without {key}")
        return self

    @model_validator(mode="after")
    def _lag_covers_lateness(self) -> Settings:
        # The slowest partition must always be able to go on: its next event's version is
        # final once its own watermark (event time minus the lateness) has passed the boundary.
        if self.model_lag_s < self.segmentation.allowed_lateness_seconds:
            raise ValueError(
                f"{env_name('model_lag_s')} ({self.model_lag_s:g}) must be at least the allowed "
                f"lateness ({self.segmentation.allowed_lateness_seconds:g} s)"
            )
        return self

    def epochs(self) -> Epochs:
        """Where the shared trainer cuts versions and which one scores what."""
        from stream_app.core.learning import Epochs  # the core imports settings, not back

        s = self.segmentation
        return Epochs(
            epoch_s=self.model_epoch_s,
            lag_s=self.model_lag_s,
            purchase_horizon_s=s.purchase_horizon_days * 86400.0,
            churn_horizon_s=s.churn_horizon_days * 86400.0,
        )

    @model_validator(mode="after")
    def _default_bootstrap(self) -> Settings:
        if not self.bootstrap_servers:
            object.__setattr__(self, "bootstrap_servers", f"127.0.0.1:{self.kafka_port}")
        return self

    @property
    def input_topics(self) -> tuple[str, str]:
        return (self.clickstream_topic, self.transactions_topic)

    @property
    def customers_changelog_topic(self) -> str:
        """Faust's changelog of the customer-state table (pre-created, compacted)."""
        return f"{self.app_id}-customers-changelog"

    @property
    def model_snapshots_topic(self) -> str:
        """Compacted topic holding the newest model record (the shared trainer's versions, or
        an in-process worker's snapshots)."""
        return f"{self.app_id}-model-snapshots"

    @property
    def learning_examples_topic(self) -> str:
        """One partition: what the shared trainer learns from, in order."""
        return f"{self.app_id}-learning-examples"

    @property
    def model_signing_keys(self) -> tuple[bytes, ...]:
        """The keys a model record's signature may be made with, the signing one first; empty
        when no key is configured (records are then neither signed nor required to be)."""
        keys = (self.model_signing_key, self.model_signing_previous_key)
        return tuple(key.get_secret_value().encode() for key in keys if key is not None)

    @property
    def kafka_dir(self) -> Path:
        """Where the broker's data, logs and pid file live."""
        return self.state_dir / "kafka"

    def renamed(self, name: str, **overrides: Any) -> Settings:
        """These settings with an app id (so a consumer group and internal topics) and input
        and output topics of their own, all named after ``name``: a demo, a shadow run or a
        test on a shared broker sees no other application's messages or offsets."""
        names = {
            "app_id": name,
            "clickstream_topic": f"{name}-clickstream",
            "transactions_topic": f"{name}-transactions",
            "segment_changes_topic": f"{name}-segment-changes",
            "segment_membership_topic": f"{name}-segment-membership",
            "dead_letters_topic": f"{name}-dead-letters",
        }
        return Settings(**{**self.model_dump(), **names, **overrides})

    def to_env(self) -> dict[str, str]:
        """The ``STREAM_APP_*`` variables that make a child process load exactly these settings."""
        env: dict[str, str] = {}
        for name, dumped in self.model_dump(mode="json").items():
            field = getattr(self, name)
            if field is None:
                continue  # an unset optional setting: the child's default is None too
            value = field.get_secret_value() if isinstance(field, SecretStr) else dumped
            text = orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
            env[f"{ENV_PREFIX}{name.upper()}"] = text
        return env

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2)


def env_name(*loc: str | int) -> str:
    """The variable of a setting: ``env_name("segmentation", "seed")`` is
    ``STREAM_APP_SEGMENTATION__SEED``."""
    return ENV_PREFIX + NESTED_DELIMITER.join(str(part) for part in loc).upper()


def is_prefixed(name: str) -> bool:
    """True for a variable pydantic-settings would read as a setting (it ignores case)."""
    return name.upper().startswith(ENV_PREFIX)


def known_variables() -> frozenset[str]:
    """Every settings variable: one per field, plus one per knob of each nested model."""
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(env_name(name))
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names.update(env_name(name, knob) for knob in nested.model_fields)
    return frozenset(names)


def closest_variable(name: str, known: frozenset[str]) -> str | None:
    """The known variable ``name`` most likely misspells. A knob of a known nested model is
    matched among that model's knobs only: ``..._SEGMENTATION__SEDE`` gives ``..._SEED``."""
    upper = name.upper()
    head, delimiter, knob = upper.partition(NESTED_DELIMITER)
    if delimiter and head in known:
        scope, typed = head + NESTED_DELIMITER, knob
    else:
        scope, typed = ENV_PREFIX, upper.removeprefix(ENV_PREFIX)
    candidates = [k.removeprefix(scope) for k in sorted(known) if k.startswith(scope)]
    found = difflib.get_close_matches(typed, candidates, n=1)
    return scope + found[0] if found else None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``STREAM_APP_*`` variables of ``environ`` that are neither settings nor exempt."""
    allowed = known_variables() | NOT_SETTINGS
    return sorted(n for n in environ if is_prefixed(n) and n.upper() not in allowed)


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse unknown ``STREAM_APP_*`` variables: a typo would otherwise be silently ignored."""
    unknown = unknown_variables(environ)
    if not unknown:
        return
    first = unknown[0]
    guess = closest_variable(first, known_variables())
    hint = f"did you mean {guess}?" if guess else "no setting has a similar name; unset it"
    more = f"; also unknown: {', '.join(unknown[1:])}" if unknown[1:] else ""
    raise UserError(f"unknown setting {first} ({hint}){more}")


def describe_invalid(error: ValidationError) -> str:
    """One line for invalid settings, naming the variable of the first problem."""
    errors = error.errors(include_url=False)
    line = _describe_detail(errors[0])
    return line + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _describe_detail(detail: ErrorDetails) -> str:
    message = detail["msg"].removeprefix("Value error, ")
    if not detail["loc"]:
        return f"invalid settings: {message}"
    return f"invalid setting {env_name(*detail['loc'])}: {message}"


def _describe_unparsable(error: SettingsError) -> str:
    """pydantic-settings could not decode a complex value (JSON) from the environment."""
    field = re.search(r'field "(\w+)"', str(error))
    where = env_name(field.group(1)) if field else "value"
    cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
    return f"invalid setting {where}: cannot parse the value as JSON{cause}"


def load_settings(**overrides: object) -> Settings:
    """The settings of a command: the environment, with explicit overrides winning.

    Raises UserError, as one line naming the variable, for an unknown ``STREAM_APP_*`` variable
    or an invalid value.
    """
    check_environment(os.environ)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise UserError(describe_invalid(exc)) from None
    except SettingsError as exc:
        raise UserError(_describe_unparsable(exc)) from None
