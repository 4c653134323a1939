"""JSON Schema (2020-12) files of every contract, generated from the pydantic models."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import orjson

from stream_app.contracts.events import CONTRACTS

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def version(name: str) -> int:
    """A contract's version is its model's ``schema_version`` (a one-value Literal, with or
    without a default): each contract moves on its own."""
    (value,) = get_args(CONTRACTS[name].model_fields["schema_version"].annotation)
    assert isinstance(value, int)
    return value


def render(name: str) -> bytes:
    schema = CONTRACTS[name].model_json_schema(mode="serialization")
    schema = {"$schema": DIALECT, "$id": f"{name}.v{version(name)}.json", **schema}
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def schema_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.v{version(name)}.json"


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CONTRACTS:
        path = schema_path(directory, name)
        path.write_bytes(render(name))
        written.append(path)
    return written


def stale_schemas(directory: Path) -> list[str]:
    """Names of contracts whose committed schema file is missing or differs from the model."""
    stale = []
    for name in CONTRACTS:
        path = schema_path(directory, name)
        if not path.exists() or path.read_bytes() != render(name):
            stale.append(name)
    return stale
