"""The search space: ``Architecture`` (one point) and ``SearchSpace`` (the allowed values per knob).

An :class:`Architecture` names a backbone, an attention kind (``none``, ``se``, ``cbam``), every
CBAM knob and the placement (which stages, which blocks within a stage). It normalises itself on
construction: knobs that do not apply are ``None``, knobs that apply but are missing take the
paper's default, ``stages`` is sorted and becomes ``None`` when it names every stage. Equal models
therefore compare equal and share one :attr:`Architecture.id`.

A :class:`SearchSpace` lists the values each knob may take (by default the whole space of
cbam-spec.md) and draws architectures from an Optuna trial with conditional parameters: the
channel-gate knobs are suggested only for arrangements with a channel gate, the spatial-gate knobs
only for arrangements with a spatial gate, so a sampler never sees a knob that has no effect.
Categorical choices are JSON primitives, the same for a parameter name in every trial: pool-type
sets are encoded as ``"avg+max"`` and stage sets as ``"1+2+3"``.

The search samples CBAM only; the reference architectures (:func:`reference_architectures`: no
attention, SE, the paper's CBAM) lie outside the sampled space and are evaluated alongside it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from search.backbones import BackboneInfo, allowed_backbones
from search.catalogue import backbone_info
from search.errors import InvalidValue
from search.knobs import (
    ARRANGEMENTS,
    BLOCK_CHOICES,
    CBAM_KNOBS,
    CHANNEL_KNOBS,
    KERNEL_SIZES,
    POOL_TYPES,
    SPATIAL_KNOBS,
    SPATIAL_POOLS,
    VALIDATORS,
    CBAMConfig,
    canonical_pools,
    check_attention,
    check_blocks,
    check_pool_types,
    check_stage_set,
    has_channel_gate,
    has_spatial_gate,
)
from search.validation import SpecModel

if TYPE_CHECKING:
    from optuna.trial import BaseTrial

REFERENCE_NAMES = ("none", "se", "cbam")
_DEFAULT_CBAM = CBAMConfig()
_ARROWS = {
    "channel-spatial": "c->s",
    "spatial-channel": "s->c",
    "parallel": "c|s",
    "channel": "c",
    "spatial": "s",
}


def _check_pool_set(value: Any, field: str) -> tuple[str, ...]:
    """A pool-type set as the space and architectures spell it: in POOL_TYPES order."""
    return canonical_pools(check_pool_types(value, field))


def _check_stages(value: Any, field: str, info: BackboneInfo | None = None) -> tuple[int, ...]:
    if info is None:
        return check_stage_set(value, field)
    return check_stage_set(value, field, info.stages, info.name)


# Knob name -> validator, as architectures and the space normalise values.
_KNOB_CHECKS: dict[str, Callable[[Any, str], Any]] = {**VALIDATORS, "pool_types": _check_pool_set}


def encode_choice(values: Iterable[Any]) -> str:
    """A set as one categorical choice and label: ``"avg+max"``, ``"1+2"``."""
    return "+".join(str(v) for v in values)


def _reject_unknown_keys(data: Any, known: Sequence[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidValue(what, data, f"a JSON object with the fields {', '.join(known)}")
    for key in data:
        if key not in known:
            raise InvalidValue(what, key, known)


# -- Architecture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """One point of the space. ``stages=None`` means every stage of the backbone."""

    backbone: str
    attention: str = "cbam"
    reduction: int | None = None
    pool_types: tuple[str, ...] | None = None
    kernel_size: int | None = None
    spatial_pool: str | None = None
    spatial_bn: bool | None = None
    mlp_bias: bool | None = None
    arrangement: str | None = None
    stages: tuple[int, ...] | None = None
    blocks: str = "all"

    def __post_init__(self) -> None:
        info = backbone_info(self.backbone)
        check_attention(self.attention)
        values: dict[str, Any] = dict.fromkeys(CBAM_KNOBS)
        stages, blocks = None, "all"
        if self.attention != "none":
            blocks = check_blocks(self.blocks)
            if self.stages is not None:
                stages = _check_stages(self.stages, "stages", info)
                stages = None if stages == info.stages else stages
        if self.attention == "se":
            values["reduction"] = self._knob("reduction", 16)
        elif self.attention == "cbam":
            arrangement = self._knob("arrangement", _DEFAULT_CBAM.arrangement)
            values["arrangement"] = arrangement
            knobs = (CHANNEL_KNOBS if has_channel_gate(arrangement) else ()) + (
                SPATIAL_KNOBS if has_spatial_gate(arrangement) else ()
            )
            for name in knobs:
                values[name] = self._knob(name, getattr(_DEFAULT_CBAM, name))
        for name, value in {**values, "stages": stages, "blocks": blocks}.items():
            object.__setattr__(self, name, value)

    def _knob(self, name: str, default: Any) -> Any:
        value = getattr(self, name)
        return default if value is None else _KNOB_CHECKS[name](value, name)

    @property
    def info(self) -> BackboneInfo:
        return backbone_info(self.backbone)

    def attends(self, stage: int, block: int) -> bool:
        """Whether block ``block`` (from 0) of stage ``stage`` (from 1) holds attention."""
        if self.attention == "none" or (self.stages is not None and stage not in self.stages):
            return False
        if self.blocks == "first":
            return block == 0
        if self.blocks == "last":
            return block == self.info.blocks_per_stage[stage - 1] - 1
        return True

    def attention_slots(self) -> tuple[tuple[int, int], ...]:
        """The (stage, block) pairs that hold an attention module."""
        return tuple(
            (stage, block)
            for stage, count in enumerate(self.info.blocks_per_stage, start=1)
            for block in range(count)
            if self.attends(stage, block)
        )

    def cbam_config(self) -> CBAMConfig | None:
        """The module configuration for ``attention="cbam"``; None otherwise."""
        if self.attention != "cbam":
            return None
        knobs = {name: getattr(self, name) for name in CBAM_KNOBS}
        return CBAMConfig(**{k: v for k, v in knobs.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Architecture:
        _reject_unknown_keys(data, _ARCHITECTURE_FIELDS, "architecture")
        if "backbone" not in data:
            raise InvalidValue("backbone", None, allowed_backbones())
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise InvalidValue("architecture", text, f"a JSON object ({exc})") from None
        return cls.from_dict(data)

    @property
    def id(self) -> str:
        """10 hex characters of the SHA-256 of the canonical JSON: stable across processes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:10]

    def describe(self) -> str:
        """A short label, e.g. ``"CBAM c->s r16 avg+max k7 @all"``."""
        if self.attention == "none":
            return "no attention"
        if self.attention == "se":
            parts = ["SE", f"r{self.reduction}"]
        else:
            parts = ["CBAM", _ARROWS[self.arrangement]]
            if self.reduction is not None:
                parts += [f"r{self.reduction}", encode_choice(self.pool_types)]
                parts += [] if self.mlp_bias else ["no-bias"]
            if self.kernel_size is not None:
                parts.append(f"k{self.kernel_size}")
                parts += ["conv-pool"] if self.spatial_pool == "conv" else []
                parts += [] if self.spatial_bn else ["no-bn"]
        where = "all" if self.stages is None else "s" + encode_choice(self.stages)
        where += "" if self.blocks == "all" else f"/{self.blocks}"
        return " ".join([*parts, f"@{where}"])


