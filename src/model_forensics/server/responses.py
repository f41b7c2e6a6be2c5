"""The inspection console's data, as pydantic models: what the JSON API returns and what the
offline report embeds. Plain data, importable without FastAPI.

Matrices are nested lists, row-major: ``CubeSlice.values`` and ``Compare.a/b/diff`` are
(layers × tokens); ``Attention.matrix`` is (queries × keys). Nothing here is sent whole
when large: slices say in ``downsampled`` and ``note`` what was cut.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ENDED_STATES: tuple[JobState, ...] = ("done", "failed", "cancelled")


class ErrorDetail(BaseModel):
    """Every error: one line saying what was wrong and what to do."""

    detail: str


class Health(BaseModel):
    version: str
    ui_built: bool = Field(description="whether the built dashboard is installed (server/static/index.html)")


class BundleSummary(BaseModel):
    """One row of the bundle list. A corrupt bundle has ``error`` set and nulls elsewhere."""

    id: str = Field(description="path of the bundle relative to the served directory")
    name: str | None = None
    model: str | None = None
    created: str | None = Field(default=None, description="ISO 8601 time of recording")
    mode: str | None = Field(default=None, description="forward or generate")
    prompt: str | None = Field(default=None, description="the recorded prompt (truncated)")
    predicate: str | None = Field(default=None, description='the failure predicate, e.g. contains("HACKED")')
    predicate_result: bool | None = Field(default=None, description="whether the predicate held on the recorded output")
    output: str | None = Field(default=None, description="generated text or predicted class (truncated)")
    size_bytes: int
    verified: bool | None = Field(
        default=None,
        description="every data file matches its sha256 in the manifest (null: too large to check on listing)",
    )
    partial: bool = Field(default=False, description="some recorder hooks failed; those sites are missing")
    error: str | None = Field(
        default=None, description="why the bundle cannot be read (the rest of the list still works)"
    )


class SiteInfo(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    sketch: str | None = None


class BundleDetail(BaseModel):
    summary: BundleSummary
    manifest: dict[str, Any]
    tokens: list[str]
    sites: list[SiteInfo]
    layers: int = Field(description="number of transformer blocks (0 for models without blocks)")
    heads: int | None = None
    kv_heads: int | None = Field(default=None, description="key/value heads (GQA: fewer than heads)")
    metrics: list[str] = Field(description="cube metrics available to /cube")
    has_attention: bool
    attention_layers: list[int] = Field(default_factory=list, description="layers with an attention pattern")
    attention_source: Literal["recorded", "recomputed"] | None = None
    analyses: list[str] = Field(description="names for /analyses/{name}")


class CubeSlice(BaseModel):
    metric: str
    tokens: list[str]
    positions: list[int] = Field(description="token position of each column")
    layers: list[int] = Field(description="layer index of each row")
    layer_names: list[str]
    site_kind: str = Field(description="what a layer row measures: resid (block output) or module")
    values: list[list[float]] = Field(description="layers × tokens, exactly the ActivityCube's values")
    total_tokens: int
    total_layers: int
    downsampled: bool
    note: str = Field(description="what was downsampled or paged, empty if nothing")


class Attention(BaseModel):
    layer: int
    head: int
    heads: int
    kv_heads: int | None = None
    kv_group: int | None = Field(default=None, description="the key/value head this query head reads (GQA)")
    tokens: list[str]
    positions: list[int] = Field(description="token position of each row and column")
    matrix: list[list[float]] = Field(description="queries × keys: attention probabilities")
    source: Literal["recorded", "recomputed"]
    total_tokens: int
    downsampled: bool
    note: str = ""


class Influence(BaseModel):
    tokens: list[str]
    scores: list[float]
    method: str
    target: int = Field(description="the explained output token (or class) id")
    target_label: str
    position: int = Field(description="the output position explained")
    evidence: str = Field(description="causal, gradient or correlational")
    causal: bool
    value: float = Field(description="the objective on the unchanged prompt")
    forward_passes: int
    notes: list[str] = Field(default_factory=list)


class Compare(BaseModel):
    a: list[list[float]] = Field(description="layers × tokens of bundle a")
    b: list[list[float]]
    diff: list[list[float]] = Field(description="b − a")
    metric: str
    tokens_a: list[str]
    tokens_b: list[str]
    layers: list[int]
    note: str


class InspectionSummary(BaseModel):
    id: str
    path: str
    model: str | None = None
    experiments: list[str]


class Plot(BaseModel):
    name: str
    url: str


class InspectionDetail(BaseModel):
    id: str
    summary: dict[str, Any] = Field(description="results.json as `inspect --out` wrote it")
    summary_markdown: str | None = None
    plots: list[Plot]


class JobProgress(BaseModel):
    phase: str | None = None
    done: int = 0
    total: int = 0
    line: str = Field(default="", description='e.g. "search: units: 12/56 candidates"')


class JobRequest(BaseModel):
    bundle: str = Field(description="bundle id")
    kind: Literal["analyze"] = "analyze"
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="strategy (greedy|exhaustive), directions / gating (auto|always|never), search (bool), "
        "baseline (bundle ids), time_limit_s",
    )


class Job(BaseModel):
    id: str
    bundle: str
    kind: str
    state: JobState
    progress: JobProgress
    error: str | None = None
    result: str | None = Field(default=None, description="name of the analysis written (for /analyses/{name})")
    created: str
    started: str | None = None
    finished: str | None = None
    time_limit_s: float


class ReplayRequest(BaseModel):
    site: str = Field(description="e.g. blocks.0.attn, blocks.1.mlp, blocks.0.attn.head.3")
    head: int | None = Field(default=None, description="narrow an attention site to one head")
    kind: Literal["zero", "mean", "scale", "patch", "resample", "noise", "clamp"] = "zero"
    value: float | None = Field(default=None, description="the factor (scale), std multiple (noise) or cap (clamp)")


class ReplayResult(BaseModel):
    intervention: dict[str, Any]
    recorded_output: str | None
    new_output: str | None
    changed: bool
    predicate_result: bool | None
    recorded_predicate_result: bool | None
    flipped: bool | None
    prediction: int
    forward_passes: int
