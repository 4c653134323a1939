"""Encoding and checking model records (the format: stream_app/contracts/model_record.py).

Nothing here executes what it reads: a record is JSON, validated against pydantic models in
strict mode, and the models are rebuilt from plain numbers by the classes' ``from_params``.
Every refusal is a :class:`SnapshotError` with a one-line reason, checked in this order:

1. not our format (not JSON, not an object, no ``"format": "stream-app-model"``);
2. the envelope violates its schema;
3. the bytes changed: ``params`` does not hash to ``params_sha256``;
4. signature: with a signing key configured, a record without an HMAC, or with one that no
   configured key produces, is refused (without a key, a signed record is accepted: its digest
   still holds);
5. another model: the knob digest is not this worker's;
6. the parameters violate their schema (wrong types, missing fields, NaN or infinities,
   negative counts), or ``version`` is not their content id; then, in the core, what the
   schema cannot say (dimensions, names).

The content id hashes the learned parameters only, not the shared trainer's bookkeeping
(``trainer``: offsets, duplicates dropped, promises): a version cut again by a trainer that took
over, or a progress record that learned nothing new, is the same model and carries the same id.
``params_sha256`` covers every byte, bookkeeping included.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Sequence
from typing import Final

import orjson
from pydantic import ValidationError

from stream_app.contracts.model_record import (
    MODEL_RECORD_VERSION,
    RECORD_FORMAT,
    ModelParams,
    ModelRecord,
)

CONTENT_HASH_HEX: Final = 12  # hex digits of the params' sha256 in a content id


class SnapshotError(ValueError):
    """A model record that is not ours, malformed, changed, unsigned or of another model."""


ModelRecordError = SnapshotError


def encode_params(params: ModelParams) -> bytes:
    """The canonical bytes of the parameters: equal parameters, equal bytes."""
    return orjson.dumps(params.model_dump(mode="python"), option=orjson.OPT_SORT_KEYS)


def learned_bytes(params: ModelParams) -> bytes:
    """The canonical bytes of the learned parameters: every field but ``trainer``."""
    learned = params.model_dump(mode="python", exclude={"trainer"})
    return orjson.dumps(learned, option=orjson.OPT_SORT_KEYS)


def content_version(params: ModelParams) -> str:
    """``<knob digest>.<first 12 hex of sha256(learned_bytes)>``: equal learned numbers, equal
    id, whatever the trainer's bookkeeping."""
    digest = hashlib.sha256(learned_bytes(params)).hexdigest()
    return f"{params.knobs}.{digest[:CONTENT_HASH_HEX]}"


def sign(key: bytes, encoded: bytes) -> str:
    return hmac.new(key, encoded, hashlib.sha256).hexdigest()


def encode_record(params: ModelParams, signing_key: bytes | None = None) -> bytes:
    encoded = encode_params(params)
    record = ModelRecord(
        schema_version=MODEL_RECORD_VERSION,
        format=RECORD_FORMAT,
        version=content_version(params),
        params_sha256=hashlib.sha256(encoded).hexdigest(),
        hmac_sha256=None if signing_key is None else sign(signing_key, encoded),
        params=encoded.decode(),
    )
    return orjson.dumps(record.model_dump(mode="json"))


def record_digest(data: bytes) -> str:
    """The sha256 of a record's whole parameters, bookkeeping included (two records of one
    version differ here when the trainer got further). Nothing is checked."""
    return str(orjson.loads(data).get("params_sha256"))


def record_version(data: bytes) -> str:
    """The version a record we wrote says it is (for log lines; nothing is checked)."""
    version = orjson.loads(data).get("version")
    return str(version)


def version_boundary(data: bytes) -> float:
    """The epoch boundary a shared trainer's version was cut at (-inf for a record made without
    epochs: a bootstrap, the deterministic mode). A trainer that took over cuts earlier
    boundaries again, so the newest version is the one with the latest boundary, not the
    last record. For listings; nothing is checked (see decode_record)."""
    try:
        trainer = orjson.loads(orjson.loads(data)["params"]).get("trainer") or {}
    except Exception:
        return -math.inf
    boundary = trainer.get("valid_from")
    return -math.inf if boundary is None else float(boundary)


def is_progress_record(data: bytes) -> bool:
    """A shared trainer's progress record (learned past its newest version: workers score
    nothing with it, they only learn from it how far versions are final), not a version. For
    listings; nothing is checked (see decode_record)."""
    try:
        trainer = orjson.loads(orjson.loads(data)["params"]).get("trainer") or {}
    except Exception:
        return False
    closed = trainer.get("closed_until")
    return closed is not None and trainer.get("valid_from") != closed


def _first_problem(error: ValidationError) -> str:
    detail = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in detail["loc"]) or "(top level)"
    more = error.error_count() - 1
    return f"{where}: {detail['msg']}" + (f" (and {more} more)" if more else "")


def decode_record(data: bytes, knobs: str, signing_keys: Sequence[bytes] = ()) -> ModelParams:
    """The parameters of a record written for the model `knobs`, or SnapshotError.

    `signing_keys`: the keys a signature may be made with (the current one first, during a
    rotation also the previous); empty: no key configured, signatures are not required."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise SnapshotError("not a stream_app model record (not JSON)") from None
    if not isinstance(raw, dict) or raw.get("format") != RECORD_FORMAT:
        raise SnapshotError(f'not a stream_app model record (no "format": "{RECORD_FORMAT}")')
    try:
        record = ModelRecord.model_validate(raw)
    except ValidationError as exc:
        raise SnapshotError(f"model record violates its schema: {_first_problem(exc)}") from None
    encoded = record.params.encode()
    digest = hashlib.sha256(encoded).hexdigest()
    if not hmac.compare_digest(digest, record.params_sha256):
        raise SnapshotError("model record digest mismatch: its parameters were changed or cut")
    if signing_keys:
        if record.hmac_sha256 is None:
            raise SnapshotError("model record is unsigned and a signing key is configured")
        if not any(hmac.compare_digest(sign(k, encoded), record.hmac_sha256) for k in signing_keys):
            raise SnapshotError("model record signature does not match the signing key")
    claimed = record.version[: -CONTENT_HASH_HEX - 1]
    if claimed != knobs:
        raise SnapshotError(f"model record is model {claimed}, this worker runs {knobs}")
    try:
        params = ModelParams.model_validate_json(encoded)
    except ValidationError as exc:
        raise SnapshotError(
            f"model parameters violate their schema: {_first_problem(exc)}"
        ) from None
    if params.knobs != knobs:
        raise SnapshotError(f"model parameters are model {params.knobs}, this worker runs {knobs}")
    if record.version != content_version(params):
        raise SnapshotError(f"model record version {record.version} is not its parameters' id")
    return params
