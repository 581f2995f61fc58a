"""Response models of the search page's analyses (search.results: scatter, knob views, ablation,
curves, importance). Those routes answer bytes encoded once per change of the search (with an
ETag), so these models document the answers in the OpenAPI document and the contract tests hold
the answers to them; nothing re-validates them per request."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from search.pareto import OVERHEAD_COLUMNS
from search.store.models import Reference
from service.api.schemas import Interval, Out

Scalar = str | int | float | bool | None
"""A knob's value as the views show it (pool types and stages as 'avg+max', '1+2')."""

Overhead = Literal[tuple(OVERHEAD_COLUMNS)]  # type: ignore[valid-type]


class ScatterPointOut(Out):
    number: int
    val_accuracy: float
    overhead: float = Field(description="The absolute overhead (the ``column``).")
    overhead_pct: float | None = Field(description="Over the no-attention baseline.")
    pareto: bool
    reference: Reference | None
    label: str


class ScatterOut(Out):
    """Completed trials as points of accuracy against an overhead, thinned above
    ``max_points`` (the Pareto front and the references always kept)."""

    search_id: str
    overhead: Overhead
    column: str
    pct_column: str
    total: int = Field(description="Completed trials with this overhead measured.")
    shown: int
    downsampled: bool
    missing: int = Field(description="Completed trials without this overhead.")
    pareto: int = Field(description="How many are on the front.")
    points: list[ScatterPointOut]


class KnobColumnOut(Out):
    """An axis of the parallel coordinates: categorical with ``values``, or numeric with its
    ``range`` (and the allowed ``values`` of a numeric knob; ``log`` for the reduction)."""

    name: str
    kind: Literal["categorical", "numeric"]
    role: Literal["knob", "objective"]
    values: list[Scalar] | None = None
    range: list[float] | None = None
    log: bool | None = None


class KnobRowOut(Out):
    """A completed trial's knobs (None where its architecture has no such knob); only the knobs
    that vary in the search's space are present."""

    number: int
    reference: Reference | None
    label: str
    val_accuracy: float
    overhead_pct: float | None
    arrangement: Scalar = None
    reduction: Scalar = None
    pool_types: Scalar = None
    mlp_bias: Scalar = None
    kernel_size: Scalar = None
    spatial_pool: Scalar = None
    spatial_bn: Scalar = None
    stages: Scalar = None
    blocks: Scalar = None


class KnobsOut(Out):
    search_id: str
    overhead: Overhead
    total: int
    shown: int
    downsampled: bool
    columns: list[KnobColumnOut]
    rows: list[KnobRowOut]


class PathColumnOut(Out):
    name: str
    values: list[str]


class BandOut(Out):
    name: str
    count: int
    min: float | None
    max: float | None


class PathOut(Out):
    values: list[str] = Field(description="One value per column, 'n/a' where none applies.")
    band: int = Field(description="Index into ``bands``.")
    count: int
    mean_accuracy: float


class KnobPathsOut(Out):
    """Parallel categories: trials grouped by knob values into paths, per accuracy band."""

    search_id: str
    total: int
    sampled: int
    columns: list[PathColumnOut]
    bands: list[BandOut]
    paths: list[PathOut]


class AblationRowOut(Out):
    """One value of a knob (or one reference): accuracy and overhead over its trials."""

    value: Scalar
    n: int
    accuracy_mean: float
    accuracy_std: float | None
    accuracy_ci95: Interval
    accuracy_max: float
    overhead_pct_mean: float | None
    overhead_pct_std: float | None


class AblationTableOut(Out):
    knob: str
    title: str
    trials: int
    left_out: int = Field(description="CBAM trials whose architecture has no such knob.")
    rows: list[AblationRowOut]


class AblationOut(Out):
    """The paper's ablation tables over the CBAM trials; the references apart."""

    search_id: str
    overhead: Overhead
    pct_column: str
    trials: int
    cbam_trials: int
    baselines: list[AblationRowOut]
    tables: list[AblationTableOut]


class CurveSeriesOut(Out):
    """Per epoch, column-wise (None where an epoch lacks the figure)."""

    epoch: list[int]
    val_accuracy: list[float | None]
    train_loss: list[float | None]
    val_loss: list[float | None]
    train_accuracy: list[float | None]


class CurveOut(Out):
    number: int
    label: str
    reference: Reference | None
    val_accuracy: float | None
    params: int | None
    epochs_run: int
    curve: CurveSeriesOut


class ImportanceOut(Out):
    """Knob importances, normalised to sum 1, most important first; empty with a ``reason``
    while there are too few trials or no knob varies."""

    importances: dict[str, float]
    spread: dict[str, list[float]] = Field(
        description="Knob -> [5th, 95th percentile] over bootstrap resamples of the trials."
    )
    trials: int
    evaluator: str
    target: str
    reason: str | None


class MapOut(Out):
    module: str
    size: list[int] = Field(description="[h, w]: the map's own resolution.")
    map: list[list[float]]


class ChannelGateOut(Out):
    module: str
    values: list[float]


class AttentionImageOut(Out):
    index: int
    image: str = Field(description="The validation image as a PNG data URL.")
    label: int
    prediction: int
    probability: float
    spatial: list[MapOut]
    channel: list[ChannelGateOut]
    grad_cam: MapOut


class AttentionModuleOut(Out):
    name: str
    spatial_size: list[int] | None
    channels: int | None


class AttentionOut(Out):
    """A completed trial's attention pictures on its first validation images: spatial maps,
    channel gate values and Grad-CAM of the last stage, maps rounded to three decimals."""

    backbone: str
    attention: str
    label: str
    image_size: list[int]
    last_stage: str | None
    modules: list[AttentionModuleOut]
    images: list[AttentionImageOut]
