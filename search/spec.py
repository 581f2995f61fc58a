"""The search specification: what to search, on which data, judged how, for how long.

A :class:`SearchSpec` is a tree of frozen pydantic models, one per section (``dataset``,
``space``, ``objectives``, ``budget``, ``training``, ``early_stopping``, ``confirm``) plus a few
top-level fields. Their field types are the published schema (the body of ``POST
/api/v1/searches`` in ``/openapi.json``) and the validation the API, the CLI and the workers run:
a bad value raises :class:`~search.errors.InvalidValue` with a dotted field path
(``training.epochs``, ``objectives.overheads[1]``, ``space.kernel_sizes[0]``) and the allowed
values; unknown keys are errors at every level (:mod:`search.validation`). ``to_dict`` gives
plain JSON values, and ``SearchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec``.

Checks that need something from outside the spec (the server's trial limit, its data roots) are
in :meth:`SearchSpec.validate`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from search.backbones import BACKBONES, LIBRARY_PATTERN, allowed_backbones, library_of
from search.datasets import DATASETS, check_download, check_options, check_path, check_paths
from search.errors import InvalidValue
from search.space import SearchSpace
from search.validation import JSON_VALUES, SpecModel

OVERHEADS = ("params", "macs", "latency")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
EARLY_STOPPING = ("none", "halving", "median", "hyperband")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant", "linear")
RECIPES = ("default", "fast")
ATTENTION_INITS = ("auto", "paper", "identity")
MAX_PATH_LENGTH = 4096
FLIP_MODES = ("random", "alternating")
# Optuna's pruners need a single objective: these policies apply in the constrained mode only.
PRUNER_POLICIES = ("median", "hyperband")
MAX_GRID_SIZE = 10_000
MAX_SEED = 2**32 - 1
MAX_NAME_LENGTH = 200
BACKBONE_NAMES = tuple(sorted(BACKBONES))
DATASET_NAMES = tuple(DATASETS)
# Ours by name, or a library model by the pattern (its blocks are checked at submit).
_BACKBONE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "enum": list(BACKBONE_NAMES)},
        {"type": "string", "pattern": LIBRARY_PATTERN},
    ]
}

EXAMPLE: dict[str, Any] = {
    "name": "cluttered digits, ResNet-20",
    "backbone": "cifar_resnet20",
    "dataset": {"name": "cluttered-digits"},
    "space": {"arrangements": ["channel-spatial", "parallel"], "kernel_sizes": [3, 7]},
    "objectives": {"overheads": ["params"]},
    "budget": {"trials": 12},
    "training": {"epochs": 6},
}
"""A small spec, as ``/docs`` shows it."""


# -- Sections ------------------------------------------------------------------------------------


def _options_text() -> str:
    """The options of every dataset, from the catalogue, for the schema's description."""
    lines = []
    for info in DATASETS.values():
        names = ", ".join(info.options) or "none"
        lines.append(f"{info.name}: {names}")
    return (
        "Options of the dataset's loader, checked against the dataset catalogue (GET "
        "/api/v1/datasets gives each option's type, bounds and default). By dataset: "
        + "; ".join(lines)
        + "."
    )


