"""Leaderboards from trial-result rows: ranking, the Pareto flags, deltas to the references.

Pure functions over rows (``TrialResult`` objects or their ``to_dict()`` mappings): the command
line and the REST API rank the same way. Accuracies are fractions; deltas to the references are
in percentage points. Within one search every trial shares a backbone, so the absolute overheads
(``params``, ``macs``, ``latency_ms``) order trials exactly as their percentages over the
no-attention baseline do; the Pareto front uses the absolute figures.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from search.pareto import ACCURACY, OVERHEAD_COLUMNS, pareto_flags
from search.space import REFERENCE_NAMES
from search.stats import (
    ACCURACY_RANGE,
    ALPHA,
    Difference,
    holm,
    mean_interval,
    paired_difference,
    sequential_p,
    verdict,
    wilson_interval,
    worse_than_another,
)

RANKED_STATES = ("completed",)

Entry = dict[str, Any]


def as_entry(row: Any) -> Entry:
    """A row as a plain dict (a copy)."""
    if isinstance(row, Mapping):
        return dict(row)
    return row.to_dict()


def _state(entry: Mapping[str, Any]) -> str:
    state = entry.get("state")
    return getattr(state, "value", state)


def reference_entries(entries: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Reference name -> its completed entry with the best validation accuracy."""
    out: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        name = entry.get("reference")
        name = getattr(name, "value", name)
        accuracy = entry.get(ACCURACY)
        if name is None or accuracy is None or _state(entry) not in RANKED_STATES:
            continue
        if name not in out or accuracy > out[name][ACCURACY]:
            out[name] = entry
    return out


def deltas(
    entry: Mapping[str, Any],
    references: Mapping[str, Mapping[str, Any] | float],
    overheads: Sequence[str] = ("params",),
) -> dict[str, float | None]:
    """Against each reference: ``delta_vs_<reference>``, accuracy minus the reference's in
    percentage points, and ``<overhead>_delta_vs_<reference>``, the overhead's change over the
    reference's in percent (as the paper's tables put them). ``references`` maps a name to its
    entry, or to its accuracy alone (then no overhead deltas)."""
    out: dict[str, float | None] = {}
    accuracy = entry.get(ACCURACY)
    for name in REFERENCE_NAMES:
        reference = references.get(name)
        ref_entry = reference if isinstance(reference, Mapping) else None
        ref_accuracy = ref_entry.get(ACCURACY) if ref_entry is not None else reference
        out[f"delta_vs_{name}"] = (
            None if accuracy is None or ref_accuracy is None else 100.0 * (accuracy - ref_accuracy)
        )
        for overhead in overheads:
            column = OVERHEAD_COLUMNS[overhead][0]
            value = entry.get(column)
            base = ref_entry.get(column) if ref_entry is not None else None
            out[f"{overhead}_delta_vs_{name}"] = (
                None if value is None or not base else 100.0 * (value - base) / base
            )
    return out


def rank_key(entry: Mapping[str, Any]) -> tuple[float, float, int]:
    """Best first: higher accuracy, then fewer parameters, then the lower trial number."""
    params = entry.get("params")
    return (-entry[ACCURACY], float("inf") if params is None else params, entry.get("number") or 0)


def leaderboard(
    rows: Iterable[Any],
    overheads: Sequence[str] = ("params",),
    states: Sequence[str] = RANKED_STATES,
) -> list[Entry]:
    """The rows in ``states``, best first (:func:`rank_key`).

    Each entry gains ``rank`` (from 1), ``pareto`` (on the front of accuracy against
    ``overheads``, among the ranked entries) and the deltas of :func:`deltas`.
    """
    all_entries = [as_entry(row) for row in rows]
    references = reference_entries(all_entries)
    entries = [e for e in all_entries if _state(e) in states and e.get(ACCURACY) is not None]
    entries.sort(key=rank_key)
    for rank, (entry, pareto) in enumerate(
        zip(entries, pareto_flags(entries, overheads), strict=True), start=1
    ):
        entry.update(rank=rank, pareto=pareto, **deltas(entry, references, overheads))
    return entries


# -- statistics over seeds -------------------------------------------------------------------


