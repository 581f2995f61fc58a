from __future__ import annotations

import subprocess
import sys
from typing import Any

import optuna
import pytest
from torch import nn

from search.build import build_model
from search.errors import InvalidValue
from search.knobs import CBAMConfig
from search.nn.cbam import CBAM
from search.nn.squeeze_excite import SqueezeExcite
from search.space import (
    REFERENCE_NAMES,
    Architecture,
    SearchSpace,
    reference_architectures,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _flat(message: str) -> str:
    return " ".join(message.split())


# -- Architecture: validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"kernel_size": 4}, "kernel_size", ["1, 3, 5, 7, 9"]),
        ({"kernel_size": 11}, "kernel_size", ["1, 3, 5, 7, 9"]),
        ({"kernel_size": 7.0}, "kernel_size", ["1, 3, 5, 7, 9"]),
        ({"reduction": 0}, "reduction", [">= 1"]),
        ({"reduction": -4}, "reduction", [">= 1"]),
        ({"pool_types": ()}, "pool_types", ["avg, max, lp, lse"]),
        ({"pool_types": ("avg", "median")}, "pool_types[1]", ["'avg', 'max', 'lp', 'lse'"]),
        ({"pool_types": ("avg", "avg")}, "pool_types", ["avg, max, lp, lse"]),
        ({"attention": "eca"}, "attention", ["'none', 'se', 'cbam'"]),
        ({"arrangement": "diagonal"}, "arrangement", ["'channel-spatial'", "'parallel'"]),
        ({"spatial_pool": "median"}, "spatial_pool", ["'maxmean', 'conv'"]),
        ({"spatial_bn": "yes"}, "spatial_bn", ["True, False"]),
        ({"mlp_bias": 1}, "mlp_bias", ["True, False"]),
        ({"blocks": "middle"}, "blocks", ["'all', 'first', 'last'"]),
        ({"stages": (2, 5)}, "stages", ["cifar_resnet20: 1, 2, 3"]),
        ({"stages": (0,)}, "stages", ["cifar_resnet20: 1, 2, 3"]),
        ({"stages": ()}, "stages", ["non-empty", "1, 2, 3"]),
    ],
)
def test_bad_values_name_field_and_allowed(
    kwargs: dict[str, Any], field: str, allowed: list[str]
) -> None:
    with pytest.raises(InvalidValue) as info:
        Architecture("cifar_resnet20", **kwargs)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}: ")
    for fragment in allowed:
        assert fragment in message


def test_unknown_backbone_lists_backbones() -> None:
    with pytest.raises(InvalidValue) as info:
        Architecture("resnet7")
    assert info.value.field == "backbone"
    for name in ("resnet18", "resnet50", "cifar_resnet20", "mobilenet_v1"):
        assert repr(name) in str(info.value)


def test_stage_message_lists_the_backbones_stages() -> None:
    with pytest.raises(InvalidValue, match=r"resnet18: 1, 2, 3, 4"):
        Architecture("resnet18", stages=(5,))


def test_from_dict_rejects_unknown_keys_listing_known_ones() -> None:
    with pytest.raises(InvalidValue) as info:
        Architecture.from_dict({"backbone": "resnet18", "kernel": 7})
    message = str(info.value)
    assert "'kernel'" in message
    for known in ("backbone", "kernel_size", "reduction", "stages", "blocks"):
        assert known in message


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"resnet18"', "{}"])
def test_from_json_rejects_malformed_input(text: str) -> None:
    with pytest.raises(InvalidValue):
        Architecture.from_json(text)


# -- Architecture: normalisation, JSON, id ------------------------------------------------------


def test_defaults_are_the_paper_cbam() -> None:
    arch = Architecture("resnet18")
    assert arch.attention == "cbam"
    assert arch.cbam_config() == CBAMConfig()
    assert (arch.reduction, arch.pool_types, arch.kernel_size) == (16, ("avg", "max"), 7)
    assert (arch.spatial_pool, arch.spatial_bn, arch.mlp_bias) == ("maxmean", True, True)
    assert (arch.arrangement, arch.stages, arch.blocks) == ("channel-spatial", None, "all")
    assert arch.describe() == "CBAM c->s r16 avg+max k7 @all"


