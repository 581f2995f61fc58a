"""CBAM's knobs: the values each may take, one validator per knob, and one module's setting.

Every place that accepts a knob value (a module's :class:`CBAMConfig`, an
:class:`~search.space.Architecture`, the lists of a :class:`~search.space.SearchSpace`, and so the
search spec) checks it with the validator here, so a knob has one rule and one message. A
validator takes the value and the dotted field path to name in its error, and returns the value
normalised or raises :class:`~search.errors.InvalidValue`.

No torch here: the API and the CLI validate specs without loading it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from search.errors import InvalidValue

ARRANGEMENTS = ("channel-spatial", "spatial-channel", "parallel", "channel", "spatial")
POOL_TYPES = ("avg", "max", "lp", "lse")
SPATIAL_POOLS = ("maxmean", "conv")
KERNEL_SIZES = (1, 3, 5, 7, 9)
ATTENTION_KINDS = ("none", "se", "cbam")
BLOCK_CHOICES = ("all", "first", "last")


def has_channel_gate(arrangement: str) -> bool:
    return arrangement != "spatial"


def has_spatial_gate(arrangement: str) -> bool:
    return arrangement != "channel"


def check_choice(value: Any, field: str, allowed: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidValue(field, value, allowed)
    return value


def check_arrangement(value: Any, field: str = "arrangement") -> str:
    return check_choice(value, field, ARRANGEMENTS)


def check_spatial_pool(value: Any, field: str = "spatial_pool") -> str:
    return check_choice(value, field, SPATIAL_POOLS)


def check_blocks(value: Any, field: str = "blocks") -> str:
    return check_choice(value, field, BLOCK_CHOICES)


def check_attention(value: Any, field: str = "attention") -> str:
    return check_choice(value, field, ATTENTION_KINDS)


def check_reduction(value: Any, field: str = "reduction") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(field, value, "an integer >= 1")
    return value


def check_kernel_size(value: Any, field: str = "kernel_size") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in KERNEL_SIZES:
        raise InvalidValue(field, value, "an odd integer from 1 to 9: 1, 3, 5, 7, 9")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidValue(field, value, (True, False))
    return value


def check_pool_types(value: Any, field: str = "pool_types") -> tuple[str, ...]:
    """A non-empty set of POOL_TYPES (a sequence, or ``"avg+max"``), each at most once, in the
    order given (the order in which a module pools; :func:`canonical_pools` sorts a set)."""
    allowed = f"a non-empty subset of {', '.join(POOL_TYPES)}"
    items = value.split("+") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items:
        raise InvalidValue(field, value, allowed)
    for i, p in enumerate(items):
        if not isinstance(p, str) or p not in POOL_TYPES:
            raise InvalidValue(f"{field}[{i}]", p, POOL_TYPES)
    if len(set(items)) != len(items):
        raise InvalidValue(field, value, f"{allowed}, each at most once")
    return tuple(items)


def canonical_pools(pools: Sequence[str]) -> tuple[str, ...]:
    """A pool-type set in POOL_TYPES order: one spelling per set, for ids and search choices."""
    return tuple(p for p in POOL_TYPES if p in pools)


def check_stage_set(
    value: Any, field: str, stages: Sequence[int] | None = None, backbone: str = ""
) -> tuple[int, ...]:
    """A non-empty set of stage numbers (a sequence, or ``"1+2"``), sorted; checked against a
    backbone's ``stages`` when given."""
    allowed = (
        f"a non-empty subset of the stages of {backbone}: {', '.join(map(str, stages))}"
        if stages is not None
        else "a non-empty list of stage numbers (1, 2, ...)"
    )
    items = value.split("+") if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise InvalidValue(field, value, allowed)
    out = []
    for item in items:
        stage = int(item) if isinstance(item, str) and item.isdigit() else item
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
            raise InvalidValue(field, value, allowed)
        if stages is not None and stage not in stages:
            raise InvalidValue(field, value, allowed)
        out.append(stage)
    return tuple(sorted(set(out)))


CHANNEL_KNOBS = ("reduction", "pool_types", "mlp_bias")
SPATIAL_KNOBS = ("kernel_size", "spatial_pool", "spatial_bn")
CBAM_KNOBS = ("arrangement", *CHANNEL_KNOBS, *SPATIAL_KNOBS)

VALIDATORS: dict[str, Callable[[Any, str], Any]] = {
    "arrangement": check_arrangement,
    "reduction": check_reduction,
    "pool_types": check_pool_types,
    "mlp_bias": check_bool,
    "kernel_size": check_kernel_size,
    "spatial_pool": check_spatial_pool,
    "spatial_bn": check_bool,
    "blocks": check_blocks,
}
"""Knob name -> its validator (the CBAM knobs and the block placement)."""


@dataclass(frozen=True)
class CBAMConfig:
    """Every knob of one CBAM module. The defaults are the paper's module as the authors coded it.

    ``timm_compat`` reproduces timm's ``CbamModule`` (mean-first concatenation, hidden width
    rounded half up, BatchNorm starting at gamma 1 with momentum 0.1); use
    :meth:`CBAMConfig.timm`, which also turns the MLP bias off as timm does.
    """

    reduction: int = 16
    pool_types: tuple[str, ...] = ("avg", "max")
    kernel_size: int = 7
    spatial_pool: str = "maxmean"
    spatial_bn: bool = True
    mlp_bias: bool = True
    arrangement: str = "channel-spatial"
    timm_compat: bool = False

    def __post_init__(self) -> None:
        for name in CBAM_KNOBS:
            object.__setattr__(self, name, VALIDATORS[name](getattr(self, name), name))
        check_bool(self.timm_compat, "timm_compat")

    @classmethod
    def timm(cls, **overrides: Any) -> CBAMConfig:
        """The setting under which :class:`CBAM` equals timm's ``CbamModule`` given its weights."""
        return cls(**{"mlp_bias": False, "timm_compat": True, **overrides})

    def hidden_channels(self, channels: int) -> int:
        if self.timm_compat:
            return max(1, int(channels / self.reduction + 0.5))
        return max(1, channels // self.reduction)

    @property
    def kernels_fit(self) -> bool:
        """Whether the compiled CPU kernels cover this setting: the paper's arrangement, avg
        and/or max channel pooling, max & mean spatial pooling."""
        return (
            self.arrangement == "channel-spatial"
            and self.spatial_pool == "maxmean"
            and set(self.pool_types) <= {"avg", "max"}
        )
