"""What every loader shares: the in-memory and streamed forms of a dataset, the request a loader
is asked, splits and statistics, and the registry of loaders by catalogue name.

Every dataset comes back split three ways: train and validation (carved from the training set,
stratified, by the search's seed) and test (the dataset's own test set, or a fixed stratified 20%
for datasets without one; only for the final report). Images stay uint8 until the training loop
normalises them on its device with ``mean`` and ``std`` (per channel, of the training images, in
[0, 1] units).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from search.datasets import DATASETS, DatasetInfo, option_value
from search.errors import InvalidValue
from search.preprocessing import read_image

TEST_FRACTION = 0.2
"""The share of a dataset without a test set of its own that is held out for the final report."""

STATS_SAMPLES = 512
"""How many training images a streamed dataset decodes to estimate its mean and std."""

Stats = tuple[float, ...]


class DatasetNotFound(FileNotFoundError):
    """A dataset's files are not where the loader looked; the message says where to put them."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(eq=False)
class DatasetTensors:
    """A dataset held in memory: uint8 NCHW images and int64 labels, CPU tensors."""

    name: str
    train_x: torch.Tensor = field(repr=False)
    train_y: torch.Tensor = field(repr=False)
    val_x: torch.Tensor = field(repr=False)
    val_y: torch.Tensor = field(repr=False)
    test_x: torch.Tensor | None = field(repr=False)
    test_y: torch.Tensor | None = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    mean: Stats
    std: Stats
    class_names: tuple[str, ...] | None = None

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Number of train, validation and test images."""
        return len(self.train_y), len(self.val_y), 0 if self.test_y is None else len(self.test_y)


class ImageFiles(Dataset):
    """Image files with their labels, decoded to uint8 CHW tensors of one size and channel count."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, channels: int) -> None:
        self.samples = list(samples)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return read_image(path, self.channels, self.size), label

    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def subset(self, indices: torch.Tensor) -> ImageFiles:
        return ImageFiles([self.samples[i] for i in indices.tolist()], self.size, self.channels)


@dataclass(eq=False)
class StreamingData:
    """An image folder too large for memory: files decoded in DataLoader worker processes.

    The loaders yield ``(uint8 NCHW images, int64 labels)`` batches, the same form as the slices of
    :class:`DatasetTensors`, so that training normalises both alike.
    """

    name: str
    train: ImageFiles = field(repr=False)
    val: ImageFiles = field(repr=False)
    test: ImageFiles | None = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    mean: Stats
    std: Stats
    num_workers: int = 2
    class_names: tuple[str, ...] | None = None

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), 0 if self.test is None else len(self.test)

    def train_loader(
        self, batch_size: int, seed: int, pin_memory: bool | None = None
    ) -> DataLoader:
        """Shuffled in an order fixed by ``seed`` (a new order each epoch, the same on a rerun)."""
        generator = torch.Generator().manual_seed(seed)
        return self._loader(self.train, batch_size, pin_memory, shuffle=True, generator=generator)

    def val_loader(self, batch_size: int, pin_memory: bool | None = None) -> DataLoader:
        return self._loader(self.val, batch_size, pin_memory)

    def test_loader(self, batch_size: int, pin_memory: bool | None = None) -> DataLoader | None:
        return None if self.test is None else self._loader(self.test, batch_size, pin_memory)

    def _loader(
        self, files: ImageFiles, batch_size: int, pin_memory: bool | None, **kwargs: Any
    ) -> DataLoader:
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        return DataLoader(
            files,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_memory,
            **kwargs,
        )


@dataclass(frozen=True)
class LoadRequest:
    """What a loader is asked for; ``options`` are the user's, read through the catalogue."""

    info: DatasetInfo
    options: Mapping[str, Any]
    data_dir: Path
    val_fraction: float
    seed: int

    @property
    def name(self) -> str:
        return self.info.name

    def option(self, key: str, default: Any = None) -> Any:
        """Option ``key``, checked against the catalogue (:func:`search.datasets.option_value`);
        ``default`` where the catalogue leaves the default to the loader."""
        return option_value(self.info, self.options, key, default)

    @property
    def data_seed(self) -> int:
        return self.option("data_seed")

    def root(self) -> Path:
        """``options.root``, else ``data_dir/<dataset name>``."""
        root = self.option("root")
        return self.data_dir / self.name if root is None else Path(root).expanduser()


@dataclass(eq=False)
class Images:
    """What a loader returns before the validation split; ``val_*`` only where the data has one."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    num_classes: int
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None
    """The classes' names in label order, where the dataset has them."""


Loaded = Images | StreamingData


LoadFunction = Callable[[LoadRequest], Loaded]
LOADERS: dict[str, LoadFunction] = {}
"""Dataset name -> its loader; every name is one of :data:`search.datasets.DATASETS`."""


def loads(*names: str, **fixed: Any) -> Callable[[Callable[..., Loaded]], Callable[..., Loaded]]:
    """Register the decorated function as the loader of catalogue datasets ``names``, called
    as ``load(request, **fixed)``."""

    def register(load: Callable[..., Loaded]) -> Callable[..., Loaded]:
        for name in names:
            if name not in DATASETS:
                raise ValueError(f"{name!r} is not in the dataset catalogue (search.datasets)")
            LOADERS[name] = (lambda request, load=load: load(request, **fixed)) if fixed else load
        return load

    return register


# -- splits and statistics -------------------------------------------------------------------------


def split_indices(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: each class gives ``round(fraction * its count)`` samples to the held-out
    part, chosen by ``seed``. Returns (kept, held out) indices, each in ascending order."""
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(len(labels), generator=generator)
    order = permutation[torch.argsort(labels[permutation], stable=True)]
    grouped = labels[order]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels)) - starts[grouped]
    held = rank < torch.round(counts.double() * fraction).long()[grouped]
    return order[~held].sort().values, order[held].sort().values


def channel_stats(images: torch.Tensor) -> tuple[Stats, Stats]:
    """Per-channel mean and std of uint8 NCHW images in [0, 1] units (exact integer sums).

    A constant channel gets std 1 so that normalising never divides by zero.
    """
    if len(images) == 0:
        raise InvalidValue("dataset", "an empty training split", "a dataset with training images")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    squares = torch.zeros(channels, dtype=torch.int64)
    chunk = max(1, 2**22 // images[0].numel())
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].to(torch.int64)
        total += part.sum(dim=(0, 2, 3))
        squares += (part * part).sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total.double() / count
    std = (squares.double() / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-3, 255.0, std)
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.round().clamp(0, 255).to(torch.uint8)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of float NCHW images to size x size (a no-op at that size already)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def stream_generator(seed: int, stream: int) -> torch.Generator:
    """Independent random streams of one data seed (train and test canvases, ...)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)
