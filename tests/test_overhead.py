from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from search.build import build_model
from search.errors import InvalidValue
from search.knobs import CBAMConfig
from search.nn.cbam import CBAM, reference_forward
from search.overhead import (
    OverheadReport,
    attention_elementwise_ops,
    attention_macs,
    attention_ops,
    check_device,
    count_macs,
    count_params,
    measure,
    measure_latency,
    measure_train_step,
)
from search.space import Architecture, reference_architectures

CIFAR_SHAPE = (3, 32, 32)


def _reference_models(backbone: str, num_classes: int, meta: bool = False) -> dict[str, object]:
    with torch.device("meta" if meta else "cpu"):
        return {
            name: build_model(arch, num_classes)
            for name, arch in reference_architectures(backbone).items()
        }


def test_resnet50_figures_match_the_paper() -> None:
    # Counting works on the meta device: shapes only, no weights, no arithmetic.
    models = _reference_models("resnet50", 1000, meta=True)
    shape = (3, 224, 224)
    params = {name: count_params(m) for name, m in models.items()}
    assert params == {"none": 25_557_032, "se": 28_088_024, "cbam": 28_089_624}
    macs = {name: count_macs(m, shape) for name, m in models.items()}
    # torchvision's ResNet-50 is 4.09 GMACs; the paper: 3.858 -> 3.860 (SE) -> 3.864 (CBAM).
    assert macs["none"] == pytest.approx(4.089e9, rel=1e-3)
    assert 2.0e6 < macs["se"] - macs["none"] < 3.0e6
    assert 5.5e6 < macs["cbam"] - macs["none"] < 7.0e6
    ops = {name: attention_ops(m, shape) for name, m in models.items()}
    assert ops["none"] == 0
    assert 0 < ops["se"] < ops["cbam"]


def test_cifar_resnet20_counts() -> None:
    models = _reference_models("cifar_resnet20", 10)
    assert count_params(models["none"]) == 269_722
    assert count_params(models["cbam"]) == 272_995
    # The backbone part is FlopCounterMode's count, halved.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        models["none"].eval()(torch.zeros(1, *CIFAR_SHAPE))
    assert count_macs(models["none"], CIFAR_SHAPE) == counter.get_total_flops() // 2
    assert count_macs(models["cbam"], CIFAR_SHAPE) > count_macs(models["none"], CIFAR_SHAPE)
    assert count_macs(models["none"], CIFAR_SHAPE, batch=4) == 4 * count_macs(
        models["none"], CIFAR_SHAPE
    )
    # 6N + 2C + 2HW per block (avg+max, maxmean, BN), three blocks per stage.
    expected = sum(
        3 * (6 * c * s * s + 2 * c + 2 * s * s) for c, s in ((16, 32), (32, 16), (64, 8))
    )
    assert attention_ops(models["cbam"], CIFAR_SHAPE) == expected == 524_832
    assert attention_ops(models["se"], CIFAR_SHAPE) == sum(
        3 * (2 * c * s * s + c) for c, s in ((16, 32), (32, 16), (64, 8))
    )
    assert attention_ops(models["none"], CIFAR_SHAPE) == 0


@pytest.mark.parametrize(
    "config",
    [
        CBAMConfig(),
        CBAMConfig(pool_types=("avg", "max", "lp"), kernel_size=3, spatial_pool="conv"),
        CBAMConfig(arrangement="channel", reduction=4),
        CBAMConfig(arrangement="spatial", kernel_size=5, spatial_bn=False),
        CBAMConfig(arrangement="parallel", mlp_bias=False),
    ],
)
def test_attention_macs_formula_matches_the_plain_computation(config: CBAMConfig) -> None:
    # The plain definition (the fused path sums the descriptors before the MLP's second layer),
    # on maps wider than 64, which take F.conv2d: the arithmetic as the paper counts it.
    shape = (2, 32, 3, 72)
    module = CBAM(32, config).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        reference_forward(module, torch.randn(shape))
    assert attention_macs(config, shape) == counter.get_total_flops() // 2
    assert attention_elementwise_ops(config, shape) > 0


def test_check_device() -> None:
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("quantum", "cuda:99"):
        with pytest.raises(InvalidValue) as info:
            check_device(bad)
        assert info.value.field == "device"
        assert "'cpu'" in str(info.value)


def test_measure_latency_and_train_step() -> None:
    model = build_model(Architecture("cifar_resnet20"), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = measure_latency(model, CIFAR_SHAPE, "cpu", batch_size=2, warmup=1, repeats=3)
    assert ms > 0
    step_ms, peak = measure_train_step(model, CIFAR_SHAPE, 10, "cpu", batch_size=4, repeats=2)
    assert step_ms > 0
    assert peak > 3 * 4 * count_params(model)  # parameters, gradients, momentum, activations
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_measure_the_baseline_itself_has_zero_overhead() -> None:
    report = measure(
        Architecture("cifar_resnet20", "none"),
        train_step=True,
        train_batch_size=4,
        warmup=1,
        repeats=2,
    )
    assert report.params == report.baseline_params == 269_722
    assert report.attention_ops == report.baseline_attention_ops == 0
    for pct in ("params_pct", "macs_pct", "latency_pct", "train_step_pct", "peak_memory_pct"):
        assert getattr(report, pct) == 0.0
    assert report.peak_memory_estimated


def test_measure_cbam() -> None:
    arch = Architecture("cifar_resnet20", stages=(2, 3), blocks="first")
    report = measure(arch, num_classes=100, in_channels=1, input_size=16, warmup=1, repeats=2)
    assert isinstance(report, OverheadReport)
    assert report.input_shape == (1, 16, 16)
    assert report.baseline_params == count_params(
        build_model(Architecture("cifar_resnet20", "none"), 100, 1)
    )
    assert report.params > report.baseline_params
    assert report.params_pct == pytest.approx(
        100 * (report.params - report.baseline_params) / report.baseline_params
    )
    assert report.macs > report.baseline_macs
    assert report.attention_ops > 0 == report.baseline_attention_ops
    assert report.latency_ms > 0 and report.baseline_latency_ms > 0
    assert report.latency_pct is not None
    assert report.train_step_ms is None and report.train_step_pct is None
    data = json.loads(json.dumps(report.to_dict()))
    assert data["architecture"] == arch.to_dict()
    assert data["architecture_id"] == arch.id
    assert data["label"] == "CBAM c->s r16 avg+max k7 @s2+3/first"
    assert data["input_shape"] == [1, 16, 16]
    assert data["macs_pct"] > 0
