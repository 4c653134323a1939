"""Offline replay end to end on the real REES46 sample (no broker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from stream_app.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ROOT.parent / "shared" / "datasets"
REES46 = DATASETS / "rees46_2019oct_head" / "events.csv.gz"

needs_data = pytest.mark.skipif(
    not REES46.exists(), reason=f"dataset folder {DATASETS} is absent (CI has it)"
)


def _replay(tmp: Path, name: str, *extra: str) -> tuple[Path, dict[str, Any]]:
    out, report = tmp / f"{name}.jsonl", tmp / f"{name}.json"
    code = main(
        [
            "replay",
            str(REES46),
            "--format",
            "rees46",
            "--offline",
            "--out",
            str(out),
            "--report",
            str(report),
            "--no-progress",
            *extra,
        ]
    )
    assert code == 0
    return out, orjson.loads(report.read_bytes())


@needs_data
def test_rees46_offline_replay_report_and_schema(tmp_path: Path) -> None:
    out, report = _replay(tmp_path, "a")
    assert report["events"] == 17434
    assert report["applied"] == 17434
    assert report["customers"] == 4504
    assert report["invalid"] == {}
    changes = report["segment_changes"]
    assert isinstance(changes, dict)
    assert changes["entry"] == 4504
    assert isinstance(report["events_per_second"], float)
    assert report["flap_rate"] is not None and 0 <= report["flap_rate"] < 0.05
    assert {c["id"] for c in report["clusters"]} == set(range(6))
    assert sum(report["lifecycle"].values()) == 4504
    assert str(report["model_version"]).startswith("river-kmeans-logreg.")
    # Three hours of data: no purchase or churn label can mature, so no AUC is claimed, and
    # the report says so in a sentence with what to change.
    assert report["purchase_auc"] is None
    assert str(report["cold_start"]).startswith(
        "Tiers and scores stayed unscored: the purchase model learned from 0 of the 200 "
        "matured labels it needs (a label matures 30 days after it is taken); the churn model"
    )
    assert report["purchase_scores_emitted"]["all"]["judged"] == 0
    schema = orjson.loads((ROOT / "schemas" / "segment_change.v2.json").read_bytes())
    validator = Draft202012Validator(schema)
    lines = out.read_bytes().splitlines()
    assert len(lines) == sum(changes.values())
    for line in lines:
        validator.validate(orjson.loads(line))


@needs_data
def test_two_replays_are_byte_identical_even_across_hash_seeds(tmp_path: Path) -> None:
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"changes-{seed}.jsonl"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        cmd = [sys.executable, "-m", "stream_app.cli", "replay", str(REES46)]
        cmd += ["--format", "rees46", "--offline", "--out", str(out), "--no-progress"]
        subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) > 0


def test_missing_file_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", str(tmp_path / "nope.csv"), "--format", "rees46", "--offline"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: no such file")


def test_bad_rows_are_counted_by_reason(tmp_path: Path) -> None:
    data = tmp_path / "events.jsonl"
    good = {
        "event_id": "e1",
        "customer_id": "c1",
        "event_time": "2024-01-01T00:00:00Z",
        "event_type": "product_view",
    }
    data.write_bytes(
        orjson.dumps(good) + b"\n{not json\n" + orjson.dumps({**good, "event_type": "fly"}) + b"\n"
    )
    report_path = tmp_path / "r.json"
    code = main(
        ["replay", str(data), "--format", "events", "--offline", "--report", str(report_path)]
    )
    assert code == 0
    report = orjson.loads(report_path.read_bytes())
    assert report["events"] == 1
    assert report["invalid"] == {"invalid_json": 1, "unknown_event_type": 1}