def test_knobs_that_do_not_apply_become_none() -> None:
    none = Architecture("resnet18", "none", reduction=4, kernel_size=3, stages=(1,), blocks="last")
    assert none == Architecture("resnet18", "none")
    assert none.to_dict() == {
        "backbone": "resnet18",
        "attention": "none",
        **dict.fromkeys(
            ["reduction", "pool_types", "kernel_size", "spatial_pool", "spatial_bn"], None
        ),
        **dict.fromkeys(["mlp_bias", "arrangement", "stages"], None),
        "blocks": "all",
    }
    se = Architecture("resnet18", "se", kernel_size=3, pool_types=("max",))
    assert (se.reduction, se.kernel_size, se.pool_types, se.arrangement) == (16, None, None, None)
    assert se.cbam_config() is None
    channel = Architecture("resnet18", arrangement="channel", kernel_size=3, spatial_bn=False)
    assert (channel.kernel_size, channel.spatial_pool, channel.spatial_bn) == (None, None, None)
    assert (channel.reduction, channel.pool_types, channel.mlp_bias) == (16, ("avg", "max"), True)
    spatial = Architecture("resnet18", arrangement="spatial", reduction=2, mlp_bias=False)
    assert (spatial.reduction, spatial.pool_types, spatial.mlp_bias) == (None, None, None)
    assert (spatial.kernel_size, spatial.spatial_pool, spatial.spatial_bn) == (7, "maxmean", True)
    assert spatial.cbam_config() == CBAMConfig(arrangement="spatial")


def test_canonical_order_and_full_stage_set() -> None:
    a = Architecture("resnet18", pool_types=["lse", "max", "avg"], stages=[4, 2, 2])
    assert a.pool_types == ("avg", "max", "lse")
    assert a.stages == (2, 4)
    assert Architecture("resnet18", pool_types="max+avg").pool_types == ("avg", "max")
    assert Architecture("resnet18", stages=(4, 3, 2, 1)).stages is None
    assert Architecture("resnet18", stages=(1, 2, 3, 4)) == Architecture("resnet18")


ARCHITECTURES = [
    Architecture("cifar_resnet20"),
    Architecture("cifar_resnet20", "none"),
    Architecture("resnet18", "se", reduction=8, stages=(1, 3), blocks="last"),
    Architecture(
        "resnet50",
        reduction=4,
        pool_types=("max", "lp", "lse"),
        kernel_size=3,
        spatial_pool="conv",
        spatial_bn=False,
        mlp_bias=False,
        arrangement="parallel",
        stages=(2, 4),
        blocks="first",
    ),
    Architecture("mobilenet_v1_0.5", arrangement="spatial", kernel_size=9),
]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.describe())
def test_json_round_trip(arch: Architecture) -> None:
    assert Architecture.from_json(arch.to_json()) == arch
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert Architecture.from_json(arch.to_json()).id == arch.id


def test_id_is_short_stable_and_distinct() -> None:
    ids = {a.id for a in ARCHITECTURES}
    assert len(ids) == len(ARCHITECTURES)
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)
    assert Architecture("resnet18", stages=[2, 1]).id == Architecture("resnet18", stages=(1, 2)).id
    code = (
        "import sys; from search.space import Architecture; "
        "print(' '.join(Architecture.from_json(line).id for line in sys.stdin.read().splitlines()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input="\n".join(a.to_json() for a in ARCHITECTURES),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [a.id for a in ARCHITECTURES]


def test_describe() -> None:
    assert Architecture("resnet18", "none").describe() == "no attention"
    assert Architecture("resnet18", "se").describe() == "SE r16 @all"
    arch = Architecture("resnet18", arrangement="channel", stages=(4, 2), blocks="first")
    assert arch.describe() == "CBAM c r16 avg+max @s2+4/first"
    arch = Architecture("resnet18", arrangement="spatial", kernel_size=3, spatial_bn=False)
    assert arch.describe() == "CBAM s k3 no-bn @all"


# -- build_model and placement ------------------------------------------------------------------


def _attention_positions(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, CBAM)]


@pytest.mark.parametrize(
    ("backbone", "stages", "blocks", "expected"),
    [
        ("resnet18", (2, 4), "first", ["layer2.0.attn", "layer4.0.attn"]),
        ("resnet18", None, "all", [f"layer{s}.{b}.attn" for s in (1, 2, 3, 4) for b in (0, 1)]),
        ("resnet18", (1,), "last", ["layer1.1.attn"]),
        ("cifar_resnet20", (3,), "all", ["layer3.0.attn", "layer3.1.attn", "layer3.2.attn"]),
        ("cifar_resnet20", None, "last", ["layer1.2.attn", "layer2.2.attn", "layer3.2.attn"]),
        ("cifar_resnet20", (1, 2), "first", ["layer1.0.attn", "layer2.0.attn"]),
    ],
)
def test_placement(
    backbone: str, stages: tuple[int, ...] | None, blocks: str, expected: list[str]
) -> None:
    arch = Architecture(backbone, stages=stages, blocks=blocks)
    model = build_model(arch, num_classes=10)
    assert _attention_positions(model) == expected
    assert len(arch.attention_slots()) == len(expected)
    assert [f"layer{s}.{b}.attn" for s, b in arch.attention_slots()] == expected


