"""The dataset catalogue: every dataset a search may name, its options, their types and bounds.

Pure data, no torch: the spec checks a dataset's name here, the API can publish the options, and
the loaders (:mod:`workers.data`, one module per family) read every option through
:func:`option_value`, so an option's type, default and bounds are written once. A loader
registers for names of this catalogue only.

Generated datasets and the carved test sets depend on the option ``data_seed`` (default 0), not
on the search's seed, so that searches with different seeds train and report on the same data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.errors import InvalidValue

INTEGER = "integer"
BOOLEAN = "boolean"
NUMBER = "number"
PATH = "path"
SIZE_RANGE = "size range"


@dataclass(frozen=True)
class DatasetOption:
    """One option of a dataset. ``default`` None with ``default_text``: the loader works the
    default out (``default_text`` says how). ``at_least`` / ``at_most`` name another option of
    the same dataset that bounds this one."""

    kind: str
    description: str
    default: Any = None
    default_text: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    at_least: str | None = None
    at_most: str | None = None
    required: bool = False


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset by name: what it is, and the options its loader reads."""

    name: str
    summary: str
    options: Mapping[str, DatasetOption] = field(default_factory=dict)
    needs_files: bool = False  # read from files under ``root`` (not generated or bundled)


_DATA_SEED = DatasetOption(
    INTEGER,
    "The seed of generated images and of a carved test set (not the search's seed).",
    default=0,
    minimum=0,
)
_FILE_OPTIONS = {
    "root": DatasetOption(
        PATH,
        "The directory holding the dataset's files.",
        default_text="<data_dir>/<dataset name>",
    ),
    "download": DatasetOption(BOOLEAN, "Download the files when they are missing.", default=False),
}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits",
            "scikit-learn's 8x8 handwritten digits, resized",
            {
                "size": DatasetOption(INTEGER, "Image side in pixels.", default=32, minimum=8),
                "data_seed": _DATA_SEED,
            },
        ),
        DatasetInfo(
            "cluttered-digits",
            "digits at random places on a larger canvas among fragments of other digits",
            {
                "canvas": DatasetOption(INTEGER, "Canvas side in pixels.", default=32, minimum=8),
                "digit_size": DatasetOption(
                    INTEGER, "Digit side in pixels.", default=14, minimum=4, at_most="canvas"
                ),
                "clutter": DatasetOption(
                    INTEGER, "Fragments of other digits per canvas.", default=6, minimum=0
                ),
                "fragment_size": DatasetOption(
                    SIZE_RANGE,
                    "Fragment side in pixels: an integer, or [min, max] (at most digit_size).",
                    default=(5, 7),
                    minimum=1,
                    at_most="digit_size",
                ),
                "num_train": DatasetOption(INTEGER, "Training canvases.", default=5000, minimum=1),
                "num_test": DatasetOption(INTEGER, "Test canvases.", default=1000, minimum=1),
                "data_seed": _DATA_SEED,
            },
        ),
        DatasetInfo("cifar10", "CIFAR-10", _FILE_OPTIONS, needs_files=True),
        DatasetInfo("cifar100", "CIFAR-100", _FILE_OPTIONS, needs_files=True),
        DatasetInfo("mnist", "MNIST", _FILE_OPTIONS, needs_files=True),
        DatasetInfo("fashion-mnist", "Fashion-MNIST", _FILE_OPTIONS, needs_files=True),
        DatasetInfo(
            "imagefolder",
            "any directory of class folders",
            {
                "root": DatasetOption(
                    PATH,
                    "A directory of class folders, or with train/ (val/, test/) of them.",
                    required=True,
                ),
                "size": DatasetOption(INTEGER, "Image side in pixels.", default=64, minimum=4),
                "channels": DatasetOption(
                    INTEGER,
                    "1 (grey) or 3 (RGB).",
                    default_text="from the first training image",
                    choices=(1, 3),
                ),
                "memory_budget_mb": DatasetOption(
                    NUMBER,
                    "Decode into memory up to this size; larger folders are streamed.",
                    default=2048,
                    minimum=0,
                ),
                "num_workers": DatasetOption(
                    INTEGER,
                    "Decoding threads or loader processes.",
                    default_text="min(4, CPU count)",
                    minimum=0,
                ),
            },
            needs_files=True,
        ),
        DatasetInfo(
            "synthetic",
            "class patterns plus noise, for tests",
            {
                "size": DatasetOption(INTEGER, "Image side in pixels.", default=16, minimum=4),
                "channels": DatasetOption(INTEGER, "Image channels.", default=3, minimum=1),
                "num_classes": DatasetOption(INTEGER, "Classes.", default=4, minimum=2),
                "num_samples": DatasetOption(
                    INTEGER, "Training images.", default=512, at_least="num_classes"
                ),
                "num_test": DatasetOption(
                    INTEGER,
                    "Test images.",
                    default_text="max(num_classes, num_samples // 4)",
                    minimum=1,
                ),
                "data_seed": _DATA_SEED,
            },
        ),
    )
}


