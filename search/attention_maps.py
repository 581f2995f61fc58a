"""Looking inside a trained model's attention: CBAM's gates and Grad-CAM (the paper's section 5.2).

:func:`attention_maps` runs a batch of normalised images through a model built by
:func:`search.space.build_model` and returns, per image, every attention module's spatial gate
``M_s`` (at its block's resolution and upsampled to the image), every channel gate ``M_c``, the
predicted class with its probability, and Grad-CAM of the last stage. :func:`attention_report`
does it from stored weights and samples and returns the JSON the API serves (see its docstring).

The gates are read with :meth:`search.nn.cbam.CBAM.gates` on each module's input (captured by a
forward pre-hook), so they are exactly what the module multiplies its input by, without touching
BatchNorm statistics. Squeeze-and-excitation is a channel-only CBAM and shows up as such;
``none`` has no gates.

The last stage is the input of the model's global pooling (the last ``AdaptiveAvgPool2d``): the
feature map the classifier sees. Its name is that of the last top-level module that ran before
the pooling: ``layer3`` for the CIFAR ResNets, ``layer4`` for ResNet-18..101, ``layer5`` for
MobileNet v1. Grad-CAM (Selvaraju et al. 2017) weighs its channels by the spatial mean of the
gradient of the predicted class's logit: ``ReLU(sum_c w_c A_c)``, divided by its maximum (all
zeros where nothing is positive).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from search.build import build_model
from search.nn.cbam import CBAM
from search.preprocessing import normalise
from search.space import Architecture

_DECIMALS = 3


@dataclass(frozen=True)
class SpatialMap:
    """One module's spatial gate for one image: ``map`` (H', W') at the block's resolution and
    ``overlay`` (H, W), bilinearly upsampled to the image. Values in [0, 1]."""

    module: str
    map: Tensor
    overlay: Tensor


@dataclass(frozen=True)
class ChannelGates:
    """One module's channel gate for one image: (C,) values in [0, 1]."""

    module: str
    values: Tensor


@dataclass(frozen=True)
class ImageAttention:
    """Everything :func:`attention_maps` finds for one image."""

    spatial: list[SpatialMap]
    channel: list[ChannelGates]
    prediction: int
    probability: float
    last_stage: str
    grad_cam: Tensor  # (h, w) at the last stage's resolution, in [0, 1]
    grad_cam_overlay: Tensor  # (H, W)


