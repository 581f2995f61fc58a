"""The search page's analyses: scatter (thinned), knobs, ablation tables, curves, importance,
and their endpoints."""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution
from rich.console import Console
from scipy import stats as scipy_stats
from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from search.pareto import pareto_flags
from search.results import ablation, agreement, cache, curves, importance, knob_views, scatter
from search.settings import Settings
from search.space import Architecture, reference_architectures
from search.spec import SearchSpec
from search.store.engine import Database
from search.store.models import Phase, Reference, ResultState, Search, TrialResult, utcnow
from search.store.searches import create_search, search_study
from search.study import optuna_fast
from service.api.analysis_schemas import (
    AblationOut,
    CurveOut,
    ImportanceOut,
    KnobPathsOut,
    KnobsOut,
    ScatterOut,
)
from service.app import create_app
from service.auth import create_token
from service.cli.render import status_table

optuna.logging.set_verbosity(optuna.logging.WARNING)
BACKBONE = "cifar_resnet20"
REFS = reference_architectures(BACKBONE)


@pytest.fixture
def db(any_db: Database) -> Iterator[Database]:
    """SQLite and PostgreSQL in turn: the study is read from Optuna's tables directly."""
    cache.clear_all()
    yield any_db
    cache.clear_all()


def _search(db: Database, **overrides: Any) -> Search:
    data: dict[str, Any] = {
        "backbone": BACKBONE,
        "dataset": {"name": "synthetic"},
        "budget": {"trials": 100},
        "training": {"epochs": 3},
    }
    data.update(overrides)
    return create_search(db, SearchSpec.from_dict(data))


def _cbam(**knobs: Any) -> Architecture:
    return Architecture(BACKBONE, "cbam", **knobs)


def _row(
    search: Search,
    number: int,
    arch: Architecture,
    accuracy: float | None,
    pct: float | None = 1.0,
    *,
    reference: str | None = None,
    params: int | None = None,
    state: ResultState = ResultState.completed,
    curve: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "search_id": search.id,
        "number": number,
        "architecture": arch.to_dict(),
        "arch_id": arch.id,
        "label": arch.describe(),
        "reference": Reference(reference) if reference else None,
        "state": state,
        "val_accuracy": accuracy,
        "params": params if params is not None else (None if pct is None else 1000 + int(pct * 10)),
        "macs": 5000,
        "latency_ms": None,
        "params_pct": pct,
        "latency_pct": None,
        "learning_curve": curve or [],
        "finished_at": utcnow(),
    }


def _insert(db: Database, rows: Sequence[dict[str, Any]]) -> None:
    with db.session() as session:
        session.execute(insert(TrialResult), list(rows))


# -- ablation ---------------------------------------------------------------------------------

# number, architecture, reference, accuracy, params % over no attention
ABLATION_ROWS = [
    (0, REFS["none"], "none", 0.80, 0.0),
    (1, REFS["se"], "se", 0.82, 0.5),
    (2, REFS["cbam"], "cbam", 0.85, 1.2),  # c->s, avg+max, r16, k7, all
    (3, _cbam(kernel_size=3, pool_types=("avg",), reduction=8), None, 0.83, 1.0),
    (4, _cbam(stages=(1, 2)), None, 0.86, 0.8),
    (5, _cbam(arrangement="channel"), None, 0.84, 0.9),
    (6, _cbam(arrangement="spatial"), None, 0.81, 0.1),
    (7, _cbam(arrangement="parallel", pool_types=("max",), blocks="last"), None, 0.845, 0.4),
]


@pytest.fixture
def ablation_search(db: Database) -> Search:
    search = _search(db)
    rows = [_row(search, n, a, acc, pct, reference=r) for n, a, r, acc, pct in ABLATION_ROWS]
    rows.append(_row(search, 8, REFS["cbam"], None, state=ResultState.failed))
    rows.append(_row(search, 9, _cbam(kernel_size=3), 0.99, state=ResultState.pruned))
    _insert(db, rows)
    return search