@dataclass
class Board:
    """A leaderboard's entries with their statistics, best first, and the answer they give.

    ``confirmed``: built from the confirmation's runs (one entry per architecture over its
    seeds, each with ``front``: not significantly dominated); else from the exploration's (one
    entry per trial, one seed each, untested, ``front`` None).
    ``top_group``: the architecture ids not significantly worse than another (every pair);
    ``recommended``: the cheapest of them by the board's overhead (ties: the more accurate)."""

    entries: list[Entry]
    references: dict[str, Entry]
    top_group: list[str]
    recommended: str | None
    confirmed: bool


def _stat_fields(
    entry: Entry, values: Sequence[float], val_images: int | None, tests: Sequence[float] = ()
) -> None:
    """n, mean and its interval: Student's t over seeds, or one run's Wilson interval; and the
    held-out test accuracy's mean over the seeds that have one, with its t interval."""
    interval = mean_interval(values, within=ACCURACY_RANGE)
    bounds = interval.bounds
    if interval.n == 1 and val_images:
        bounds = wilson_interval(values[0], val_images).bounds
    entry.update(n_seeds=interval.n, val_accuracy_mean=interval.estimate, val_accuracy_ci95=bounds)
    test = mean_interval(tests, within=ACCURACY_RANGE)
    entry.update(
        test_accuracy_mean=test.estimate if tests else None, test_accuracy_ci95=test.bounds
    )


def _untested(entry: Entry) -> None:
    for name in REFERENCE_NAMES:
        entry[f"delta_vs_{name}_ci95"] = None
        entry[f"verdict_vs_{name}"] = "untested"


def exploration_board(entries: list[Entry], overhead: str) -> Board:
    """The exploration's ranked entries (rows, best first) with one-seed statistics; the best
    is the answer until a confirmation says more. Each reference is its best entry."""
    for entry in entries:
        test = entry.get("test_accuracy")
        _stat_fields(entry, [entry[ACCURACY]], entry.get("val_images"), _present([test]))
        _untested(entry)
        entry["front"] = None
    best = entries[0]["arch_id"] if entries else None
    references = {name: dict(entry) for name, entry in reference_entries(entries).items()}
    return Board(entries, references, [best] if best else [], best, confirmed=False)


def confirmed_board(
    rows: Sequence[Entry],
    overhead: str,
    alpha: float = ALPHA,
    looks: tuple[int, int] | None = None,
) -> Board:
    """One entry per architecture of the confirmation's completed runs (``rows``, with
    ``arch_id``, ``seed``, ``reference``, ``val_accuracy`` and the overheads), aggregated over
    its seeds; each compared with each reference on their shared seeds (paired t, in points),
    every comparison of the board Holm-corrected together. ``looks``: the race's first and last
    look (``confirm.looks``): the seeds each arm ended with were chosen by tests after every
    round, so each p-value is first corrected for them (``stats.sequential_p``); None: a fixed
    number of seeds, no correction."""
    scores: dict[str, dict[int, float]] = {}
    tests: dict[str, dict[int, float | None]] = {}
    best_row: dict[str, Entry] = {}
    for row in rows:
        arch = row["arch_id"]
        scores.setdefault(arch, {}).setdefault(row["seed"], row[ACCURACY])
        tests.setdefault(arch, {}).setdefault(row["seed"], row.get("test_accuracy"))
        if arch not in best_row or row[ACCURACY] > best_row[arch][ACCURACY]:
            best_row[arch] = row
    entries = []
    for arch, by_seed in scores.items():
        entry = dict(best_row[arch])
        test = _present(tests[arch].values())
        _stat_fields(entry, list(by_seed.values()), entry.get("val_images"), test)
        entries.append(entry)
    references = {
        name: e for e in entries if (name := _reference(e)) is not None and name in REFERENCE_NAMES
    }
    pairs: list[tuple[Entry, str, Difference]] = []
    for entry in entries:
        for name in REFERENCE_NAMES:
            ref = references.get(name)
            if ref is None or ref is entry:
                entry[f"delta_vs_{name}"] = 0.0 if ref is entry else None
                entry[f"delta_vs_{name}_ci95"] = None
                entry[f"verdict_vs_{name}"] = "untested"
                continue
            pairs.append((entry, name, _paired(scores[entry["arch_id"]], scores[ref["arch_id"]])))
    adjusted = holm([_sequential(d, looks) for _, _, d in pairs])
    for (entry, name, diff), p in zip(pairs, adjusted, strict=True):
        entry[f"delta_vs_{name}"] = 100 * diff.estimate
        bounds = diff.bounds
        entry[f"delta_vs_{name}_ci95"] = None if bounds is None else [100 * b for b in bounds]
        entry[f"verdict_vs_{name}"] = verdict(diff, p, alpha)
    column = OVERHEAD_COLUMNS[overhead][0]
    entries.sort(key=lambda e: (-e["val_accuracy_mean"], _cost(e, column), e["arch_id"]))
    flags = pareto_flags([{**e, ACCURACY: e["val_accuracy_mean"]} for e in entries], [overhead])
    for rank, (entry, pareto) in enumerate(zip(entries, flags, strict=True), start=1):
        entry.update(rank=rank, pareto=pareto)
    _significant_front(entries, scores, column, alpha, looks)
    top = _top_group(entries, scores, alpha, looks)
    recommended = min(top, key=lambda e: (_cost(e, column), -e["val_accuracy_mean"]))
    return Board(entries, references, [e["arch_id"] for e in top], recommended["arch_id"], True)


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _reference(entry: Mapping[str, Any]) -> str | None:
    name = entry.get("reference")
    return getattr(name, "value", name)


