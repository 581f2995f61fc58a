"""timm and torchvision models as backbones: built by name, their attention slots found.

A search may name ``timm:<model>`` or ``torchvision:<model>``. The model is built as its library
builds it (``pretrained=False``: weights come from a local file, :mod:`search.nn.weights`), then
every residual block of a family we know gets a slot on its residual branch after its last
normalisation and before the addition, where the CBAM paper places it (Fig. 3):

* torchvision ``BasicBlock`` / ``Bottleneck`` (ResNet, ResNeXt, Wide-ResNet): after ``bn2`` /
  ``bn3``; MobileNetV2's ``InvertedResidual`` after the last BN of ``conv``; MobileNetV3's
  ``InvertedResidual`` and EfficientNet's ``MBConv`` / ``FusedMBConv`` after the last
  conv-norm of ``block``; those only where they add their input (``use_res_connect``).
* timm's ``BasicBlock`` / ``Bottleneck`` (its whole ResNet family) after ``bn2`` / ``bn3``, which
  is where timm's own ``attn_layer`` sits; its ``DepthwiseSeparableConv``, ``InvertedResidual``
  and ``EdgeResidual`` (MobileNetV2/V3, EfficientNet, MixNet, MnasNet) after the last BN, where
  they have a skip (``has_skip``).

Blocks are matched by class (module and name, subclasses included) without importing timm's
private modules. Stages are the runs of slots with the same output resolution at the model's
design input size, counted from 1 as for our backbones; blocks count from 0 within a stage.

The attention module becomes the block's child ``attn`` (so its state-dict keys read
``layer1.0.attn.*`` as in our backbones), and a forward hook on the slot's module passes that
module's output through it. The hook keeps every key of the library's own state dict as it is,
so the library's weights load into the model with attention, and survives ``copy.deepcopy``
(EMA), ``torch.compile`` and ONNX export. The slots are found once per name on the meta device
(no memory, no arithmetic) and cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from search.backbones import SUPPORTED_FAMILIES, BackboneInfo, allowed_backbones, library_of
from search.errors import InvalidValue

AttentionFactory = Callable[[int, int, int], nn.Module]

# (module of the block's class, class name) -> (path of the module after which the attention
# goes, the block's attribute saying whether it adds its input; None: it always does).
_SLOT_RULES: dict[tuple[str, str], tuple[str, str | None]] = {
    ("torchvision.models.resnet", "BasicBlock"): ("bn2", None),
    ("torchvision.models.resnet", "Bottleneck"): ("bn3", None),
    ("torchvision.models.mobilenetv2", "InvertedResidual"): ("conv.-1", "use_res_connect"),
    ("torchvision.models.mobilenetv3", "InvertedResidual"): ("block.-1", "use_res_connect"),
    ("torchvision.models.efficientnet", "MBConv"): ("block.-1", "use_res_connect"),
    ("torchvision.models.efficientnet", "FusedMBConv"): ("block.-1", "use_res_connect"),
    ("timm.models.resnet", "BasicBlock"): ("bn2", None),
    ("timm.models.resnet", "Bottleneck"): ("bn3", None),
    ("timm.models._efficientnet_blocks", "DepthwiseSeparableConv"): ("bn2", "has_skip"),
    ("timm.models._efficientnet_blocks", "InvertedResidual"): ("bn3", "has_skip"),
    ("timm.models._efficientnet_blocks", "EdgeResidual"): ("bn2", "has_skip"),
}
_ATTENTION_CHILD = "attn"


@dataclass(frozen=True)
class Slot:
    """Where one block's attention goes: the block's path in the model and the path, inside
    the block, of the module whose output the attention takes."""

    stage: int
    block: int
    channels: int
    block_path: str
    output_path: str


def split_name(name: str) -> tuple[str, str]:
    """``timm:resnet50`` -> (``timm``, ``resnet50``); InvalidValue for anything else."""
    library = library_of(name) if isinstance(name, str) else None
    if library is None:
        raise InvalidValue("backbone", name, allowed_backbones())
    return library, name.split(":", 1)[1]


@functools.cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@functools.cache
def _torchvision_names() -> frozenset[str]:
    import torchvision.models

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def create(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The library's model ``name`` without attention, freshly initialised, nothing downloaded.

    ``in_channels`` other than 3 replaces torchvision's stem convolution (timm takes
    ``in_chans`` itself)."""
    library, model_name = split_name(name)
    if library == "timm":
        import timm

        if model_name not in _timm_names():
            raise InvalidValue("backbone", name, "timm:<a name of timm.list_models()>")
        return timm.create_model(
            model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    import torchvision.models

    if model_name not in _torchvision_names():
        raise InvalidValue(
            "backbone",
            name,
            "torchvision:<a classification model of torchvision.models.list_models()>",
        )
    model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """The first convolution rebuilt for ``in_channels`` inputs, everything else as it was."""
    path, stem = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        stem.out_channels,
        stem.kernel_size,  # type: ignore[arg-type]
        stem.stride,  # type: ignore[arg-type]
        stem.padding,  # type: ignore[arg-type]
        stem.dilation,  # type: ignore[arg-type]
        stem.groups,
        stem.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _rule(block: nn.Module) -> tuple[str, str | None] | None:
    for cls in type(block).__mro__:
        rule = _SLOT_RULES.get((cls.__module__, cls.__name__))
        if rule is not None:
            return rule
    return None


def _submodule(block: nn.Module, path: str) -> nn.Module:
    """``path`` inside ``block``; a part ``-1`` indexes a Sequential from its end."""
    module = block
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)  # type: ignore[index]
    return module