def test_build_model_attention_kinds() -> None:
    refs = reference_architectures("cifar_resnet20")
    assert _attention_positions(build_model(refs["none"], 10)) == []
    se = build_model(refs["se"], 10)
    assert sum(isinstance(m, SqueezeExcite) for m in se.modules()) == 9
    cbam = [
        m for m in build_model(refs["cbam"], 10, in_channels=1).modules() if isinstance(m, CBAM)
    ]
    assert len(cbam) == 9
    assert all(m.config == CBAMConfig() for m in cbam)
    arch = Architecture("cifar_resnet20", reduction=4, kernel_size=3, arrangement="parallel")
    configs = {m.config for m in build_model(arch, 10).modules() if isinstance(m, CBAM)}
    assert configs == {arch.cbam_config()}


def test_paper_parameter_count_resnet18() -> None:
    model = build_model(reference_architectures("resnet18")["cbam"], 1000)
    assert sum(p.numel() for p in model.parameters()) == 11_779_392


def test_reference_architectures() -> None:
    refs = reference_architectures("resnet50")
    assert tuple(refs) == REFERENCE_NAMES == ("none", "se", "cbam")
    assert refs["none"].attention == "none"
    assert (refs["se"].attention, refs["se"].reduction) == ("se", 16)
    assert refs["cbam"] == Architecture("resnet50")
    with pytest.raises(InvalidValue, match="backbone"):
        reference_architectures("vgg16")


# -- SearchSpace --------------------------------------------------------------------------------


def test_default_space_is_the_whole_space() -> None:
    space = SearchSpace()
    assert space.arrangements == (
        "channel-spatial",
        "spatial-channel",
        "parallel",
        "channel",
        "spatial",
    )
    assert space.reductions == (2, 4, 8, 16, 32)
    assert len(space.pool_types) == 15
    assert ("avg", "max", "lp", "lse") in space.pool_types
    assert space.kernel_sizes == (1, 3, 5, 7, 9)
    assert len(space.stage_choices("resnet18")) == 15
    assert len(space.stage_choices("cifar_resnet20")) == 7
    # per stage set and block choice: 3 two-gate arrangements x 150 x 20 + 150 + 20
    assert space.size("cifar_resnet20") == (3 * 150 * 20 + 150 + 20) * 7 * 3
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_space_size_of_a_narrow_space() -> None:
    space = SearchSpace.from_dict(
        {
            "arrangements": ["channel", "spatial", "channel-spatial"],
            "reductions": [8, 16],
            "pool_types": [["avg"], "max+avg"],
            "mlp_bias": [True],
            "kernel_sizes": [3, 7],
            "spatial_pools": ["maxmean"],
            "spatial_bn": [True],
            "stages": [[1], [1, 2, 3]],
            "blocks": ["all", "last"],
        }
    )
    assert space.pool_types == (("avg",), ("avg", "max"))
    assert space.size("cifar_resnet20") == (4 + 2 + 8) * 2 * 2


@pytest.mark.parametrize(
    ("data", "field", "allowed"),
    [
        ({"kernel_sizes": [3, 4]}, "space.kernel_sizes[1]", "1, 3, 5, 7, 9"),
        ({"reductions": []}, "space.reductions", "non-empty"),
        ({"reductions": [8, 0]}, "space.reductions[1]", ">= 1"),
        ({"arrangements": ["channel", "zigzag"]}, "space.arrangements[1]", "'parallel'"),
        ({"pool_types": [["avg", "foo"]]}, "space.pool_types[0][1]", "'lp', 'lse'"),
        ({"pool_types": [[]]}, "space.pool_types[0]", "avg, max, lp, lse"),
        ({"stages": [[1], []]}, "space.stages[1]", "non-empty"),
        ({"blocks": "all"}, "space.blocks", "non-empty list"),
        ({"spatial_bn": [True, "no"]}, "space.spatial_bn[1]", "True, False"),
    ],
)
def test_space_validation(data: dict[str, Any], field: str, allowed: str) -> None:
    with pytest.raises(InvalidValue) as info:
        SearchSpace.from_dict(data)
    assert info.value.field == field
    assert allowed in _flat(str(info.value))


