"""Tests for stream_app.settings and the CLI's handling of settings and user mistakes.

Every test starts from an environment without any ``STREAM_APP_*`` setting (the autouse fixture
in tests/conftest.py), so the developer's shell cannot change the outcome.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from stream_app.cli import main
from stream_app.contracts.schemas import schema_path, write_schemas
from stream_app.errors import UserError
from stream_app.settings import (
    LOG_LEVELS,
    NOT_SETTINGS,
    SegmentationSettings,
    Settings,
    check_environment,
    closest_variable,
    known_variables,
    load_settings,
    unknown_variables,
)


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


# --- defaults and environment ---------------------------------------------------------------------


def test_defaults() -> None:
    s = Settings()
    assert s.kafka_port == 19092
    assert s.bootstrap_servers == "127.0.0.1:19092"
    assert s.partitions == 4
    assert s.replication_factor == 1
    assert s.input_topics == ("clickstream", "transactions")
    assert (s.segment_changes_topic, s.segment_membership_topic, s.dead_letters_topic) == (
        "segment-changes",
        "segment-membership",
        "dead-letters",
    )
    assert s.max_event_bytes == 65536
    assert s.state_dir == Path(".stream_app")
    assert s.kafka_dir == Path(".stream_app") / "kafka"
    assert s.segmentation == SegmentationSettings()
    seg = s.segmentation
    assert (seg.high_enter, seg.high_leave, seg.medium_enter, seg.medium_leave) == (
        0.65,
        0.55,
        0.3,
        0.2,
    )
    assert (seg.tier_min_dwell_days, seg.tier_warm_up_labels) == (7.0, 6000)
    assert (seg.at_risk_after_days, seg.lapsed_after_days) == (30.0, 90.0)
    assert seg.purchase_horizon_days == 30.0
    assert seg.cluster_count == 6


def test_environment_with_prefix_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "12")
    monkeypatch.setenv("STREAM_APP_CLICKSTREAM_TOPIC", "clicks-v2")
    monkeypatch.setenv("PARTITIONS", "99")  # no prefix: ignored
    s = load_settings()
    assert s.partitions == 12
    assert s.clickstream_topic == "clicks-v2"


def test_nested_segmentation_knob_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_SEGMENTATION__PURCHASE_HORIZON_DAYS", "14")
    monkeypatch.setenv("STREAM_APP_SEGMENTATION__CLUSTER_COUNT", "8")
    seg = Settings().segmentation
    assert seg.purchase_horizon_days == 14.0
    assert seg.cluster_count == 8
    assert seg.churn_horizon_days == 60.0  # the others keep their defaults


def test_explicit_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "12")
    assert load_settings(partitions=2).partitions == 2


def test_bootstrap_servers_derive_from_kafka_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_KAFKA_PORT", "29092")
    assert Settings().bootstrap_servers == "127.0.0.1:29092"
    assert Settings(kafka_port=30000).bootstrap_servers == "127.0.0.1:30000"
    explicit = Settings(kafka_port=30000, bootstrap_servers="broker:9092")
    assert explicit.bootstrap_servers == "broker:9092"


INVALID: list[tuple[str, dict[str, object], str]] = [
    ("partitions 0", {"partitions": 0}, "partitions"),
    ("port below 1024", {"kafka_port": 80}, "kafka_port"),
    ("unknown setting", {"partitons": 4}, "partitons"),
    (
        "high_leave equal to high_enter",
        {"segmentation": {"high_enter": 0.6, "high_leave": 0.6}},
        "high_leave must be below high_enter",
    ),
    (
        "high_leave above high_enter",
        {"segmentation": {"high_enter": 0.6, "high_leave": 0.7}},
        "high_leave must be below high_enter",
    ),
    (
        "medium_leave not below medium_enter",
        {"segmentation": {"medium_enter": 0.3, "medium_leave": 0.3}},
        "medium_leave must be below medium_enter",
    ),
    (
        "medium_enter above high_leave",
        {"segmentation": {"medium_enter": 0.56, "medium_leave": 0.2}},
        "medium_enter must not exceed high_leave",
    ),
    (
        "at_risk not before lapsed",
        {"segmentation": {"at_risk_after_days": 90, "lapsed_after_days": 90}},
        "at_risk_after_days must be below lapsed_after_days",
    ),
    ("one cluster", {"segmentation": {"cluster_count": 1}}, "cluster_count"),
    ("unknown knob", {"segmentation": {"purchase_horizon": 3}}, "purchase_horizon"),
]


@pytest.mark.parametrize(
    ("values", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_values_are_rejected(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_invalid_value_from_environment_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "0")
    with pytest.raises(ValidationError, match="partitions"):
        Settings()


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.partitions = 8  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        s.segmentation.seed = 7  # type: ignore[misc]
    assert (s.partitions, s.segmentation.seed) == (4, 42)


def test_segmentation_version_is_stable() -> None:
    a, b = SegmentationSettings(), SegmentationSettings(purchase_horizon_days=30)
    assert a.version == b.version
    assert a.version == Settings().segmentation.version
    assert a.version.startswith("seg-1.")
    assert len(a.version) == len("seg-1.") + 10


@pytest.mark.parametrize(
    "knob",
    [
        {"purchase_horizon_days": 14},
        {"seed": 43},
        {"high_enter": 0.7},
        {"tier_min_dwell_days": 3},
        {"tier_warm_up_labels": 500},
        {"cluster_confirmations": 3},
        {"session_gap_minutes": 45},
        {"top_categories": 6},
    ],
    ids=lambda knob: next(iter(knob)),
)
def test_segmentation_version_changes_when_a_knob_changes(knob: dict[str, object]) -> None:
    changed = SegmentationSettings(**knob)
    assert changed.version != SegmentationSettings().version
    assert changed.version == SegmentationSettings(**knob).version


def test_segmentation_version_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_SEGMENTATION__PURCHASE_HORIZON_DAYS", "14")
    assert Settings().segmentation.version == (
        SegmentationSettings(purchase_horizon_days=14).version
    )


@pytest.mark.parametrize("given", ["DEBUG", "debug", "Warning", "error", "CRITICAL"])
def test_log_level_accepts_standard_names_in_any_case(given: str) -> None:
    assert Settings(log_level=given).log_level == given.upper()


@pytest.mark.parametrize("given", ["LOUD", "WARN", "", "10", "info "])
def test_log_level_refuses_other_names(given: str) -> None:
    with pytest.raises(ValidationError, match="must be one of DEBUG, INFO, WARNING"):
        Settings(log_level=given)


def test_log_level_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_LOG_LEVEL", "warning")
    assert load_settings().log_level == "WARNING"
    assert LOG_LEVELS == ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# --- model signing keys --------------------------------------------------------------------------

SIGNING_KEY = "0123456789abcdef" * 4


def test_no_signing_key_by_default() -> None:
    s = Settings()
    assert (s.model_signing_key, s.model_signing_previous_key, s.model_signing_keys) == (
        None,
        None,
        (),
    )
    assert not any("SIGNING" in name for name in s.to_env())  # unset stays unset in a child


def test_signing_keys_from_environment_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    previous = "f" * 40
    monkeypatch.setenv("STREAM_APP_MODEL_SIGNING_KEY", SIGNING_KEY)
    monkeypatch.setenv("STREAM_APP_MODEL_SIGNING_PREVIOUS_KEY", previous)
    s = load_settings()
    assert s.model_signing_keys == (SIGNING_KEY.encode(), previous.encode())  # signing key first
    assert SIGNING_KEY not in repr(s) and SIGNING_KEY.encode() not in s.to_json()
    env = s.to_env()  # a worker process gets the real keys
    assert env["STREAM_APP_MODEL_SIGNING_KEY"] == SIGNING_KEY
    assert env["STREAM_APP_MODEL_SIGNING_PREVIOUS_KEY"] == previous
    assert unknown_variables(env) == []
    assert s.renamed("other").model_signing_keys == s.model_signing_keys


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"STREAM_APP_MODEL_SIGNING_KEY": "short"},
            "invalid setting STREAM_APP_MODEL_SIGNING_KEY: must be at least 32 characters",
        ),
        (
            {"STREAM_APP_MODEL_SIGNING_PREVIOUS_KEY": SIGNING_KEY},
            "invalid settings: STREAM_APP_MODEL_SIGNING_PREVIOUS_KEY is set without "
            "STREAM_APP_MODEL_SIGNING_KEY",
        ),
    ],
    ids=["too-short", "previous-without-key"],
)
def test_invalid_signing_keys_are_one_line(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as raised:
        load_settings()
    assert str(raised.value) == message  # the value itself is never echoed


# --- unknown variables ----------------------------------------------------------------------------


def test_known_variables_are_the_fields_and_the_nested_knobs() -> None:
    known = known_variables()
    assert {"STREAM_APP_PARTITIONS", "STREAM_APP_LOG_LEVEL", "STREAM_APP_SEGMENTATION"} <= known
    assert {"STREAM_APP_SEGMENTATION__SEED", "STREAM_APP_SEGMENTATION__HIGH_ENTER"} <= known
    assert len(known) == len(Settings.model_fields) + len(SegmentationSettings.model_fields)
    assert not known & NOT_SETTINGS


def test_every_variable_a_child_gets_is_known() -> None:
    """Workers are configured by `Settings.to_env`; the check must never refuse those."""
    env = Settings(partitions=3, segmentation=SegmentationSettings(seed=7)).to_env()
    assert unknown_variables(env) == []
    check_environment(env)


def test_known_exempt_and_unprefixed_variables_pass() -> None:
    check_environment(
        {
            "STREAM_APP_PARTITIONS": "3",
            "STREAM_APP_SEGMENTATION__SEED": "1",
            "stream_app_web_port": "7000",  # pydantic-settings ignores case, and so does the check
            "STREAM_APP_TEST_BOOTSTRAP": "127.0.0.1:9092",
            "STREAM_APP_TEST_RUN_DIR": "/tmp/run",
            "PARTITONS": "4",
            "HOME": "/root",
        }
    )


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("STREAM_APP_PARTITONS", "STREAM_APP_PARTITIONS"),
        ("STREAM_APP_LOGLEVEL", "STREAM_APP_LOG_LEVEL"),
        ("stream_app_web_prot", "STREAM_APP_WEB_PORT"),
        ("STREAM_APP_SEGMENTATION__SEDE", "STREAM_APP_SEGMENTATION__SEED"),
        ("STREAM_APP_SEGMENTATION_SEED", "STREAM_APP_SEGMENTATION__SEED"),
        ("STREAM_APP_SEGMENTATION__CLUSTERCOUNT", "STREAM_APP_SEGMENTATION__CLUSTER_COUNT"),
        ("STREAM_APP_BOGUS", None),
        ("STREAM_APP_SEGMENTATION__BOGUS", None),  # compared with the knobs only
    ],
)
def test_closest_variable(name: str, guess: str | None) -> None:
    assert closest_variable(name, known_variables()) == guess


def test_unknown_variable_is_refused_with_the_closest_name() -> None:
    with pytest.raises(UserError) as raised:
        check_environment({"STREAM_APP_PARTITONS": "4", "STREAM_APP_PARTITIONS": "4"})
    assert str(raised.value) == (
        "unknown setting STREAM_APP_PARTITONS (did you mean STREAM_APP_PARTITIONS?)"
    )


def test_unknown_nested_knob_is_refused_with_the_closest_knob() -> None:
    with pytest.raises(UserError, match=r"STREAM_APP_SEGMENTATION__SEDE \(did you mean "):
        check_environment({"STREAM_APP_SEGMENTATION__SEDE": "3"})


def test_several_unknown_variables_are_one_line() -> None:
    with pytest.raises(UserError) as raised:
        check_environment({"STREAM_APP_ZZZ": "1", "STREAM_APP_BOGUS": "1", "STREAM_APP_YYY": "1"})
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        "unknown setting STREAM_APP_BOGUS (no setting has a similar name; unset it); "
        "also unknown: STREAM_APP_YYY, STREAM_APP_ZZZ"
    )


def test_load_settings_checks_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITONS", "4")
    with pytest.raises(UserError, match="unknown setting STREAM_APP_PARTITONS"):
        load_settings()


def test_load_settings_names_the_variable_of_an_invalid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAM_APP_WEB_PORT", "80")
    with pytest.raises(UserError, match=r"^invalid setting STREAM_APP_WEB_PORT: Input should be"):
        load_settings()


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_config_prints_the_effective_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAM_APP_PARTITIONS", "6")
    monkeypatch.setenv("STREAM_APP_SEGMENTATION__PURCHASE_HORIZON_DAYS", "14")
    assert main(["config"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    printed = orjson.loads(out.out)
    assert printed == orjson.loads(Settings().to_json())
    assert printed["partitions"] == 6
    assert printed["bootstrap_servers"] == "127.0.0.1:19092"
    assert printed["segmentation"]["purchase_horizon_days"] == 14.0
    assert printed["segmentation"]["seed"] == 42


def test_cli_unknown_command_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bogus"]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert "'bogus'" in lines[0]


def test_cli_missing_command_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("error:")


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        (
            "STREAM_APP_PARTITIONS",
            "0",
            "error: invalid setting STREAM_APP_PARTITIONS: "
            "Input should be greater than or equal to 1",
        ),
        (
            "STREAM_APP_PARTITIONS",
            "many",
            "error: invalid setting STREAM_APP_PARTITIONS: "
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            "STREAM_APP_SEGMENTATION__HIGH_LEAVE",
            "0.7",
            "error: invalid setting STREAM_APP_SEGMENTATION: high_leave must be below high_enter",
        ),
        (
            "STREAM_APP_SEGMENTATION__CLUSTER_COUNT",
            "1",
            "error: invalid setting STREAM_APP_SEGMENTATION__CLUSTER_COUNT: "
            "Input should be greater than or equal to 2",
        ),
        (
            "STREAM_APP_LOG_LEVEL",
            "LOUD",
            "error: invalid setting STREAM_APP_LOG_LEVEL: "
            "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'LOUD'",
        ),
        (
            "STREAM_APP_PARTITONS",
            "4",
            "error: unknown setting STREAM_APP_PARTITONS (did you mean STREAM_APP_PARTITIONS?)",
        ),
    ],
)
def test_cli_invalid_env_setting_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    line: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["config"]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [line]
    assert out.out == ""


def test_cli_malformed_json_env_setting_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAM_APP_SEGMENTATION", "not json")
    assert main(["config"]) == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith("error: invalid setting STREAM_APP_SEGMENTATION: ")


def test_cli_schemas_check_passes_on_fresh_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_schemas(tmp_path)
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"schemas in {tmp_path} match the models\n"


def test_cli_schemas_check_fails_on_a_tampered_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_schemas(tmp_path)
    path = schema_path(tmp_path, "segment_change")
    path.write_bytes(path.read_bytes() + b"\n")
    assert main(["schemas", "--check", "--dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        f"error: schemas out of date in {tmp_path}: segment_change (run `stream-app schemas`)"
    ]
    assert out.out == ""


def test_cli_schemas_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out"
    assert main(["schemas", "--dir", str(target)]) == 0
    written = sorted(p.name for p in target.iterdir())
    assert written == [
        "click_event.v1.json",
        "dead_letter.v1.json",
        "model_params.v1.json",
        "model_record.v1.json",
        "segment_change.v2.json",
        "segment_membership.v1.json",
        "transaction_event.v1.json",
    ]
    assert len(capsys.readouterr().out.splitlines()) == 7
    assert main(["schemas", "--check", "--dir", str(target)]) == 0