def _residual_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(path, block, output path) of every block with a slot, in the model's order."""
    for path, module in model.named_modules():
        rule = _rule(module)
        if rule is None:
            continue
        output, residual = rule
        if residual is None or getattr(module, residual, False):
            yield path, module, output


def _input_size(model: nn.Module, library: str) -> int:
    """The image side the model is designed for: timm's pretrained config, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if library == "timm" and size else 224


@functools.lru_cache(maxsize=64)
def discover(name: str) -> tuple[BackboneInfo, tuple[Slot, ...]]:
    """The backbone info of library model ``name`` and its slots, found on the meta device.

    InvalidValue at ``backbone`` for an unknown name, and for a model without a block of a
    family we can place into (naming those families)."""
    library = split_name(name)[0]
    try:
        with torch.device("meta"):
            model = create(name, 1000)
    except InvalidValue:
        raise
    except Exception as exc:  # a library model that needs arguments cbam-nas does not pass
        raise InvalidValue(
            "backbone", name, f"a model {library} builds by name alone ({exc})"
        ) from exc
    found = list(_residual_blocks(model))
    if not found:
        raise InvalidValue(
            "backbone",
            name,
            f"a model with residual blocks of a family cbam-nas places attention into: "
            f"{'; '.join(SUPPORTED_FAMILIES)} ({type(model).__name__} has none)",
        )
    size = _input_size(model, library)
    shapes: dict[str, torch.Size] = {}
    handles = [
        _submodule(block, output).register_forward_hook(functools.partial(_record, shapes, path))
        for path, block, output in found
    ]
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device="meta"))
    except Exception as exc:  # a library model that cannot run its design input
        raise InvalidValue("backbone", name, f"a model that runs on {size}x{size} ({exc})") from exc
    finally:
        for handle in handles:
            handle.remove()
    slots: list[Slot] = []
    resolution: int | None = None
    stage = block = 0
    for path, _, output in found:
        shape = shapes[path]
        if shape[-1] != resolution:
            resolution, stage, block = shape[-1], stage + 1, 0
        slots.append(Slot(stage, block, int(shape[1]), path, output))
        block += 1
    blocks_per_stage = tuple(sum(1 for s in slots if s.stage == i) for i in range(1, stage + 1))
    block_channels = tuple(
        tuple(s.channels for s in slots if s.stage == i) for i in range(1, stage + 1)
    )
    info = BackboneInfo(
        name=name,
        family=f"{library}:{type(model).__name__}",
        blocks_per_stage=blocks_per_stage,
        stage_channels=tuple(channels[0] for channels in block_channels),
        input_size=size,
        block_channels=block_channels,
        stem_weight=_first_weight(model, nn.Conv2d),
        classifier_weight=_last_weight(model, nn.Linear),
    )
    return info, tuple(slots)


def _record(shapes: dict[str, torch.Size], path: str, _m: nn.Module, _a: Any, out: Tensor) -> None:
    shapes[path] = out.shape


def _first_weight(model: nn.Module, kind: type[nn.Module]) -> str:
    path = next(p for p, m in model.named_modules() if isinstance(m, kind))
    return f"{path}.weight" if path else "weight"


def _last_weight(model: nn.Module, kind: type[nn.Module]) -> str:
    paths = [p for p, m in model.named_modules() if isinstance(m, kind)]
    return f"{paths[-1]}.weight" if paths else ""


class _ThenAttention:
    """A forward hook: the slot module's output through the block's attention.

    A plain object holding the module, so ``copy.deepcopy`` of the model copies it with the
    model (its memo maps the module to the same copy the block holds)."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention

    def __call__(self, _module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        return self.attention(output)


def insert_attention(model: nn.Module, name: str, attention: AttentionFactory) -> int:
    """Put ``attention(stage, block, channels)`` into every slot of ``model`` (library model
    ``name``); an ``nn.Identity`` leaves the slot empty. Returns the modules inserted."""
    _, slots = discover(name)
    inserted = 0
    for slot in slots:
        module = attention(slot.stage, slot.block, slot.channels)
        if isinstance(module, nn.Identity):
            continue
        block = model.get_submodule(slot.block_path)
        if hasattr(block, _ATTENTION_CHILD):
            raise RuntimeError(f"{slot.block_path} of {name} already has an {_ATTENTION_CHILD!r}")
        block.add_module(_ATTENTION_CHILD, module)
        _submodule(block, slot.output_path).register_forward_hook(_ThenAttention(module))
        inserted += 1
    return inserted


def build_library_backbone(
    name: str, num_classes: int, in_channels: int = 3, attention: AttentionFactory | None = None
) -> nn.Module:
    """Library model ``name`` with ``attention(stage, block, channels)`` in its slots."""
    model = create(name, num_classes, in_channels)
    if attention is not None:
        insert_attention(model, name, attention)
    return model
