"""How a trained model's inputs are made: from an image (a file, a PIL image or a tensor) to the
normalised batch the network was trained on.

Training reads uint8 NCHW images already at the dataset's size and normalises them as
:data:`NORMALISATION` (``workers.augment.normalizer``, an fma per pixel); :func:`normalise` is
the same arithmetic, so that a model's predictions here match the accuracies it was measured
with. :class:`Preprocess` adds what a user's images need first: the channel count (grey or RGB)
and the size, decoded and resized as the image-folder loader does (PIL, bilinear).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

NORMALISATION = "(uint8 / 255 - mean) / std"
"""How the worker normalises images (``workers.augment.normalizer``); mean and std are per
channel, in [0, 1] units, of the training images."""

ImageLike = str | Path | Tensor | Any
"""An image file's path, a uint8 (C, H, W) or (N, C, H, W) tensor, or a PIL image."""


def normalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, computed as the worker does
    (``uint8 * scale + shift``)."""
    m = mean.to(torch.float32).view(1, -1, 1, 1)
    s = std.to(torch.float32).view(1, -1, 1, 1)
    return torch.addcmul(-m / s, images.to(torch.float32), 1.0 / (255.0 * s))


@dataclass(frozen=True)
class Preprocess:
    """Images -> the model's input batch: ``channels`` (1: grey, 3: RGB), ``size`` x ``size``,
    normalised with the training images' per-channel ``mean`` and ``std``.

    ``preprocess("cat.png")``, ``preprocess(["a.png", "b.jpg"])``, ``preprocess(uint8_tensor)``
    or ``preprocess(pil_image)``; files (PNG, JPEG and whatever PIL reads) are decoded and
    resized as the image-folder loader does."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        if isinstance(images, (list, tuple)):
            batch = torch.cat([self.pixels(image) for image in images])
        else:
            batch = self.pixels(images)
        return normalise(batch, torch.tensor(self.mean), torch.tensor(self.std))

    def pixels(self, image: ImageLike) -> Tensor:
        """One image (or a batch tensor) as uint8 (N, channels, size, size), not normalised."""
        if isinstance(image, (str, Path)):
            return read_image(image, self.channels, self.size).unsqueeze(0)
        if hasattr(image, "convert"):  # a PIL image
            return _from_pil(image, self.channels, self.size)
        if not isinstance(image, Tensor):
            raise TypeError(f"not an image: {type(image).__name__}")
        tensor = image
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 4:
            raise ValueError(f"an image tensor is (C, H, W) or (N, C, H, W), got {tensor.shape}")
        tensor = _channels(tensor, self.channels)
        if tensor.shape[-2:] != (self.size, self.size):
            # Tensors have no PIL image to resize: torchvision's antialiased bilinear, which
            # follows PIL's.
            from torchvision.transforms.v2.functional import InterpolationMode, resize

            resized = resize(
                tensor.float(), [self.size, self.size], InterpolationMode.BILINEAR, antialias=True
            )
            tensor = resized.round_().clamp_(0, 255).to(torch.uint8)
        return tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "color": "L" if self.channels == 1 else "RGB",
            "size": [self.size, self.size],
            "resize": "bilinear (PIL for files and PIL images)",
            "normalisation": NORMALISATION,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW, float32",
        }


def read_image(path: str | Path, channels: int, size: int) -> Tensor:
    """An image file as uint8 (channels, size, size): PIL decodes it, converts it to grey or
    RGB and resizes it (bilinear). The image-folder loader reads training images with it, so
    a file the model trained on gives here the pixels it trained on. (Not torchvision's
    decoders: they are deprecated since torchvision 0.29.)"""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file {path}")
    try:
        with Image.open(path) as image:
            return _from_pil(image, channels, size)[0]
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image PIL can decode: {exc}") from None


def _from_pil(image: Any, channels: int, size: int) -> Tensor:
    """uint8 (1, channels, size, size)."""
    import numpy as np
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = torch.from_numpy(np.array(image))
    tensor = array.unsqueeze(0) if channels == 1 else array.permute(2, 0, 1).contiguous()
    return tensor.unsqueeze(0)


def _channels(tensor: Tensor, channels: int) -> Tensor:
    """Grey to RGB by repetition, RGB to grey by ITU-R 601 luma (as PIL's convert('L'))."""
    have = tensor.shape[1]
    if have == channels:
        return tensor
    if have == 1 and channels == 3:
        return tensor.expand(-1, 3, -1, -1).contiguous()
    if have in (3, 4) and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (tensor[:, :3].float() * weights).sum(1, keepdim=True)
        return grey.round_().clamp_(0, 255).to(torch.uint8)
    if have == 4 and channels == 3:
        return tensor[:, :3].contiguous()
    raise ValueError(f"cannot make {channels} channels from {have}")