class DatasetSpec(SpecModel):
    """The data: a dataset of the catalogue, its loader's options, and the validation split."""

    path: ClassVar[str] = "dataset"

    name: Literal[DATASET_NAMES] = "cluttered-digits"  # type: ignore[valid-type]
    """A dataset of the catalogue."""
    options: dict[str, Any] = Field(default_factory=dict, description=_options_text())
    val_fraction: float = Field(0.1, gt=0, lt=1, strict=True, allow_inf_nan=False)
    """The fraction of the training images held out to validate (and rank) the trials."""

    @field_validator("options", mode="before")
    @classmethod
    def _json(cls, value: Any) -> dict[str, Any]:
        """A JSON object with string keys, copied through JSON so that it round-trips exactly."""
        at = "dataset.options"
        if not isinstance(value, Mapping):
            raise InvalidValue(at, value, JSON_VALUES)
        for key in value:
            if not isinstance(key, str):
                raise InvalidValue(at, key, JSON_VALUES)
        try:
            return json.loads(json.dumps(value, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidValue(at, value, f"{JSON_VALUES} ({exc})") from None

    @model_validator(mode="after")
    def _catalogue(self) -> DatasetSpec:
        check_options(self.name, self.options)
        return self

    def __hash__(self) -> int:
        """Specs are hashable; the options (a JSON object) take no part in the hash."""
        return hash((self.name, self.val_fraction))


def fast_recipe(epochs: int) -> dict[str, Any]:
    """What ``recipe: fast`` sets, for the fields a spec leaves out: the parts of airbench's
    recipe (Jordan 2024) that apply to any backbone. Label smoothing 0.2; a triangular learning
    rate (linear warm-up over the first fifth of the epochs, then linearly to zero); an
    exponential moving average of the weights, which validation, test and the stored weights
    use; and alternating flips (each image mirrored on every other epoch, from a random first
    choice, instead of a fresh coin each epoch). Not taken: a larger batch with a scaled
    learning rate (on small datasets it leaves too few steps) and flip test-time augmentation
    (it would change what the stored model computes at inference)."""
    return {
        "label_smoothing": 0.2,
        "schedule": "linear",
        "warmup_epochs": epochs // 5,
        "ema_decay": 0.9,
        "flip_mode": "alternating",
    }


class TrainingSpec(SpecModel):
    """How one trial trains: ``channels_last`` on CPU and CUDA, ``mixed_precision`` on CUDA."""

    path: ClassVar[str] = "training"

    recipe: Literal[RECIPES] = "default"  # type: ignore[valid-type]
    """``fast``: airbench's techniques that apply to any backbone (label smoothing, a triangular
    learning rate, an average of the weights, alternating flips) for the fields the spec leaves
    out; ``default``: the fields as given. A recipe changes what a search ranks: see the README
    (benchmarks/recipe.py) for by how much."""
    epochs: int = Field(10, ge=1, strict=True)
    """Epochs of an exploration trial."""
    batch_size: int = Field(128, ge=1, strict=True)
    optimizer: Literal[OPTIMIZERS] = "sgd"  # type: ignore[valid-type]
    lr: float = Field(0.1, gt=0, strict=True, allow_inf_nan=False)
    """The peak learning rate."""
    momentum: float = Field(0.9, ge=0, lt=1, strict=True, allow_inf_nan=False)
    nesterov: bool = Field(True, strict=True)
    """Nesterov momentum (SGD; false when momentum is 0)."""
    weight_decay: float = Field(5e-4, ge=0, strict=True, allow_inf_nan=False)
    schedule: Literal[SCHEDULES] = "cosine"  # type: ignore[valid-type]
    """The learning-rate schedule over the epochs."""
    warmup_epochs: int = Field(0, ge=0, strict=True)
    """Linear warm-up epochs, fewer than ``epochs``."""
    label_smoothing: float = Field(0.0, ge=0, lt=1, strict=True, allow_inf_nan=False)
    augment: bool = Field(True, strict=True)
    """Random crops (``crop_padding``) and flips (``flip``) of the training images."""
    crop_padding: int = Field(4, ge=0, strict=True)
    flip: bool = Field(True, strict=True)
    flip_mode: Literal[FLIP_MODES] = "random"  # type: ignore[valid-type]
    """``random``: each image mirrored with probability 1/2 each epoch; ``alternating``: on every
    other epoch, from a random first choice (in-memory datasets; streamed folders flip at
    random)."""
    ema_decay: float | None = Field(None, gt=0, lt=1, strict=True, allow_inf_nan=False)
    """An exponential moving average of the weights (and BatchNorm statistics), updated each
    step with this decay; validation, test and the stored weights use it. None: no average."""
    mixed_precision: bool = Field(True, strict=True)
    """bfloat16/float16 autocast on CUDA; ignored on the CPU."""
    channels_last: bool = Field(True, strict=True)
    compile: bool = Field(False, strict=True)
    """``torch.compile`` the model (CUDA)."""
    cuda_graphs: bool = Field(False, strict=True)
    """The training step on static tensors, as a CUDA graph captures it: the batch copied into
    fixed buffers, learning rates as device tensors updated in place, a fused optimizer, the
    loss and accuracy summed on the device and read once per epoch. On CUDA the step is
    captured after three eager steps and replayed; elsewhere, or where capture fails (logged),
    it runs eagerly. In-memory data, fp32 or bf16, no ``ema_decay``, no ``compile``; otherwise
    the usual step runs (logged). Not yet measured on a GPU (README, GPU)."""
    backbone_lr_scale: float = Field(1.0, gt=0, le=1, strict=True, allow_inf_nan=False)
    """Fine-tuning: the learning rate of the weights loaded from ``backbone_weights`` is
    ``lr`` times this; inserted attention and a new classifier train at ``lr``. Without
    ``backbone_weights`` every weight trains at ``lr``. Whether a smaller rate helps depends on
    how far the new task is from the weights' (README: on bundled data 0.1 cost accuracy)."""
    reset_head: bool = Field(False, strict=True)
    """Fine-tuning: start the classifier afresh even where the ``backbone_weights`` file's has
    this dataset's class count (the same number of classes, other classes). The file's
    classifier is never loaded when the class count differs."""
    attention_init: Literal[ATTENTION_INITS] = "auto"  # type: ignore[valid-type]
    """How inserted attention starts: ``paper``, the authors' initialisation (random gates
    around 0.5); ``identity``, every gate at 0.95 where the module has a bias for it, so
    pretrained features pass nearly unchanged (README: its head start, measured); ``auto``,
    ``identity`` with ``backbone_weights`` and ``paper`` without."""

    def identity_init(self, pretrained: bool) -> bool:
        """Whether inserted attention starts near the identity, for a backbone loaded from
        ``backbone_weights`` (``pretrained``) or not."""
        return self.attention_init == "identity" or (self.attention_init == "auto" and pretrained)

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """``recipe: fast`` fills the fields the spec leaves out with :func:`fast_recipe`."""
        if isinstance(data, dict) and data.get("recipe") == "fast":
            epochs = data.get("epochs", 10)
            if isinstance(epochs, int) and epochs >= 1:
                return {**fast_recipe(epochs), **data}
        return data

    @model_validator(mode="after")
    def _across_fields(self) -> TrainingSpec:
        if self.warmup_epochs > self.epochs - 1:
            raise InvalidValue(
                self._at("warmup_epochs"),
                self.warmup_epochs,
                f"an integer from 0 to {self.epochs - 1}",
            )
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise InvalidValue(self._at("nesterov"), True, "false when training.momentum is 0")
        return self


class EarlyStoppingSpec(SpecModel):
    """``halving``: successive-halving rungs at ``min_epochs * reduction_factor**k`` epochs, a
    trial continuing when it is in the top ``1/reduction_factor`` of the trials that reached the
    rung, judged once ``min_trials_at_rung`` have. ``median``/``hyperband``: Optuna's pruners
    (constrained mode only)."""

    path: ClassVar[str] = "early_stopping"

    policy: Literal[EARLY_STOPPING] = "halving"  # type: ignore[valid-type]
    min_epochs: int = Field(1, ge=1, strict=True)
    """The first rung, in epochs."""
    reduction_factor: int = Field(3, ge=2, strict=True)
    min_trials_at_rung: int = Field(3, ge=1, strict=True)
    """Trials that must reach a rung before it stops any."""

    def rungs(self, epochs: int) -> list[int]:
        """The successive-halving rungs of a training of ``epochs`` epochs: ``min_epochs *
        reduction_factor**k``, before the last epoch."""
        out, epoch = [], self.min_epochs
        while epoch < epochs:
            out.append(epoch)
            epoch *= self.reduction_factor
        return out


class ObjectivesSpec(SpecModel):
    """Validation accuracy is always maximised. Without a constraint the overheads (percent over
    the no-attention baseline) are minimised alongside it; with ``constraint_overhead`` and
    ``constraint_max_pct`` the study has accuracy as its single objective, subject to
    ``overhead_pct <= constraint_max_pct``, and ``overheads`` are measured and reported only."""

    path: ClassVar[str] = "objectives"

    overheads: tuple[Literal[OVERHEADS], ...] = Field(("params",), min_length=1)  # type: ignore[valid-type]
    """The overheads measured, each at most once."""
    constraint_overhead: Literal[OVERHEADS] | None = None  # type: ignore[valid-type]
    """The overhead bounded in the constrained mode."""
    constraint_max_pct: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False)
    """Its bound, in percent over the no-attention baseline."""

    @model_validator(mode="after")
    def _across_fields(self) -> ObjectivesSpec:
        at = self._at
        if len(set(self.overheads)) != len(self.overheads):
            raise InvalidValue(
                at("overheads"), list(self.overheads), "each of params, macs, latency at most once"
            )
        overhead, max_pct = self.constraint_overhead, self.constraint_max_pct
        if overhead is not None and max_pct is None:
            raise InvalidValue(
                at("constraint_max_pct"), None, "a number > 0 when constraint_overhead is set"
            )
        if overhead is None and max_pct is not None:
            raise InvalidValue(
                at("constraint_overhead"),
                None,
                f"one of {', '.join(OVERHEADS)} when constraint_max_pct is set",
            )
        return self

    @property
    def constrained(self) -> bool:
        return self.constraint_overhead is not None


class BudgetSpec(SpecModel):
    """``trials`` counts completed trials; a failed trial is re-run up to ``max_retries`` times."""

    path: ClassVar[str] = "budget"

    trials: int = Field(20, ge=1, strict=True)
    """Exploration trials (the server may cap it: GET /api/v1/meta)."""
    wall_clock_s: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False)
    """Stop exploring after this many seconds."""
    max_retries: int = Field(2, ge=0, strict=True)


