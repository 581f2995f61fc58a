"""Model bundles (search.bundle): the card, loading in two lines, the API's archive, the CLI's
download and predict.

The end-to-end test trains a real search on bundled digits, downloads its answer's bundle
through the API, loads it in a fresh interpreter that never imports the search's spec, and
reproduces the test accuracy the worker stored; ``cbam-nas predict`` then classifies image
files the test writes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from support import flat, run_worker_to_the_end
from typer.testing import CliRunner

from search.build import build_model
from search.bundle import (
    CARD_FILE,
    CARD_KEY,
    WEIGHTS_FILE,
    BundleError,
    archive,
    bundle_files,
    load_model,
    model_card,
    read_card,
)
from search.preprocessing import Preprocess, normalise
from search.settings import Settings
from search.space import reference_architectures
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import ResultState, TrialResult
from search.store.searches import create_search
from service.app import create_app
from service.auth import create_token
from service.cli import app as cli

ARCH = reference_architectures("cifar_resnet20")["cbam"]
MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)


def _card(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "num_classes": 4,
        "in_channels": 3,
        "input_size": 16,
        "mean": MEAN,
        "std": STD,
        "class_names": ["ant", "bee", "cat", "dog"],
    }
    values.update(overrides)
    return model_card(ARCH, **values)


def _weights(num_classes: int = 4, in_channels: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes, in_channels)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


# -- the card and loading -----------------------------------------------------------------------


def test_a_folder_a_zip_and_the_weights_alone_load_the_same_model(tmp_path: Path) -> None:
    weights = _weights()
    files = bundle_files(_card(), weights)
    assert set(files) == {WEIGHTS_FILE, CARD_FILE, "README.md"}
    folder = _write(tmp_path / "bundle", files)
    zipped = tmp_path / "bundle.zip"
    zipped.write_bytes(archive(files, "cbam-nas-x-trial0"))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    outputs = []
    for path in (folder, zipped, folder / WEIGHTS_FILE):
        model, preprocess = load_model(path)
        assert not model.training
        with torch.no_grad():
            outputs.append(model(preprocess(images)))
    reference = build_model(ARCH, 4, 3).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        expected = reference(normalise(images, torch.tensor(MEAN), torch.tensor(STD)))
    for output in outputs:
        assert torch.equal(output, expected)
    # The header carries the same card as model.json.
    assert read_card(folder / WEIGHTS_FILE) == read_card(folder) == json.loads(files[CARD_FILE])
    card = read_card(zipped)
    assert card["num_classes"] == 4 and card["in_channels"] == 3
    assert card["input_size"] == [16, 16] and card["class_names"][2] == "cat"
    assert card["preprocessing"]["mean"] == list(MEAN)
    assert card["inputs"]["name"] == "images" and card["outputs"]["shape"] == ["batch", 4]
    readme = files["README.md"].decode()
    assert "load_model" in readme and "cbam-nas predict" in readme and "ant, bee" in readme


def test_weights_that_do_not_fit_the_card_are_refused_with_the_keys(tmp_path: Path) -> None:
    weights = _weights()
    weights.pop("fc.bias")
    weights["extra.weight"] = torch.zeros(1)
    folder = _write(tmp_path / "b", bundle_files(_card(), weights))
    with pytest.raises(BundleError, match=r"missing \['fc.bias'\], unexpected \['extra.weight'\]"):
        load_model(folder)


def test_what_is_not_a_bundle_says_why(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle at"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"has no weights\.safetensors"):
        load_model(tmp_path / "empty")
    plain = tmp_path / "plain.safetensors"
    save_file(_weights(), str(plain))
    with pytest.raises(BundleError, match=r"neither model\.json nor a card"):
        load_model(plain)
    future = {**_card(), "format_version": 99}
    save_file(_weights(), str(plain), metadata={CARD_KEY: json.dumps(future)})
    with pytest.raises(BundleError, match="version 99"):
        load_model(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_model(junk)


def test_a_card_needs_one_name_per_class() -> None:
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        _card(class_names=["a", "b", "c"])


def test_preprocess_reads_files_resizes_and_converts_channels(tmp_path: Path) -> None:
    rgb = Preprocess(8, 3, MEAN, STD)
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    # A lossless file gives exactly the tensor's input; the model sees the training arithmetic.
    assert torch.equal(rgb(path), rgb(image))
    assert torch.equal(rgb.pixels(path), image.unsqueeze(0))
    assert rgb([path, image]).shape == (2, 3, 8, 8)
    big = tmp_path / "big.jpg"
    Image.fromarray(image.permute(1, 2, 0).numpy()).resize((32, 24)).save(big)
    assert rgb.pixels(big).shape == (1, 3, 8, 8)
    pil = Image.open(path)
    assert torch.equal(rgb.pixels(pil), image.unsqueeze(0))
    grey = Preprocess(8, 1, (0.5,), (0.25,))
    assert grey.pixels(path).shape == (1, 1, 8, 8)
    expected = np.array(Image.open(path).convert("L"))
    assert torch.equal(grey.pixels(path)[0, 0], torch.from_numpy(expected))  # PIL's luma
    # A tensor is converted alike (ITU-R 601 luma), to within rounding.
    assert (grey.pixels(image)[0, 0].int() - torch.from_numpy(expected).int()).abs().max() <= 1
    with pytest.raises(FileNotFoundError):
        rgb(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not an image"):
        rgb(tmp_path / "bad.png")


# -- end to end: a real search, its bundle through the API, two lines in a fresh interpreter ----

# What a user runs: two lines to load, then the stored test images through the model.
LOADER = """
import sys
from safetensors.torch import load_file
from search import load_model
model, preprocess = load_model(sys.argv[1])
data = load_file(sys.argv[2])
predicted = model(preprocess(data["images"])).argmax(-1)
correct = int((predicted == data["labels"]).sum())
print(correct, len(data["labels"]), "search.spec" in sys.modules, "optuna" in sys.modules)
"""


@pytest.fixture
def trained(sqlite_db: Database, settings: Settings) -> tuple[Any, str, str]:
    """A finished real search on 16x16 digits: one trial of the paper's CBAM, trained."""
    spec = SearchSpec.from_dict(
        {
            "backbone": "cifar_resnet20",
            "dataset": {"name": "digits", "options": {"size": 16}, "val_fraction": 0.2},
            "training": {"epochs": 1, "batch_size": 64, "lr": 0.05},
            "space": {"arrangements": ["channel-spatial"], "kernel_sizes": [3]},
            "sampler": "random",
            "budget": {"trials": 1},
            "early_stopping": {"policy": "none"},
            "confirm": {"enabled": False},
        }
    )
    search = create_search(sqlite_db, spec)
    run_worker_to_the_end(search.id)
    app = create_app(settings, db=sqlite_db)
    return app, create_token(sqlite_db, "tester"), search.id


