"""Leaderboards from trial-result rows: ranking, the Pareto flags, deltas to the references.

Pure functions over rows (``TrialResult`` objects or their ``to_dict()`` mappings): the command
line and the REST API rank the same way. Accuracies are fractions; deltas to the references are
in percentage points. Within one search every trial shares a backbone, so the absolute overheads
(``params``, ``macs``, ``latency_ms``) order trials exactly as their percentages over the
no-attention baseline do; the Pareto front uses the absolute figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from search.pareto import ACCURACY, OVERHEAD_COLUMNS, pareto_flags
from search.space import REFERENCE_NAMES

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
