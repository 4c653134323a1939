"""The model record: every learned parameter of a model set as plain JSON, never code.

A record is what the worker writes to the compacted model-snapshots topic (and, later, what a
trainer publishes). It is a small JSON envelope (:class:`ModelRecord`) around the parameters
(:class:`ModelParams`), which travel as JSON *text* in ``params`` so that the bytes the digest
and the HMAC cover are exact and need no re-serialisation to check:

* ``params_sha256``: sha256 of the UTF-8 bytes of ``params``;
* ``hmac_sha256``: HMAC-SHA256 of the same bytes under the operator's signing key, or null;
* ``version``: the content id, ``<knob digest>.<first 12 hex of the sha256 of the learned
  parameters>`` (``params`` without ``trainer``, canonical: the trainer's bookkeeping is not
  part of what a version is).

The parameters are written canonically (orjson, keys sorted, no whitespace), so equal models
give equal bytes and so the same version, and every float is a float64 that orjson writes in its
shortest exact form: it reads back bit for bit. Decoding validates strictly (no coercion: ``1.0``
is not an integer, ``"1.5"`` not a number; NaN and infinities are refused); what JSON Schema
cannot say here (dimensions against this worker's knobs, feature names) the core checks when it
builds the models (stream_app/core/models.py, ``from_params``).

Adding a learned attribute to a model class means adding its field here, in the class's
``to_params``/``from_params``, and a new ``schema_version`` if old records cannot carry it.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

MODEL_RECORD_VERSION: Final = 1
MODEL_PARAMS_VERSION: Final = 1
RECORD_FORMAT: Final = "stream-app-model"
HEX64: Final = r"^[0-9a-f]{64}$"
CONTENT_VERSION_PATTERN: Final = r"^[a-z0-9-]{1,64}\.[0-9a-f]{10}\.[0-9a-f]{12}$"
KNOB_DIGEST_PATTERN: Final = r"^[a-z0-9-]{1,64}\.[0-9a-f]{10}$"

Real = Annotated[float, Field(allow_inf_nan=False)]
NonNegativeReal = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
Name = Annotated[str, Field(min_length=1, max_length=1024)]
Row = list[Real]  # one value per feature, in CLUSTER_FEATURES order


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ScalerParams(_Params):
    """A River ``StandardScaler`` as it keeps itself: per feature, the number of observations,
    the running mean and the running (population) variance. The three maps may have different
    keys: River's maps default to 0 and gain a key when read."""

    counts: dict[Name, Count]
    means: dict[Name, Real]
    vars: dict[Name, NonNegativeReal]


class ProfileParams(_Params):
    """One cached cluster profile, as last reported (names are sticky, so the cache is state)."""

    name: Name
    traits: list[Real] = Field(
        description="The centre in CLUSTER_FEATURES order, rounded to 3 decimals; empty while "
        "warming up."
    )


class RenameParams(_Params):
    observations: Count = Field(description="Observations learned when the name changed.")
    cluster: Count
    old: Name
    new: Name


class ReseedParams(_Params):
    observations: Count = Field(description="Observations learned when the centre was re-seeded.")
    cluster: Count = Field(description="The dead cluster, re-seeded.")
    donor: Count = Field(description="The cluster split to re-seed it.")


class ClusterParams(_Params):
    """BehaviourClusters: the scaler, the k centres and their sizes, the warm-up reservoir."""

    scaler: ScalerParams
    centres: list[Row] = Field(
        min_length=1, max_length=1024, description="k rows of scaled values, ids 0..k-1."
    )
    sizes: list[Count] = Field(min_length=1, max_length=1024)
    reservoir: list[Row] | None = Field(
        description="The raw warm-up observations while warming up, null once seeded."
    )
    names: list[Name] = Field(description="The kept (sticky) name of each cluster, or empty.")
    profiles: list[ProfileParams] = Field(description="The profile cache, or empty.")
    profiled_at: Count = Field(description="Observations learned when profiles were computed.")
    renames: list[RenameParams]
    warmup_seen: Count = Field(description="Observations seen while warming up.")
    first_seen_at: Real | None = Field(description="Event time of the earliest observation.")
    recent: list[NonNegativeReal] = Field(
        min_length=1, max_length=1024, description="Decayed recent observations per cluster."
    )
    spread: list[list[NonNegativeReal]] = Field(
        min_length=1, max_length=1024, description="Each cluster's variance per feature."
    )
    since_reseed: Count = Field(description="Observations since seeding or the last re-seed.")
    forgotten: int = Field(description="Observations of centres since re-seeded (net).")
    reseeds: list[ReseedParams]


AUC_BINS: Final = 10_000  # a score's bin is round(score * AUC_BINS), 0..AUC_BINS


def _check_run(run: list[int]) -> list[int]:
    if run[0] > AUC_BINS or run[0] + len(run) - 1 > AUC_BINS + 1:
        raise ValueError(f"a run must stay within bins 0..{AUC_BINS}")
    if min(run[1:]) < 1:
        raise ValueError("a run holds non-empty bins only (counts >= 1)")
    return run


Run = Annotated[
    list[Count],
    Field(min_length=2),
    AfterValidator(_check_run),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 2,
            "prefixItems": [{"type": "integer", "minimum": 0, "maximum": AUC_BINS}],
            "items": {"type": "integer", "minimum": 1},
            "description": "A run of consecutive non-empty bins: the first bin, then the count "
            "of each bin of the run.",
        }
    ),
]


