"""Leaderboards from trial-result rows: ranking, the Pareto front, deltas to the references.

Pure functions over rows (``TrialResult`` objects or their ``to_dict()`` mappings): the command
line and the REST API rank the same way. Accuracies are fractions; deltas to the references are
in percentage points. Within one search every trial shares a backbone, so the absolute overheads
(``params``, ``macs``, ``latency_ms``) order trials exactly as their percentages over the
no-attention baseline do; the Pareto front uses the absolute figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from search.space import REFERENCE_NAMES

ACCURACY = "val_accuracy"
# overhead name (as in SearchSpec.objectives) -> (absolute column, percent column)
OVERHEAD_COLUMNS = {
    "params": ("params", "params_pct"),
    "macs": ("macs", "macs_pct"),
    "latency": ("latency_ms", "latency_pct"),
}
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


def dominates(a: Mapping[str, Any], b: Mapping[str, Any], overheads: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` everywhere (higher accuracy, lower overheads)
    and better somewhere. A missing figure is worse than any value."""
    pairs = list(zip(_goodness(a, overheads), _goodness(b, overheads), strict=True))
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def _goodness(entry: Mapping[str, Any], overheads: Sequence[str]) -> list[float]:
    """Accuracy and negated overheads: higher is better in every position."""
    inf = float("inf")

    def value(key: str, missing: float) -> float:
        figure = entry.get(key)
        return missing if figure is None else float(figure)

    return [
        value(ACCURACY, -inf),
        *(-value(OVERHEAD_COLUMNS[o][0], inf) for o in overheads),
    ]


def pareto_flags(entries: Sequence[Mapping[str, Any]], overheads: Sequence[str]) -> list[bool]:
    """For each entry, whether no other entry dominates it."""
    return [
        not any(dominates(other, entry, overheads) for other in entries if other is not entry)
        for entry in entries
    ]


def reference_accuracies(entries: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Reference name -> its best completed validation accuracy."""
    out: dict[str, float] = {}
    for entry in entries:
        name = entry.get("reference")
        name = getattr(name, "value", name)
        accuracy = entry.get(ACCURACY)
        if name is None or accuracy is None or _state(entry) not in RANKED_STATES:
            continue
        out[name] = max(accuracy, out.get(name, accuracy))
    return out


def deltas(entry: Mapping[str, Any], references: Mapping[str, float]) -> dict[str, float | None]:
    """``delta_vs_<reference>``: accuracy minus the reference's, in percentage points."""
    accuracy = entry.get(ACCURACY)
    return {
        f"delta_vs_{name}": None
        if accuracy is None or name not in references
        else 100.0 * (accuracy - references[name])
        for name in REFERENCE_NAMES
    }


def leaderboard(
    rows: Iterable[Any],
    overheads: Sequence[str] = ("params",),
    states: Sequence[str] = RANKED_STATES,
) -> list[Entry]:
    """The rows in ``states``, best first: by accuracy, then fewer parameters, then number.

    Each entry gains ``rank`` (from 1), ``pareto`` (on the front of accuracy against
    ``overheads``, among the ranked entries) and the ``delta_vs_*`` of :func:`deltas`.
    """
    all_entries = [as_entry(row) for row in rows]
    references = reference_accuracies(all_entries)
    entries = [e for e in all_entries if _state(e) in states and e.get(ACCURACY) is not None]
    entries.sort(
        key=lambda e: (-e[ACCURACY], e.get("params") or float("inf"), e.get("number") or 0)
    )
    for rank, (entry, pareto) in enumerate(
        zip(entries, pareto_flags(entries, overheads), strict=True), start=1
    ):
        entry.update(rank=rank, pareto=pareto, **deltas(entry, references))
    return entries


def pareto_front(rows: Iterable[Any], overheads: Sequence[str] = ("params",)) -> list[Entry]:
    """The leaderboard's Pareto-optimal entries, by increasing first overhead."""
    column = OVERHEAD_COLUMNS[overheads[0]][0] if overheads else "params"
    front = [e for e in leaderboard(rows, overheads) if e["pareto"]]
    return sorted(front, key=lambda e: e.get(column) or 0)