_ARCHITECTURE_FIELDS = tuple(f.name for f in fields(Architecture))


def reference_architectures(backbone: str) -> dict[str, Architecture]:
    """The baselines of every search: no attention, SE (r=16), the paper's CBAM in every block."""
    return {
        "none": Architecture(backbone, "none"),
        "se": Architecture(backbone, "se", reduction=16),
        "cbam": Architecture(backbone, "cbam"),
    }


# -- SearchSpace -------------------------------------------------------------------------------

# SearchSpace field -> (Architecture field, validator of one value).
_SPACE_KNOBS: dict[str, str] = {
    "arrangements": "arrangement",
    "reductions": "reduction",
    "pool_types": "pool_types",
    "mlp_bias": "mlp_bias",
    "kernel_sizes": "kernel_size",
    "spatial_pools": "spatial_pool",
    "spatial_bn": "spatial_bn",
    "blocks": "blocks",
}
_ALL_POOL_SETS = tuple(
    combo for n in range(1, len(POOL_TYPES) + 1) for combo in itertools.combinations(POOL_TYPES, n)
)


def _values(name: str, raw: Any, check: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    field = f"space.{name}"
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
        raise InvalidValue(field, raw, "a non-empty list")
    values = [check(value, f"{field}[{i}]") for i, value in enumerate(raw)]
    return tuple(dict.fromkeys(values))


def _stage_subsets(stages: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(
        combo for n in range(1, len(stages) + 1) for combo in itertools.combinations(stages, n)
    )


class SearchSpace(SpecModel):
    """The values each CBAM knob may take; a sampled architecture takes one of each. Values are
    validated, normalised (pool-type sets in the order avg, max, lp, lse; stage sets sorted) and
    de-duplicated in their given order, so the Optuna choices stay the same from trial to trial.
    """

    path: ClassVar[str] = "space"

    arrangements: tuple[Literal[ARRANGEMENTS], ...] = Field(ARRANGEMENTS, min_length=1)  # type: ignore[valid-type]
    """How the channel and spatial gates are combined (``channel`` / ``spatial``: one gate)."""
    reductions: tuple[Annotated[int, Field(ge=1)], ...] = Field((2, 4, 8, 16, 32), min_length=1)
    """The channel gate's MLP reduction ratio r (hidden units = channels / r)."""
    pool_types: tuple[tuple[Literal[POOL_TYPES], ...], ...] = Field(_ALL_POOL_SETS, min_length=1)  # type: ignore[valid-type]
    """Sets of the channel gate's pooling (a set may also be written ``"avg+max"``)."""
    mlp_bias: tuple[bool, ...] = Field((True, False), min_length=1)
    kernel_sizes: tuple[Literal[KERNEL_SIZES], ...] = Field(KERNEL_SIZES, min_length=1)  # type: ignore[valid-type]
    """The spatial gate's convolution kernel size."""
    spatial_pools: tuple[Literal[SPATIAL_POOLS], ...] = Field(SPATIAL_POOLS, min_length=1)  # type: ignore[valid-type]
    """The spatial gate's channel pooling: max and mean, or a 1x1 convolution."""
    spatial_bn: tuple[bool, ...] = Field((True, False), min_length=1)
    stages: tuple[tuple[Annotated[int, Field(ge=1)], ...], ...] | None = Field(None, min_length=1)
    """The allowed stage sets (stages numbered from 1); null: every non-empty subset of the
    backbone's stages."""
    blocks: tuple[Literal[BLOCK_CHOICES], ...] = Field(BLOCK_CHOICES, min_length=1)  # type: ignore[valid-type]
    """Which blocks of a chosen stage hold CBAM."""

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Each list through its knob's one validator (:mod:`search.knobs`), so a value has the
        same rule and message here as in an architecture or a module."""
        if not isinstance(data, Mapping):
            return data
        checks = {name: _KNOB_CHECKS[knob] for name, knob in _SPACE_KNOBS.items()}
        if data.get("stages") is not None:
            checks["stages"] = _check_stages
        return {
            name: _values(name, value, checks[name]) if name in checks else value
            for name, value in data.items()
        }

    def validate_for(self, backbone: str) -> BackboneInfo:
        """Check the backbone and every stage set against it; returns the backbone's info."""
        info = backbone_info(backbone)
        for i, stage_set in enumerate(self.stages or ()):
            _check_stages(stage_set, f"space.stages[{i}]", info)
        return info

    def stage_choices(self, backbone: str) -> tuple[tuple[int, ...], ...]:
        """The allowed stage sets for ``backbone``."""
        info = self.validate_for(backbone)
        return self.stages if self.stages is not None else _stage_subsets(info.stages)

    def _choices(self, backbone: str) -> dict[str, tuple[Any, ...]]:
        """Architecture field -> allowed values (stages as stage tuples)."""
        choices = {knob: getattr(self, name) for name, knob in _SPACE_KNOBS.items()}
        choices["stages"] = self.stage_choices(backbone)
        return choices

    def sample(self, trial: BaseTrial, backbone: str) -> Architecture:
        """Draw a CBAM architecture through ``trial.suggest_categorical``.

        Order: ``arrangement``; the channel knobs (``reduction``, ``pool_types``, ``mlp_bias``) if
        the arrangement has a channel gate; the spatial knobs (``kernel_size``, ``spatial_pool``,
        ``spatial_bn``) if it has a spatial gate; then ``stages`` and ``blocks``. A knob with a
        single allowed value is fixed, not suggested.
        """
        choices = self._choices(backbone)

        def pick(name: str) -> Any:
            options = choices[name]
            if len(options) == 1:
                return options[0]
            if name in ("pool_types", "stages"):
                encoded = [encode_choice(o) for o in options]
                return options[encoded.index(trial.suggest_categorical(name, encoded))]
            return trial.suggest_categorical(name, list(options))

        values = {name: pick(name) for name in self._knobs_for(pick("arrangement"))}
        return Architecture(backbone, "cbam", **values)

    @staticmethod
    def _knobs_for(arrangement: str) -> tuple[str, ...]:
        """The Architecture fields sampled after ``arrangement``, in suggestion order."""
        return (
            "arrangement",
            *(CHANNEL_KNOBS if has_channel_gate(arrangement) else ()),
            *(SPATIAL_KNOBS if has_spatial_gate(arrangement) else ()),
            "stages",
            "blocks",
        )

    def _values_of(self, architecture: Architecture) -> dict[str, Any]:
        """Architecture field -> value as the space lists it (stages as an explicit tuple)."""
        values = {
            name: getattr(architecture, name) for name in self._knobs_for(architecture.arrangement)
        }
        values["stages"] = architecture.stages or architecture.info.stages
        return values

    def contains(self, architecture: Architecture) -> bool:
        """Whether ``sample`` can draw ``architecture`` (only CBAM architectures are sampled)."""
        if architecture.attention != "cbam":
            return False
        choices = self._choices(architecture.backbone)
        return all(v in choices[k] for k, v in self._values_of(architecture).items())

    def to_params(self, architecture: Architecture) -> dict[str, Any]:
        """The params ``sample`` would suggest for ``architecture`` (for ``enqueue_trial``)."""
        if not self.contains(architecture):
            raise InvalidValue(
                "architecture",
                architecture.describe(),
                "a CBAM architecture inside the search space",
            )
        choices = self._choices(architecture.backbone)
        return {
            name: encode_choice(value) if name in ("pool_types", "stages") else value
            for name, value in self._values_of(architecture).items()
            if len(choices[name]) > 1
        }

    def size(self, backbone: str) -> int:
        """The number of distinct architectures ``sample`` can draw for ``backbone``."""
        choices = self._choices(backbone)

        def product(names: Iterable[str]) -> int:
            n = 1
            for name in names:
                n *= len(choices[name])
            return n

        return sum(
            product(self._knobs_for(arrangement)[1:]) for arrangement in choices["arrangement"]
        )
