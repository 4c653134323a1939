"""docs/integration-guide.md cannot drift from the contracts it documents.

* Every field of the SegmentChange and SegmentMembership schemas, nested ones included
  (``scores.churn_risk``, ``reason.top_contributions[].feature``), has a row in that contract's
  table, and no row names a field the schema does not have. A nested object's fields are
  listed once, where it first appears (a segment under ``current``, not again under
  ``previous`` or the membership's ``segment``).
* The "null when" column says ``never`` exactly for the fields the schema never lets be null.
* The guide's Python validation snippet runs, accepts a real change and refuses broken ones.
* Every relative link in the guide leads to a file of the repository.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_subscriber import change

from stream_app.contracts.events import encode

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "integration-guide.md"
SCHEMAS = ROOT / "schemas"
CONTRACTS = {
    "SegmentChange": "segment_change.v2.json",
    "SegmentMembership": "segment_membership.v1.json",
}

Schema = dict[str, Any]


def section(text: str, heading: str) -> str:
    """The text under the first heading containing ``heading``, up to the next heading of the
    same or a higher level."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and heading in line)
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level
        ),
        len(lines),
    )
    return "\n".join(lines[start + 1 : end])


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of the tables in ``text`` whose first cell is a `code` field path: path -> cells."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `([^`]+)` \|", line)
        if match:
            rows[match[1]] = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
    return rows


def resolve(schema: Schema, node: Schema) -> tuple[Schema, str | None, bool]:
    """(the node behind a $ref or a nullable anyOf, its definition's name, whether it may be
    null)."""
    nullable = False
    if "anyOf" in node:
        members = node["anyOf"]
        nullable = {"type": "null"} in members
        (node,) = [m for m in members if m != {"type": "null"}]
    name = None
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        node = schema["$defs"][name]
    return node, name, nullable


def fields(
    schema: Schema, node: Schema, prefix: str, expanded: set[str]
) -> Iterator[tuple[str, bool]]:
    """(dotted path, nullable) of every property, a definition's fields under its first path
    only (``expanded`` holds the definitions already listed)."""
    for name, prop in node.get("properties", {}).items():
        path = prefix + name
        target, definition, nullable = resolve(schema, prop)
        yield path, nullable
        if target.get("type") == "array":
            target, definition, _ = resolve(schema, target["items"])
            path += "[]"
        if "properties" in target and definition not in expanded:
            expanded.add(definition or path)
            yield from fields(schema, target, path + ".", expanded)


def load(contract: str) -> Schema:
    schema: Schema = json.loads((SCHEMAS / CONTRACTS[contract]).read_text())
    return schema


def test_the_contracts_are_the_schemas_the_guide_links() -> None:
    text = GUIDE.read_text()
    for contract, file in CONTRACTS.items():
        assert load(contract)["title"] == contract
        assert f"(../schemas/{file})" in text


@pytest.fixture(scope="module")
def documented() -> dict[str, dict[str, list[str]]]:
    text = GUIDE.read_text()
    return {c: table_rows(section(text, f"{c} fields")) for c in CONTRACTS}


def required_fields() -> dict[str, dict[str, bool]]:
    """Per contract, the field paths its table must have, with whether they may be null."""
    expanded: set[str] = set()  # shared: a segment is documented once, in the first contract
    return {c: dict(fields(load(c), load(c), "", expanded)) for c in CONTRACTS}


def test_every_schema_field_has_a_row(documented: dict[str, dict[str, list[str]]]) -> None:
    required = required_fields()
    assert "reason.top_contributions[].contribution" in required["SegmentChange"]
    assert "current.lifecycle" in required["SegmentChange"]
    assert "previous.lifecycle" not in required["SegmentChange"]  # listed under current
    for contract, paths in required.items():
        missing = sorted(set(paths) - set(documented[contract]))
        assert not missing, f"{contract} fields not in the guide: {missing}"


def test_no_row_names_a_field_the_schema_lacks(
    documented: dict[str, dict[str, list[str]]],
) -> None:
    for contract, rows in documented.items():
        every = dict(fields(load(contract), load(contract), "", set()))
        unknown = sorted(set(rows) - set(every))
        assert not unknown, f"{contract} rows for fields the schema lacks: {unknown}"
        assert len(rows) >= 9


def test_null_when_says_never_exactly_for_non_nullable_fields(
    documented: dict[str, dict[str, list[str]]],
) -> None:
    for contract, paths in required_fields().items():
        for path, nullable in paths.items():
            cells = documented[contract][path]
            assert len(cells) == 4, f"{contract} {path}: {cells}"
            says_never = cells[3].startswith("never")
            assert says_never != nullable, f"{contract} {path} null when: {cells[3]!r}"
    assert required_fields()["SegmentChange"]["scores.churn_risk"] is True


def snippet() -> str:
    block = re.search(r"```python\n(.*?)```", section(GUIDE.read_text(), "Validating"), re.S)
    assert block is not None, "no python block under 'Validating against the schema'"
    return block[1]


@pytest.fixture
def check_change(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The snippet's ``check_change``, run as a reader would: from the repository's root."""
    monkeypatch.chdir(ROOT)  # the snippet reads schemas/ relative to where it runs
    namespace: dict[str, Any] = {}
    exec(compile(snippet(), str(GUIDE), "exec"), namespace)
    return namespace["check_change"]


def test_the_validation_snippet_accepts_a_change(check_change: Any) -> None:
    value = encode(change("c1", 2))
    assert check_change(value) == orjson.loads(value)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda c: c.pop("change_id"), "'change_id' is a required property"),
        (lambda c: c.update(sequence=0), "at $.sequence: 0 is less than the minimum of 1"),
        (lambda c: c.update(event_time="2026-13-01T00:00:00Z"), "is not a 'date-time'"),
        (lambda c: c["current"].update(lifecycle="gone"), "at $.current.lifecycle: 'gone' is not"),
        (lambda c: c.update(schema_version=3), "segment_change version 3 is not one I know"),
    ],
    ids=["missing", "out-of-range", "bad-date", "unknown-stage", "unknown-version"],
)
def test_the_validation_snippet_names_what_is_wrong(
    check_change: Any, spoil: Any, message: str
) -> None:
    spoilt = orjson.loads(encode(change("c1", 2)))
    spoil(spoilt)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_change(orjson.dumps(spoilt))


def test_every_relative_link_leads_to_a_file() -> None:
    links = re.findall(r"\]\(((?:\.\./|[a-z-]+\.md)[^)#]*)", GUIDE.read_text())
    assert len(links) > 5
    missing = [link for link in links if not (GUIDE.parent / link).exists()]
    assert not missing, missing
