"""Attention pictures: gates read per module, Grad-CAM of the last stage on every backbone family,
the JSON report, the samples the worker stores, and the API endpoint with its cache."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import run_worker_to_the_end
from torch import Tensor, nn

from search.attention_maps import attention_maps, attention_report, normalise
from search.build import build_model
from search.nn.cbam import CBAM
from search.nn.gates import ChannelGate, SpatialGate
from search.settings import Settings
from search.space import Architecture, reference_architectures
from search.store.engine import Database
from search.store.models import ResultState, TrialResult, utcnow
from service.api.analysis_schemas import AttentionOut

CIFAR = reference_architectures("cifar_resnet20")
SPATIAL_ONLY = Architecture("cifar_resnet20", "cbam", arrangement="spatial", kernel_size=3)
CASES = {"cbam": CIFAR["cbam"], "se": CIFAR["se"], "none": CIFAR["none"], "spatial": SPATIAL_ONLY}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights, BatchNorm statistics included (CBAM's spatial BN starts at gamma 0,
    which would make every spatial gate exactly 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator)
                    * (2.0 / module.weight[0].numel()) ** 0.5
                )
    return model.eval()


def _model(architecture: Architecture, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(build_model(architecture, classes), seed)


def _images(count: int, size: int, seed: int = 1) -> Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# Independent definitions of the gates (eval mode), for the CBAM modules these backbones build.


def _channel(gate: ChannelGate, x: Tensor) -> Tensor:
    pools = {"avg": x.mean((2, 3)), "max": x.amax((2, 3))}
    logits = sum(gate.fc2(F.relu(gate.fc1(pools[p]))) for p in gate.pool_types)
    return torch.sigmoid(logits)


def _spatial(gate: SpatialGate, x: Tensor) -> Tensor:
    maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    z = F.conv2d(maps, gate.conv.weight, padding=gate.conv.weight.shape[-1] // 2)
    bn = gate.bn
    z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return torch.sigmoid(z)[:, 0]


def _expected_gates(model: nn.Module, x: Tensor) -> dict[str, tuple[Tensor | None, Tensor | None]]:
    inputs: dict[str, Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in model.named_modules()
        if isinstance(m, CBAM)
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    out: dict[str, tuple[Tensor | None, Tensor | None]] = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, CBAM):
                continue
            block_input = inputs[name]
            arrangement = m.config.arrangement
            assert arrangement in ("channel-spatial", "channel", "spatial")
            channel = _channel(m.channel_gate, block_input) if m.channel_gate else None
            spatial = None
            if m.spatial_gate is not None:
                gated = block_input if channel is None else block_input * channel[:, :, None, None]
                spatial = _spatial(m.spatial_gate, gated)
            out[name] = (channel, spatial)
    return out


def _expected_grad_cam(model: nn.Module, stage: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    kept: list[Tensor] = []
    handle = stage.register_forward_hook(lambda _m, _a, out: kept.append(out))
    logits = model(x)
    handle.remove()
    features = kept[0]
    prediction = logits.argmax(1)
    (grads,) = torch.autograd.grad(logits[torch.arange(len(x)), prediction].sum(), features)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * features).sum(1)).detach()
    peak = cam.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-30), 0.0), logits.detach()


@pytest.mark.parametrize("case", list(CASES))
def test_gates_and_grad_cam_on_cifar_resnet20(case: str) -> None:
    architecture = CASES[case]
    model = _model(architecture)
    x = _images(3, 32)
    found = attention_maps(model, x)
    assert model.training is False and len(found) == 3

    expected = _expected_gates(model, x)
    spatial_names = [n for n, (_, s) in expected.items() if s is not None]
    channel_names = [n for n, (c, _) in expected.items() if c is not None]
    if case == "none":
        assert spatial_names == channel_names == []
    if case in ("cbam", "spatial"):
        assert spatial_names == [f"layer{s}.{b}.attn" for s in (1, 2, 3) for b in range(3)]
    if case in ("cbam", "se"):
        assert len(channel_names) == 9
    else:
        assert channel_names == []
    cam, logits = _expected_grad_cam(model, model.layer3, x)
    probabilities = torch.softmax(logits, 1)

    for i, item in enumerate(found):
        assert [m.module for m in item.spatial] == spatial_names
        assert [g.module for g in item.channel] == channel_names
        for m in item.spatial:
            stage = int(m.module[len("layer")])
            side = 32 // 2 ** (stage - 1)
            assert m.map.shape == (side, side) and m.overlay.shape == (32, 32)
            for values in (m.map, m.overlay):
                assert values.min() >= 0 and values.max() <= 1
            torch.testing.assert_close(m.map, expected[m.module][1][i])
            assert float(m.map.std()) > 0  # random weights: not the initial constant 0.5
        for g in item.channel:
            stage = int(g.module[len("layer")])
            assert g.values.shape == (16 * 2 ** (stage - 1),)
            assert g.values.min() >= 0 and g.values.max() <= 1
            torch.testing.assert_close(g.values, expected[g.module][0][i])
        assert item.prediction == int(logits[i].argmax())
        assert item.probability == pytest.approx(float(probabilities[i].max()), rel=1e-5)
        assert item.last_stage == "layer3"
        assert item.grad_cam.shape == (8, 8) and item.grad_cam_overlay.shape == (32, 32)
        assert item.grad_cam.min() >= 0
        assert float(item.grad_cam.max()) in (0.0, pytest.approx(1.0))
        torch.testing.assert_close(item.grad_cam, cam[i], atol=1e-5, rtol=1e-4)
        assert item.grad_cam_overlay.min() >= 0 and item.grad_cam_overlay.max() <= 1


@pytest.mark.parametrize(
    ("backbone", "stage", "cam_side", "modules"),
    [("resnet18", "layer4", 2, 8), ("mobilenet_v1_0.25", "layer5", 2, 13)],
)
def test_last_stage_is_the_input_of_global_pooling(
    backbone: str, stage: str, cam_side: int, modules: int
) -> None:
    model = _model(reference_architectures(backbone)["cbam"])
    x = _images(2, 64)
    found = attention_maps(model, x)
    cam, _ = _expected_grad_cam(model, getattr(model, stage), x)
    for i, item in enumerate(found):
        assert item.last_stage == stage
        assert item.grad_cam.shape == (cam_side, cam_side)
        assert item.grad_cam_overlay.shape == (64, 64)
        torch.testing.assert_close(item.grad_cam, cam[i], atol=1e-5, rtol=1e-4)
        assert len(item.spatial) == len(item.channel) == modules
        first_side = 16 if backbone == "resnet18" else 32
        assert item.spatial[0].map.shape == (first_side, first_side)


def test_frozen_weights_and_training_mode_are_handled() -> None:
    model = _model(CIFAR["cbam"]).train()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = attention_maps(model, _images(2, 32))
    assert model.training and found[0].grad_cam.shape == (8, 8)
    for key, value in model.state_dict().items():  # BatchNorm statistics untouched
        torch.testing.assert_close(value, before[key])


# -- the report ------------------------------------------------------------------------------


def _samples(count: int = 8, size: int = 32, channels: int = 3) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "images": torch.randint(0, 256, (count, channels, size, size), generator=generator).to(
            torch.uint8
        ),
        "labels": torch.arange(count, dtype=torch.int64) % 10,
        "mean": torch.tensor([0.49, 0.48, 0.45][:channels], dtype=torch.float32),
        "std": torch.tensor([0.25, 0.24, 0.26][:channels], dtype=torch.float32),
    }


def _decode(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))))


def test_normalisation_is_the_workers() -> None:
    from workers.augment import normalizer, to_float

    samples = _samples()
    mean, std = tuple(samples["mean"].tolist()), tuple(samples["std"].tolist())
    expected = to_float(samples["images"], *normalizer(mean, std, "cpu"), torch.contiguous_format)
    assert torch.equal(normalise(samples["images"], samples["mean"], samples["std"]), expected)


def test_attention_report_shape_and_values() -> None:
    architecture = CIFAR["cbam"]
    weights = _model(architecture).state_dict()
    samples = _samples()
    report = attention_report(architecture.to_dict(), weights, samples, max_images=4)
    assert set(report) == {
        "backbone",
        "attention",
        "label",
        "image_size",
        "last_stage",
        "modules",
        "images",
    }
    assert report["image_size"] == [32, 32] and report["last_stage"] == "layer3"
    assert [m["name"] for m in report["modules"]] == [
        f"layer{s}.{b}.attn" for s in (1, 2, 3) for b in range(3)
    ]
    assert report["modules"][3] == {
        "name": "layer2.0.attn",
        "spatial_size": [16, 16],
        "channels": 32,
    }
    assert len(report["images"]) == 4

    model = build_model(architecture, 10)
    model.load_state_dict(weights)
    found = attention_maps(model, normalise(samples["images"][:4], samples["mean"], samples["std"]))
    for i, image in enumerate(report["images"]):
        assert set(image) == {
            "index",
            "image",
            "label",
            "prediction",
            "probability",
            "spatial",
            "channel",
            "grad_cam",
        }
        assert np.array_equal(
            _decode(image["image"]), samples["images"][i].permute(1, 2, 0).numpy()
        )
        assert image["label"] == int(samples["labels"][i])
        assert image["prediction"] == found[i].prediction
        assert len(image["spatial"]) == len(image["channel"]) == 9
        first = image["spatial"][0]
        assert first["module"] == "layer1.0.attn" and first["size"] == [32, 32]
        assert len(first["map"]) == 32 and len(first["map"][0]) == 32
        np.testing.assert_allclose(first["map"], found[i].spatial[0].map.numpy(), atol=5e-4)
        assert all(v == round(v, 3) for row in first["map"] for v in row)
        assert len(image["channel"][-1]["values"]) == 64
        cam = image["grad_cam"]
        assert cam["module"] == "layer3" and cam["size"] == [8, 8]
        np.testing.assert_allclose(cam["map"], found[i].grad_cam.numpy(), atol=5e-4)
    assert len(json.dumps(report, separators=(",", ":"))) < 200_000

    # Grey-scale images and attention "none".
    none = CIFAR["none"]
    grey = build_model(none, 10, in_channels=1).state_dict()
    report = attention_report(none, grey, _samples(channels=1), max_images=2)
    assert report["modules"] == [] and len(report["images"]) == 2
    assert report["images"][0]["spatial"] == report["images"][0]["channel"] == []
    assert _decode(report["images"][0]["image"]).shape == (32, 32)


# -- the samples the worker stores -------------------------------------------------------------


def test_validation_samples_of_tensors_and_streamed_folders(tmp_path: Path) -> None:
    from workers.artifacts import validation_samples
    from workers.data import ImageFiles, StreamingData, load_dataset

    options = {"size": 16, "num_samples": 64, "num_test": 16}
    data = load_dataset("synthetic", options, tmp_path, 0.25, 0)
    samples = validation_samples(data)
    assert samples is not None
    assert samples["images"].dtype == torch.uint8 and samples["images"].shape == (8, 3, 16, 16)
    assert torch.equal(samples["images"], data.val_x[:8])
    assert torch.equal(samples["labels"], data.val_y[:8])
    assert samples["mean"].dtype == samples["std"].dtype == torch.float32
    assert samples["mean"].tolist() == pytest.approx(list(data.mean))
    no_val = load_dataset("synthetic", options, tmp_path, 0.0, 0)
    assert torch.equal(validation_samples(no_val)["images"], no_val.test_x[:8])  # type: ignore[index]

    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((12, 10, 3), 40 * i, dtype=np.uint8)).save(path)
        files.append((str(path), i))
    streamed = StreamingData(
        name="folder",
        train=ImageFiles(files, 8, 3),
        val=ImageFiles(files, 8, 3),
        test=None,
        num_classes=3,
        in_channels=3,
        image_size=8,
        mean=(0.5, 0.5, 0.5),
        std=(0.2, 0.2, 0.2),
        num_workers=0,
    )
    samples = validation_samples(streamed)
    assert samples is not None and samples["images"].shape == (3, 3, 8, 8)
    assert samples["labels"].tolist() == [0, 1, 2]
    assert int(samples["images"][2].float().mean()) == 80


# -- the API ---------------------------------------------------------------------------------

SPEC = """\
name: attention test
backbone: cifar_resnet20
dataset: {name: synthetic, options: {num_samples: 64}}
budget: {trials: 3}
training: {epochs: 1}
"""


def _upload(db: Database, settings: Settings, study_name: str, folder: Path) -> dict[str, str]:
    import optuna
    from optuna.artifacts import upload_artifact
    from safetensors.torch import save_file

    from search.store.artifacts import artifact_store

    folder.mkdir()
    save_file(_model(CIFAR["cbam"]).state_dict(), str(folder / "weights.safetensors"))
    save_file(_samples(), str(folder / "samples.safetensors"))
    store = artifact_store(settings)
    study = optuna.load_study(study_name=study_name, storage=db.optuna_storage())
    return {
        name: upload_artifact(
            artifact_store=store, file_path=str(folder / name), study_or_trial=study
        )
        for name in ("weights.safetensors", "samples.safetensors")
    }


def test_attention_endpoint_computes_caches_and_refuses(
    sqlite_db: Database, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from search import attention_maps as maps_module
    from search.spec import SearchSpec
    from search.store.searches import create_search
    from service.app import create_app
    from service.auth import create_token

    search = create_search(sqlite_db, SearchSpec.from_yaml(SPEC).validate())
    artifacts = _upload(sqlite_db, settings, search.study_name, tmp_path / "up")
    old = {"weights.safetensors": artifacts["weights.safetensors"]}  # stored before samples
    architecture = CIFAR["cbam"]
    with sqlite_db.session() as session:
        for number, files, state in (
            (0, artifacts, ResultState.completed),
            (1, old, ResultState.completed),
            (2, None, ResultState.running),
        ):
            session.add(
                TrialResult(
                    search_id=search.id,
                    number=number,
                    architecture=architecture.to_dict(),
                    arch_id=architecture.id,
                    state=state,
                    artifacts=files,
                    finished_at=utcnow(),
                )
            )
    headers = {"Authorization": f"Bearer {create_token(sqlite_db, 't')}"}
    url = f"/api/v1/searches/{search.id}/trials/{{}}/attention"
    with TestClient(create_app(settings, db=sqlite_db)) as client:
        response = client.get(url.format(0), headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        AttentionOut.model_validate(body)  # what the OpenAPI document says it answers
        assert body["last_stage"] == "layer3" and len(body["images"]) == 4
        assert len(body["images"][0]["spatial"]) == 9
        assert body["images"][0]["grad_cam"]["size"] == [8, 8]
        cached = settings.cache_dir / "attention" / search.id / "0-0.json"
        assert cached.read_bytes() == response.content

        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError("computed again instead of served from the cache")

        monkeypatch.setattr(maps_module, "attention_report", fail)
        again = client.get(url.format(0) + "?attempt=0", headers=headers)
        assert again.status_code == 200 and again.content == response.content

        missing = client.get(url.format(1), headers=headers)
        assert missing.status_code == 404 and "sample images" in missing.json()["detail"]
        assert client.get(url.format(2), headers=headers).status_code == 409
        assert client.get(url.format(7), headers=headers).status_code == 404
        assert client.get(url.format(0)).status_code == 401


def test_a_workers_trial_has_attention_pictures(
    sqlite_db: Database, settings: Settings, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient
    from safetensors import safe_open

    from search.preprocessing import NORMALISATION
    from search.spec import SearchSpec
    from search.store.artifacts import read_artifact
    from search.store.searches import create_search
    from service.app import create_app
    from service.auth import create_token
    from workers.data import load_dataset

    dataset = {"name": "synthetic", "options": {"size": 16, "num_samples": 64, "num_test": 8}}
    spec = SearchSpec.from_dict(
        {
            "backbone": "cifar_resnet20",
            "dataset": {**dataset, "val_fraction": 0.25},
            "training": {"epochs": 1, "batch_size": 32},
            "budget": {"trials": 1},
            "early_stopping": {"policy": "none"},
            "confirm": {"enabled": False},
        }
    )
    search = create_search(sqlite_db, spec)
    run_worker_to_the_end(search.id)
    with sqlite_db.session() as session:
        row = session.query(TrialResult).filter_by(search_id=search.id).one()
    assert row.state == ResultState.completed
    assert "samples.safetensors" in row.artifacts

    from search.store.artifacts import artifact_store

    stored = read_artifact(artifact_store(settings), row.artifacts["samples.safetensors"], "s")
    path = tmp_path / "samples.safetensors"
    path.write_bytes(stored)
    data = load_dataset("synthetic", dataset["options"], settings.data_dir, 0.25, spec.seed)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"normalisation": NORMALISATION}
        assert torch.equal(handle.get_tensor("images"), data.val_x[:8])
        assert torch.equal(handle.get_tensor("labels"), data.val_y[:8])
        assert handle.get_tensor("std").tolist() == pytest.approx(list(data.std))

    headers = {"Authorization": f"Bearer {create_token(sqlite_db, 't')}"}
    with TestClient(create_app(settings, db=sqlite_db)) as client:
        response = client.get(f"/api/v1/searches/{search.id}/trials/0/attention", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    AttentionOut.model_validate(body)
    assert body["attention"] == "none" and body["image_size"] == [16, 16]
    assert [image["label"] for image in body["images"]] == data.val_y[:4].tolist()
