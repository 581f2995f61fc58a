"""The search specification: what to search, on which data, judged how, for how long.

A :class:`SearchSpec` is a tree of frozen dataclasses, one per section (``dataset``, ``space``,
``objectives``, ``budget``, ``training``, ``early_stopping``) plus a few top-level fields. Every
section validates itself on construction and raises :class:`~search.errors.InvalidValue` with a
dotted field path (``training.epochs``, ``objectives.overheads[1]``, ``space.kernel_sizes[0]``)
and the allowed values; unknown keys are errors at every level. ``to_dict`` gives plain JSON
values, and ``SearchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec``.

Checks that need something from outside the spec (the server's trial limit) are in
:meth:`SearchSpec.validate`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from search.backbones import BACKBONES
from search.datasets import DATASETS, check_paths
from search.errors import InvalidValue
from search.space import SearchSpace

OVERHEADS = ("params", "macs", "latency")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
EARLY_STOPPING = ("none", "halving", "median", "hyperband")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
# Optuna's pruners need a single objective: these policies apply in the constrained mode only.
PRUNER_POLICIES = ("median", "hyperband")
MAX_GRID_SIZE = 10_000
MAX_SEED = 2**32 - 1
MAX_NAME_LENGTH = 200


# -- Field checks: each returns the normalised value or raises InvalidValue at ``path``. ----------


def _choice(value: Any, path: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidValue(path, value, allowed)
    return value


def _int(value: Any, path: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bounds = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise InvalidValue(path, value, bounds)
    return value


def _float(
    value: Any, path: str, low: float, high: float | None = None, *, low_open: bool = False
) -> float:
    """A finite number in [low, high) (or (low, high) when ``low_open``); ints are accepted."""
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    ok = number is not None and math.isfinite(number)
    if ok:
        ok = (number > low if low_open else number >= low) and (high is None or number < high)
    if not ok:
        above = f"> {low}" if low_open else f">= {low}"
        allowed = f"a number {above}" + ("" if high is None else f" and < {high}")
        raise InvalidValue(path, value, allowed)
    return float(number)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(path, value, (True, False))
    return value


def _json_object(value: Any, path: str) -> dict[str, Any]:
    """A JSON object with string keys, copied through JSON so that it round-trips exactly."""
    allowed = "a JSON object with string keys and JSON values"
    if not isinstance(value, Mapping):
        raise InvalidValue(path, value, allowed)
    for key in value:
        if not isinstance(key, str):
            raise InvalidValue(path, key, allowed)
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidValue(path, value, f"{allowed} ({exc})") from None


def _check_keys(data: Any, path: str, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidValue(path, data, f"a mapping with the fields {', '.join(known)}")
    for key in data:
        if key not in known:
            raise InvalidValue(path, key, known)
    return data


def _plain(value: Any) -> Any:
    """Tuples as lists and dicts copied, recursively: the JSON shape of a field."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


_S = TypeVar("_S", bound="_Section")


class _Section:
    """from_dict/to_dict for a flat frozen dataclass whose fields are JSON values."""

    path: ClassVar[str]

    @classmethod
    def from_dict(cls: type[_S], data: Mapping[str, Any]) -> _S:
        known = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
        return cls(**_check_keys(data, cls.path, known))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _at(self, name: str) -> str:
        return f"{self.path}.{name}"


# -- Sections ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec(_Section):
    """``name`` is one of the dataset catalogue (:mod:`search.datasets`); ``options`` are read by
    its loader, checked against the catalogue's types and bounds (root, canvas, download, ...)."""

    path: ClassVar[str] = "dataset"

    name: str = "cluttered-digits"
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        _choice(self.name, self._at("name"), tuple(DATASETS))
        self._set("options", _json_object(self.options, self._at("options")))
        self._set(
            "val_fraction", _float(self.val_fraction, self._at("val_fraction"), 0, 1, low_open=True)
        )