def _expected(accuracies: list[float], pcts: list[float]) -> dict[str, Any]:
    def std(values: list[float]) -> float | None:
        return statistics.stdev(values) if len(values) > 1 else None

    def ci(values: list[float]) -> Any:
        if len(values) < 2:
            return None
        half = scipy_stats.t.ppf(0.975, len(values) - 1) * std(values) / len(values) ** 0.5
        mean = statistics.mean(values)
        return pytest.approx([mean - half, mean + half])

    return {
        "n": len(accuracies),
        "accuracy_mean": pytest.approx(statistics.mean(accuracies)),
        "accuracy_std": None if len(accuracies) < 2 else pytest.approx(std(accuracies)),
        "accuracy_ci95": ci(accuracies),
        "accuracy_max": max(accuracies),
        "overhead_pct_mean": pytest.approx(statistics.mean(pcts)),
        "overhead_pct_std": None if len(pcts) < 2 else pytest.approx(std(pcts)),
    }


def test_ablation_tables_match_a_hand_computation(db: Database, ablation_search: Search) -> None:
    answer = ablation.ablation(db, ablation_search.id)
    assert answer["trials"] == 8 and answer["cbam_trials"] == 6
    tables = {t["knob"]: t for t in answer["tables"]}
    assert list(tables) == [
        "arrangement",
        "pool_types",
        "kernel_size",
        "spatial_pool",
        "reduction",
        "placement",
    ]

    def rows(knob: str) -> list[tuple[Any, dict[str, Any]]]:
        return [
            (r["value"], {k: v for k, v in r.items() if k != "value"}) for r in tables[knob]["rows"]
        ]

    assert rows("arrangement") == [
        ("channel-spatial", _expected([0.85, 0.83, 0.86], [1.2, 1.0, 0.8])),
        ("parallel", _expected([0.845], [0.4])),
        ("channel", _expected([0.84], [0.9])),
        ("spatial", _expected([0.81], [0.1])),
    ]
    # Channel pooling: the spatial-only trial has none; single pools before pairs.
    assert rows("pool_types") == [
        ("avg", _expected([0.83], [1.0])),
        ("max", _expected([0.845], [0.4])),
        ("avg+max", _expected([0.85, 0.86, 0.84], [1.2, 0.8, 0.9])),
    ]
    assert tables["pool_types"]["left_out"] == 3  # none, SE, spatial-only
    # Kernel size: the channel-only trial has none.
    assert rows("kernel_size") == [
        (3, _expected([0.83], [1.0])),
        (7, _expected([0.85, 0.86, 0.81, 0.845], [1.2, 0.8, 0.1, 0.4])),
    ]
    assert tables["kernel_size"]["trials"] == 5 and tables["kernel_size"]["left_out"] == 3
    assert rows("reduction") == [
        (8, _expected([0.83], [1.0])),
        (16, _expected([0.85, 0.86, 0.84, 0.845], [1.2, 0.8, 0.9, 0.4])),
    ]
    assert [v for v, _ in rows("spatial_pool")] == ["maxmean"]
    # Placement: fewer stages first, then every block before the last only.
    assert rows("placement") == [
        ("s1+2", _expected([0.86], [0.8])),
        ("all", _expected([0.85, 0.83, 0.84, 0.81], [1.2, 1.0, 0.9, 0.1])),
        ("all/last", _expected([0.845], [0.4])),
    ]
    assert answer["baselines"] == [
        {"value": "none", **_expected([0.80], [0.0])},
        {"value": "se", **_expected([0.82], [0.5])},
        {"value": "cbam", **_expected([0.85], [1.2])},
    ]
    # Without the overhead figure: accuracies only.
    latency = ablation.ablation(db, ablation_search.id, overhead="latency")
    first = latency["tables"][0]["rows"][0]
    assert first["n"] == 3 and first["overhead_pct_mean"] is None
    assert first["overhead_pct_std"] is None


