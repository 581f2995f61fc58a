"""ONNX export: onnxruntime against PyTorch for the reference and other CBAM architectures.

Each architecture is exported once (a module-scoped cache) from weights that went through a
safetensors file as the worker writes them. PyTorch's outputs come from the eager model, i.e.
CBAM's fused path, computed after the export: the export must leave that path intact.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from search.build import build_model
from search.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    export_onnx,
)
from search.nn.backbones import BACKBONES
from search.space import Architecture, SearchSpace, reference_architectures

if TYPE_CHECKING:
    import onnx

BACKBONE = "cifar_resnet20"
REFERENCES = reference_architectures(BACKBONE)
# CBAM beyond the paper's module: other arrangements, pool types, learned spatial pooling,
# other kernels, no BatchNorm or MLP bias, partial placement.
VARIANTS = {
    "parallel-lp-lse-k3": Architecture(
        BACKBONE, arrangement="parallel", pool_types=("avg", "lp", "lse"), kernel_size=3
    ),
    "spatial-conv-pool-k3": Architecture.from_json(
        '{"backbone": "cifar_resnet20", "arrangement": "spatial", "kernel_size": 3,'
        ' "spatial_pool": "conv", "spatial_bn": false, "stages": [2, 3], "blocks": "last"}'
    ),
    "spatial-channel-k5": Architecture(
        BACKBONE,
        arrangement="spatial-channel",
        reduction=4,
        pool_types=("max",),
        mlp_bias=False,
        kernel_size=5,
        blocks="first",
    ),
}
CASES = {**REFERENCES, **VARIANTS}


@dataclass(frozen=True)
class Exported:
    architecture: Architecture
    model: nn.Module  # eval mode, with the exported weights
    onnx_bytes: bytes


def _random_model(
    architecture: Architecture, num_classes: int = 10, in_channels: int = 3, seed: int = 0
) -> nn.Module:
    """A seeded model whose BatchNorms (the spatial gate's included) are far from their init."""
    torch.manual_seed(seed)
    model = build_model(architecture, num_classes, in_channels)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _saved_and_loaded(
    model: nn.Module, architecture: Architecture, path: Path
) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """Round-trip through a safetensors file like the worker's: (architecture, state dict)."""
    save_file(model.state_dict(), str(path), metadata={"architecture": architecture.to_json()})
    with safe_open(str(path), "pt") as f:
        stored = Architecture.from_json(f.metadata()["architecture"])
    return stored, load_file(str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """``exported(case)``: the case's model and ONNX bytes, exported once per module."""
    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            architecture = CASES[name]
            model = _random_model(architecture)
            path = tmp_path_factory.mktemp("weights") / f"{name}.safetensors"
            stored, state_dict = _saved_and_loaded(model, architecture, path)
            cache[name] = Exported(architecture, model, export_onnx(stored, state_dict))
        return cache[name]

    return get


def _assert_matches(model: nn.Module, onnx_bytes: bytes, shape: tuple[int, int, int]) -> None:
    import onnxruntime as ort

    """onnxruntime equals PyTorch at batch sizes 1 and 3."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_variants_lie_in_the_search_space() -> None:
    space = SearchSpace()
    assert all(space.contains(a) for a in VARIANTS.values())
    assert len({a.id for a in CASES.values()}) == len(CASES)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_matches_pytorch(name: str, exported: Callable[[str], Exported]) -> None:
    case = exported(name)
    _assert_matches(case.model, case.onnx_bytes, (3, 32, 32))


@pytest.mark.e2e
def test_interface_and_metadata(exported: Callable[[str], Exported]) -> None:
    import onnx

    case = exported("cbam")
    proto = onnx.load_from_string(case.onnx_bytes)
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert images.name == INPUT_NAME and logits.name == OUTPUT_NAME
    batch = _dims(images)[0]
    assert isinstance(batch, str) and batch
    assert _dims(images) == [batch, 3, 32, 32]
    assert _dims(logits) == [batch, 10]
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert Architecture.from_json(metadata["architecture"]) == case.architecture
    # Each spatial gate's k x k convolution is a Conv, not the training path's banded MatMul.
    convs = sum(isinstance(m, nn.Conv2d) for m in case.model.modules())
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == convs == 19 + 9


@pytest.mark.e2e
def test_one_channel_ten_classes(tmp_path: Path) -> None:
    """Digits-like: 1 channel, 32 x 32, 10 classes, all read from the weights; opset asked for."""
    import onnx

    architecture = Architecture(BACKBONE, arrangement="channel", pool_types=("avg", "max"))
    model = _random_model(architecture, num_classes=10, in_channels=1, seed=3)
    stored, state_dict = _saved_and_loaded(model, architecture, tmp_path / "w.safetensors")
    onnx_bytes = export_onnx(stored, state_dict, input_size=32, opset=18)
    proto = onnx.load_from_string(onnx_bytes)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert _dims(proto.graph.input[0])[1:] == [1, 32, 32]
    assert _dims(proto.graph.output[0])[1:] == [10]
    _assert_matches(model, onnx_bytes, (1, 32, 32))


def _state_dict(architecture: Architecture, num_classes: int = 10) -> dict[str, torch.Tensor]:
    return build_model(architecture, num_classes).state_dict()


@pytest.mark.parametrize(
    ("weights_of", "num_classes", "match"),
    [
        (REFERENCES["se"], None, r"missing layer1\.0\.attn\.spatial_gate\.conv\.weight"),
        (REFERENCES["none"], None, r"missing layer1\.0\.attn\.channel_gate\.fc1\.weight"),
        (
            Architecture(BACKBONE, kernel_size=5),
            None,
            r"wrong shapes: layer1\.0\.attn\.spatial_gate\.conv\.weight \(1, 2, 5, 5\) "
            r"\(expected \(1, 2, 7, 7\)\)",
        ),
        (REFERENCES["cbam"], 100, r"wrong shapes: fc\.weight \(10, 64\) \(expected \(100, 64\)\)"),
        (REFERENCES["cbam"], None, r"unexpected fc\.extra"),
    ],
)
def test_weights_that_do_not_fit(
    weights_of: Architecture, num_classes: int | None, match: str
) -> None:
    state_dict = _state_dict(weights_of)
    if "unexpected" in match:
        state_dict["fc.extra"] = torch.zeros(1)
    with pytest.raises(ExportError, match=r"do not fit cifar_resnet20 with CBAM c->s") as error:
        export_onnx(REFERENCES["cbam"], state_dict, num_classes=num_classes)
    assert re.search(match, str(error.value)), str(error.value)


def test_weights_without_a_classifier() -> None:
    state_dict = _state_dict(REFERENCES["none"])
    del state_dict[REFERENCES["none"].info.classifier_weight]
    with pytest.raises(ExportError, match="num_classes"):
        export_onnx(REFERENCES["none"], state_dict)
    with pytest.raises(ExportError, match=r"missing fc\.weight"):
        export_onnx(REFERENCES["none"], state_dict, num_classes=10)


@pytest.mark.e2e
def test_an_opset_the_exporter_cannot_produce() -> None:
    architecture = Architecture(BACKBONE, arrangement="channel", stages=(1,), blocks="first")
    with pytest.raises(ExportError, match="opset 17"):
        export_onnx(architecture, _state_dict(architecture), opset=17)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_has_the_stem_and_classifier_keys(backbone: str) -> None:
    architecture = Architecture(backbone)
    with torch.device("meta"):
        state_dict = build_model(architecture, num_classes=5, in_channels=2).state_dict()
    assert state_dict[architecture.info.classifier_weight].shape[0] == 5
    assert state_dict[architecture.info.stem_weight].shape[1] == 2
