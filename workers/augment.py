"""Augmentation of whole batches on the device: random crop with zero padding, horizontal flip.

Each function takes a batch ``(B, C, H, W)`` (uint8 or float, any memory format) and per-sample
parameters as tensors, and runs a fixed number of tensor operations whatever ``B`` is: no Python
loop over samples. The random parameters come from a ``torch.Generator`` on the batch's device, so
a seed fixes them. Crop before normalising: the padding is then black (pixel value 0), as with
``torchvision.transforms.v2.RandomCrop(size, padding=p)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def crop(x: Tensor, top: Tensor, left: Tensor, padding: int) -> Tensor:
    """Crop ``x`` zero-padded by ``padding`` on every side back to its size, per sample.

    ``top`` and ``left`` (int64, shape ``(B,)``, values in ``[0, 2 * padding]``) are the window's
    corner in the padded image, so ``top == left == padding`` returns ``x`` unchanged and
    ``top == 0`` shifts the image down by ``padding`` rows. The result is contiguous NCHW.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def mirror(x: Tensor, mask: Tensor) -> Tensor:
    """Flip left-right the samples where ``mask`` (bool, shape ``(B,)``) is true."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """A random shift of up to ``padding`` pixels in each direction, drawn per sample."""
    corners = torch.randint(
        0, 2 * padding + 1, (2, x.shape[0]), generator=generator, device=x.device
    )
    return crop(x, corners[0], corners[1], padding)


def random_mirror(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each sample left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return mirror(x, mask)


def alternate(x: Tensor, first: Tensor, epoch: int) -> Tensor:
    """Alternating flips (airbench): the samples whose ``first`` (bool, ``(B,)``) is true are
    flipped on odd epochs (from 1), the others on even ones, so that each image is seen both
    ways every two epochs instead of at the whim of a coin."""
    return mirror(x, first if epoch % 2 == 1 else ~first)


def augment(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop (when ``padding > 0``), then random flip (when ``flip``)."""
    if padding > 0:
        x = random_crop(x, padding, generator)
    if flip:
        x = random_mirror(x, generator)
    return x


def normalizer(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of shape ``(1, C, 1, 1)`` such that ``uint8 * scale + shift`` equals
    ``(uint8 / 255 - mean) / std``."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * s), -m / s


def to_float(x: Tensor, scale: Tensor, shift: Tensor, memory_format: torch.memory_format) -> Tensor:
    """uint8 images -> normalised float32 in ``memory_format`` (one conversion copy, one fma)."""
    x = x.to(dtype=torch.float32, memory_format=memory_format)
    return torch.addcmul(shift, x, scale)