def test_ablation_is_cached_until_a_trial_completes(db: Database, ablation_search: Search) -> None:
    first = ablation.ablation(db, ablation_search.id)
    assert ablation.ablation(db, ablation_search.id) is first
    _insert(db, [_row(ablation_search, 20, _cbam(kernel_size=5), 0.9, 2.0)])
    second = ablation.ablation(db, ablation_search.id)
    assert second is not first and second["trials"] == 9
    kernels = {r["value"]: r["n"] for r in second["tables"][2]["rows"]}
    assert kernels == {3: 1, 5: 1, 7: 4}


def test_unknown_search_and_bad_arguments(db: Database) -> None:
    from search.errors import InvalidValue, NotFound

    with pytest.raises(NotFound):
        scatter.scatter(db, "nope")
    search = _search(db)
    with pytest.raises(InvalidValue):
        scatter.scatter(db, search.id, overhead="flops")
    with pytest.raises(InvalidValue):
        curves.learning_curves(db, search.id, top=0)
    empty = scatter.scatter(db, search.id)
    assert empty["total"] == 0 and empty["points"] == []
    assert ablation.ablation(db, search.id)["tables"][0]["rows"] == []
    assert knob_views.knobs(db, search.id)["rows"] == []


# -- scatter ----------------------------------------------------------------------------------


def test_scatter_is_exact_when_small(db: Database, ablation_search: Search) -> None:
    _insert(db, [_row(ablation_search, 30, _cbam(kernel_size=5), 0.9, None)])  # no params
    answer = scatter.scatter(db, ablation_search.id)
    assert answer["total"] == answer["shown"] == 8 and not answer["downsampled"]
    assert answer["missing"] == 1
    points = {p["number"]: p for p in answer["points"]}
    assert set(points) == set(range(8))
    # Pareto of accuracy against params (params = 1000 + 10 x pct): 0 (0.80 at 0.0),
    # 6 (0.81 at 0.1), 7 (0.845 at 0.4), 4 (0.86 at 0.8).
    assert {n for n, p in points.items() if p["pareto"]} == {0, 6, 7, 4}
    assert answer["pareto"] == 4
    assert points[1]["reference"] == "se" and points[3]["reference"] is None
    assert points[3]["label"] == ABLATION_ROWS[3][1].describe()
    assert points[4]["overhead"] == 1008 and points[4]["overhead_pct"] == 0.8
    overheads = [p["overhead"] for p in answer["points"]]
    assert overheads == sorted(overheads)


def _many(db: Database, n: int, seed: int = 0) -> Search:
    search = _search(db)
    rng = random.Random(seed)
    arch = _cbam()
    rows = [
        _row(search, 0, REFS["none"], 0.5, 0.0, reference="none"),
        _row(search, 1, REFS["se"], 0.3, 9.0, reference="se"),  # deep inside the cloud
        _row(search, 2, REFS["cbam"], 0.35, 8.0, reference="cbam"),
    ]
    for number in range(3, n):
        pct = rng.uniform(0.0, 10.0)
        rows.append(_row(search, number, arch, min(1.0, rng.uniform(0.2, 0.6) + pct / 40), pct))
    _insert(db, rows)
    return search


def test_scatter_thins_keeping_pareto_and_references(db: Database) -> None:
    search = _many(db, 3000)
    full = scatter.scatter(db, search.id, max_points=5000)
    assert full["shown"] == full["total"] == 3000 and not full["downsampled"]
    front = {p["number"] for p in full["points"] if p["pareto"]}
    thinned = scatter.scatter(db, search.id, max_points=200)
    shown = {p["number"] for p in thinned["points"]}
    assert thinned["total"] == 3000 and thinned["downsampled"]
    assert 100 < thinned["shown"] == len(shown) <= 200
    assert front <= shown and {0, 1, 2} <= shown
    assert {p["number"] for p in thinned["points"] if p["pareto"]} == front
    # Deterministic, and independent of the cache.
    cache.clear_all()
    assert scatter.scatter(db, search.id, max_points=200) == thinned