def _cost(entry: Mapping[str, Any], column: str) -> float:
    value = entry.get(column)
    return float("inf") if value is None else float(value)


def _sequential(diff: Difference, looks: tuple[int, int] | None) -> float | None:
    return diff.p_value if looks is None else sequential_p(diff.p_value, diff.n, *looks)


def _paired(first: Mapping[int, float], second: Mapping[int, float]) -> Difference:
    shared = sorted(set(first) & set(second))
    return paired_difference([first[s] for s in shared], [second[s] for s in shared])


def _significant_front(
    entries: list[Entry],
    scores: Mapping[str, Mapping[int, float]],
    column: str,
    alpha: float,
    looks: tuple[int, int] | None,
) -> None:
    """``front`` on each entry: not significantly dominated, i.e. no architecture at most as
    costly is significantly more accurate (paired on shared seeds; Holm across every such pair
    the board has). Wider than the front of the means, which a seed's luck can reshape."""
    pairs = [
        (entry, _paired(scores[other["arch_id"]], scores[entry["arch_id"]]))
        for entry in entries
        for other in entries
        if other is not entry
        and _cost(other, column) <= _cost(entry, column)
        and other["val_accuracy_mean"] > entry["val_accuracy_mean"]
    ]
    adjusted = holm([_sequential(d, looks) for _, d in pairs])
    dominated = {
        id(entry)
        for (entry, d), p in zip(pairs, adjusted, strict=True)
        if verdict(d, p, alpha) == "better"
    }
    for entry in entries:
        entry["front"] = id(entry) not in dominated


def _top_group(
    entries: list[Entry],
    scores: Mapping[str, Mapping[int, float]],
    alpha: float,
    looks: tuple[int, int] | None,
) -> list[Entry]:
    """The best entry (first) and those not significantly worse than another (every pair on
    its shared seeds, Holm across all the pairs: :func:`search.stats.worse_than_another`)."""
    pairs = [
        (a["arch_id"], b["arch_id"], _paired(scores[a["arch_id"]], scores[b["arch_id"]]))
        for a, b in itertools.combinations(entries, 2)
    ]
    worse = worse_than_another(pairs, alpha, looks)
    best, others = entries[0], entries[1:]
    return [best, *(e for e in others if e["arch_id"] not in worse)]


EVIDENCE_FIELDS = (
    "n_seeds",
    "val_accuracy_mean",
    "val_accuracy_ci95",
    "test_accuracy_mean",
    "test_accuracy_ci95",
    "rank",
)


def evidence(entry: Mapping[str, Any], confirmed: bool, top_group: list[str]) -> Entry:
    """Why a board entry stands where it does: its statistics over seeds, its verdicts against
    the references, whether the board is confirmed, and the board's top group."""
    out = {
        key: value
        for key, value in entry.items()
        if key in EVIDENCE_FIELDS or key.startswith(("delta_vs_", "verdict_vs_"))
    }
    out.update(confirmed=confirmed, top_group=top_group)
    return out