def dataset_info(name: Any, field_path: str = "dataset.name") -> DatasetInfo:
    if not isinstance(name, str) or name not in DATASETS:
        raise InvalidValue(field_path, name, tuple(DATASETS))
    return DATASETS[name]


def check_option_keys(name: str, options: Mapping[str, Any]) -> DatasetInfo:
    """The dataset ``name``, after checking that it has every key of ``options``: an unknown
    key is an error at ``dataset.options.<key>``."""
    info = dataset_info(name)
    for key in options:
        if key not in info.options:
            allowed = tuple(info.options) or f"no option ({name} takes none)"
            raise InvalidValue(f"dataset.options.{key}", key, allowed)
    return info


def check_options(name: str, options: Mapping[str, Any]) -> DatasetInfo:
    """The dataset ``name``, after checking ``options`` whole against the catalogue: known keys,
    values of their types within their bounds, the required ones given. The spec runs this at
    submit, so a typo is refused before any worker loads data."""
    info = check_option_keys(name, options)
    for key in info.options:
        option_value(info, options, key)
    return info


def check_paths(name: str, options: Mapping[str, Any], roots: Sequence[Path]) -> None:
    """Every path option of ``options`` must resolve (``~`` expanded, symlinks followed) inside
    one of ``roots``: a caller names paths on the workers' hosts, and may name no other (not
    ``/etc``, not ``../..``)."""
    info = dataset_info(name)
    for key, value in options.items():
        option = info.options.get(key)
        if option is None or option.kind != PATH or value is None:
            continue
        check_path(f"dataset.options.{key}", value, roots)


def check_path(field: str, value: Any, roots: Sequence[Path]) -> None:
    """``value`` must resolve (``~`` expanded, symlinks followed) inside one of ``roots``."""
    allowed = [Path(root).expanduser().resolve() for root in roots]
    resolved = Path(str(value)).expanduser().resolve()
    if not any(resolved.is_relative_to(root) for root in allowed):
        inside = " or ".join(str(root) for root in allowed)
        raise InvalidValue(
            field, value, f"a path inside {inside} (the server's data roots, CBAM_NAS_DATA_ROOTS)"
        )


def check_download(options: Mapping[str, Any], allowed: bool) -> None:
    """A download asked for (``download: true``) where the server's settings forbid it is an
    error at ``dataset.options.download``."""
    if not allowed and options.get("download") is True:
        raise InvalidValue(
            "dataset.options.download",
            True,
            "false (this server downloads no datasets: CBAM_NAS_ALLOW_DOWNLOADS is false; put "
            "the files under a data root)",
        )


def option_value(
    info: DatasetInfo, options: Mapping[str, Any], key: str, default: Any = None
) -> Any:
    """Option ``key`` of ``options`` checked against the catalogue, else its default (the
    catalogue's, or ``default`` where the loader works it out). Bounds that name another
    option read that option's value too."""
    spec = info.options[key]
    path = f"dataset.options.{key}"
    value = options.get(key)
    if value is None:
        if spec.required:
            raise InvalidValue(path, None, spec.description)
        value = spec.default if spec.default is not None else default
        if value is None:
            return None
    low = spec.minimum
    if spec.at_least is not None:
        low = option_value(info, options, spec.at_least)
    high = spec.maximum
    if spec.at_most is not None:
        high = option_value(info, options, spec.at_most)
    if spec.kind == INTEGER:
        return _integer(path, value, low, high, spec.choices)
    if spec.kind == BOOLEAN:
        if not isinstance(value, bool):
            raise InvalidValue(path, value, "true or false")
        return value
    if spec.kind == NUMBER:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (low is not None and value < low):
            raise InvalidValue(
                path, value, f"a number >= {low:g}" if low is not None else "a number"
            )
        return value
    if spec.kind == SIZE_RANGE:
        return _size_range(path, value, int(low or 1), high)
    return str(value)  # PATH


def _integer(
    path: str, value: Any, low: float | None, high: float | None, choices: tuple[Any, ...] | None
) -> int:
    if choices is not None:
        if isinstance(value, bool) or value not in choices:
            raise InvalidValue(path, value, choices)
        return int(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        allowed = f"an integer >= {low:g}" if low is not None else "an integer"
        raise InvalidValue(path, value, allowed + ("" if high is None else f" and <= {high:g}"))
    return value


def _size_range(path: str, value: Any, low: int, high: float | None) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
        or not low <= pair[0] <= pair[1]
        or (high is not None and pair[1] > high)
    ):
        raise InvalidValue(
            path,
            value,
            f"an integer or a pair [min, max] with {low} <= min <= max <= digit_size ({high:g})",
        )
    return int(pair[0]), int(pair[1])
