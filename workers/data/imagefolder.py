"""Any directory of class folders (``imagefolder``): decoded into memory when it fits the memory
budget, else streamed from the files by DataLoader workers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch.utils.data import DataLoader

from workers.data.base import (
    STATS_SAMPLES,
    DatasetNotFound,
    ImageFiles,
    Images,
    Loaded,
    LoadRequest,
    StreamingData,
    channel_stats,
    loads,
    split_indices,
    stream_generator,
)


def _decode_all(files: ImageFiles, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(len(files), files.channels, files.size, files.size, dtype=torch.uint8)

    def decode(index: int) -> None:
        out[index] = files[index][0]

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes with the GIL released
        list(pool.map(decode, range(len(files))))
    return out, files.labels()


def _image_channels(request: LoadRequest, first_image: str) -> int:
    channels = request.option("channels")
    if channels is not None:
        return channels
    with Image.open(first_image) as image:
        return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


@loads("imagefolder")
def load_imagefolder(request: LoadRequest) -> Loaded:
    """``root`` with ``train/`` (and optionally ``val/`` and ``test/``) of class folders, or
    ``root`` itself a folder of class folders (then no test set)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = request.root()
    if not root.is_dir():
        raise DatasetNotFound(
            f"{request.name}: {root} is not a directory; dataset options root must name a "
            "directory of class folders (or with train/, val/, test/ subfolders of them)",
            root,
        )
    split = (root / "train").is_dir()
    train_dir = root / "train" if split else root
    try:
        classes, class_to_idx = find_classes(str(train_dir))
        train_samples = make_dataset(str(train_dir), class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as error:
        raise DatasetNotFound(f"{request.name}: {error}", train_dir) from None

    def optional(folder: str) -> list[tuple[str, int]] | None:
        path = root / folder
        if not (split and path.is_dir()):
            return None
        return make_dataset(str(path), class_to_idx, IMG_EXTENSIONS, allow_empty=True)

    val_samples, test_samples = optional("val"), optional("test")
    size = request.option("size")
    channels = _image_channels(request, train_samples[0][0])
    workers = request.option("num_workers", min(4, os.cpu_count() or 1))
    budget = request.option("memory_budget_mb")

    train = ImageFiles(train_samples, size, channels)
    val = None if val_samples is None else ImageFiles(val_samples, size, channels)
    test = None if test_samples is None else ImageFiles(test_samples, size, channels)
    parts = [part for part in (train, val, test) if part is not None]
    if sum(len(part) for part in parts) * channels * size * size <= budget * 2**20:
        train_x, train_y = _decode_all(train, workers)
        val_x, val_y = (None, None) if val is None else _decode_all(val, workers)
        test_x, test_y = (None, None) if test is None else _decode_all(test, workers)
        return Images(train_x, train_y, test_x, test_y, len(classes), val_x, val_y, tuple(classes))

    if val is None:
        kept, held = split_indices(train.labels(), request.val_fraction, request.seed)
        train, val = train.subset(kept), train.subset(held)
    sample = torch.randperm(len(train), generator=stream_generator(request.seed, 3))[:STATS_SAMPLES]
    decoded = DataLoader(train.subset(sample), batch_size=64, num_workers=workers)
    mean, std = channel_stats(torch.cat([images for images, _ in decoded]))
    return StreamingData(
        request.name,
        train,
        val,
        test,
        len(classes),
        channels,
        size,
        mean,
        std,
        workers,
        class_names=tuple(classes),
    )
