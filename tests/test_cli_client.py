"""The CLI's client commands against the real app, served by uvicorn on a free port.

No worker runs: submitted searches stay queued, and the leaderboard and download tests write
their trial rows and artifacts directly, as a worker would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from support import flat, free_port
from typer.testing import CliRunner

from search.settings import Settings, get_settings
from search.store.engine import Database
from search.store.models import Reference, ResultState, Search, TrialResult, utcnow
from service.app import create_app
from service.auth import create_token
from service.cli import app
from service.client import ApiClient, ApiError, ApiUnreachable

runner = CliRunner()

SPEC = """\
name: cli client test
backbone: cifar_resnet20
dataset: {name: synthetic, options: {num_samples: 64}}
space: {arrangements: [channel], kernel_sizes: [3, 7]}
objectives: {overheads: [params]}
budget: {trials: 5}
training: {epochs: 1}
"""


@pytest.fixture
def token(sqlite_db: Database) -> str:
    return create_token(sqlite_db, "tester")


@pytest.fixture
def server(
    sqlite_db: Database, token: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The app on a free port; CBAM_NAS_API_URL and CBAM_NAS_TOKEN point the CLI at it."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, db=sqlite_db), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("CBAM_NAS_API_URL", url)
    monkeypatch.setenv("CBAM_NAS_TOKEN", token)
    get_settings.cache_clear()
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def _cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _spec_file(tmp_path: Path, text: str = SPEC, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _submit(tmp_path: Path, *args: str) -> str:
    code, out, err = _cli("submit", str(_spec_file(tmp_path)), *args)
    assert code == 0, err
    return out.strip()


# -- submit, status, searches, cancel --------------------------------------------------------


def test_submit_then_status_and_list(server: str, tmp_path: Path) -> None:
    search_id = _submit(tmp_path)
    assert len(search_id) == 32 and search_id.isalnum()

    code, out, err = _cli("status", search_id)
    assert code == 0, err
    text = flat(out)
    assert search_id in text
    assert "state queued" in text
    assert "0 of 5 done (budget 5)" in text
    assert "cifar_resnet20 on synthetic" in text
    assert "best so far -" in text and "ETA -" in text

    code, out, _ = _cli("status", search_id, "--json")
    assert code == 0
    status = json.loads(out)
    assert status["state"] == "queued" and status["progress"]["budget"] == 5

    code, out, err = _cli("searches")
    assert code == 0, err
    assert search_id in flat(out) and "0/5" in flat(out)


def test_idempotency_key_returns_the_same_search(server: str, tmp_path: Path) -> None:
    first = _submit(tmp_path, "--key", "k-1")
    code, out, err = _cli("submit", str(_spec_file(tmp_path)), "--key", "k-1")
    assert code == 0 and out.strip() == first
    assert "existing search" in err
    changed = _spec_file(tmp_path, SPEC.replace("trials: 5", "trials: 4"), "other.yaml")
    code, _, err = _cli("submit", str(changed), "--key", "k-1")
    assert code == 2
    assert "Idempotency-Key 'k-1' was used for a different search spec" in err


def test_invalid_spec_shows_the_servers_message(server: str, tmp_path: Path) -> None:
    bad = _spec_file(tmp_path, SPEC.replace("kernel_sizes: [3, 7]", "kernel_sizes: [3, 4]"))
    code, out, err = _cli("submit", str(bad))
    assert code == 2 and out == ""
    assert "(422)" in err
    assert "space.kernel_sizes" in err
    assert "allowed" in err and "7" in err


def test_bad_yaml_and_bad_query_are_exit_2(server: str, tmp_path: Path) -> None:
    broken = _spec_file(tmp_path, "backbone: [unclosed\n")
    code, _, err = _cli("submit", str(broken))
    assert code == 2 and "not valid YAML" in err
    code, _, err = _cli("submit", str(tmp_path / "missing.yaml"))
    assert code == 2
    search_id = _submit(tmp_path)
    # A query value FastAPI itself refuses: its 422 names the parameter.
    code, _, err = _cli("leaderboard", search_id, "--overhead", "flops")
    assert code == 2 and "overhead:" in err and "'params'" in err


def test_missing_and_invalid_token(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CBAM_NAS_TOKEN")
    get_settings.cache_clear()  # and no token file exists
    code, _, err = _cli("submit", str(_spec_file(tmp_path)))
    assert code == 2
    assert "(401)" in err and "missing token" in err
    code, _, err = _cli("searches", "--token", "cbn_1_not-the-right-secret-at-all")
    assert code == 2
    assert "invalid or revoked token" in err


def test_token_file_is_the_fallback(
    server: str, token: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CBAM_NAS_TOKEN")
    get_settings.cache_clear()
    settings.token_file.parent.mkdir(parents=True, exist_ok=True)
    settings.token_file.write_text(token + "\n")
    code, _, err = _cli("searches")
    assert code == 0, err


def test_unreachable_server_exits_1(token: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # closed: nothing listens there
    code, _, err = _cli("status", "abc", "--url", url, "--token", token)
    assert code == 1
    assert f"no server answers at {url}" in flat(err)
    assert "cbam-nas serve" in err
    with pytest.raises(ApiUnreachable), ApiClient(url, token) as client:
        client.searches()
    code, _, err = _cli("status", "abc", "--url", "127.0.0.1:8000", "--token", token)
    assert code == 2 and "http(s)://" in err


def test_cancel_twice_and_unknown_search(server: str, tmp_path: Path) -> None:
    search_id = _submit(tmp_path)
    code, out, err = _cli("cancel", search_id)
    assert code == 0, err
    assert out.strip() == f"search {search_id} cancelled"
    code, _, err = _cli("cancel", search_id)
    assert code == 2
    assert "(409)" in err and "is cancelled" in err
    code, _, err = _cli("status", "0" * 32)
    assert code == 2 and f"search {'0' * 32} not found" in err


def test_wait_follows_the_search_to_its_end(
    server: str, sqlite_db: Database, tmp_path: Path
) -> None:
    """--wait polls until the search is over; here a 'worker' cancels it meanwhile."""
    from search.store.searches import cancel_search

    def cancel_soon() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with sqlite_db.session() as session:
                found = session.query(Search.id).first()
            if found is not None:
                time.sleep(0.3)
                cancel_search(sqlite_db, found[0])
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_soon)
    canceller.start()
    code, out, err = _cli("submit", str(_spec_file(tmp_path)), "--wait", "--interval", "0.1")
    canceller.join()
    assert code == 1
    assert "search cancelled" in err
    assert "none of 0 ranked trials" in flat(out)


# -- leaderboard and download ---------------------------------------------------------------


def _store_artifacts(
    db: Database, settings: Settings, search: Search, arch: Any, folder: Path
) -> dict[str, str]:
    import optuna
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact
    from safetensors.torch import save_file

    from search.build import build_model

    folder.mkdir()
    save_file(build_model(arch, 10).state_dict(), str(folder / "weights.safetensors"))
    (folder / "architecture.json").write_text(arch.to_json())
    metrics = {"val_accuracy": 0.85, "overhead": {"input_shape": [1, 3, 32, 32]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(settings.artifacts_dir)
    study = optuna.load_study(study_name=search.study_name, storage=db.optuna_storage())
    return {
        name: upload_artifact(
            artifact_store=store, file_path=str(folder / name), study_or_trial=study
        )
        for name in ("weights.safetensors", "architecture.json", "metrics.json")
    }


@pytest.fixture
def finished_search(sqlite_db: Database, settings: Settings, tmp_path: Path) -> str:
    """A search with four completed trials (the three references and one other), one pruned;
    the best (CBAM, trial 2) has its files stored."""
    from search.space import reference_architectures
    from search.spec import SearchSpec
    from search.store.searches import create_search

    spec = SearchSpec.from_yaml(SPEC).validate()
    search = create_search(sqlite_db, spec)
    refs = reference_architectures("cifar_resnet20")
    custom = refs["cbam"].to_dict() | {"kernel_size": 3}
    rows = [
        # number, architecture, reference, val acc, params, params %
        (0, refs["none"].to_dict(), Reference.none, 0.80, 269_722, 0.0),
        (1, refs["se"].to_dict(), Reference.se, 0.82, 271_000, 0.47),
        (2, refs["cbam"].to_dict(), Reference.cbam, 0.85, 272_995, 1.21),
        (3, custom, None, 0.83, 270_500, 0.29),
    ]
    artifacts = _store_artifacts(sqlite_db, settings, search, refs["cbam"], tmp_path / "up")
    now = utcnow()
    with sqlite_db.session() as session:
        for number, arch, reference, accuracy, params, pct in rows:
            session.add(
                TrialResult(
                    search_id=search.id,
                    number=number,
                    architecture=arch,
                    arch_id=f"arch{number}",
                    label=f"label-{number}",
                    reference=reference,
                    state=ResultState.completed,
                    val_accuracy=accuracy,
                    params=params,
                    params_pct=pct,
                    epochs_run=1,
                    artifacts=artifacts if number == 2 else None,
                    finished_at=now,
                )
            )
        session.add(
            TrialResult(
                search_id=search.id,
                number=4,
                architecture=custom,
                arch_id="arch4",
                label="label-4",
                state=ResultState.pruned,
                val_accuracy=0.5,
                params=270_500,
                params_pct=0.29,
            )
        )
    return search.id


def _board_rows(text: str) -> list[list[str]]:
    """The table's body rows, as their cells."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_leaderboard_ranks_with_pareto_flags(server: str, finished_search: str) -> None:
    code, out, err = _cli("leaderboard", finished_search)
    assert code == 0, err
    rows = _board_rows(out)
    # rank, trial, architecture, val acc, 95% CI, seeds, test acc, Δ none, Δ SE, Δ CBAM,
    # params, params %, epochs, Pareto, answer
    assert [(r[0], r[1]) for r in rows] == [("1", "2"), ("2", "3"), ("3", "1"), ("4", "0")]
    assert [r[-2] for r in rows] == ["*", "*", "", "*"]
    assert [r[-1] for r in rows] == ["recommended", "", "", ""]  # unconfirmed: the best
    assert rows[0][2] == "label-2 (cbam)" and rows[1][2] == "label-3"
    assert rows[0][3] == "85.00" and rows[0][5] == "1" and rows[0][6] == "-"  # no test set
    assert rows[0][7:10] == ["+5.00", "+3.00", "+0.00"]
    assert rows[1][11] == "+0.29%"
    assert "4 ranked trials" in flat(out)

    code, out, _ = _cli("leaderboard", finished_search, "--limit", "2", "--offset", "1")
    assert code == 0
    rows = _board_rows(out)
    assert [r[1] for r in rows] == ["3", "1"]
    assert rows[1][7:10] == ["+2.00", "+0.00", "-3.00"]  # deltas use the whole search's refs

    code, out, _ = _cli("leaderboard", finished_search, "--pareto-only")
    assert [r[1] for r in _board_rows(out)] == ["2", "3", "0"]

    code, out, _ = _cli("leaderboard", finished_search, "--sort", "params")
    assert [(r[0], r[1]) for r in _board_rows(out)] == [
        ("4", "0"),
        ("2", "3"),
        ("3", "1"),
        ("1", "2"),
    ]


