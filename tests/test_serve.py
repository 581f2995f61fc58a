"""``cbam-nas serve`` end to end: a real server process with one local worker, a search over
HTTP, the leaderboard, downloads that reproduce the reported accuracy, ONNX that runs in
onnxruntime, and a clean stop that takes the workers with it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from support import SERVED_SPEC, SERVED_TRIALS, Served, start_serve, wait_until

from search.build import build_model
from search.settings import Settings
from search.space import Architecture
from search.spec import SearchSpec
from workers.data import load_dataset
from workers.train import evaluate


def _worker_pids(server_pid: int) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-P", str(server_pid)], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in found]


@pytest.mark.e2e
def test_serve_runs_a_search_end_to_end(served_search: Served, shared_data_dir: Path) -> None:
    """The shared served search (conftest.py), submitted over HTTP and run by serve's worker."""
    client = served_search.api()
    search_id = served_search.search_id
    search = client.get(f"/searches/{search_id}").json()
    assert search["state"] == "completed", search
    progress = search["progress"]
    trials = SERVED_TRIALS
    assert (progress["done"], progress["completed"], progress["budget"]) == (trials,) * 3

    # The three references ran first; every trial is ranked, with its flag and deltas.
    board = client.get(f"/searches/{search_id}/leaderboard", params={"overhead": "params"}).json()
    assert board["total"] == trials and set(board["references"]) == {"none", "se", "cbam"}
    numbers = {e["reference"]: e["number"] for e in board["entries"] if e["reference"]}
    assert numbers == {"none": 0, "se": 1, "cbam": 2}
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
    spec = SearchSpec.from_dict(SERVED_SPEC)
    data = load_dataset(
        spec.dataset.name,
        spec.dataset.options,
        shared_data_dir,
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


@pytest.mark.e2e
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_serve_starts_on_a_fresh_database_and_its_workers_stop_with_it(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    """On PostgreSQL (the compose file's database; the shared served search is on SQLite):
    serve migrates a fresh database, makes the admin token, starts its worker, and a SIGTERM
    takes the worker with it."""
    served = start_serve(tmp_path, {"CBAM_NAS_DATABASE_URL": database_url})
    try:
        # The admin token: created on first start, owner-only, and the only way in.
        assert stat.S_IMODE(settings.token_file.stat().st_mode) == 0o600
        assert httpx.get(f"{served.url}/api/v1/searches").status_code == 401
        with served.api() as client:
            assert client.get("/searches").json()["total"] == 0
        workers = wait_until(lambda: _worker_pids(served.process.pid), "serve's local worker")
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=60)
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