def _test_set(tmp_path: Path, settings: Settings, spec: dict[str, Any]) -> Path:
    from workers.data import load_dataset

    dataset = spec["dataset"]
    name, options, fraction = dataset["name"], dataset["options"], dataset["val_fraction"]
    data = load_dataset(name, options, settings.data_dir, fraction, spec["seed"])
    path = tmp_path / "test.safetensors"
    save_file({"images": data.test_x.contiguous(), "labels": data.test_y.contiguous()}, str(path))
    return path


@pytest.mark.e2e
def test_a_downloaded_bundle_reproduces_the_stored_test_accuracy(
    trained: tuple[Any, str, str], sqlite_db: Database, settings: Settings, tmp_path: Path
) -> None:
    app, token, search_id = trained
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        answer = client.get(f"/api/v1/searches/{search_id}/best/bundle")
        spec = client.get(f"/api/v1/searches/{search_id}").json()["spec"]
        stranger = client.get(
            f"/api/v1/searches/{search_id}/best/bundle", headers={"Authorization": "Bearer x"}
        )
    assert stranger.status_code == 401
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    zipped = tmp_path / "best.zip"
    zipped.write_bytes(answer.content)
    with zipfile.ZipFile(io.BytesIO(answer.content)) as opened:
        names = sorted(Path(name).name for name in opened.namelist())
    assert names == sorted(
        ["weights.safetensors", "model.json", "README.md", "architecture.json", "metrics.json"]
    )
    card = read_card(zipped)
    with sqlite_db.session() as session:
        row = session.query(TrialResult).filter_by(search_id=search_id).one()
    assert row.state == ResultState.completed and row.test_accuracy is not None
    assert card["class_names"] == [str(d) for d in range(10)]
    assert (card["num_classes"], card["in_channels"], card["input_size"]) == (10, 1, [16, 16])
    assert card["search_id"] == search_id and card["spec"] == spec and card["seeds"] == [row.seed]
    assert card["dataset"]["name"] == "digits" and card["architecture"] == row.architecture
    metrics = card["metrics"]
    assert metrics["test_accuracy"] == row.test_accuracy
    assert metrics["n_seeds"] == 1 and len(metrics["val_accuracy_ci95"]) == 2
    assert metrics["verdict_vs_none"] == "untested" and metrics["confirmed"] is False

    test_file = _test_set(tmp_path, settings, spec)
    ran = subprocess.run(
        [sys.executable, "-c", LOADER, str(zipped), str(test_file)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    correct, total, spec_imported, optuna_imported = ran.stdout.split()
    assert int(correct) / int(total) == pytest.approx(row.test_accuracy, abs=1e-12)
    assert spec_imported == "False" and optuna_imported == "False"

    # cbam-nas predict classifies image files the test writes, as the model does.
    from safetensors.torch import load_file

    data = load_file(test_file)
    paths = []
    for index in range(4):
        path = tmp_path / f"digit{index}.png"
        Image.fromarray(data["images"][index, 0].numpy()).save(path)
        paths.append(path)
    model, preprocess = load_model(zipped)
    with torch.no_grad():
        expected = model(preprocess(data["images"][:4])).argmax(-1).tolist()
    result = CliRunner().invoke(cli, ["predict", str(zipped), *map(str, paths), "--json"])
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.stdout.splitlines()]
    assert [item["top"][0]["name"] for item in shown] == [str(e) for e in expected]
    assert [item["image"] for item in shown] == [str(p) for p in paths]
    assert all(len(item["top"]) == 3 for item in shown)
    table = CliRunner().invoke(cli, ["predict", str(zipped), str(paths[0]), "--top", "2"])
    assert table.exit_code == 0 and "#2" in table.stdout and "digit0.png" in table.stdout


def test_predict_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    folder = _write(tmp_path / "b", bundle_files(_card(), _weights()))
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    runner = CliRunner()
    missing = runner.invoke(cli, ["predict", str(tmp_path / "none"), str(image)])
    assert missing.exit_code == 2 and "no bundle at" in flat(missing.output)
    no_image = runner.invoke(cli, ["predict", str(folder), str(tmp_path / "none.png")])
    assert no_image.exit_code == 2 and "no image file" in flat(no_image.output)
    (tmp_path / "bad.png").write_bytes(b"nope")
    bad = runner.invoke(cli, ["predict", str(folder), str(tmp_path / "bad.png")])
    assert bad.exit_code == 2 and "not an image" in flat(bad.output)
    ok = runner.invoke(cli, ["predict", str(folder), str(image), "--json", "--top", "9"])
    assert ok.exit_code == 0, ok.output
    top = json.loads(ok.stdout)["top"]
    assert len(top) == 4 and {item["name"] for item in top} == {"ant", "bee", "cat", "dog"}


# -- a confirmed architecture's bundle, and trials stored before cards --------------------------


def _upload(db: Database, study_name: str, settings: Settings, files: dict[str, bytes]) -> dict:
    import optuna
    from optuna.artifacts import upload_artifact

    from search.store.artifacts import artifact_store

    store = artifact_store(settings)
    study = optuna.load_study(study_name=study_name, storage=db.optuna_storage())
    folder = Path(settings.cache_dir) / "upload"
    folder.mkdir(parents=True, exist_ok=True)
    ids = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        ids[name] = upload_artifact(
            artifact_store=store, file_path=str(folder / name), study_or_trial=study
        )
    return ids


def _confirmed_search(sqlite_db: Database, settings: Settings) -> tuple[Any, str, str, str]:
    """A search with explored and confirmed rows whose artifacts were stored at different times
    (with a model card, before cards, before the normalisation was stored, not at all): the
    app, a reader's token, the search's URL and its id."""
    from safetensors.torch import save
    from support import quick_spec

    from search.store.models import Phase, Reference, utcnow

    spec = quick_spec(trials=2, confirm={"enabled": True, "min_seeds": 2, "max_seeds": 2})
    search = create_search(sqlite_db, spec)
    weights = _weights()
    stored = {
        "weights.safetensors": save(weights),
        "architecture.json": ARCH.to_json().encode(),
        "metrics.json": json.dumps({"overhead": {"input_shape": [1, 3, 16, 16]}}).encode(),
    }
    samples = {
        "images": torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        "labels": torch.zeros(2, dtype=torch.int64),
        "mean": torch.tensor(MEAN),
        "std": torch.tensor(STD),
    }
    with_card = _upload(
        sqlite_db,
        search.study_name,
        settings,
        {**stored, "model.json": json.dumps(_card()).encode()},
    )
    legacy = _upload(
        sqlite_db,
        search.study_name,
        settings,
        {**stored, "samples.safetensors": save(samples)},
    )
    older = _upload(sqlite_db, search.study_name, settings, stored)
    none = reference_architectures("cifar_resnet20")["none"]
    rows = [
        # number, phase, architecture, reference, seed, accuracy, artifacts
        (0, Phase.explore, ARCH, None, 0, 0.70, legacy),
        (1, Phase.explore, none, Reference.none, 0, 0.60, older),
        (2, Phase.confirm, ARCH, None, 11, 0.80, None),
        (3, Phase.confirm, ARCH, None, 12, 0.83, with_card),
        (4, Phase.confirm, none, Reference.none, 11, 0.70, None),
        (5, Phase.confirm, none, Reference.none, 12, 0.71, None),
    ]
    with sqlite_db.session() as session:
        for number, phase, arch, reference, seed, accuracy, files in rows:
            session.add(
                TrialResult(
                    search_id=search.id,
                    number=number,
                    architecture=arch.to_dict(),
                    arch_id=arch.id,
                    label=arch.describe(),
                    reference=reference,
                    phase=phase,
                    seed=seed,
                    state=ResultState.completed,
                    val_accuracy=accuracy,
                    params=270_000 if reference else 280_000,
                    artifacts=files,
                    finished_at=utcnow(),
                )
            )
    app = create_app(settings, db=sqlite_db)
    return app, create_token(sqlite_db, "reader"), f"/api/v1/searches/{search.id}", search.id


def test_a_confirmed_architecture_bundles_its_seeds_and_evidence(
    sqlite_db: Database, settings: Settings
) -> None:
    from search.stats import VERDICTS

    app, token, base, search_id = _confirmed_search(sqlite_db, settings)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        confirmed = client.get(f"{base}/trials/3/bundle")
        rebuilt = client.get(f"{base}/trials/0/bundle")
        refused = client.get(f"{base}/trials/1/bundle")
        unstored = client.get(f"{base}/trials/2/bundle")
    assert confirmed.status_code == 200, confirmed.text
    with zipfile.ZipFile(io.BytesIO(confirmed.content)) as opened:
        files = {Path(name).name: opened.read(name) for name in opened.namelist()}
    assert "model.onnx" not in files and "samples.safetensors" not in files
    card = json.loads(files["model.json"])
    assert card["seeds"] == [11, 12] and card["search_id"] == search_id
    evidence = card["metrics"]
    assert evidence["confirmed"] is True and evidence["n_seeds"] == 2
    assert evidence["val_accuracy_mean"] == pytest.approx(0.815)
    assert evidence["verdict_vs_none"] in VERDICTS and evidence["delta_vs_none"] > 0
    assert card["class_names"] == ["ant", "bee", "cat", "dog"]  # the stored card's

    # Stored before cards: rebuilt from the weights, the measured input and the samples' stats.
    assert rebuilt.status_code == 200, rebuilt.text
    with zipfile.ZipFile(io.BytesIO(rebuilt.content)) as opened:
        old_card = json.loads(opened.read(f"cbam-nas-{search_id[:8]}-trial0/model.json"))
    assert (old_card["num_classes"], old_card["in_channels"]) == (4, 3)
    assert old_card["input_size"] == [16, 16] and old_card["class_names"] is None
    assert old_card["preprocessing"]["mean"] == pytest.approx(list(MEAN))
    assert old_card["seeds"] == [0] and "confirmed" not in old_card["metrics"]  # not on the board
    # Stored before the normalisation was: no honest preprocessing, no bundle.
    assert refused.status_code == 409 and "normalisation" in refused.json()["detail"]
    assert unstored.status_code == 409 and "stored weights" in unstored.json()["detail"]


@pytest.mark.e2e
def test_a_bundle_can_carry_the_model_as_onnx(sqlite_db: Database, settings: Settings) -> None:
    """``?onnx=true``: the model exported (torch's dynamo exporter, seconds on a CPU), its input
    and output named as the card says."""
    import onnx

    app, token, base, _ = _confirmed_search(sqlite_db, settings)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        confirmed = client.get(f"{base}/trials/3/bundle", params={"onnx": "true"})
    assert confirmed.status_code == 200, confirmed.text
    with zipfile.ZipFile(io.BytesIO(confirmed.content)) as opened:
        files = {Path(name).name: opened.read(name) for name in opened.namelist()}
    card = json.loads(files["model.json"])
    graph = onnx.load_from_string(files["model.onnx"]).graph
    assert [i.name for i in graph.input] == [card["inputs"]["name"]]
    assert [o.name for o in graph.output] == [card["outputs"]["name"]]