def test_space_rejects_unknown_keys() -> None:
    with pytest.raises(InvalidValue) as info:
        SearchSpace.from_dict({"kernels": [3]})
    assert "'kernels'" in str(info.value)
    assert "kernel_sizes" in str(info.value)


def test_space_stages_checked_against_the_backbone() -> None:
    space = SearchSpace(stages=((1,), (2, 4)))
    space.validate_for("resnet18")
    with pytest.raises(InvalidValue) as info:
        space.validate_for("cifar_resnet20")
    assert info.value.field == "space.stages[1]"
    assert "1, 2, 3" in str(info.value)
    with pytest.raises(InvalidValue, match="backbone"):
        space.validate_for("resnet7")


@pytest.mark.parametrize(
    "sampler",
    [optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=0, n_startup_trials=5)],
    ids=["random", "tpe"],
)
def test_sample_draws_valid_architectures_with_conditional_knobs(
    sampler: optuna.samplers.BaseSampler,
) -> None:
    space = SearchSpace()
    study = optuna.create_study(sampler=sampler)
    seen_arrangements = set()
    for _ in range(30):
        trial = study.ask()
        arch = space.sample(trial, "cifar_resnet20")
        assert arch.attention == "cbam"
        assert space.contains(arch)
        assert Architecture.from_json(arch.to_json()) == arch
        params = trial.params
        seen_arrangements.add(params["arrangement"])
        if arch.arrangement == "channel":
            assert not {"kernel_size", "spatial_pool", "spatial_bn"} & set(params)
        if arch.arrangement == "spatial":
            assert not {"reduction", "pool_types", "mlp_bias"} & set(params)
        assert all(isinstance(v, str | int | bool) for v in params.values())
        assert space.to_params(arch) == params
        study.tell(trial, float(arch.reduction or 0) + float(arch.kernel_size or 0))
    assert len(seen_arrangements) > 1


def test_sample_respects_a_narrowed_space() -> None:
    space = SearchSpace(
        arrangements=("channel-spatial", "spatial"),
        reductions=(8,),
        pool_types=(("avg",), ("max", "lse")),
        kernel_sizes=(3, 7),
        stages=((1,), (2, 3)),
        blocks=("last",),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        arch = space.sample(trial, "cifar_resnet20")
        assert arch.arrangement in ("channel-spatial", "spatial")
        assert arch.kernel_size in (3, 7)
        assert arch.stages in ((1,), (2, 3))
        assert arch.blocks == "last"
        if arch.arrangement == "channel-spatial":
            assert arch.reduction == 8
            assert arch.pool_types in (("avg",), ("max", "lse"))
        assert "reduction" not in trial.params  # a single allowed value is fixed
        assert "blocks" not in trial.params
        study.tell(trial, 0.0)
    with pytest.raises(InvalidValue, match=r"space\.stages\[1\]"):
        SearchSpace(stages=((1,), (5,))).sample(study.ask(), "cifar_resnet20")


def test_to_params_round_trips_through_enqueue_trial() -> None:
    space = SearchSpace()
    archs = [
        reference_architectures("cifar_resnet20")["cbam"],
        Architecture("cifar_resnet20", arrangement="channel", pool_types=("lp",), blocks="last"),
        Architecture("cifar_resnet20", arrangement="spatial", kernel_size=1, stages=(2,)),
        Architecture("cifar_resnet20", reduction=32, spatial_pool="conv", arrangement="parallel"),
    ]
    study = optuna.create_study()
    for arch in archs:
        study.enqueue_trial(space.to_params(arch))
    for arch in archs:
        trial = study.ask()
        assert space.sample(trial, "cifar_resnet20") == arch
        study.tell(trial, 0.0)
    assert space.to_params(archs[0])["stages"] == "1+2+3"
    assert space.to_params(archs[0])["pool_types"] == "avg+max"


def test_contains_and_to_params_outside_the_space() -> None:
    space = SearchSpace(kernel_sizes=(3,))
    refs = reference_architectures("cifar_resnet20")
    assert not space.contains(refs["none"])
    assert not space.contains(refs["se"])
    assert not space.contains(refs["cbam"])  # k = 7
    assert space.contains(Architecture("cifar_resnet20", kernel_size=3))
    with pytest.raises(InvalidValue, match="architecture"):
        space.to_params(refs["none"])
