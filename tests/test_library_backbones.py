"""timm and torchvision models as backbones (search.nn.library, search.nn.weights): slots found
per family, CBAM placed where the paper places it, parameter counts equal to our own ResNet-50,
pretrained weights from a local file, and a search through the API whose best weights load back
into the timm model with attention inserted."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from support import flat, run_worker_to_the_end
from torch import Tensor, nn
from typer.testing import CliRunner

from search.build import build_model, load_pretrained
from search.bundle import load_model
from search.catalogue import backbone_info
from search.errors import InvalidValue
from search.nn.cbam import CBAM
from search.nn.library import build_library_backbone
from search.nn.weights import IDENTITY_GATE_LOGIT, near_identity_
from search.settings import Settings
from search.space import Architecture
from search.spec import SearchSpec, TrainingSpec
from search.store.engine import Database
from search.store.models import ResultState, TrialResult
from service.app import create_app
from service.auth import create_token
from service.cli import app as cli
from workers.data import DatasetTensors
from workers.train import make_optimizer, train

PAPER_RESNET50_PARAMS = 28_089_624  # our ResNet-50 with the paper's CBAM, 1000 classes
runner = CliRunner()


def _library_model(name: str, **kwargs: Any) -> nn.Module:
    library, model = name.split(":")
    if library == "timm":
        return timm.create_model(model, pretrained=False, **kwargs)
    return torchvision.models.get_model(model, weights=None, **kwargs)


def _residual_blocks(model: nn.Module) -> int:
    """The blocks that add their input, counted from the library's own flags."""
    count = 0
    for module in model.modules():
        kind = type(module)
        if (
            kind.__name__ in ("BasicBlock", "Bottleneck")
            or getattr(module, "use_res_connect", False)
            or getattr(module, "has_skip", False)
        ):
            count += 1
    return count


def _attention_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, CBAM)]


# -- slots ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slots"),
    [
        ("torchvision:resnet18", 8),
        ("timm:resnet18", 8),
        ("torchvision:resnet50", 16),
        ("timm:resnet50", 16),
        ("torchvision:resnext50_32x4d", 16),
        ("torchvision:wide_resnet50_2", 16),
        ("torchvision:mobilenet_v2", 10),
        ("torchvision:mobilenet_v3_small", None),
        ("torchvision:efficientnet_b0", None),
        ("timm:mobilenetv3_small_050", None),
        ("timm:efficientnet_b0", None),
    ],
)
def test_slots_are_the_residual_blocks_of_each_family(name: str, slots: int | None) -> None:
    info = backbone_info(name)
    with torch.device("meta"):
        expected = _residual_blocks(_library_model(name))
    assert sum(info.blocks_per_stage) == expected
    if slots is not None:
        assert expected == slots
    assert info.family.startswith(name.split(":")[0] + ":")
    assert all(len(c) == n for c, n in zip(info.block_channels, info.blocks_per_stage, strict=True))


def test_stages_are_grouped_by_output_resolution() -> None:
    for name in ("torchvision:resnet50", "timm:resnet50"):
        info = backbone_info(name)
        assert info.blocks_per_stage == (3, 4, 6, 3)
        assert info.stage_channels == (256, 512, 1024, 2048)
        assert info.input_size == 224
    mobilenet = backbone_info("torchvision:mobilenet_v2")
    # The residual blocks at 56, 28, 14 and 7 pixels; the 14-pixel stage widens from 64 to 96.
    assert mobilenet.blocks_per_stage == (1, 2, 5, 2)
    assert mobilenet.block_channels[2] == (64, 64, 64, 96, 96)
    assert mobilenet.stem_weight == "features.0.0.weight"
    assert mobilenet.classifier_weight == "classifier.1.weight"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("timm:vit_small_patch16_224", "timm's ResNet family"),
        ("torchvision:vgg11", "torchvision ResNet/ResNeXt/Wide-ResNet"),
        ("timm:no_such_model", "timm.list_models()"),
        ("torchvision:no_such_model", "torchvision.models.list_models()"),
    ],
)
def test_a_model_we_cannot_place_into_is_refused_naming_the_families(
    name: str, allowed: str
) -> None:
    with pytest.raises(InvalidValue) as error:
        SearchSpec.from_dict({"backbone": name})
    assert error.value.field == "backbone" and allowed in error.value.allowed