class ConfirmSpec(SpecModel):
    """Confirmation by racing, after the exploration: the candidates (the Pareto front of the
    explored architectures, or the most accurate feasible ones in the constrained mode; up to
    ``top_k``) and the three references run again on shared seeds, one seed per round for every
    arm still in the race. Once ``min_seeds`` rounds are in, an arm significantly worse than
    another (every pair paired t on its shared seeds, Holm across the pairs, at ``alpha``) gets
    no more seeds; arms still tied run until ``max_seeds``. ``epochs`` is the schedule of these
    runs, meant to be the one the final model will train with (default: twice the
    exploration's); ``trials`` caps their number (default: every arm on every seed). The
    leaderboard's verdicts, top group and recommendation come from these runs."""

    path: ClassVar[str] = "confirm"

    enabled: bool = Field(True, strict=True)
    top_k: int = Field(3, ge=1, le=50, strict=True)
    min_seeds: int = Field(2, ge=2, le=100, strict=True)
    max_seeds: int = Field(5, ge=2, le=100, strict=True)
    """At least ``min_seeds``. Racing saves runs only where arms stop before it: a paired t on
    2-3 seeds rarely clears the race's corrected alpha, so at 5 the first stops come at 4-5
    seeds (a tenth saved at most); at 10, arms eight run-to-run spreads behind stop at 4-5,
    about half the runs (``python -m benchmarks.racing_cost``)."""
    alpha: float = Field(0.05, gt=0, lt=0.5, strict=True, allow_inf_nan=False)
    epochs: int | None = Field(None, ge=1, strict=True)
    trials: int | None = Field(None, ge=1, strict=True)

    @model_validator(mode="after")
    def _across_fields(self) -> ConfirmSpec:
        if self.max_seeds < self.min_seeds:
            raise InvalidValue(
                self._at("max_seeds"), self.max_seeds, f"an integer from {self.min_seeds} to 100"
            )
        return self

    @property
    def looks(self) -> tuple[int, int]:
        """The race tests its arms after every round from ``min_seeds`` to ``max_seeds``: its
        p-values are corrected for those looks (``stats.sequential_p``)."""
        return self.min_seeds, self.max_seeds


