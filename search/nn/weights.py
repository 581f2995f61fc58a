"""Pretrained backbone weights from a local file, matched to the backbone before attention.

The file is a safetensors file (preferred) or a ``.pth``/``.pt`` checkpoint read with
``torch.load(weights_only=True)``: never a pickle that could run code. A checkpoint that nests
its state dict under ``state_dict`` or ``model``, or whose keys all start with ``module.``
(DataParallel), is unwrapped.

Keys are matched against the backbone's own keys: those of the model without its attention
modules (the ``attn`` children, which the file cannot hold). Every other key must be there with
its shape, except the classifier's when the class count differs: the new head keeps its fresh
initialisation; the stem's weight may be for other input channels (adapted as timm adapts
its pretrained stems). Anything else is refused, naming the missing, unexpected and mismatched keys.

:func:`near_identity_` starts inserted attention close to the identity, so that the features
the pretrained weights compute reach the next block nearly unchanged at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from search.backbones import BackboneInfo
from search.errors import InvalidValue
from search.nn.cbam import CBAM

FIELD = "backbone_weights"
SAFETENSORS = (".safetensors",)
CHECKPOINTS = (".pth", ".pt", ".bin")
_ATTENTION = "attn"
_SHOWN = 8
# The gate every inserted gate starts at with near_identity_: sigmoid(3) = 0.953.
IDENTITY_GATE_LOGIT = 3.0


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file or a ``weights_only`` torch checkpoint."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS + CHECKPOINTS:
        raise InvalidValue(
            FIELD, str(path), f"a file ending in {', '.join(SAFETENSORS + CHECKPOINTS)}"
        )
    if not path.is_file():
        raise InvalidValue(FIELD, str(path), "an existing file on the worker's host")
    try:
        if suffix in SAFETENSORS:
            from safetensors.torch import load_file

            return load_file(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidValue(FIELD, str(path), f"a readable weights file ({exc})") from None
    return _state_dict(loaded, path)


def _state_dict(loaded: object, path: Path) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()
    ):
        raise InvalidValue(FIELD, str(path), "a state dict: a mapping of names to tensors")
    state = dict(loaded)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def backbone_keys(model: nn.Module) -> dict[str, torch.Size]:
    """The backbone's own state-dict keys and shapes: the model's without its attention."""
    return {
        key: value.shape
        for key, value in model.state_dict().items()
        if _ATTENTION not in key.split(".")
    }


def match_weights(
    expected: Mapping[str, torch.Size],
    given: Mapping[str, torch.Size],
    info: BackboneInfo,
    source: str,
    keep_head: bool = True,
) -> set[str]:
    """The keys of ``given`` to load into backbone ``info`` whose keys are ``expected``.

    The classifier's keys are left out when their shapes differ (another class count) or
    without ``keep_head`` (a fresh classifier for other classes); the
    stem's weight may differ in its input channels (it is adapted as it loads). Raises
    InvalidValue at ``backbone_weights`` listing missing, unexpected and mismatched keys."""
    head = info.classifier_weight.rpartition(".")[0]
    in_head = {k for k in expected if k.rpartition(".")[0] == head}
    missing = sorted(
        k for k in expected if k not in given and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(
        f"{k} {tuple(given[k])} (the backbone's: {tuple(expected[k])})"
        for k in expected
        if k in given
        and k not in in_head
        and given[k] != expected[k]
        and not (k == info.stem_weight and _adaptable(given[k], expected[k]))
    )
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {_listed(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of another shape", mismatched),
            )
            if keys
        ]
        raise InvalidValue(
            FIELD, source, f"a state dict of {info.name}; this file has " + "; ".join(problems)
        )
    head_fits = keep_head and all(given[k] == expected[k] for k in in_head if k in given)
    return {k for k in given if k in expected and (head_fits or k not in in_head)}


def _listed(keys: list[str]) -> str:
    more = ", ..." if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _adaptable(given: torch.Size, expected: torch.Size) -> bool:
    """An RGB stem weight for other input channels, otherwise of the same shape."""
    return (
        len(given) == len(expected) == 4
        and given[1] == 3
        and (given[0], *given[2:]) == (expected[0], *expected[2:])
    )


def load_backbone_weights(
    model: nn.Module,
    state: Mapping[str, Tensor],
    info: BackboneInfo,
    source: str,
    keep_head: bool = True,
) -> set[str]:
    """Load ``state`` into ``model``'s backbone part (``model`` is backbone ``info``); returns the
    keys loaded (the classifier's are not when the class count differs or without
    ``keep_head``).

    An RGB stem weight for other input channels (grey-scale data, say) is adapted as timm
    adapts its pretrained stems (``timm.models.adapt_input_conv``: summed over the channels
    for one, repeated and rescaled for more)."""
    shapes = {k: v.shape for k, v in state.items()}
    keys = match_weights(backbone_keys(model), shapes, info, source, keep_head)
    own = model.state_dict()
    with torch.no_grad():
        for key in keys:
            value = state[key]
            if value.shape != own[key].shape:
                from timm.models import adapt_input_conv

                value = adapt_input_conv(own[key].shape[1], value)
            own[key].copy_(value)
    return keys


@torch.no_grad()
def near_identity_(model: nn.Module) -> int:
    """Start every CBAM or SE module of ``model`` close to the identity; returns how many.

    Each gate starts at the logit :data:`IDENTITY_GATE_LOGIT` everywhere (a gate of 0.95)
    where the module has a bias for it: the channel MLP's ``fc2`` gets zero weights and that
    bias (divided over the pool types, whose outputs are summed); the spatial gate's BatchNorm
    gets gamma 0 and that beta. A gate without a bias (``mlp_bias: false``,
    ``spatial_bn: false``) gets zero weights in its last layer and starts at exactly 0.5
    everywhere: a constant scale, not the random mask of the authors' init."""
    count = 0
    for module in model.modules():
        if not isinstance(module, CBAM):
            continue
        channel, spatial = module.channel_gate, module.spatial_gate
        if channel is not None:
            nn.init.zeros_(channel.fc2.weight)
            if channel.fc2.bias is not None:
                channel.fc2.bias.fill_(IDENTITY_GATE_LOGIT / len(channel.pool_types))
        if spatial is not None:
            if spatial.bn is not None:
                # gamma 0 (the authors' init) makes the logit beta whatever the convolution
                # computes; zeroing the convolution as well would stall both (no gradient
                # reaches either while the other is zero).
                spatial.bn.weight.zero_()
                spatial.bn.bias.fill_(IDENTITY_GATE_LOGIT)
            else:
                nn.init.zeros_(spatial.conv.weight)
        count += 1
    return count