def test_thin_keeps_the_best_of_each_cell() -> None:
    rng = random.Random(1)
    accuracy = [rng.random() for _ in range(1000)]
    overhead = [rng.random() for _ in range(1000)]
    numbers = list(range(1000))
    flags = pareto_flags(
        [{"val_accuracy": a, "params": o} for a, o in zip(accuracy, overhead, strict=True)],
        ["params"],
    )
    kept = scatter.thin(accuracy, overhead, numbers, flags, 100)
    assert kept == sorted(kept) and len(kept) <= 100
    assert {i for i, f in enumerate(flags) if f} <= set(kept)
    # The best point overall survives; so do all points when they fit.
    assert max(range(1000), key=lambda i: accuracy[i]) in kept
    assert scatter.thin(accuracy[:50], overhead[:50], numbers[:50], flags[:50], 100) == list(
        range(50)
    )
    # More forced points than allowed: all of them, nothing else.
    forced = [i % 2 == 0 for i in range(1000)]
    kept = scatter.thin(accuracy, overhead, numbers, forced, 100)
    assert {i for i in range(0, 1000, 2)} <= set(kept) and len(kept) <= 501


# -- knobs ------------------------------------------------------------------------------------

SMALL_SPACE = {
    "arrangements": ["channel-spatial", "channel"],
    "reductions": [8, 16],
    "pool_types": [["avg"], ["avg", "max"]],
    "mlp_bias": [True],
    "kernel_sizes": [3, 7],
    "spatial_pools": ["maxmean"],
    "spatial_bn": [True],
    "stages": [[1, 2, 3], [3]],
    "blocks": ["all", "last"],
}


def test_knobs_columns_and_rows(db: Database) -> None:
    search = _search(db, space=SMALL_SPACE)
    rows = [
        _row(search, 0, REFS["none"], 0.80, 0.0, reference="none"),
        _row(search, 1, REFS["se"], 0.82, 0.5, reference="se"),
        _row(search, 2, _cbam(kernel_size=3, reduction=8, stages=(3,), blocks="last"), 0.83),
        _row(search, 3, _cbam(arrangement="channel", pool_types=("avg",)), 0.84, 0.7),
        _row(search, 4, _cbam(), 0.70, state=ResultState.failed),
    ]
    _insert(db, rows)
    answer = knob_views.knobs(db, search.id)
    columns = {c["name"]: c for c in answer["columns"]}
    assert list(columns) == [
        "arrangement",
        "reduction",
        "pool_types",
        "kernel_size",
        "stages",
        "blocks",
        "val_accuracy",
        "overhead_pct",
    ]
    assert columns["arrangement"] == {
        "name": "arrangement",
        "kind": "categorical",
        "role": "knob",
        "values": ["channel-spatial", "channel"],
    }
    assert columns["pool_types"]["values"] == ["avg", "avg+max"]
    assert columns["stages"]["values"] == ["1+2+3", "3"]
    assert columns["reduction"]["kind"] == "numeric" and columns["reduction"]["log"]
    assert columns["reduction"]["range"] == [8, 16]
    assert columns["kernel_size"]["values"] == [3, 7]
    assert columns["val_accuracy"]["role"] == "objective"
    assert columns["val_accuracy"]["range"] == [0.80, 0.84]
    assert answer["total"] == answer["shown"] == 4
    by_number = {r["number"]: r for r in answer["rows"]}
    assert by_number[0]["reference"] == "none"
    assert all(by_number[0][k] is None for k in list(columns)[:6])
    assert by_number[1] == {
        "number": 1,
        "reference": "se",
        "label": REFS["se"].describe(),
        "val_accuracy": 0.82,
        "overhead_pct": 0.5,
        "arrangement": None,
        "reduction": 16,
        "pool_types": None,
        "kernel_size": None,
        "stages": "1+2+3",
        "blocks": "all",
    }
    assert by_number[2] == {
        "number": 2,
        "reference": None,
        "label": rows[2]["label"],
        "val_accuracy": 0.83,
        "overhead_pct": 1.0,
        "arrangement": "channel-spatial",
        "reduction": 8,
        "pool_types": "avg+max",
        "kernel_size": 3,
        "stages": "3",
        "blocks": "last",
    }
    assert by_number[3]["kernel_size"] is None and by_number[3]["pool_types"] == "avg"