@dataclass(frozen=True)
class TrainingSpec(_Section):
    """How one trial trains: ``channels_last`` on CPU and CUDA, ``mixed_precision`` on CUDA."""

    path: ClassVar[str] = "training"

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int = 4
    flip: bool = True
    mixed_precision: bool = True
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        at = self._at
        epochs = _int(self.epochs, at("epochs"), 1)
        _int(self.batch_size, at("batch_size"), 1)
        _choice(self.optimizer, at("optimizer"), OPTIMIZERS)
        self._set("lr", _float(self.lr, at("lr"), 0, low_open=True))
        self._set("momentum", _float(self.momentum, at("momentum"), 0, 1))
        self._set("weight_decay", _float(self.weight_decay, at("weight_decay"), 0))
        _choice(self.schedule, at("schedule"), SCHEDULES)
        _int(self.warmup_epochs, at("warmup_epochs"), 0, epochs - 1)
        self._set("label_smoothing", _float(self.label_smoothing, at("label_smoothing"), 0, 1))
        _int(self.crop_padding, at("crop_padding"), 0)
        for name in ("nesterov", "augment", "flip", "mixed_precision", "channels_last", "compile"):
            _bool(getattr(self, name), at(name))
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise InvalidValue(at("nesterov"), True, "false when training.momentum is 0")


@dataclass(frozen=True)
class EarlyStoppingSpec(_Section):
    """``halving``: successive-halving rungs at ``min_epochs * reduction_factor**k`` epochs, a
    trial continuing when it is in the top ``1/reduction_factor`` of the trials that reached the
    rung, judged once ``min_trials_at_rung`` have. ``median``/``hyperband``: Optuna's pruners
    (constrained mode only)."""

    path: ClassVar[str] = "early_stopping"

    policy: str = "halving"
    min_epochs: int = 1
    reduction_factor: int = 3
    min_trials_at_rung: int = 3

    def __post_init__(self) -> None:
        _choice(self.policy, self._at("policy"), EARLY_STOPPING)
        _int(self.min_epochs, self._at("min_epochs"), 1)
        _int(self.reduction_factor, self._at("reduction_factor"), 2)
        _int(self.min_trials_at_rung, self._at("min_trials_at_rung"), 1)

    def rungs(self, epochs: int) -> list[int]:
        """The successive-halving rungs of a training of ``epochs`` epochs: ``min_epochs *
        reduction_factor**k``, before the last epoch."""
        out, epoch = [], self.min_epochs
        while epoch < epochs:
            out.append(epoch)
            epoch *= self.reduction_factor
        return out


@dataclass(frozen=True)
class ObjectivesSpec(_Section):
    """Validation accuracy is always maximised. Without a constraint the overheads (percent over
    the no-attention baseline) are minimised alongside it; with ``constraint_overhead`` and
    ``constraint_max_pct`` the study has accuracy as its single objective, subject to
    ``overhead_pct <= constraint_max_pct``, and ``overheads`` are measured and reported only."""

    path: ClassVar[str] = "objectives"

    overheads: tuple[str, ...] = ("params",)
    constraint_overhead: str | None = None
    constraint_max_pct: float | None = None

    def __post_init__(self) -> None:
        at = self._at
        raw = self.overheads
        if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
            raise InvalidValue(at("overheads"), raw, f"a non-empty list of {', '.join(OVERHEADS)}")
        overheads = tuple(
            _choice(o, f"{at('overheads')}[{i}]", OVERHEADS) for i, o in enumerate(raw)
        )
        if len(set(overheads)) != len(overheads):
            raise InvalidValue(
                at("overheads"), list(raw), "each of params, macs, latency at most once"
            )
        self._set("overheads", overheads)
        overhead, max_pct = self.constraint_overhead, self.constraint_max_pct
        if overhead is not None:
            _choice(overhead, at("constraint_overhead"), OVERHEADS)
        if max_pct is not None:
            self._set(
                "constraint_max_pct", _float(max_pct, at("constraint_max_pct"), 0, low_open=True)
            )
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

    @property
    def constrained(self) -> bool:
        return self.constraint_overhead is not None


@dataclass(frozen=True)
class BudgetSpec(_Section):
    """``trials`` counts completed trials; a failed trial is re-run up to ``max_retries`` times."""

    path: ClassVar[str] = "budget"

    trials: int = 20
    wall_clock_s: float | None = None
    max_retries: int = 2

    def __post_init__(self) -> None:
        _int(self.trials, self._at("trials"), 1)
        if self.wall_clock_s is not None:
            self._set(
                "wall_clock_s",
                _float(self.wall_clock_s, self._at("wall_clock_s"), 0, low_open=True),
            )
        _int(self.max_retries, self._at("max_retries"), 0)


