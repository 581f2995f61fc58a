"""Datasets by name, held in memory as uint8 NCHW tensors or, for large image folders, streamed.

Every dataset comes back split three ways: train and validation (carved from the training set,
stratified, by the search's seed) and test (the dataset's own test set, or a fixed stratified 20%
for datasets without one; only for the final report). The content of generated datasets and the
carved test sets depend on the option ``data_seed`` (default 0), not on the search's seed, so that
searches with different seeds train and report on the same data.

Loaded datasets are cached per process (a few entries, least recently used first out), so that a
worker reuses them across the trials of a search. Images stay uint8 until the training loop
normalises them on its device with ``mean`` and ``std`` (per channel, of the training images, in
[0, 1] units).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from search.errors import InvalidValue

TEST_FRACTION = 0.2
"""The share of a dataset without a test set of its own that is held out for the final report."""

CACHE_SIZE = 4
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
        return decode_image(path, self.size, self.channels), label

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
    """What a loader is asked for; ``options`` are the user's, checked against the loader's keys."""

    name: str
    options: Mapping[str, Any]
    data_dir: Path
    val_fraction: float
    seed: int

    def int_option(self, key: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.options.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            allowed = f"an integer >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
            raise InvalidValue(f"dataset.options.{key}", value, allowed)
        return value

    def bool_option(self, key: str, default: bool = False) -> bool:
        value = self.options.get(key, default)
        if not isinstance(value, bool):
            raise InvalidValue(f"dataset.options.{key}", value, "true or false")
        return value

    @property
    def data_seed(self) -> int:
        return self.int_option("data_seed", 0, 0)

    def root(self) -> Path:
        """``options.root``, else ``data_dir/<dataset name>``."""
        root = self.options.get("root")
        return self.data_dir / self.name if root is None else Path(str(root)).expanduser()


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


Loaded = Images | StreamingData


@dataclass(frozen=True)
class DatasetLoader:
    load: Callable[[LoadRequest], Loaded]
    options: tuple[str, ...]
    summary: str


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


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent random streams of one data seed (train and test canvases, ...)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


# -- digits ---------------------------------------------------------------------------------------

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


def _load_digits(request: LoadRequest) -> Images:
    size = request.int_option("size", 32, 8)
    images, labels = digit_images()
    x = to_uint8(resize(images, size))
    train, test = split_indices(labels, TEST_FRACTION, request.data_seed)
    return Images(x[train], labels[train], x[test], labels[test], 10)


def _fragment_sizes(request: LoadRequest, digit_size: int) -> tuple[int, int]:
    value = request.options.get("fragment_size", (5, 7))
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        or not 1 <= pair[0] <= pair[1] <= digit_size
    ):
        raise InvalidValue(
            "dataset.options.fragment_size",
            value,
            f"an integer or a pair [min, max] with 1 <= min <= max <= digit_size ({digit_size})",
        )
    return int(pair[0]), int(pair[1])


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


def _load_cluttered_digits(request: LoadRequest) -> Images:
    canvas = request.int_option("canvas", 32, 8)
    digit_size = request.int_option("digit_size", 14, 4, canvas)
    clutter = request.int_option("clutter", 6, 0)
    fragments = _fragment_sizes(request, digit_size)
    num_train = request.int_option("num_train", 5000, 1)
    num_test = request.int_option("num_test", 1000, 1)
    images, labels = digit_images()
    digits = resize(images, digit_size)[:, 0]
    # Test canvases are made of digits no training canvas shows, not even as clutter.
    train, test = split_indices(labels, TEST_FRACTION, request.data_seed)
    seed = request.data_seed
    train_x, train_y = cluttered_canvases(
        digits[train], labels[train], num_train, canvas, clutter, fragments, _generator(seed, 1)
    )
    test_x, test_y = cluttered_canvases(
        digits[test], labels[test], num_test, canvas, clutter, fragments, _generator(seed, 2)
    )
    return Images(train_x, train_y, test_x, test_y, 10)


# -- synthetic ------------------------------------------------------------------------------------


def _load_synthetic(request: LoadRequest) -> Images:
    """Each class a smooth random pattern; each image its class's pattern plus uniform noise."""
    size = request.int_option("size", 16, 4)
    channels = request.int_option("channels", 3, 1)
    num_classes = request.int_option("num_classes", 4, 2)
    num_samples = request.int_option("num_samples", 512, num_classes)
    num_test = request.int_option("num_test", max(num_classes, num_samples // 4), 1)
    seed = request.data_seed
    coarse = torch.rand(num_classes, channels, 4, 4, generator=_generator(seed, 0))
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
        noise = torch.rand(count, channels, size, size, generator=generator)
        return to_uint8(255 * (0.6 * patterns[labels] + 0.4 * noise)), labels

    train_x, train_y = sample(num_samples, _generator(seed, 1))
    test_x, test_y = sample(num_test, _generator(seed, 2))
    return Images(train_x, train_y, test_x, test_y, num_classes)


# -- torchvision's file formats -------------------------------------------------------------------


def _not_found(request: LoadRequest, what: str, missing: Path, folder: Path, source: str) -> str:
    return (
        f"{request.name}: {what} not found: {missing} is missing. Put {source} into {folder} "
        f"(or point dataset options root at the directory that holds it), or set dataset "
        "options {download: true} to download it there."
    )


def _read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle; real ones are Python 2 pickles with str keys, ours may have bytes keys."""
    with path.open("rb") as file:
        entry = pickle.load(file, encoding="latin1")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in entry.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    entry = _read_pickle(path)
    labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
    return np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), list(labels)


def _read_cifar(paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [_read_cifar_batch(path) for path in paths]
    images = np.concatenate([data for data, _ in batches])
    labels = [label for _, batch_labels in batches for label in batch_labels]
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64)


def _load_cifar(request: LoadRequest, class_name: str) -> Images:
    """CIFAR-10/100 in torchvision's layout (``root/cifar-10-batches-py/data_batch_1`` ...).

    torchvision's own classes refuse files whose md5 differs from the published archive's, which
    rules out the small files the tests write; the format is a few pickled dicts, so we read it
    here, rows already channel-planar (NCHW), and use torchvision only to download.
    """
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    spec = getattr(datasets, class_name)
    root = request.root()
    folder = root / spec.base_folder
    names = [name for name, _ in spec.train_list + spec.test_list] + [spec.meta["filename"]]
    missing = [folder / name for name in names if not (folder / name).is_file()]
    if missing and request.bool_option("download"):
        download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
        missing = [folder / name for name in names if not (folder / name).is_file()]
    if missing:
        source = f"the folder {spec.base_folder} extracted from {spec.url}"
        raise DatasetNotFound(_not_found(request, class_name, missing[0], root, source), folder)
    train_x, train_y = _read_cifar([folder / name for name, _ in spec.train_list])
    test_x, test_y = _read_cifar([folder / name for name, _ in spec.test_list])
    num_classes = len(_read_pickle(folder / spec.meta["filename"])[spec.meta["key"]])
    return Images(train_x, train_y, test_x, test_y, num_classes)


def _load_mnist(request: LoadRequest, class_name: str) -> Images:
    """MNIST-format idx files through torchvision (which checks only that the files exist)."""
    from torchvision import datasets

    spec = getattr(datasets, class_name)
    root = request.root()
    raw = root / class_name / "raw"
    download = request.bool_option("download")
    try:
        train = spec(str(root), train=True, download=download)
        test = spec(str(root), train=False, download=download)
    except RuntimeError as error:
        names = [Path(url).with_suffix("").name for url, _ in spec.resources]
        missing = [raw / name for name in names if not (raw / name).is_file()]
        if not missing:
            raise
        source = f"the uncompressed idx files ({', '.join(names)}) from {spec.mirrors[0]}"
        message = _not_found(request, class_name, missing[0], raw, source)
        raise DatasetNotFound(message, raw) from (error if download else None)
    return Images(
        train.data.unsqueeze(1).contiguous(),
        train.targets.long(),
        test.data.unsqueeze(1).contiguous(),
        test.targets.long(),
        len(spec.classes),
    )


# -- image folders --------------------------------------------------------------------------------


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """One image file as a uint8 (channels, size, size) tensor (bilinear, antialiased resize)."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        array = np.array(image)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def _decode_all(files: ImageFiles, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(len(files), files.channels, files.size, files.size, dtype=torch.uint8)

    def decode(index: int) -> None:
        out[index] = files[index][0]

    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes with the GIL released
        list(pool.map(decode, range(len(files))))
    return out, files.labels()


def _image_channels(request: LoadRequest, first_image: str) -> int:
    if "channels" in request.options:
        channels = request.int_option("channels", 3, 1, 3)
        if channels == 2:
            raise InvalidValue("dataset.options.channels", channels, (1, 3))
        return channels
    with Image.open(first_image) as image:
        return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def _load_imagefolder(request: LoadRequest) -> Loaded:
    """``root`` with ``train/`` (and optionally ``val/`` and ``test/``) of class folders, or
    ``root`` itself a folder of class folders (then no test set)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if request.options.get("root") is None:
        raise InvalidValue(
            "dataset.options.root", None, "a directory of class folders, or with train/ val/ test/"
        )
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
    size = request.int_option("size", 64, 4)
    channels = _image_channels(request, train_samples[0][0])
    workers = request.int_option("num_workers", min(4, os.cpu_count() or 1), 0)
    budget = request.options.get("memory_budget_mb", 2048)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise InvalidValue("dataset.options.memory_budget_mb", budget, "a number >= 0")

    train = ImageFiles(train_samples, size, channels)
    val = None if val_samples is None else ImageFiles(val_samples, size, channels)
    test = None if test_samples is None else ImageFiles(test_samples, size, channels)
    parts = [part for part in (train, val, test) if part is not None]
    if sum(len(part) for part in parts) * channels * size * size <= budget * 2**20:
        train_x, train_y = _decode_all(train, workers)
        val_x, val_y = (None, None) if val is None else _decode_all(val, workers)
        test_x, test_y = (None, None) if test is None else _decode_all(test, workers)
        return Images(train_x, train_y, test_x, test_y, len(classes), val_x, val_y)

    if val is None:
        kept, held = split_indices(train.labels(), request.val_fraction, request.seed)
        train, val = train.subset(kept), train.subset(held)
    sample = torch.randperm(len(train), generator=_generator(request.seed, 3))[:STATS_SAMPLES]
    decoded = DataLoader(train.subset(sample), batch_size=64, num_workers=workers)
    mean, std = channel_stats(torch.cat([images for images, _ in decoded]))
    return StreamingData(
        request.name, train, val, test, len(classes), channels, size, mean, std, workers
    )


# -- the registry ---------------------------------------------------------------------------------

_FILE_OPTIONS = ("root", "download")

DATASETS: dict[str, DatasetLoader] = {
    "digits": DatasetLoader(
        _load_digits, ("size", "data_seed"), "scikit-learn's 8x8 handwritten digits, resized"
    ),
    "cluttered-digits": DatasetLoader(
        _load_cluttered_digits,
        ("canvas", "digit_size", "clutter", "fragment_size", "num_train", "num_test", "data_seed"),
        "digits at random places on a larger canvas among fragments of other digits",
    ),
    "cifar10": DatasetLoader(partial(_load_cifar, class_name="CIFAR10"), _FILE_OPTIONS, "CIFAR-10"),
    "cifar100": DatasetLoader(
        partial(_load_cifar, class_name="CIFAR100"), _FILE_OPTIONS, "CIFAR-100"
    ),
    "mnist": DatasetLoader(partial(_load_mnist, class_name="MNIST"), _FILE_OPTIONS, "MNIST"),
    "fashion-mnist": DatasetLoader(
        partial(_load_mnist, class_name="FashionMNIST"), _FILE_OPTIONS, "Fashion-MNIST"
    ),
    "imagefolder": DatasetLoader(
        _load_imagefolder,
        ("root", "size", "channels", "memory_budget_mb", "num_workers"),
        "any directory of class folders",
    ),
    "synthetic": DatasetLoader(
        _load_synthetic,
        ("size", "channels", "num_classes", "num_samples", "num_test", "data_seed"),
        "class patterns plus noise, for tests",
    ),
}


def check_options(name: str, options: Mapping[str, Any]) -> DatasetLoader:
    """The loader of ``name``, after checking that it knows every key of ``options``."""
    loader = DATASETS.get(name)
    if loader is None:
        raise InvalidValue("dataset.name", name, sorted(DATASETS))
    for key in options:
        if key not in loader.options:
            raise InvalidValue("dataset.options", key, loader.options)
    return loader


def _freeze(value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(key), _freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


_cache: OrderedDict[Hashable, DatasetTensors | StreamingData] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def load_dataset(
    name: str, options: Mapping[str, Any], data_dir: Path, val_fraction: float, seed: int
) -> DatasetTensors | StreamingData:
    """The dataset ``name``, split into train/validation (by ``seed``) and test; cached."""
    loader = check_options(name, options)
    if not 0 <= val_fraction < 1:
        raise InvalidValue("dataset.val_fraction", val_fraction, "a number in [0, 1)")
    request = LoadRequest(name, dict(options), Path(data_dir), float(val_fraction), int(seed))
    key = (name, _freeze(options), request.data_dir, request.val_fraction, request.seed)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        result = _split(request, loader.load(request))
        _cache[key] = result
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return result


def _split(request: LoadRequest, loaded: Loaded) -> DatasetTensors | StreamingData:
    if isinstance(loaded, StreamingData):
        return loaded
    if loaded.val_x is None or loaded.val_y is None:
        kept, held = split_indices(loaded.train_y, request.val_fraction, request.seed)
        train_x, train_y = loaded.train_x[kept], loaded.train_y[kept]
        val_x, val_y = loaded.train_x[held], loaded.train_y[held]
    else:
        train_x, train_y, val_x, val_y = loaded.train_x, loaded.train_y, loaded.val_x, loaded.val_y
    mean, std = channel_stats(train_x)
    return DatasetTensors(
        name=request.name,
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=loaded.test_x,
        test_y=loaded.test_y,
        num_classes=loaded.num_classes,
        in_channels=train_x.shape[1],
        image_size=train_x.shape[-1],
        mean=mean,
        std=std,
    )
