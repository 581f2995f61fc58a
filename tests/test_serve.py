"""``cbam-nas serve`` end to end: a real server process with one local worker, a
3-trial search over HTTP, the leaderboard, downloads that reproduce the reported accuracy, ONNX
that runs in onnxruntime, and a clean stop that takes the workers with it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from support import free_port

from search.settings import Settings
from search.space import Architecture, build_model
from search.spec import SearchSpec
from workers.data import load_dataset
from workers.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
SPEC: dict[str, Any] = {
    "name": "e2e",
    "backbone": "cifar_resnet20",
    "dataset": {
        "name": "synthetic",
        "options": {"size": 16, "num_samples": 256, "num_test": 32},
        "val_fraction": 0.25,
    },
    "training": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "sampler": "random",
    "budget": {"trials": 3},
    "early_stopping": {"policy": "none"},
}


def _worker_pids(server_pid: int) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-P", str(server_pid)], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in found]


@pytest.fixture
def server(
    settings: Settings, database_url: str, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The server on a fresh database: SQLite, then PostgreSQL (CBAM_NAS_DATABASE_URL)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            pytest.fail(f"serve exited:\n{process.stdout.read() if process.stdout else ''}")
        time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("serve did not become ready in 60 s")
    try:
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_serve_runs_a_search_end_to_end(
    server: tuple[str, subprocess.Popen[str]], settings: Settings
) -> None:
    base, process = server
    # The admin token: created on first start, owner-only, and the only way in.
    assert stat.S_IMODE(settings.token_file.stat().st_mode) == 0o600
    token = settings.token_file.read_text().strip()
    assert httpx.get(f"{base}/api/v1/searches").status_code == 401
    client = httpx.Client(
        base_url=f"{base}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=180
    )

    created = client.post("/searches", json=SPEC)
    assert created.status_code == 201, created.text
    search_id = created.json()["id"]
    deadline = time.monotonic() + 240
    while True:
        search = client.get(f"/searches/{search_id}").json()
        if search["state"] not in ("queued", "running"):
            break
        assert time.monotonic() < deadline, f"search not finished: {search['progress']}"
        time.sleep(1.0)
    assert search["state"] == "completed", search
    progress = search["progress"]
    assert (progress["done"], progress["completed"], progress["budget"]) == (3, 3, 3)

    # The three references ran first; every trial is ranked, with its flag and deltas.
    board = client.get(f"/searches/{search_id}/leaderboard", params={"overhead": "params"}).json()
    assert board["total"] == 3 and set(board["references"]) == {"none", "se", "cbam"}
    entries = {e["reference"]: e for e in board["entries"]}
    assert entries["none"]["delta_vs_none"] == pytest.approx(0.0)
    assert entries["none"]["params_delta_vs_none"] == pytest.approx(0.0)
    none_acc = entries["none"]["val_accuracy"]
    for entry in board["entries"]:
        assert entry["delta_vs_none"] == pytest.approx(100 * (entry["val_accuracy"] - none_acc))
        better = [
            o
            for o in board["entries"]
            if o["val_accuracy"] >= entry["val_accuracy"]
            and o["params"] <= entry["params"]
            and (o["val_accuracy"], o["params"]) != (entry["val_accuracy"], entry["params"])
        ]
        assert entry["pareto"] == (not better)
    assert entries["none"]["pareto"]  # fewest parameters of all

    # Download the best trial's files and reproduce its reported accuracy.
    best = client.get(f"/searches/{search_id}/best").json()
    number = best["number"]
    files = {}
    for name in ("weights.safetensors", "architecture.json", "metrics.json"):
        response = client.get(f"/searches/{search_id}/trials/{number}/files/{name}")
        assert response.status_code == 200, response.text
        files[name] = response.content
    architecture = Architecture.from_json(files["architecture.json"].decode())
    assert architecture.to_dict() == best["architecture"]
    metrics = json.loads(files["metrics.json"])
    spec = SearchSpec.from_dict(SPEC)
    data = load_dataset(
        spec.dataset.name,
        spec.dataset.options,
        settings.data_dir,
        spec.dataset.val_fraction,
        spec.seed,
    )
    model = build_model(architecture, data.num_classes, data.in_channels)
    model.load_state_dict(load_safetensors(files["weights.safetensors"]))
    _, accuracy = evaluate(model, data.val_x, data.val_y, data)
    assert accuracy == pytest.approx(best["final_val_accuracy"], abs=1e-9)
    assert metrics["final_val_accuracy"] == pytest.approx(best["final_val_accuracy"])

    # ONNX, exported on demand, computes what PyTorch does.
    import onnxruntime

    exported = client.get(f"/searches/{search_id}/trials/{number}/files/model.onnx")
    assert exported.status_code == 200, exported.text
    session = onnxruntime.InferenceSession(exported.content, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model(images).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)

    # Stopping the server stops its worker.
    workers = _worker_pids(process.pid)
    assert workers
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "local workers outlived the server"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