def test_knobs_thin_like_the_scatter(db: Database) -> None:
    search = _many(db, 1500)
    answer = knob_views.knobs(db, search.id, max_points=100)
    points = scatter.scatter(db, search.id, max_points=100)
    assert answer["total"] == 1500 and answer["downsampled"]
    assert {r["number"] for r in answer["rows"]} == {p["number"] for p in points["points"]}


def test_knob_paths_group_trials_by_knob_values_and_accuracy_band(
    db: Database, ablation_search: Search
) -> None:
    answer = knob_views.knob_paths(db, ablation_search.id)
    assert answer["total"] == answer["sampled"] == 8  # completed rows only
    # 8 trials ranked by accuracy: bands end at ranks ceil(0.8), ceil(2), ceil(4), 8.
    bands = answer["bands"]
    assert [b["name"] for b in bands] == [name for _, name in knob_views.ACCURACY_BANDS]
    assert [b["count"] for b in bands] == [1, 1, 2, 4]
    assert (bands[0]["min"], bands[0]["max"]) == (0.86, 0.86)
    assert (bands[2]["min"], bands[2]["max"]) == (0.84, 0.845)
    assert sum(p["count"] for p in answer["paths"]) == 8
    columns = {c["name"]: c for c in answer["columns"]}
    by_band = {}
    for path in answer["paths"]:
        by_band.setdefault(path["band"], []).append(path)
    (best,) = by_band[0]  # trial 4: the paper's CBAM in stages 1 and 2
    values = dict(zip(columns, best["values"], strict=True))
    assert values["arrangement"] == "channel-spatial" and values["stages"] == "1+2"
    assert best["mean_accuracy"] == 0.86
    # The no-attention reference has no knob at all: n/a everywhere, listed last.
    (none,) = [p for p in answer["paths"] if p["band"] == 3 and p["mean_accuracy"] == 0.80]
    assert set(none["values"]) == {knob_views.NOT_APPLICABLE}
    assert all(c["values"][-1] == knob_views.NOT_APPLICABLE for c in columns.values())
    assert columns["arrangement"]["values"][:2] == ["channel-spatial", "spatial-channel"]


def test_knob_paths_sample_large_searches_but_band_every_trial(db: Database) -> None:
    search = _many(db, 1500)
    answer = knob_views.knob_paths(db, search.id, max_trials=300)
    assert answer["total"] == 1500 and answer["sampled"] == 300
    assert sum(p["count"] for p in answer["paths"]) == 300
    assert [b["count"] for b in answer["bands"]] == [150, 225, 375, 750]
    # A uniform sample: each band keeps about its share.
    share = sum(p["count"] for p in answer["paths"] if p["band"] == 3) / 300
    assert 0.4 < share < 0.6
    cache.clear_all()
    assert knob_views.knob_paths(db, search.id, max_trials=300) == answer


# -- learning curves --------------------------------------------------------------------------


def _curve(accuracies: list[float]) -> list[dict[str, Any]]:
    return [
        {"epoch": i + 1, "val_accuracy": a, "train_loss": 1.0 - a, "val_loss": 1.1 - a}
        for i, a in enumerate(accuracies)
    ]


def test_learning_curves_of_the_best_trials(db: Database) -> None:
    search = _search(db)
    arch = _cbam()
    _insert(
        db,
        [
            _row(search, 0, arch, 0.80, params=100, curve=_curve([0.7, 0.8])),
            _row(search, 1, arch, 0.90, params=120, curve=_curve([0.85, 0.9])),
            _row(search, 2, arch, 0.90, params=110, curve=[{"epoch": 1, "val_accuracy": 0.9}]),
            _row(search, 3, arch, 0.95, params=100, state=ResultState.pruned),
            _row(search, 4, arch, 0.85, params=90, curve=_curve([0.85])),
        ],
    )
    best = curves.learning_curves(db, search.id, top=3)
    # Accuracy first, then fewer parameters; pruned trials are not ranked.
    assert [c["number"] for c in best] == [2, 1, 4]
    assert best[1]["curve"] == {
        "epoch": [1, 2],
        "val_accuracy": [0.85, 0.9],
        "train_loss": [pytest.approx(0.15), pytest.approx(0.1)],
        "val_loss": [pytest.approx(0.25), pytest.approx(0.2)],
        "train_accuracy": [None, None],
    }
    assert best[0]["curve"]["train_loss"] == [None]
    assert best[0]["label"] == arch.describe() and best[0]["val_accuracy"] == 0.9
    assert len(curves.learning_curves(db, search.id, top=10)) == 4


