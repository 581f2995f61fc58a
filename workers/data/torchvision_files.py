"""Datasets in torchvision's file formats: CIFAR-10/100 (pickled batches) and MNIST / Fashion-MNIST
(idx files), read from ``root`` or downloaded there on request."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.data.base import DatasetNotFound, Images, LoadRequest, loads


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


@loads("cifar10", class_name="CIFAR10")
@loads("cifar100", class_name="CIFAR100")
def load_cifar(request: LoadRequest, class_name: str) -> Images:
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
    if missing and request.option("download"):
        download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
        missing = [folder / name for name in names if not (folder / name).is_file()]
    if missing:
        source = f"the folder {spec.base_folder} extracted from {spec.url}"
        raise DatasetNotFound(_not_found(request, class_name, missing[0], root, source), folder)
    train_x, train_y = _read_cifar([folder / name for name, _ in spec.train_list])
    test_x, test_y = _read_cifar([folder / name for name, _ in spec.test_list])
    listed = _read_pickle(folder / spec.meta["filename"])[spec.meta["key"]]
    names = tuple(name.decode() if isinstance(name, bytes) else str(name) for name in listed)
    return Images(train_x, train_y, test_x, test_y, len(names), class_names=names)


@loads("mnist", class_name="MNIST")
@loads("fashion-mnist", class_name="FashionMNIST")
def load_mnist(request: LoadRequest, class_name: str) -> Images:
    """MNIST-format idx files through torchvision (which checks only that the files exist)."""
    from torchvision import datasets

    spec = getattr(datasets, class_name)
    root = request.root()
    raw = root / class_name / "raw"
    download = request.option("download")
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
        class_names=tuple(spec.classes),
    )