@dataclass(frozen=True)
class ConfirmSpec(_Section):
    """Confirmation by racing, after the exploration: the candidates (the Pareto front of the
    explored architectures, or the most accurate feasible ones in the constrained mode; up to
    ``top_k``) and the three references run again on shared seeds, one seed per round for every
    arm still in the race. Once ``min_seeds`` rounds are in, an arm significantly worse than the
    best (paired t on the shared seeds, Holm-corrected, at ``alpha``) gets no more seeds; arms
    still tied run until ``max_seeds``. ``epochs`` is the schedule of these runs, meant to be
    the one the final model will train with (default: twice the exploration's); ``trials`` caps
    their number (default: every arm on every seed). The leaderboard's verdicts, top group and
    recommendation come from these runs."""

    path: ClassVar[str] = "confirm"

    enabled: bool = True
    top_k: int = 3
    min_seeds: int = 2
    max_seeds: int = 5
    alpha: float = 0.05
    epochs: int | None = None
    trials: int | None = None

    def __post_init__(self) -> None:
        at = self._at
        _bool(self.enabled, at("enabled"))
        _int(self.top_k, at("top_k"), 1, 50)
        _int(self.min_seeds, at("min_seeds"), 2, 100)
        _int(self.max_seeds, at("max_seeds"), self.min_seeds, 100)
        self._set("alpha", _float(self.alpha, at("alpha"), 0, 0.5, low_open=True))
        if self.epochs is not None:
            _int(self.epochs, at("epochs"), 1)
        if self.trials is not None:
            _int(self.trials, at("trials"), 1)

    @property
    def looks(self) -> tuple[int, int]:
        """The race tests its arms after every round from ``min_seeds`` to ``max_seeds``: its
        p-values are corrected for those looks (``stats.sequential_p``)."""
        return self.min_seeds, self.max_seeds


# -- SearchSpec ----------------------------------------------------------------------------------

_SECTIONS: dict[str, type[_Section]] = {
    "dataset": DatasetSpec,
    "objectives": ObjectivesSpec,
    "budget": BudgetSpec,
    "training": TrainingSpec,
    "early_stopping": EarlyStoppingSpec,
    "confirm": ConfirmSpec,
}


@dataclass(frozen=True)
class SearchSpec:
    """One search. Sections may be given as mappings; they are converted (and validated)."""

    backbone: str = "cifar_resnet20"
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    space: SearchSpace = field(default_factory=SearchSpace)
    objectives: ObjectivesSpec = field(default_factory=ObjectivesSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    sampler: str = "tpe"
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        for name, section in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, section):
                object.__setattr__(self, name, section.from_dict(value))
        if not isinstance(self.space, SearchSpace):
            object.__setattr__(self, "space", SearchSpace.from_dict(self.space))
        _choice(self.backbone, "backbone", sorted(BACKBONES))
        self.space.validate_for(self.backbone)
        _choice(self.sampler, "sampler", SAMPLERS)
        _int(self.seed, "seed", 0, MAX_SEED)
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_LENGTH:
            raise InvalidValue(
                "name", self.name, f"a string of at most {MAX_NAME_LENGTH} characters"
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

    @property
    def confirm_epochs(self) -> int:
        """The schedule of the confirmation runs: ``confirm.epochs``, else twice exploration's."""
        return self.confirm.epochs or 2 * self.training.epochs

    @property
    def confirm_trials(self) -> int:
        """The most confirmation runs: ``confirm.trials``, else every arm on every seed."""
        arms = self.confirm.top_k + 3  # the candidates and the three references
        return self.confirm.trials or arms * self.confirm.max_seeds

    def validate(
        self, max_trials: int | None = None, data_roots: Sequence[Path] | None = None
    ) -> SearchSpec:
        """Checks against the server: the trial budget at most ``max_trials``; the dataset's
        paths inside ``data_roots`` (``Settings.allowed_data_roots``). Returns self."""
        if max_trials is not None and self.budget.trials > max_trials:
            raise InvalidValue(
                "budget.trials",
                self.budget.trials,
                f"an integer from 1 to {max_trials} (this server's limit)",
            )
        if data_roots is not None:
            check_paths(self.dataset.name, self.dataset.options, data_roots)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpec:
        known = tuple(f.name for f in fields(cls))
        return cls(**_check_keys(data, "spec", known))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

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
