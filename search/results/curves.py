"""Learning curves of a search's best trials."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from search.results.cache import cached, completed
from search.results.rows import check_positive
from search.store.models import TrialResult

if TYPE_CHECKING:
    from search.store.engine import Database

CURVE_KEYS = ("val_accuracy", "train_loss", "val_loss", "train_accuracy")


def learning_curves(db: Database, search_id: str, top: int = 5) -> list[dict[str, Any]]:
    """The learning curves of the ``top`` best completed trials, best first (the leaderboard's
    order: accuracy, then fewer parameters, then the lower number). Each curve is columnar:
    ``epoch`` and one list per figure of :data:`CURVE_KEYS` (None where an epoch lacks it)."""
    check_positive("top", top)

    def compute() -> list[dict[str, Any]]:
        query = (
            select(
                TrialResult.number,
                TrialResult.label,
                TrialResult.reference,
                TrialResult.val_accuracy,
                TrialResult.params,
                TrialResult.epochs_run,
                TrialResult.learning_curve,
            )
            .where(*completed(search_id))
            .order_by(
                TrialResult.val_accuracy.desc(),
                TrialResult.params.is_(None),
                TrialResult.params,
                TrialResult.number,
            )
            .limit(top)
        )
        with db.session() as session:
            found = session.execute(query).all()
        out = []
        for number, label, reference, accuracy, params, epochs_run, curve in found:
            points = [p for p in curve or [] if isinstance(p, Mapping)]
            series: dict[str, list[Any]] = {
                "epoch": [p.get("epoch", i + 1) for i, p in enumerate(points)]
            }
            for key in CURVE_KEYS:
                series[key] = [p.get(key) for p in points]
            out.append(
                {
                    "number": number,
                    "label": label,
                    "reference": reference.value if reference else None,
                    "val_accuracy": accuracy,
                    "params": params,
                    "epochs_run": epochs_run,
                    "curve": series,
                }
            )
        return out

    return cached(db, search_id, ("curves", top), compute)