def test_rung_agreement_ranks_each_rung_against_the_end(db: Database, settings: Settings) -> None:
    """Rungs at epochs 1 and 3 of 9: epoch 1 still ranks noise, epoch 3 ranks as the end does.
    Pruned trials (no final accuracy) and the confirmation's runs take no part."""
    search = _search(db, training={"epochs": 9})
    rng = random.Random(4)
    finals = [0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90]
    first = [0.10 + 0.05 * rng.random() for _ in finals]
    rows = [
        _row(
            search,
            n,
            _cbam(reduction=2**n),
            final,
            curve=_curve([e1, final - 0.1, final - 0.05] + [final] * 6),
        )
        for n, (e1, final) in enumerate(zip(first, finals, strict=True))
    ]
    rows.append(
        _row(search, 7, _cbam(kernel_size=3), None, state=ResultState.pruned, curve=_curve([0.99]))
    )
    confirmation = _row(search, 8, _cbam(), 0.1, curve=_curve([0.99, 0.0, 0.0] + [0.1] * 6))
    rows.append({**confirmation, "phase": Phase.confirm, "seed": 1})
    _insert(db, rows)
    at_1, at_3 = agreement.rung_agreement(db, search.id)
    expected = scipy_stats.spearmanr(first, finals).statistic
    assert at_1["epoch"] == 1 and at_1["n"] == 7
    assert at_1["rho"] == pytest.approx(expected)
    low, high = at_1["ci95"]
    assert low < expected < high
    assert at_3 == {"epoch": 3, "rho": pytest.approx(1.0), "ci95": None, "n": 7}

    client = TestClient(create_app(settings, db=db))
    client.headers["Authorization"] = f"Bearer {create_token(db, 't')}"
    answer = client.get(f"/api/v1/searches/{search.id}").json()
    assert [r["epoch"] for r in answer["rung_agreement"]] == [1, 3]
    console = Console(width=250, record=True)
    console.print(status_table(answer))
    text = console.export_text()
    assert "epoch 1: Spearman" in text and "epoch 3: Spearman +1.00 over 7" in text
    no_rungs = _search(db, training={"epochs": 1})
    assert agreement.rung_agreement(db, no_rungs.id) == []
    not_started = _search(db, training={"epochs": 9})
    assert agreement.rung_agreement(db, not_started.id) is None


# -- importance -------------------------------------------------------------------------------