def test_cli_slots_prints_stages_blocks_and_channels() -> None:
    result = runner.invoke(cli, ["slots", "--backbone", "timm:resnet50", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["blocks_per_stage"] == [3, 4, 6, 3] and shown["slots"] == 16
    assert shown["block_channels"][3] == [2048, 2048, 2048]
    table = runner.invoke(cli, ["slots", "--backbone", "torchvision:mobilenet_v2"])
    assert table.exit_code == 0 and "64, 64, 64, 96, 96" in flat(table.stdout)
    refused = runner.invoke(cli, ["slots", "--backbone", "timm:vit_small_patch16_224"])
    assert refused.exit_code == 2 and "--backbone" in flat(refused.output)


# -- the model with attention -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["timm:resnet50", "torchvision:resnet50"])
def test_paper_cbam_has_the_parameters_of_our_resnet50(name: str) -> None:
    result = runner.invoke(
        cli, ["inspect", "--backbone", name, "--preset", "paper", "--json", "--no-latency"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with torch.device("meta"):
        plain = sum(p.numel() for p in _library_model(name).parameters())
    assert report["params"] == PAPER_RESNET50_PARAMS
    assert report["baseline_params"] == plain == 25_557_032
    assert report["num_classes"] == 1000


class _Zero(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 0


def test_attention_sits_on_the_residual_branch_before_the_addition() -> None:
    """An attention that zeroes its input leaves a block's output relu(x): the branch is
    gated before the addition, the shortcut is not."""
    model = build_library_backbone("torchvision:resnet18", 10, attention=lambda *_: _Zero())
    block = model.layer1[1].eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), torch.relu(x))
    # MobileNetV2's residual inverted block: output = x + 0.
    mobile = build_library_backbone("torchvision:mobilenet_v2", 10, attention=lambda *_: _Zero())
    residual = next(m for m in mobile.modules() if getattr(m, "use_res_connect", False)).eval()
    y = torch.randn(2, residual.conv[0][0].in_channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(residual(y), y)


@pytest.mark.parametrize(
    "name",
    [
        "torchvision:resnet18",
        "timm:test_resnet",
        "torchvision:mobilenet_v2",
        "torchvision:mobilenet_v3_small",
        "torchvision:efficientnet_b0",
        "timm:mobilenetv3_small_050",
    ],
)
def test_forward_and_backward_on_each_family(name: str) -> None:
    architecture = Architecture(name, reduction=4, kernel_size=3)
    torch.manual_seed(0)
    model = build_model(architecture, num_classes=5, in_channels=1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 5)
    out.square().sum().backward()
    paths = _attention_paths(model)
    assert len(paths) == len(architecture.attention_slots())
    assert all(path.endswith(".attn") for path in paths)
    attention = model.get_submodule(paths[0])
    assert attention.channel_gate.fc1.weight.grad is not None
    state = model.state_dict()
    assert state[architecture.info.stem_weight].shape[1] == 1
    assert state[architecture.info.classifier_weight].shape[0] == 5


def test_placement_by_stage_and_block() -> None:
    architecture = Architecture("timm:resnet50", stages=(2, 4), blocks="last")
    with torch.device("meta"):
        model = build_model(architecture, 1000)
    assert _attention_paths(model) == ["layer2.3.attn", "layer4.2.attn"]
    mobile = Architecture("torchvision:mobilenet_v2", stages=(3,), blocks="first")
    with torch.device("meta"):
        paths = _attention_paths(build_model(mobile, 10))
    assert paths == ["features.8.attn"]  # the first residual block at 14 pixels


def test_a_copy_of_the_model_uses_its_own_attention() -> None:
    """EMA deep-copies the model: the copy's hooks must call the copy's modules."""
    model = build_model(Architecture("timm:test_resnet", reduction=4), 10).eval()
    for name, parameter in model.named_parameters():
        if name.endswith(("bn2.weight", "bn3.weight")):  # timm starts these at 0
            parameter.data.fill_(1.0)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        for module in twin.modules():
            if isinstance(module, CBAM):
                module.channel_gate.fc2.bias.fill_(20.0)
        assert torch.equal(model(x), before)
        assert not torch.allclose(twin(x), before)


@pytest.mark.e2e
def test_onnx_export_of_a_library_model() -> None:
    import onnxruntime as ort

    from search.export import export_onnx

    architecture = Architecture("timm:test_resnet", reduction=4)
    model = build_model(architecture, 10, 1).eval()
    data = export_onnx(architecture, model.state_dict(), input_size=32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 32, 32)
    (out,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert abs(out - expected).max() < 1e-4


# -- pretrained weights -----------------------------------------------------------------------


def _saved(
    tmp_path: Path, name: str, suffix: str = ".safetensors", **kwargs: Any
) -> tuple[Path, dict[str, Tensor]]:
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in _library_model(name, **kwargs).state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_library_weights_load_before_attention_and_the_head_starts_afresh(
    tmp_path: Path, suffix: str
) -> None:
    path, state = _saved(tmp_path, "torchvision:resnet18", suffix)
    architecture = Architecture("torchvision:resnet18")
    model = build_model(architecture, num_classes=5)
    loaded = load_pretrained(model, architecture, path)
    own = model.state_dict()
    assert "fc.weight" not in loaded and own["fc.weight"].shape == (5, 512)
    assert loaded == set(state) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(own[key], state[key]) for key in loaded)
    assert any(key.endswith(".attn.channel_gate.fc1.weight") for key in own)
    # With the class count the file has, the head loads too.
    same = build_model(architecture, num_classes=1000)
    assert load_pretrained(same, architecture, path) == set(state)
    # Unless the spec asks for a fresh one (training.reset_head: other classes, as many).
    fresh = build_model(architecture, num_classes=1000)
    initial = fresh.state_dict()["fc.weight"].clone()
    loaded = load_pretrained(fresh, architecture, path, keep_head=False)
    assert loaded == set(state) - {"fc.weight", "fc.bias"}
    assert torch.equal(fresh.state_dict()["fc.weight"], initial)
    assert not torch.equal(initial, state["fc.weight"])


@pytest.mark.parametrize("reset_head", [False, True])
def test_training_keeps_a_classifier_that_fits_unless_asked_for_a_fresh_one(
    tmp_path: Path, reset_head: bool
) -> None:
    """A file whose classifier has this dataset's class count: training starts from it, or
    with ``training.reset_head`` (the same number of other classes) from a fresh one."""
    torch.manual_seed(0)
    file_model = timm.create_model("test_resnet", num_classes=3)
    head = torch.full_like(file_model.fc.weight, 0.25)
    state = {k: v.contiguous() for k, v in file_model.state_dict().items()} | {"fc.weight": head}
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (48, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.arange(48) % 3
    data = DatasetTensors(
        "synthetic", x, y, x[:16], y[:16], x[:16], y[:16], 3, 3, 16, (0.5,) * 3, (0.25,) * 3
    )
    settings = TrainingSpec(
        epochs=1, batch_size=16, lr=1e-6, weight_decay=0.0, reset_head=reset_head
    )
    result = train(Architecture("timm:test_resnet"), data, settings, seed=1, backbone_weights=path)
    # lr 1e-6 moves no weight by more than a hair: what training started from shows.
    started_from_the_file = torch.allclose(result.state_dict["fc.weight"], head, atol=1e-3)
    assert started_from_the_file is not reset_head
    stem = result.state_dict["conv1.0.weight"]
    assert torch.allclose(stem, state["conv1.0.weight"], atol=1e-3)


def test_weights_of_another_model_are_refused_with_the_keys(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, "torchvision:resnet34")
    architecture = Architecture("torchvision:resnet18")
    with pytest.raises(InvalidValue) as error:
        load_pretrained(build_model(architecture, 10), architecture, path)
    assert error.value.field == "backbone_weights"
    assert "unexpected keys (" in error.value.allowed and "layer1.2.bn1.bias" in error.value.allowed
    (tmp_path / "other").mkdir()
    other, _ = _saved(tmp_path / "other", "torchvision:mobilenet_v2")
    with pytest.raises(InvalidValue, match=r"missing keys \(\d+\): bn1\.bias"):
        load_pretrained(build_model(architecture, 10), architecture, other)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Zero()}}, path)
    architecture = Architecture("torchvision:resnet18")
    with pytest.raises(InvalidValue, match="readable weights file"):
        load_pretrained(build_model(architecture, 10), architecture, path)
    with pytest.raises(InvalidValue, match="a file ending in"):
        load_pretrained(build_model(architecture, 10), architecture, tmp_path / "w.npz")


def test_near_identity_starts_every_gate_at_the_same_high_value() -> None:
    model = build_model(Architecture("torchvision:resnet18", reduction=4), 10)
    assert near_identity_(model) == 8
    gate = torch.sigmoid(torch.tensor(IDENTITY_GATE_LOGIT))
    x = torch.randn(4, 3, 32, 32)
    for module in model.modules():
        if isinstance(module, CBAM):
            channel, spatial = module.gates(torch.randn(4, module.channels, 8, 8))
            assert torch.allclose(channel, gate) and torch.allclose(spatial, gate)
    model(x).sum().backward()  # every gate still learns
    for module in model.modules():
        if isinstance(module, CBAM):
            assert module.channel_gate.fc2.weight.grad.abs().sum() > 0
            assert module.spatial_gate.bn.weight.grad.abs().sum() > 0


def test_pretrained_weights_train_at_the_scaled_rate() -> None:
    model = build_model(Architecture("timm:test_resnet"), 10)
    pretrained = {n for n, _ in model.named_parameters() if ".attn." not in n and "fc." not in n}
    optimizer = make_optimizer(model, TrainingSpec(backbone_lr_scale=0.1, lr=0.2), pretrained)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        members = {names[id(p)] for p in group["params"]}
        scaled = members <= pretrained
        assert scaled or not members & pretrained
        assert group["lr"] == pytest.approx(0.02 if scaled else 0.2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)


def test_the_spec_keeps_weights_inside_the_data_roots(tmp_path: Path) -> None:
    spec = SearchSpec.from_dict({"backbone": "timm:test_resnet", "backbone_weights": "/etc/w.pth"})
    with pytest.raises(InvalidValue) as error:
        spec.validate(data_roots=[tmp_path])
    assert error.value.field == "backbone_weights"
    inside = SearchSpec.from_dict(
        {"backbone": "timm:test_resnet", "backbone_weights": str(tmp_path / "w.safetensors")}
    )
    assert inside.validate(data_roots=[tmp_path]) is inside
    assert inside.training.identity_init(pretrained=True)
    assert not inside.training.identity_init(pretrained=False)
    with pytest.raises(InvalidValue) as stages:
        SearchSpec.from_dict({"backbone": "timm:resnet50", "space": {"stages": [[5]]}})
    assert stages.value.field == "space.stages[0]"


def test_the_api_describes_a_library_backbone(sqlite_db: Database, settings: Settings) -> None:
    app = create_app(settings, db=sqlite_db)
    token = create_token(sqlite_db, "tester")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        found = client.get("/api/v1/backbones/timm:resnet50")
        refused = client.get("/api/v1/backbones/timm:vit_small_patch16_224")
        ours = client.get("/api/v1/backbones/cifar_resnet20")
        submitted = client.post("/api/v1/searches", json={"backbone": "torchvision:vgg11"})
        listed = client.get("/api/v1/searches")
    assert found.status_code == 200 and found.json()["blocks_per_stage"] == [3, 4, 6, 3]
    assert ours.json()["block_channels"] == [[16, 16, 16], [32, 32, 32], [64, 64, 64]]
    assert refused.status_code == 422 and "timm's ResNet family" in refused.text
    assert submitted.status_code == 422 and "backbone" in submitted.text
    assert listed.json()["items"] == []


# -- end to end -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_search_on_a_pretrained_timm_model_through_the_api(
    sqlite_db: Database, settings: Settings, tmp_path: Path
) -> None:
    """A user's timm model, their weights file, a search through the API; the answer's bundle
    loads back into the timm model with attention inserted and reproduces the stored test
    accuracy."""
    from workers.data import load_dataset

    weights = settings.allowed_data_roots[0] / f"{tmp_path.name}-test_resnet.safetensors"
    torch.manual_seed(2)
    save_file(
        {k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
        str(weights),
    )
    spec = {
        "backbone": "timm:test_resnet",
        "backbone_weights": str(weights),
        "dataset": {"name": "digits", "options": {"size": 16}, "val_fraction": 0.2},
        "training": {"epochs": 1, "batch_size": 64, "lr": 0.05, "backbone_lr_scale": 0.1},
        "space": {"arrangements": ["channel-spatial"], "kernel_sizes": [3], "stages": [[3, 4]]},
        "sampler": "random",
        "budget": {"trials": 4},
        "early_stopping": {"policy": "none"},
        "confirm": {"enabled": False},
    }
    app = create_app(settings, db=sqlite_db)
    token = create_token(sqlite_db, "tester")
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        created = client.post("/api/v1/searches", json=spec)
        assert created.status_code == 201, created.text
        search_id = created.json()["id"]
        run_worker_to_the_end(search_id)
        assert client.get(f"/api/v1/searches/{search_id}").json()["state"] == "completed"
        best = client.get(f"/api/v1/searches/{search_id}/best/bundle")
        with sqlite_db.session() as session:
            rows = session.query(TrialResult).filter_by(search_id=search_id).all()
            found = [(r.number, r.state, r.architecture, r.test_accuracy) for r in rows]
        assert all(state == ResultState.completed for _, state, _, _ in found), found
        number, _, _, stored = next(row for row in found if row[2]["attention"] == "cbam")
        answer = client.get(f"/api/v1/searches/{search_id}/trials/{number}/bundle")
    assert best.status_code == 200, best.text
    assert answer.status_code == 200, answer.text
    bundle = tmp_path / "cbam.zip"
    bundle.write_bytes(answer.content)
    model, preprocess = load_model(bundle)
    assert isinstance(model, timm.models.ResNet)
    attention = _attention_paths(model)
    assert attention and all(p.startswith(("layer3.", "layer4.")) for p in attention)
    data = load_dataset("digits", {"size": 16}, settings.data_dir, 0.2, 0)
    with torch.no_grad():
        predicted = model(preprocess(data.test_x)).argmax(-1)
    accuracy = int((predicted == data.test_y).sum()) / len(data.test_y)
    assert accuracy == pytest.approx(stored, abs=1e-9)
