"""Datasets by name, held in memory as uint8 NCHW tensors or, for large image folders, streamed.

One module per loader family (:mod:`~workers.data.digits`, :mod:`~workers.data.synthetic`,
:mod:`~workers.data.torchvision_files`, :mod:`~workers.data.imagefolder`), each registered for
names of the dataset catalogue (:mod:`search.datasets`), which holds every option's type, default
and bounds; :mod:`~workers.data.base` has what they share.

Loaded datasets are cached per process (a few entries, least recently used first out), so that a
worker reuses them across the trials of a search.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from search.datasets import DATASETS, check_option_keys
from search.errors import InvalidValue
from workers.data import digits, imagefolder, synthetic, torchvision_files
from workers.data.base import (
    LOADERS,
    DatasetNotFound,
    DatasetTensors,
    ImageFiles,
    Loaded,
    LoadRequest,
    StreamingData,
    channel_stats,
    split_indices,
)

__all__ = [
    "DatasetNotFound",
    "DatasetTensors",
    "ImageFiles",
    "StreamingData",
    "clear_cache",
    "load_dataset",
]

_FAMILIES = (digits, imagefolder, synthetic, torchvision_files)  # imported to register
if set(LOADERS) != set(DATASETS):
    raise RuntimeError(f"datasets without a loader: {sorted(set(DATASETS) - set(LOADERS))}")

CACHE_SIZE = 4


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
    info = check_option_keys(name, options)
    if not 0 <= val_fraction < 1:
        raise InvalidValue("dataset.val_fraction", val_fraction, "a number in [0, 1)")
    request = LoadRequest(info, dict(options), Path(data_dir), float(val_fraction), int(seed))
    key = (name, _freeze(options), request.data_dir, request.val_fraction, request.seed)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        result = _split(request, LOADERS[name](request))
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
        class_names=loaded.class_names,
    )