class AucParams(_Params):
    """TieAwareROCAUC's two score histograms, sparse: only non-empty bins, as runs of
    consecutive ones, in bin order (a flat list per run: ~2-3 bytes a bin when most bins are
    used, as on Online Retail, instead of ~9 for a (bin, count) pair)."""

    positives: list[Run]
    negatives: list[Run]


class LogLossParams(_Params):
    """River ``metrics.LogLoss``: its running mean's weight and value."""

    n: NonNegativeReal
    mean: Real


CALIBRATION_BINS: Final = 10


class CalibrationParams(_Params):
    """Predict-then-learn calibration over CALIBRATION_BINS equal-width score bins: per bin,
    the labels whose prediction fell in it, the sum of those predictions and how many were
    positive (expected calibration error = sum over bins of n/N * |mean prediction - rate|)."""

    counts: list[Count] = Field(min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS)
    predicted: list[NonNegativeReal] = Field(
        min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS
    )
    positives: list[Count] = Field(min_length=CALIBRATION_BINS, max_length=CALIBRATION_BINS)


class PropensityParams(_Params):
    """A Propensity: River ``StandardScaler | LogisticRegression`` (SGD, constant learning rate
    from the knobs) and its predict-then-learn quality."""

    scaler: ScalerParams
    weights: dict[Name, Real]
    intercept: Real
    iterations: Count = Field(description="The SGD optimizer's n_iterations.")
    auc: AucParams
    log_loss: LogLossParams
    labels: Count
    positives: Count
    largest_scaled_input: NonNegativeReal
    # Absent in records written before it existed: then counted from the next label on.
    calibration: CalibrationParams | None = None


class TrainerParams(_Params):
    """How far the trainer that published this version had learned (issue 14): a trainer taking
    over restores the version and continues at `next_offset` of the examples log, dropping any
    batch a source sends again (its number is not above the source's newest learned)."""

    next_offset: Count = Field(description="The examples log's next offset to learn.")
    sources: dict[Name, Count] = Field(description="Each source's newest example batch learned.")
    examples: Count = Field(description="Examples learned in all.")
    duplicates: Count = Field(description="Example batches dropped as sent twice.")
    # Shared learning in event-time epochs (core.learning.SharedTrainer); absent in versions
    # of the deterministic mode and in those written before epochs existed.
    promises: dict[Name, Real] = Field(
        default_factory=dict,
        description="Per source (input partition), the event time below which it sends no more "
        "examples, as of `next_offset`.",
    )
    closed_until: Real | None = Field(
        None, description="Every example before this event time is learned, none after it."
    )
    valid_from: Real | None = Field(
        None,
        description="The epoch boundary this version was completed at: it scores events from "
        "one model lag after it.",
    )
    dirty_until: Real | None = Field(
        None,
        description="The boundary at which the next version is due: something was learned "
        "after `valid_from` (None: nothing was).",
    )
    read_to: Count | None = Field(
        None, description="The examples log's offset read when this version was made."
    )
    late: Count = Field(0, description="Examples dropped as older than `closed_until`.")
    idle: list[Name] = Field(
        default_factory=list,
        description="Sources that said they are idle (nothing unread, nothing held), as of "
        "`next_offset`: versions are cut without waiting for them.",
    )


class ModelParams(_Params):
    """Every learned parameter of a SegmentModels set."""

    schema_version: Literal[1]
    knobs: str = Field(
        pattern=KNOB_DIGEST_PATTERN,
        description="The model family and the digest of every knob that shapes learning.",
    )
    clusters: ClusterParams
    purchase: PropensityParams
    churn: PropensityParams
    trainer: TrainerParams | None = Field(
        None, description="Set by the shared trainer; null for models learned in one process."
    )


class ModelRecord(BaseModel):
    """The envelope on the topic. See the module docstring for what each field covers."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=True,
        json_schema_extra={
            "description": "A stream_app model record: every learned parameter as JSON text, "
            "with its digest and, when a signing key is configured, an HMAC-SHA256."
        },
    )

    # Required, without defaults: they are how a reader recognises a record.
    schema_version: Literal[1]
    format: Literal["stream-app-model"]
    version: str = Field(
        pattern=CONTENT_VERSION_PATTERN,
        description="Content id: the knob digest, then the first 12 hex of the sha256 of the "
        "learned parameters (params without `trainer`, canonical JSON).",
    )
    params_sha256: str = Field(pattern=HEX64, description="sha256 of the UTF-8 bytes of params.")
    hmac_sha256: str | None = Field(
        pattern=HEX64, description="HMAC-SHA256 of the UTF-8 bytes of params, or null (unsigned)."
    )
    params: str = Field(
        min_length=2,
        description="The model_params document (model_params.v1.json) as canonical JSON text.",
        json_schema_extra={"contentMediaType": "application/json"},
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """pydantic's schema, with ``params`` pointing at the parameters' own schema file (a
        ``$ref`` pydantic would try to resolve among its own definitions)."""
        schema = super().model_json_schema(*args, **kwargs)
        schema["properties"]["params"]["contentSchema"] = {"$ref": "model_params.v1.json"}
        return schema
