"""Request and response bodies of the REST API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from store.ids import ID_REGEX
from workers.probes.params import integral_to_int

MAX_BATCH_SIZE = 4096
# Request bodies reject unknown fields and convert no types: JSON true is not the integer 1,
# and "3" is not 3. The one conversion is in integer fields (JsonInt), from a float with an
# integral value to int.
REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)


# The integer type of request fields: integral_to_int passes every value but an integral float
# unchanged, so strict mode still rejects 2.5, true, "2", NaN, infinity and 1e300 as sent. Its
# JSON Schema stays "integer".
JsonInt = Annotated[int, BeforeValidator(integral_to_int)]
# The same for optional fields. Written as JsonInt | None, the Field bounds would apply to the
# union, and pydantic 2.14 then writes them to the JSON Schema as "ge" and "le" instead of
# "minimum" and "maximum".
OptionalJsonInt = Annotated[int | None, BeforeValidator(integral_to_int)]
# The layers field of extraction and probe requests: "all" or a list of hidden-state indices.
# The CLI checks its --layers value with this type too, so both accept the same forms.
LayerSelection = Literal["all"] | list[JsonInt]


class ExtractionCreate(BaseModel):
    """Request body of POST /v1/extractions."""

    model_config = REQUEST_CONFIG

    model: str = Field(
        ...,
        min_length=1,
        max_length=512,
        examples=["store:digits-igpt", "openai/imagegpt-small", "pixels"],
    )
    dataset: str = Field(..., min_length=1, max_length=1024, examples=["digits"])
    split: str = Field(..., min_length=1, max_length=64, examples=["train"])
    layers: LayerSelection = "all"
    pooling: Literal["mean", "cls", "last_token", "mean_ln_f"] = "mean"
    input_policy: Literal["sos", "plain"] | None = Field(
        None,
        description="ImageGPT only: sos prepends the start token and drops the last pixel; "
        "plain uses no start token. Default: the policy the checkpoint was trained with, else "
        "plain.",
    )
    dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Stored dtype of the features. A block with values beyond float16's "
        "largest finite value (65504) fails the job with an error naming dtype, as does a "
        "model output of NaN or infinity (naming model); such values are never stored.",
    )
    token_layers: list[JsonInt] = Field(
        default_factory=list,
        max_length=1024,
        description="Hidden-state indices whose unpooled (per-token) states are stored too, as "
        "token_features (n_token_layers, n_items, seq, dim); list each layer explicitly.",
    )
    batch_size: OptionalJsonInt = Field(None, ge=1, le=MAX_BATCH_SIZE)
    block_rows: OptionalJsonInt = Field(
        None, ge=1, le=1_000_000, description="Rows per block (one rq job each)."
    )
    limit: OptionalJsonInt = Field(None, ge=1, description="Stratified subset size.")
    seed: JsonInt = Field(0, ge=0, le=2**31 - 1, description="Seed of the stratified subset.")
    image_column: str | None = Field(
        None, max_length=128, description="Hugging Face datasets: the image column."
    )
    label_column: str | None = Field(
        None, max_length=128, description="Hugging Face datasets: the label column."
    )


class ExtractionPublic(BaseModel):
    featureset_id: str
    job_id: str | None
    status: str
    created: bool = Field(description="False when an identical request already had a feature set.")
    estimated_bytes: int | None = Field(
        None, description="Bytes the stored arrays take: pooled plus token-level features."
    )
    token_bytes: int | None = Field(None, description="Bytes of the token-level features alone.")


class ProgressPublic(BaseModel):
    done: int
    total: int
    items_done: int | None = None
    items_total: int | None = None


class ErrorPublic(BaseModel):
    message: str
    field: str | None = None
    value: Any = None


class JobPublic(BaseModel):
    job_id: str
    kind: str
    target_id: str
    status: Literal["queued", "running", "finished", "failed", "canceled"]
    progress: ProgressPublic
    error: ErrorPublic | None = None
    created: str
    result: dict[str, Any] | None = None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_before: str | None = Field(
        default=None,
        description="Value of before that lists the next page, which is the id of the last "
        "job in data. Null when no more jobs match.",
    )


class FeatureSetPublic(BaseModel):
    featureset_id: str
    status: Literal["pending", "complete", "failed", "canceled"] = Field(
        description="complete once every block is written; pending while its job is queued or "
        "running; failed when the job failed or no job record is left; canceled when the job "
        "was canceled. A failed or canceled set stays incomplete until its job is resumed or "
        "the same POST /v1/extractions is sent again (see hint)."
    )
    spec: dict[str, Any]
    layer_map: list[dict[str, Any]]
    shape: list[int]
    dtype: str
    n_items: int
    dim: int
    block_rows: int
    class_names: list[str]
    created: str | None
    completed: str | None
    progress: dict[str, int]
    token_layers: list[int] = Field(default_factory=list)
    token_shape: list[int] | None = None
    job_id: str | None = Field(None, description="The job that writes or wrote the set.")
    error: ErrorPublic | None = Field(
        None, description="Why the set is failed or canceled, from its job when it has one."
    )
    hint: str | None = Field(
        None,
        description="The next step while the set is not complete: wait for, resume or re-send "
        "its job. The 409 of the layer and labels routes ends with the same sentence.",
    )


class FeatureSetsPublic(BaseModel):
    data: list[FeatureSetPublic]
    count: int


class ProbeCreate(BaseModel):
    """Request body of POST /v1/probes."""

    model_config = REQUEST_CONFIG

    train_featureset: str = Field(
        ..., description="Id of the feature set to fit on.", json_schema_extra={"pattern": ID_REGEX}
    )
    test_featureset: str = Field(
        ...,
        description="Id of the feature set to test on.",
        json_schema_extra={"pattern": ID_REGEX},
    )
    layers: LayerSelection = "all"
    kind: str | list[str] = Field(
        "logistic", description="logistic, knn, mlp, adapter, or a list of them."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Hyper-parameters; either flat (applied to the only kind) or keyed by kind.",
    )
    seed: JsonInt = Field(0, ge=0, le=2**31 - 1)


class ProbeCreated(BaseModel):
    probe_id: str
    job_id: str | None
    status: str
    created: bool


class ProbePublic(BaseModel):
    probe_id: str
    status: str
    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    job_id: str | None = None
    error: ErrorPublic | None = None


class ProbesPublic(BaseModel):
    data: list[ProbePublic]
    count: int


class CurvePublic(BaseModel):
    probe_id: str
    kinds: dict[str, list[dict[str, Any]]]
    best: dict[str, Any]


class PretrainCreate(BaseModel):
    """Request body of POST /v1/pretrain: a small ImageGPT trained on a stored dataset."""

    model_config = REQUEST_CONFIG

    name: str = Field(..., min_length=1, max_length=64, examples=["digits-igpt"])
    dataset: str = "digits"
    split: str = "train"
    n_layer: JsonInt = Field(4, ge=1, le=48)
    n_embd: JsonInt = Field(64, ge=8, le=2048)
    n_head: JsonInt = Field(4, ge=1, le=64)
    n_colors: JsonInt = Field(16, ge=2, le=1024)
    steps: JsonInt = Field(1000, ge=1, le=1_000_000)
    batch_size: JsonInt = Field(64, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    seed: JsonInt = Field(0, ge=0, le=2**31 - 1)
    eval_every: JsonInt = Field(100, ge=1, description="Steps between validation-loss evaluations.")
    checkpoint_every: OptionalJsonInt = Field(
        None,
        ge=1,
        description="Save a checkpoint (store:<name>@step<N>) at step 0 and every "
        "this many steps, each with its validation loss; none when unset.",
    )


class PretrainPublic(BaseModel):
    model: str
    job_id: str | None
    status: str
    created: bool


class ModelPublic(BaseModel):
    model: str
    family: str
    source: str
    revision: str
    n_hidden_states: int
    dim: int | None = Field(
        description="Width of each hidden state; null for pixels, whose width is the "
        "dataset's pixel count times its channels."
    )
    training: dict[str, Any] = Field(default_factory=dict)


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class CheckpointPublic(BaseModel):
    model: str = Field(description="Reference to extract with, store:<name>@step<N>.")
    step: int
    val_loss: float = Field(description="Validation cross-entropy in nats per token.")
    val_bits_per_token: float


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


class ProjectionCreate(BaseModel):
    """Request body of POST /v1/projections."""

    model_config = REQUEST_CONFIG

    featureset: str = Field(
        ...,
        description="Id of the feature set to project.",
        json_schema_extra={"pattern": ID_REGEX},
    )
    layer: JsonInt = Field(..., ge=0)
    method: Literal["tsne", "pca", "umap"] = "tsne"
    n_points: JsonInt = Field(
        1000,
        ge=1,
        le=100_000,
        description="Stratified subsample size; all items when the feature set has fewer.",
    )
    seed: JsonInt = Field(0, ge=0, le=2**31 - 1)


class ProjectionCreated(BaseModel):
    projection_id: str
    job_id: str | None
    status: str
    created: bool


class ProjectionPublic(BaseModel):
    projection_id: str
    status: str
    spec: dict[str, Any]
    n_points: int | None = None
    info: dict[str, Any] = Field(default_factory=dict, description="Engine and its settings.")
    class_names: list[str] = Field(default_factory=list)
    coords: list[list[float]] | None = Field(None, description="(n_points, 2) when complete.")
    item_indices: list[int] | None = Field(None, description="Rows of the feature set.")
    labels: list[int] | None = None
    job_id: str | None = None
    error: ErrorPublic | None = None


class ProjectionsPublic(BaseModel):
    data: list[ProjectionPublic]
    count: int


class ClaimPointPublic(BaseModel):
    probe_id: str
    model: str
    step: int
    kind: str
    layer: int
    val_loss: float
    val_bits_per_token: float
    test_accuracy: float
    test_accuracy_ci95: list[float] | None = None


class ClaimPublic(BaseModel):
    points: list[ClaimPointPublic]
    spearman: float | None = Field(
        None,
        description="Rank correlation of validation bits per token and test accuracy; "
        "negative when lower loss goes with higher accuracy. None with fewer than 3 points.",
    )


class DatasetPublic(BaseModel):
    reference: str
    kind: str
    description: str
    example: str
    splits: list[str]
    sizes: dict[str, int] | None = None
    image_shape: list[int] | None = None
    class_names: list[str] | None = None
    local_path: bool
    available: bool


class TokenCachePublic(BaseModel):
    key: str
    dataset_fingerprint: str
    palette_sha256: str
    size: list[int]
    n_items: int
    seq: int
    dataset: str | None = None
    split: str | None = None
    created: str | None = None


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int
    token_caches: list[TokenCachePublic] = Field(
        default_factory=list,
        description="Dataset fingerprints whose ImageGPT palette tokens are cached in the store.",
    )