class _Sampled:
    """Answers ``SearchSpace.sample`` at random and records what Optuna would store."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, CategoricalDistribution] = {}

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        value = self.rng.choice(list(choices))
        self.params[name] = value
        self.distributions[name] = CategoricalDistribution(list(choices))
        return value


def _fill_study(
    db: Database, search: Search, n: int, accuracy: Any, seed: int = 0
) -> list[optuna.trial.FrozenTrial]:
    """``n`` completed study trials sampled from the search's space (plus completed no-attention
    and SE references without parameters), with a trial-result row each."""
    spec = SearchSpec.from_dict(search.spec)
    rng = random.Random(seed)
    study = search_study(db, search, spec)
    trials, rows = [], []
    for name in ("none", "se"):
        trials.append(
            optuna.trial.create_trial(
                params={}, distributions={}, values=[0.99, 0.0], user_attrs={"reference": name}
            )
        )
        rows.append(_row(search, len(rows), REFS[name], 0.99, 0.0, reference=name))
    for _ in range(n):
        sampled = _Sampled(rng)
        arch = spec.space.sample(sampled, spec.backbone)  # type: ignore[arg-type]
        acc = accuracy(arch, rng)
        trials.append(
            optuna.trial.create_trial(
                params=sampled.params, distributions=sampled.distributions, values=[acc, 1.0]
            )
        )
        rows.append(_row(search, len(rows), arch, acc))
    study.add_trials(trials)
    _insert(db, rows)
    return trials


IMPORTANCE_SPACE = {**SMALL_SPACE, "arrangements": ["channel-spatial"]}


def test_importance_finds_the_knob_that_matters(db: Database) -> None:
    search = _search(db, space=IMPORTANCE_SPACE)

    def accuracy(arch: Architecture, rng: random.Random) -> float:
        return (0.9 if arch.kernel_size == 7 else 0.7) + rng.uniform(-0.01, 0.01)

    _fill_study(db, search, 80, accuracy)
    answer = importance.importance(db, search.id)
    assert answer["evaluator"] == "PedAnovaImportanceEvaluator" and answer["reason"] is None
    assert answer["trials"] == 80  # the references have no knob values
    importances = answer["importances"]
    assert set(importances) == {"reduction", "pool_types", "kernel_size", "stages", "blocks"}
    assert sum(importances.values()) == pytest.approx(1.0)
    assert next(iter(importances)) == "kernel_size" and importances["kernel_size"] > 0.5
    # The bootstrap spread of each: kernel_size's low end is above every other knob's.
    spread = answer["spread"]
    assert set(spread) == set(importances)
    assert all(low <= high for low, high in spread.values())
    assert spread["kernel_size"][0] > 0.3
    assert spread["kernel_size"][0] == max(low for low, _ in spread.values())
    # Once per change: the same answer until another trial completes.
    assert importance.importance(db, search.id) is answer
    _insert(db, [_row(search, 500, _cbam(), 0.8)])
    assert importance.importance(db, search.id) is not answer


def test_importance_reads_the_study_like_optunas_storage(db: Database) -> None:
    search = _search(db)  # the whole default space: conditional knobs
    trials = _fill_study(db, search, 30, lambda arch, rng: rng.random())
    direct = optuna_fast._read_completed_trials(db.session, search.study_name, ())
    through_optuna = optuna_fast._load_completed_trials(db.optuna_storage(), search.study_name, ())
    assert direct[0] == through_optuna[0] and len(direct[0]) >= 30

    def essence(ts: list[optuna_fast.CompletedTrial]) -> list[Any]:
        return sorted((t.number, t.params, t.distributions, t.value) for t in ts)

    assert essence(direct[1]) == essence(through_optuna[1])
    with_knobs = importance.study_trials(db, search)
    assert [t.value for t in with_knobs] == [-t.values[0] for t in trials if t.params]
    # Read again: only the new trials are fetched; the result is the same.
    numbers, fresh = optuna_fast._read_completed_trials(db.session, search.study_name, direct[0])
    assert numbers == direct[0] and fresh == []
    assert importance.study_trials(db, search) == with_knobs
    assert importance.importance(db, search.id)["trials"] == 30


def test_importance_falls_back_to_optunas_storage(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    search = _search(db, space=IMPORTANCE_SPACE)
    _fill_study(db, search, 10, lambda arch, rng: rng.random())

    def changed_schema(*_args: Any) -> None:
        raise SQLAlchemyError("no such column: trial_params.param_value")

    monkeypatch.setattr(optuna_fast, "_read_completed_trials", changed_schema)
    answer = importance.importance(db, search.id)
    assert answer["trials"] == 10 and answer["importances"]


def test_importance_needs_trials_and_varying_knobs(db: Database) -> None:
    few = _search(db)
    _fill_study(db, few, 2, lambda arch, rng: 0.5)
    answer = importance.importance(db, few.id)
    assert answer["importances"] == {} and answer["trials"] == 2
    assert "at least 8" in answer["reason"]

    fixed_space = {
        "arrangements": ["channel"],
        "reductions": [16],
        "pool_types": [["avg"]],
        "mlp_bias": [True],
        "stages": [[1, 2, 3]],
        "blocks": ["all"],
    }
    fixed = _search(db, space=fixed_space)
    spec = SearchSpec.from_dict(fixed.spec)
    study = search_study(db, fixed, spec)
    # Every knob is fixed, so trials carry no parameters: no trial has knob values.
    study.add_trials([optuna.trial.create_trial(params={}, distributions={}, values=[0.5, 1.0])])
    answer = importance.importance(db, fixed.id)
    assert answer["importances"] == {} and answer["trials"] == 0

    same = _search(db, space={**fixed_space, "reductions": [8, 16]})
    distribution = CategoricalDistribution([8, 16])
    search_study(db, same).add_trials(
        [
            optuna.trial.create_trial(
                params={"reduction": 8}, distributions={"reduction": distribution}, values=[a, 1.0]
            )
            for a in (0.5, 0.6, 0.7)
        ]
    )
    answer = importance.importance(db, same.id)
    assert answer["importances"] == {} and answer["trials"] == 3
    assert answer["reason"].startswith("1 distinct architecture(s)")


# -- endpoints --------------------------------------------------------------------------------


def test_endpoints(db: Database, settings: Settings, ablation_search: Search) -> None:
    client = TestClient(create_app(settings, db=db))
    base = f"/api/v1/searches/{ablation_search.id}"
    assert client.get(f"{base}/scatter").status_code == 401
    client.headers["Authorization"] = f"Bearer {create_token(db, 't')}"

    scattered = client.get(f"{base}/scatter", params={"overhead": "params", "max_points": 10})
    assert scattered.status_code == 200, scattered.text
    body = scattered.json()
    assert body["total"] == 8 and body["shown"] <= 10 and body["overhead"] == "params"
    assert set(body["points"][0]) == {
        "number",
        "val_accuracy",
        "overhead",
        "overhead_pct",
        "pareto",
        "reference",
        "label",
    }
    knobs = client.get(f"{base}/knobs").json()
    assert knobs["columns"][0]["name"] == "arrangement" and len(knobs["rows"]) == 8
    tables = client.get(f"{base}/ablation", params={"overhead": "params"}).json()
    assert tables["tables"][0]["knob"] == "arrangement"
    assert tables == ablation.ablation(db, ablation_search.id)
    curves = client.get(f"{base}/curves", params={"top": 2}).json()
    assert [c["number"] for c in curves] == [4, 2]
    importance = client.get(f"{base}/importance").json()
    assert importance["importances"] == {} and importance["reason"]

    paths = client.get(f"{base}/knob-paths").json()
    assert paths == knob_views.knob_paths(db, ablation_search.id)
    # Each answer is what the OpenAPI document says it is.
    for model, answer in (
        (ScatterOut, body),
        (KnobsOut, knobs),
        (AblationOut, tables),
        (ImportanceOut, importance),
        (KnobPathsOut, paths),
    ):
        model.model_validate(answer)
    for curve in curves:
        CurveOut.model_validate(curve)

    # Answers carry an ETag: unchanged, the server says so; a new completed trial changes it.
    tag = scattered.headers["ETag"]
    again = client.get(
        f"{base}/scatter",
        params={"overhead": "params", "max_points": 10},
        headers={"If-None-Match": tag},
    )
    assert again.status_code == 304 and again.headers["ETag"] == tag and not again.content
    _insert(db, [_row(ablation_search, 10, _cbam(reduction=4), 0.9)])
    changed = client.get(
        f"{base}/scatter",
        params={"overhead": "params", "max_points": 10},
        headers={"If-None-Match": tag},
    )
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    assert changed.json()["total"] == 9

    assert client.get(f"{base}/scatter", params={"overhead": "flops"}).status_code == 422
    assert client.get(f"{base}/scatter", params={"max_points": 1}).status_code == 422
    assert client.get(f"{base}/curves", params={"top": 0}).status_code == 422
    missing = "/api/v1/searches/0123456789abcdef0123456789abcdef"
    assert client.get(f"{base}/knob-paths", params={"max_trials": 1}).status_code == 422
    for path in ("scatter", "knobs", "knob-paths", "ablation", "curves", "importance"):
        assert client.get(f"{missing}/{path}").status_code == 404, path
