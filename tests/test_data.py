"""The dataset registry: generated datasets, real loaders on files written here, splits, caching."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search.datasets import DATASETS
from search.errors import InvalidValue
from workers.data import (
    DatasetNotFound,
    DatasetTensors,
    StreamingData,
    clear_cache,
    load_dataset,
)
from workers.data.base import LOADERS, loads


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def load(name: str, data_dir: Path, val_fraction: float = 0.1, seed: int = 0, **options):
    return load_dataset(name, options, data_dir, val_fraction, seed)


def test_every_catalogued_dataset_has_one_loader() -> None:
    assert set(LOADERS) == set(DATASETS)
    with pytest.raises(ValueError, match="not in the dataset catalogue"):
        loads("imagenet")(lambda request: None)


def test_unknown_name_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidValue) as error:
        load("imagenet", tmp_path)
    assert error.value.field == "dataset.name"
    with pytest.raises(InvalidValue) as error:
        load("cluttered-digits", tmp_path, canvass=40)
    assert error.value.field == "dataset.options.canvass" and "'canvas'" in str(error.value)
    with pytest.raises(InvalidValue) as error:
        load("cluttered-digits", tmp_path, canvas=16, digit_size=20)
    assert error.value.field == "dataset.options.digit_size"
    with pytest.raises(InvalidValue) as error:
        load("synthetic", tmp_path, val_fraction=1.0)
    assert error.value.field == "dataset.val_fraction"


def test_digits(tmp_path: Path) -> None:
    data = load("digits", tmp_path, size=16)
    assert isinstance(data, DatasetTensors)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 16)
    assert data.train_x.shape[1:] == (1, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.train_y.dtype == torch.int64
    assert sum(data.sizes) == 1797 and data.sizes[2] == pytest.approx(1797 * 0.2, abs=10)
    assert set(data.val_y.tolist()) == set(range(10)) == set(data.test_y.tolist())
    assert int(data.train_x.max()) > 200 and 0 < data.mean[0] < 1 and 0 < data.std[0] < 1
    assert data.class_names == tuple("0123456789")


def test_cluttered_digits_is_deterministic_for_its_data_seed(tmp_path: Path) -> None:
    options = {"canvas": 40, "digit_size": 16, "clutter": 4, "num_train": 200, "num_test": 50}
    first = load_dataset("cluttered-digits", options, tmp_path, 0.1, 0)
    assert first.train_x.shape[1:] == (1, 40, 40) and first.sizes == (180, 20, 50)
    assert first.num_classes == 10 and first.image_size == 40
    assert first.class_names == tuple("0123456789")
    clear_cache()
    again = load_dataset("cluttered-digits", options, tmp_path, 0.1, 0)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    other = load_dataset("cluttered-digits", {**options, "data_seed": 1}, tmp_path, 0.1, 0)
    assert not torch.equal(first.train_x, other.train_x)
    # The search's seed moves the validation split, not the images.
    reseeded = load_dataset("cluttered-digits", options, tmp_path, 0.1, 1)
    assert torch.equal(first.test_x, reseeded.test_x)
    assert not torch.equal(first.val_x, reseeded.val_x)
    total = first.train_x.sum() + first.val_x.sum()
    assert total == reseeded.train_x.sum() + reseeded.val_x.sum()


def test_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    first = load("synthetic", tmp_path, val_fraction=0.25, num_samples=400, num_classes=4)
    assert first.sizes == (300, 100, 100)
    assert torch.bincount(first.val_y).tolist() == [25, 25, 25, 25]
    clear_cache()
    again = load("synthetic", tmp_path, val_fraction=0.25, num_samples=400, num_classes=4)
    other = load("synthetic", tmp_path, val_fraction=0.25, seed=1, num_samples=400, num_classes=4)
    assert torch.equal(first.val_x, again.val_x) and torch.equal(first.train_y, again.train_y)
    assert not torch.equal(first.val_x, other.val_x)


def test_synthetic_is_learnable(tmp_path: Path) -> None:
    data = load("synthetic", tmp_path, size=8, channels=2, num_classes=5)
    assert data.train_x.shape[1:] == (2, 8, 8) and data.num_classes == 5
    flat = data.train_x.flatten(1).float()
    centroids = torch.stack([flat[data.train_y == k].mean(0) for k in range(5)])
    predicted = torch.cdist(data.test_x.flatten(1).float(), centroids).argmin(1)
    assert (predicted == data.test_y).float().mean() > 0.9


def test_cache_returns_the_same_object(tmp_path: Path) -> None:
    options = {"num_samples": 64, "size": 8}
    first = load_dataset("synthetic", options, tmp_path, 0.1, 0)
    assert load_dataset("synthetic", dict(reversed(options.items())), tmp_path, 0.1, 0) is first
    assert load_dataset("synthetic", options, tmp_path, 0.2, 0) is not first
    clear_cache()
    assert load_dataset("synthetic", options, tmp_path, 0.1, 0) is not first


# -- CIFAR and MNIST files in their real layouts --------------------------------------------------


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    with path.open("wb") as file:
        pickle.dump({b"data": images.reshape(len(images), -1), label_key: labels}, file)


def test_cifar10_reads_the_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 3, 32, 32), dtype=np.uint8)  # 5 train batches + test
    labels = rng.integers(0, 10, (6, 5))
    for i in range(5):
        write_cifar_batch(folder / f"data_batch_{i + 1}", images[i], labels[i].tolist(), b"labels")
    write_cifar_batch(folder / "test_batch", images[5], labels[5].tolist(), b"labels")
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump({b"label_names": [f"class{k}" for k in range(10)]}, file)

    data = load("cifar10", tmp_path, val_fraction=0.0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert data.class_names == tuple(f"class{k}" for k in range(10))  # the meta file's
    assert torch.equal(data.train_x, torch.from_numpy(images[:5].reshape(25, 3, 32, 32)))
    assert data.train_y.tolist() == labels[:5].ravel().tolist()
    assert (
        torch.equal(data.test_x, torch.from_numpy(images[5]))
        and data.test_y.tolist() == labels[5].tolist()
    )
    expected_mean = images[:5].transpose(2, 0, 1, 3, 4).reshape(3, -1).mean(1) / 255
    assert data.mean == pytest.approx(expected_mean.tolist())


def test_cifar100_reads_fine_labels_from_root(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere" / "cifar-100-python"
    folder.mkdir(parents=True)
    images = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3, 32, 32).astype(np.uint8)
    write_cifar_batch(folder / "train", images, [0, 99, 50, 7], b"fine_labels")
    write_cifar_batch(folder / "test", images[:2], [3, 4], b"fine_labels")
    with (folder / "meta").open("wb") as file:
        pickle.dump({b"fine_label_names": [str(k) for k in range(100)]}, file)

    data = load("cifar100", tmp_path, val_fraction=0.0, root=str(tmp_path / "elsewhere"))
    assert data.num_classes == 100 and data.train_y.tolist() == [0, 99, 50, 7]
    assert data.class_names is not None and data.class_names[99] == "99"
    assert torch.equal(data.train_x, torch.from_numpy(images))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_reads_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / name / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5))

    data = load(name, tmp_path, val_fraction=0.5)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert data.sizes == (10, 10, 5) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(test.astype(np.uint8)))
    assert data.test_y.tolist() == [0, 1, 2, 3, 4]
    assert data.class_names is not None and len(data.class_names) == 10  # torchvision's names


@pytest.mark.parametrize(
    "name, where", [("cifar10", "cifar10"), ("mnist", "mnist/MNIST/raw"), ("cifar100", "cifar100")]
)
def test_missing_files_say_where_to_put_them(tmp_path: Path, name: str, where: str) -> None:
    with pytest.raises(DatasetNotFound) as error:
        load(name, tmp_path)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert str(tmp_path / where) in message and "{download: true}" in message
    assert "https://" in message or "http://" in message


# -- image folders --------------------------------------------------------------------------------

COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255)}


def write_images(folder: Path, per_class: int, mode: str = "RGB") -> None:
    for name, colour in COLOURS.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("RGB", (20 + i, 24), colour).convert(mode)
            image.save(folder / name / f"{i}.png")


def test_imagefolder_with_splits_in_memory(tmp_path: Path) -> None:
    write_images(tmp_path / "tree" / "train", 6)
    write_images(tmp_path / "tree" / "val", 2)
    write_images(tmp_path / "tree" / "test", 3)
    data = load("imagefolder", tmp_path, root=str(tmp_path / "tree"), size=16, num_workers=2)
    assert isinstance(data, DatasetTensors)
    assert (data.num_classes, data.in_channels, data.image_size) == (2, 3, 16)
    assert data.sizes == (12, 4, 6) and data.train_x.shape == (12, 3, 16, 16)
    cats = data.train_x[data.train_y == 0].float().mean(dim=(0, 2, 3))
    assert cats[0] > 250 and cats[2] < 5  # class 0 is "cat", red
    assert data.mean == pytest.approx((0.5, 0.0, 0.5), abs=0.01)
    assert data.class_names == ("cat", "dog")  # the folders', in label order


def test_imagefolder_single_folder_grayscale(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 4, mode="L")
    data = load("imagefolder", tmp_path, val_fraction=0.25, root=str(tmp_path / "flat"), size=8)
    assert data.in_channels == 1 and data.sizes == (6, 2, 0) and data.test_x is None
    assert torch.bincount(data.val_y).tolist() == [1, 1]


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="not a directory"):
        load("imagefolder", tmp_path, root=str(tmp_path / "nowhere"))
    with pytest.raises(InvalidValue):
        load("imagefolder", tmp_path)


def test_imagefolder_over_the_memory_budget_streams(tmp_path: Path) -> None:
    write_images(tmp_path / "tree" / "train", 5)
    write_images(tmp_path / "tree" / "test", 2)
    options = {"root": str(tmp_path / "tree"), "size": 12, "memory_budget_mb": 0.001}
    data = load_dataset("imagefolder", {**options, "num_workers": 1}, tmp_path, 0.2, 0)
    assert isinstance(data, StreamingData)
    assert data.sizes == (8, 2, 4) and (data.num_classes, data.in_channels) == (2, 3)
    assert data.class_names == ("cat", "dog")
    assert data.mean == pytest.approx((0.5, 0.0, 0.5), abs=0.01)
    batches = list(data.train_loader(batch_size=3, seed=0))
    assert [len(y) for _, y in batches] == [3, 3, 2]
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 12, 12)
    assert labels.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == [0] * 4 + [1] * 4
    test_images, _ = next(iter(data.test_loader(batch_size=4)))
    assert test_images.shape == (4, 3, 12, 12)
