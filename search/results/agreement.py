"""Could the cheap measurements be trusted? Rank agreements a search reports about itself.

- :func:`rank_agreement`: the exploration's accuracies of the confirmed architectures against
  their confirmed means (does a short schedule on one seed rank as the confirmation does?).
- :func:`rung_agreement`: per early-stopping rung, the accuracies of the exploration's trials
  at that epoch against their final accuracies, for the trials that ran to the end (did a rung
  rank trials as their end did, so that stopping there was informed?).

Both are Spearman's rho with a Fisher-z interval (``search.stats.rank_agreement``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from search.results.cache import cached, completed
from search.results.queries import get_search
from search.spec import SearchSpec
from search.stats import Interval
from search.stats import rank_agreement as spearman_interval
from search.store.models import Phase, TrialResult

if TYPE_CHECKING:
    from collections.abc import Sequence

    from search.store.engine import Database


def _figure(rho: Interval) -> dict[str, Any]:
    estimate = None if math.isnan(rho.estimate) else rho.estimate
    return {"rho": estimate, "ci95": rho.bounds, "n": rho.n}


def rank_agreement(db: Database, search_id: str) -> dict[str, Any] | None:
    """Does the exploration predict the confirmation? Spearman's rho (with its interval)
    between the confirmed architectures' exploration accuracies and their confirmed means;
    None before any confirmation run completes."""

    def compute() -> dict[str, Any] | None:
        with db.session() as session:
            rows = session.execute(
                select(TrialResult.arch_id, TrialResult.phase, TrialResult.val_accuracy).where(
                    *completed(search_id)
                )
            ).all()
        explored: dict[str, float] = {}
        confirmed: dict[str, list[float]] = {}
        for arch_id, phase, accuracy in rows:
            if phase == Phase.confirm:
                confirmed.setdefault(arch_id, []).append(accuracy)
            else:
                explored[arch_id] = max(accuracy, explored.get(arch_id, accuracy))
        both = sorted(set(explored) & set(confirmed))
        if not confirmed:
            return None
        return _figure(
            spearman_interval(
                [explored[a] for a in both],
                [sum(confirmed[a]) / len(confirmed[a]) for a in both],
            )
        )

    return cached(db, search_id, "rank_agreement", compute)


def rung_agreement(db: Database, search_id: str) -> list[dict[str, Any]] | None:
    """Per rung of the spec's successive-halving schedule (reported whatever the policy: with
    none it says whether stopping early would have been informed), Spearman's rho (``rho``,
    ``ci95``, ``n``) between the validation accuracies of the exploration's completed trials at
    that ``epoch`` and their final ones. Pruned trials cannot take part: they have no final
    accuracy. A low rho says the rung ranked noise: stop later (``min_epochs``) or not at all.
    None before any exploration trial completes; empty when the schedule has no rung."""

    def compute() -> list[dict[str, Any]] | None:
        spec = SearchSpec.from_dict(get_search(db, search_id).spec)
        rungs = spec.early_stopping.rungs(spec.training.epochs)
        if not rungs:
            return []
        with db.session() as session:
            rows = session.execute(
                select(TrialResult.val_accuracy, TrialResult.learning_curve).where(
                    *completed(search_id), TrialResult.phase == Phase.explore
                )
            ).all()
        if not rows:
            return None
        return [{"epoch": epoch, **_figure(_at_rung(rows, epoch))} for epoch in rungs]

    return cached(db, search_id, "rung_agreement", compute)


def _at_rung(rows: Sequence[Any], epoch: int) -> Interval:
    reached = [
        (curve[epoch - 1]["val_accuracy"], final) for final, curve in rows if len(curve) > epoch
    ]
    return spearman_interval([r for r, _ in reached], [f for _, f in reached])