# -- SearchSpec ----------------------------------------------------------------------------------


class SearchSpec(SpecModel):
    """One search: what to search, on which data, judged how, for how long. Sections may be
    given as mappings; every field has a default."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})

    backbone: Annotated[str, WithJsonSchema(_BACKBONE_SCHEMA)] = Field(
        "cifar_resnet20", strict=True
    )
    """The network CBAM is placed into: one of ours, or a timm or torchvision model by name
    (``timm:resnet50``, ``torchvision:mobilenet_v2``), built without downloading anything and
    checked at submit for blocks cbam-nas can place attention into. GET /api/v1/choices lists
    ours; GET /api/v1/backbones/{name} gives any one's stages, blocks and channels."""
    backbone_weights: str | None = Field(
        None, min_length=1, max_length=MAX_PATH_LENGTH, strict=True
    )
    """Pretrained weights of the backbone without attention, a file on the workers' hosts
    inside the data roots: safetensors (preferred), or a ``.pth``/``.pt`` state dict read with
    ``torch.load(weights_only=True)``. Keys are matched before attention is inserted; a new
    classifier is initialised afresh when the class count differs. See
    ``training.backbone_lr_scale`` and ``training.attention_init``."""
    dataset: DatasetSpec = DatasetSpec()
    space: SearchSpace = SearchSpace()
    objectives: ObjectivesSpec = ObjectivesSpec()
    budget: BudgetSpec = BudgetSpec()
    training: TrainingSpec = TrainingSpec()
    sampler: Literal[SAMPLERS] = "tpe"  # type: ignore[valid-type]
    """Optuna's sampler; ``grid`` for spaces of at most 10,000 architectures."""
    early_stopping: EarlyStoppingSpec = EarlyStoppingSpec()
    confirm: ConfirmSpec = ConfirmSpec()
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True)
    """The seed of the sampler and of the exploration's trainings."""
    name: str = Field("", max_length=MAX_NAME_LENGTH, strict=True)

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_name(cls, value: Any) -> Any:
        """The name's form here; a library model's blocks are checked across fields, by
        ``space.validate_for`` (it builds the model on the meta device)."""
        if not isinstance(value, str) or (value not in BACKBONES and library_of(value) is None):
            raise InvalidValue("backbone", value, allowed_backbones())
        return value

    @model_validator(mode="after")
    def _across_fields(self) -> SearchSpec:
        self.space.validate_for(self.backbone)
        warmup = self.training.warmup_epochs
        if self.confirm.epochs is not None and self.confirm.epochs <= warmup:
            raise InvalidValue(
                "confirm.epochs",
                self.confirm.epochs,
                f"an integer >= {warmup + 1} (more than training.warmup_epochs)",
            )
        if self.sampler == "grid":
            size = self.space.size(self.backbone)
            if size > MAX_GRID_SIZE:
                others = ", ".join(s for s in SAMPLERS if s != "grid")
                raise InvalidValue(
                    "sampler",
                    "grid",
                    f"{others} (grid needs a space of at most {MAX_GRID_SIZE:,} architectures; "
                    f"this space has {size:,} for {self.backbone})",
                )
        policy = self.early_stopping.policy
        if policy in PRUNER_POLICIES and not self.objectives.constrained:
            allowed = [p for p in EARLY_STOPPING if p not in PRUNER_POLICIES]
            raise InvalidValue(
                "early_stopping.policy",
                policy,
                f"{', '.join(allowed)} ({' and '.join(PRUNER_POLICIES)} need the constrained "
                "mode: objectives.constraint_overhead and objectives.constraint_max_pct)",
            )
        return self

    @property
    def confirm_epochs(self) -> int:
        """The schedule of the confirmation runs: ``confirm.epochs``, else twice exploration's."""
        return self.confirm.epochs or 2 * self.training.epochs

    @property
    def confirm_trials(self) -> int:
        """The most confirmation runs: ``confirm.trials``, else every arm on every seed."""
        arms = self.confirm.top_k + 3  # the candidates and the three references
        return self.confirm.trials or arms * self.confirm.max_seeds

    def validate(  # type: ignore[override]
        self,
        max_trials: int | None = None,
        data_roots: Sequence[Path] | None = None,
        allow_downloads: bool = True,
    ) -> SearchSpec:
        """Checks against the server: the trial budget at most ``max_trials``; the dataset's
        paths inside ``data_roots`` (``Settings.allowed_data_roots``); no download unless
        ``allow_downloads``. Returns self."""
        if max_trials is not None and self.budget.trials > max_trials:
            raise InvalidValue(
                "budget.trials",
                self.budget.trials,
                f"an integer from 1 to {max_trials} (this server's limit)",
            )
        if data_roots is not None:
            check_paths(self.dataset.name, self.dataset.options, data_roots)
            if self.backbone_weights is not None:
                check_path("backbone_weights", self.backbone_weights, data_roots)
        check_download(self.dataset.options, allow_downloads)
        return self

    @classmethod
    def from_yaml(cls, source: str | os.PathLike[str]) -> SearchSpec:
        """From YAML text, or from a file when ``source`` is a path object (not a str)."""
        text = Path(source).read_text() if isinstance(source, os.PathLike) else source
        try:
            data = yaml.load(text, Loader=_YamlLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the document"
            problem = getattr(exc, "problem", None) or str(exc)
            raise InvalidValue("spec", where, f"valid YAML ({problem})") from None
        return cls.from_dict({} if data is None else data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
