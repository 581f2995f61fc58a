"""scikit-learn's bundled handwritten digits, plain (``digits``) or placed on a larger canvas
among fragments of other digits (``cluttered-digits``, the demo's dataset)."""

from __future__ import annotations

import threading

import torch

from workers.data.base import (
    TEST_FRACTION,
    Images,
    LoadRequest,
    loads,
    resize,
    split_indices,
    stream_generator,
    to_uint8,
)

DIGIT_NAMES = tuple(str(digit) for digit in range(10))
_digits_lock = threading.Lock()
_digits: tuple[torch.Tensor, torch.Tensor] | None = None


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 bundled 8x8 digits as float (N, 1, 8, 8) in 0..255, and labels."""
    global _digits
    with _digits_lock:
        if _digits is None:
            from sklearn.datasets import load_digits  # slow import, only for the digits

            bunch = load_digits()
            images = torch.from_numpy(bunch.images).float().mul_(255 / 16).unsqueeze(1)
            _digits = images, torch.from_numpy(bunch.target).long()
        return _digits


@loads("digits")
def load_digits(request: LoadRequest) -> Images:
    size = request.option("size")
    images, labels = digit_images()
    x = to_uint8(resize(images, size))
    train, test = split_indices(labels, TEST_FRACTION, request.data_seed)
    return Images(x[train], labels[train], x[test], labels[test], 10, class_names=DIGIT_NAMES)


def cluttered_canvases(
    digits: torch.Tensor,
    labels: torch.Tensor,
    count: int,
    canvas: int,
    clutter: int,
    fragment_sizes: tuple[int, int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` canvases, each with one digit of ``digits`` (float (M, D, D)) at a random place and
    ``clutter`` fragments (random crops of other digits) pasted under it; pixels combine by max.

    Batched over the canvases: one indexed write per fragment layer, no per-sample loop.
    """
    sources, digit_size = digits.shape[0], digits.shape[-1]
    low, high = fragment_sizes
    steps = torch.arange(max(high, digit_size))
    out = torch.zeros(count, canvas, canvas)
    canvas_index = torch.arange(count)[:, None, None]

    def paste(patches: torch.Tensor) -> None:
        size = patches.shape[-1]
        top, left = torch.randint(canvas - size + 1, (2, count, 1), generator=generator)
        rows = (top + steps[:size])[:, :, None]
        cols = (left + steps[:size])[:, None, :]
        out[canvas_index, rows, cols] = torch.maximum(out[canvas_index, rows, cols], patches)

    chosen = torch.randint(sources, (count,), generator=generator)
    for _ in range(clutter):
        other = (chosen + torch.randint(1, sources, (count,), generator=generator)) % sources
        top, left = torch.randint(digit_size - high + 1, (2, count, 1), generator=generator)
        crops = digits[
            other[:, None, None],
            (top + steps[:high])[:, :, None],
            (left + steps[:high])[:, None, :],
        ]
        height, width = torch.randint(low, high + 1, (2, count, 1, 1), generator=generator)
        inside = (steps[:high, None] < height) & (steps[:high] < width)
        paste(crops * inside)
    paste(digits[chosen])
    return to_uint8(out.unsqueeze(1)), labels[chosen]


@loads("cluttered-digits")
def load_cluttered_digits(request: LoadRequest) -> Images:
    canvas = request.option("canvas")
    digit_size = request.option("digit_size")
    clutter = request.option("clutter")
    fragments = request.option("fragment_size")
    num_train = request.option("num_train")
    num_test = request.option("num_test")
    images, labels = digit_images()
    digits = resize(images, digit_size)[:, 0]
    # Test canvases are made of digits no training canvas shows, not even as clutter.
    train, test = split_indices(labels, TEST_FRACTION, request.data_seed)
    seed = request.data_seed
    train_x, train_y = cluttered_canvases(
        digits[train],
        labels[train],
        num_train,
        canvas,
        clutter,
        fragments,
        stream_generator(seed, 1),
    )
    test_x, test_y = cluttered_canvases(
        digits[test], labels[test], num_test, canvas, clutter, fragments, stream_generator(seed, 2)
    )
    return Images(train_x, train_y, test_x, test_y, 10, class_names=DIGIT_NAMES)
