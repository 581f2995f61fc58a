"""SearchSpec: validation messages name the field and the allowed values; JSON/YAML round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from search.datasets import DATASETS
from search.errors import InvalidValue
from search.space import SearchSpace
from search.spec import (
    EARLY_STOPPING,
    OVERHEADS,
    SAMPLERS,
    BudgetSpec,
    DatasetSpec,
    ObjectivesSpec,
    SearchSpec,
    TrainingSpec,
)


def _custom_spec() -> SearchSpec:
    return SearchSpec(
        backbone="resnet18",
        dataset=DatasetSpec(
            name="cifar10", options={"root": "/data/cifar", "download": False}, val_fraction=0.2
        ),
        space=SearchSpace(
            arrangements=("channel-spatial", "spatial"),
            reductions=(8, 16),
            pool_types=(("avg", "max"), ("avg",)),
            kernel_sizes=(3, 7),
            stages=((3, 4), (1, 2, 3, 4)),
        ),
        objectives=ObjectivesSpec(
            overheads=("macs", "latency"), constraint_overhead="params", constraint_max_pct=5
        ),
        budget=BudgetSpec(trials=12, wall_clock_s=3600, max_retries=0),
        training=TrainingSpec(epochs=3, lr=1, optimizer="adamw", label_smoothing=0.1),
        sampler="nsga2",
        early_stopping={"policy": "median", "min_epochs": 2},
        seed=7,
        name="resnet18 on cifar10",
    )


@pytest.mark.parametrize("make", [SearchSpec, _custom_spec], ids=["default", "custom"])
def test_json_and_yaml_round_trip(make: Any) -> None:
    spec = make()
    data = json.loads(json.dumps(spec.to_dict()))
    assert data == spec.to_dict()
    assert SearchSpec.from_dict(data) == spec
    assert SearchSpec.from_yaml(spec.to_yaml()) == spec
    assert hash(SearchSpec.from_dict(data)) == hash(spec)


def test_values_are_normalised() -> None:
    spec = _custom_spec()
    assert isinstance(spec.early_stopping, type(SearchSpec().early_stopping))
    assert spec.training.lr == 1.0 and isinstance(spec.training.lr, float)
    assert spec.objectives.overheads == ("macs", "latency") and spec.objectives.constrained
    assert spec.objectives.constraint_max_pct == 5.0
    assert not SearchSpec().objectives.constrained
    # to_dict hands out copies: the frozen spec cannot be changed through them
    spec.to_dict()["dataset"]["options"]["root"] = "elsewhere"
    assert spec.dataset.options["root"] == "/data/cifar"


def test_yaml_file_with_short_float_notation(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        "backbone: cifar_resnet20\n"
        "dataset: {name: synthetic, options: {num_samples: 64}}\n"
        "training: {epochs: 2, lr: 1e-3, weight_decay: 5E-4}\n"
        "space: {arrangements: [channel], pool_types: [avg+max]}\n"
        "budget: {trials: 3}\n"
    )
    spec = SearchSpec.from_yaml(path)
    assert spec.training.lr == 0.001 and spec.training.weight_decay == 0.0005
    assert spec.space.pool_types == (("avg", "max"),)
    assert spec.dataset.options == {"num_samples": 64}
    assert SearchSpec.from_yaml("") == SearchSpec()


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(InvalidValue, match="line 2") as info:
        SearchSpec.from_yaml("backbone: resnet18\ntraining: {epochs: 1]\nseed: 1\n")
    assert info.value.field == "spec"


def _expect(data: dict[str, Any], field: str, *allowed: str) -> None:
    with pytest.raises(InvalidValue) as info:
        SearchSpec.from_dict(data)
    error = info.value
    assert error.field == field, str(error)
    assert str(error).startswith(f"{field}: ")
    for fragment in allowed:
        assert fragment in error.allowed, str(error)


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        ({"backbone": "resnet9"}, "backbone", ("'resnet18'", "'cifar_resnet20'")),
        ({"dataset": {"name": "imagenet"}}, "dataset.name", tuple(map(repr, DATASETS))),
        ({"sampler": "cmaes"}, "sampler", tuple(map(repr, SAMPLERS))),
        (
            {"early_stopping": {"policy": "asha"}},
            "early_stopping.policy",
            tuple(map(repr, EARLY_STOPPING)),
        ),
        (
            {"objectives": {"overheads": ["params", "flops"]}},
            "objectives.overheads[1]",
            tuple(map(repr, OVERHEADS)),
        ),
        ({"objectives": {"overheads": []}}, "objectives.overheads", ("params, macs, latency",)),
        (
            {"objectives": {"overheads": ["macs", "macs"]}},
            "objectives.overheads",
            ("at most once",),
        ),
        (
            {"objectives": {"constraint_overhead": "energy", "constraint_max_pct": 5}},
            "objectives.constraint_overhead",
            tuple(map(repr, OVERHEADS)),
        ),
        ({"training": {"epochs": 0}}, "training.epochs", ("an integer >= 1",)),
        ({"training": {"epochs": 2.5}}, "training.epochs", ("an integer >= 1",)),
        ({"training": {"batch_size": 0}}, "training.batch_size", ("an integer >= 1",)),
        ({"training": {"lr": 0}}, "training.lr", ("a number > 0",)),
        ({"training": {"lr": "fast"}}, "training.lr", ("a number > 0",)),
        ({"training": {"optimizer": "lion"}}, "training.optimizer", ("'sgd'", "'adamw'")),
        ({"training": {"schedule": "onecycle"}}, "training.schedule", ("'cosine'", "'step'")),
        ({"training": {"flip": "yes"}}, "training.flip", ("True", "False")),
        ({"training": {"momentum": 1.0}}, "training.momentum", (">= 0", "< 1")),
        ({"training": {"warmup_epochs": 3, "epochs": 3}}, "training.warmup_epochs", ("0 to 2",)),
        ({"training": {"momentum": 0}}, "training.nesterov", ("false when",)),
        ({"dataset": {"val_fraction": 0}}, "dataset.val_fraction", ("> 0", "< 1")),
        ({"dataset": {"val_fraction": 1.0}}, "dataset.val_fraction", ("> 0", "< 1")),
        ({"dataset": {"options": {"x": float("nan")}}}, "dataset.options", ("JSON",)),
        ({"budget": {"trials": 0}}, "budget.trials", ("an integer >= 1",)),
        ({"budget": {"wall_clock_s": -1}}, "budget.wall_clock_s", ("a number > 0",)),
        ({"space": {"kernel_sizes": [7, 4]}}, "space.kernel_sizes[1]", ("1, 3, 5, 7, 9",)),
        (
            {"space": {"stages": [[1, 5]]}},
            "space.stages[0]",
            ("stages of cifar_resnet20: 1, 2, 3",),
        ),
        ({"space": {"arrangements": []}}, "space.arrangements", ("a non-empty list",)),
        (
            {"objectives": {"constraint_overhead": "params"}},
            "objectives.constraint_max_pct",
            ("a number > 0",),
        ),
        (
            {"objectives": {"constraint_max_pct": 10}},
            "objectives.constraint_overhead",
            ("params, macs, latency",),
        ),
        ({"sampler": "grid"}, "sampler", ("tpe, nsga2, random", "at most 10,000")),
        (
            {"early_stopping": {"policy": "hyperband"}},
            "early_stopping.policy",
            ("none, halving", "constrained"),
        ),
        ({"seed": -1}, "seed", ("an integer from 0 to",)),
        ({"name": "x" * 201}, "name", ("at most 200",)),
        ({"epochs": 3}, "spec", ("'backbone'", "'training'")),
        ({"training": {"epoch": 3}}, "training", ("'epochs'", "'batch_size'")),
        ({"dataset": {"name": "digits", "root": "/x"}}, "dataset", ("'options'",)),
        ({"space": {"kernel": [3]}}, "space", ("'kernel_sizes'",)),
        ({"budget": 5}, "budget", ("a mapping with the fields trials",)),
    ],
)
def test_bad_field_is_named_with_allowed_values(
    data: dict[str, Any], field: str, allowed: tuple[str, ...]
) -> None:
    _expect(data, field, *allowed)


def test_grid_on_a_small_space_is_allowed() -> None:
    space = {"arrangements": ["channel"], "reductions": [8, 16], "blocks": ["all"]}
    spec = SearchSpec.from_dict({"sampler": "grid", "space": space})
    assert spec.space.size(spec.backbone) <= 10_000


def test_validate_checks_the_server_limit() -> None:
    spec = SearchSpec(budget=BudgetSpec(trials=50))
    assert spec.validate(max_trials=50) is spec
    assert spec.validate() is spec
    with pytest.raises(InvalidValue, match=r"budget\.trials: 50 .* from 1 to 20") as info:
        spec.validate(max_trials=20)
    assert info.value.field == "budget.trials"


def test_sections_constructed_directly_use_their_paths() -> None:
    with pytest.raises(InvalidValue, match=r"^training\.batch_size: -1"):
        TrainingSpec(batch_size=-1)
    with pytest.raises(InvalidValue, match=r"^dataset\.name: 'svhn'"):
        DatasetSpec(name="svhn")


def test_the_bundled_examples_are_valid_specs() -> None:
    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        spec = SearchSpec.from_yaml(path).validate()
        assert spec.dataset.name in DATASETS