def test_download_best_and_by_number(server: str, finished_search: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from search.build import build_model
    from search.space import Architecture, reference_architectures

    out_dir = tmp_path / "best"
    code, out, err = _cli("download", finished_search, "--out", str(out_dir))
    assert code == 0, err
    assert "trial 2: label-2" in err
    names = ["weights.safetensors", "architecture.json", "metrics.json"]
    assert out.split() == [str(out_dir / name) for name in names]
    arch = Architecture.from_json((out_dir / "architecture.json").read_text())
    assert arch == reference_architectures("cifar_resnet20")["cbam"]
    model = build_model(arch, 10)
    model.load_state_dict(load_file(out_dir / "weights.safetensors"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["overhead"]["input_shape"] == [1, 3, 32, 32]
    assert not list(out_dir.glob(".*part"))

    # Within 1% params overhead the best is trial 3, which has no files: the server's 409.
    code, _, err = _cli("download", finished_search, "--out", str(tmp_path / "x"), "--max-pct", "1")
    assert code == 2
    assert "trial 3" in err and "(409)" in err
    code, _, err = _cli("download", finished_search, "--trial", "9", "--out", str(tmp_path / "y"))
    assert code == 2 and "trial 9 of search" in err and "not found" in err


def test_client_methods(server: str, finished_search: str, token: str, tmp_path: Path) -> None:
    with ApiClient(server, token) as client:
        page = client.trials(finished_search, sort="val_accuracy", order="desc", limit=2)
        assert page["total"] == 5 and [t["number"] for t in page["items"]] == [2, 3]
        assert client.trial(finished_search, 2)["files"] == [
            "architecture.json",
            "metrics.json",
            "weights.safetensors",
            "model.onnx",
        ]
        assert client.best(finished_search, max_pct=0.3)["number"] == 3
        board = client.leaderboard(finished_search, limit=1)
        assert board["total"] == 4 and board["entries"][0]["number"] == 2
        with pytest.raises(ApiError) as caught:
            client.download(finished_search, 3, "metrics.json", tmp_path / "m.json")
        assert caught.value.status == 409 and not (tmp_path / "m.json").exists()
        with pytest.raises(ApiError) as caught:
            client.delete(finished_search)  # queued: not finished yet
        assert caught.value.status == 409
        client.cancel(finished_search)
        client.delete(finished_search)
        with pytest.raises(ApiError) as caught:
            client.search(finished_search)
        assert caught.value.status == 404
        assert caught.value.message == f"search {finished_search} not found"


@pytest.mark.e2e
def test_download_with_onnx(server: str, finished_search: str, tmp_path: Path) -> None:
    import onnx

    out_dir = tmp_path / "onnx"
    code, out, err = _cli(
        "download", finished_search, "--trial", "2", "--out", str(out_dir), "--onnx"
    )
    assert code == 0, err
    assert out.split()[-1] == str(out_dir / "model.onnx")
    model = onnx.load(str(out_dir / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"]