def _global_pool(model: nn.Module) -> nn.Module:
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools:
        raise ValueError(f"{type(model).__name__} has no global pooling (AdaptiveAvgPool2d)")
    return pools[-1]


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W), bilinear, kept in [0, 1]."""
    if tuple(maps.shape[-2:]) == size:
        return maps.clone()
    out = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)
    return out[:, 0].clamp(0, 1)


def attention_maps(model: nn.Module, images: Tensor) -> list[ImageAttention]:
    """Gates, prediction and Grad-CAM per image of ``images`` (B, C, H, W), normalised as in
    training. Runs ``model`` in eval mode (its mode is restored) on the images' device."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    gates: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    ran: list[tuple[str, Tensor]] = []  # top-level modules' 4-D outputs, in call order
    pooled: list[Tensor] = []
    handles = []

    def read_gates(name: str) -> Any:
        def hook(module: CBAM, args: tuple[Tensor, ...]) -> None:
            channel, spatial = module.gates(args[0].detach())
            gates[name] = (channel, spatial)

        return hook

    def record(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and output.dim() == 4:
                ran.append((name, output))

        return hook

    def pool_input(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        pooled.append(args[0])

    try:
        for name, module in model.named_modules():
            if isinstance(module, CBAM):
                handles.append(module.register_forward_pre_hook(read_gates(name)))
        for name, module in model.named_children():
            handles.append(module.register_forward_hook(record(name)))
        handles.append(_global_pool(model).register_forward_pre_hook(pool_input))
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                # An input that needs gradients keeps the graph even when the weights are frozen.
                x = images.detach()
                x = (x if x.is_floating_point() else x.float()).requires_grad_(True)
                logits = model(x)
                features = pooled[-1]
                probabilities = torch.softmax(logits.detach().float(), 1)
                probability, prediction = probabilities.max(1)
                chosen = logits.gather(1, prediction[:, None]).sum()
                # Eval mode: images do not interact, so one backward gives each its own gradient.
                (grads,) = torch.autograd.grad(chosen, features)
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()

    last_stage = next((name for name, out in reversed(ran) if out is features), "")
    features = features.detach().float()
    weights = grads.float().mean((2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(1))
    peak = cam.amax((1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)
    size = (images.shape[-2], images.shape[-1])
    cam_overlay = _upsample(cam, size)

    spatial_all = {
        name: (s.float(), _upsample(s.float(), size))
        for name, (_, s) in gates.items()
        if s is not None
    }
    result = []
    for i in range(images.shape[0]):
        result.append(
            ImageAttention(
                spatial=[SpatialMap(name, s[i], up[i]) for name, (s, up) in spatial_all.items()],
                channel=[
                    ChannelGates(name, c[i].float())
                    for name, (c, _) in gates.items()
                    if c is not None
                ],
                prediction=int(prediction[i]),
                probability=float(probability[i]),
                last_stage=last_stage,
                grad_cam=cam[i],
                grad_cam_overlay=cam_overlay[i],
            )
        )
    return result


# -- the API's report ------------------------------------------------------------------------


def png_data_url(image: Tensor) -> str:
    """A uint8 (C, H, W) image as a ``data:image/png;base64,...`` URL (1, 3 or 4 channels; other
    counts show their first channel)."""
    from PIL import Image

    array = image.detach().to("cpu", torch.uint8)
    channels = array.shape[0]
    if channels in (3, 4):
        picture = Image.fromarray(array.permute(1, 2, 0).contiguous().numpy(), "RGBA"[:channels])
    else:
        picture = Image.fromarray(array[0].contiguous().numpy(), "L")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _rounded(values: Tensor) -> Any:
    return torch.round(values.detach().double(), decimals=_DECIMALS).tolist()


def _grid(values: Tensor) -> dict[str, Any]:
    return {"size": list(values.shape), "map": _rounded(values)}


def attention_report(
    architecture: Architecture | Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    samples: Mapping[str, Tensor],
    max_images: int = 4,
) -> dict[str, Any]:
    """The attention pictures of the first ``max_images`` stored samples, as JSON-ready data.

    ``samples`` holds ``images`` (uint8 NCHW), ``labels`` (int64) and per-channel ``mean`` and
    ``std`` (float32, [0, 1] units), as the worker stores them in ``samples.safetensors``. Maps
    are at their own resolution (the browser upsamples them over the image), values rounded to
    three decimals::

        {"backbone", "attention", "label",          # the architecture and its short description
         "image_size": [H, W], "last_stage": "layer3",
         "modules": [{"name", "spatial_size": [h, w] | null, "channels": C | null}],
         "images": [{"index", "image": "data:image/png;base64,...", "label", "prediction",
                     "probability",
                     "spatial": [{"module", "size": [h, w], "map": [[...]]}],
                     "channel": [{"module", "values": [...]}],
                     "grad_cam": {"module", "size": [h, w], "map": [[...]]}}]}
    """
    if not isinstance(architecture, Architecture):
        architecture = Architecture.from_dict(architecture)
    for key in ("images", "labels", "mean", "std"):
        if key not in samples:
            raise ValueError(f"samples lack {key!r}")
    info = architecture.info
    num_classes = int(state_dict[info.classifier_weight].shape[0])
    in_channels = int(state_dict[info.stem_weight].shape[1])
    model = build_model(architecture, num_classes, in_channels)
    model.load_state_dict(dict(state_dict), strict=True)
    count = max(0, min(max_images, samples["images"].shape[0]))
    raw = samples["images"][:count]
    labels = samples["labels"][:count]
    found = attention_maps(model, normalise(raw, samples["mean"], samples["std"])) if count else []

    modules: list[dict[str, Any]] = []
    if found:
        spatial_sizes = {m.module: list(m.map.shape) for m in found[0].spatial}
        widths = {g.module: int(g.values.numel()) for g in found[0].channel}
        for name in dict.fromkeys([*spatial_sizes, *widths]):
            modules.append(
                {
                    "name": name,
                    "spatial_size": spatial_sizes.get(name),
                    "channels": widths.get(name),
                }
            )
    images = []
    for index, item in enumerate(found):
        images.append(
            {
                "index": index,
                "image": png_data_url(raw[index]),
                "label": int(labels[index]),
                "prediction": item.prediction,
                "probability": round(item.probability, 4),
                "spatial": [{"module": m.module, **_grid(m.map)} for m in item.spatial],
                "channel": [
                    {"module": g.module, "values": _rounded(g.values)} for g in item.channel
                ],
                "grad_cam": {"module": item.last_stage, **_grid(item.grad_cam)},
            }
        )
    return {
        "backbone": architecture.backbone,
        "attention": architecture.attention,
        "label": architecture.describe(),
        "image_size": list(raw.shape[-2:]),
        "last_stage": found[0].last_stage if found else None,
        "modules": modules,
        "images": images,
    }
