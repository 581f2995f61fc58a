"""Response models of the API (what /docs shows). Request bodies are the domain's own
``SearchSpec`` mapping, validated by the domain so the API and the CLI give the same messages."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from search.results.queries import Progress
from search.store.models import Search, SearchState

Item = TypeVar("Item")


class ProgressOut(BaseModel):
    budget: int = Field(description="Trial slots the search may use.")
    done: int = Field(description="Slots finished (completed, pruned, over budget or failed).")
    completed: int
    running: int
    pruned: int
    failed: int
    over_budget: int
    requeued: int
    eta_s: float | None = Field(description="Seconds left, extrapolated; None when unknown.")
    best: dict[str, Any] | None = Field(description="The best completed trial so far.")
    confirmation: dict[str, int] = Field(
        description="Confirmation runs by state: pending, running, completed, failed, requeued."
    )
    val_images: int | None = Field(description="The validation split's size, in images.")
    noise_floor_pp: float | None = Field(
        description="Half of one run's 95 % Wilson interval at the best accuracy, in points."
    )


class SearchOut(BaseModel):
    id: str
    name: str
    state: SearchState
    spec: dict[str, Any]
    budget_trials: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    progress: ProgressOut | None = None
    rank_agreement: dict[str, Any] | None = Field(
        default=None,
        description="Spearman's rho (with ci95 and n) between the confirmed architectures' "
        "exploration accuracies and their confirmed means: whether the cheap phase could be "
        "trusted. Only on a single search's answer, once confirmation runs have completed.",
    )

    references_convergence: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Per reference (its leaderboard run): converged (its validation accuracy "
        "rose by less than one run's noise over its last quarter of epochs), last_gain_pp, "
        "window, noise_pp and by_epoch (where it had not: when a fitted exponential approach "
        "says it would have). Only on a single search's answer.",
    )

    rung_agreement: list[dict[str, Any]] | None = Field(
        default=None,
        description="Per rung of the successive-halving schedule (epoch): Spearman's rho (with "
        "ci95 and n) between the exploration's completed trials' validation accuracies at that "
        "epoch and their final ones: whether stopping trials there was informed. Null before "
        "any exploration trial completes, empty without rungs. Only on a single search's "
        "answer.",
    )

    @classmethod
    def of(
        cls,
        search: Search,
        progress: Progress | None = None,
        rank_agreement: dict[str, Any] | None = None,
        references_convergence: dict[str, dict[str, Any]] | None = None,
        rung_agreement: list[dict[str, Any]] | None = None,
    ) -> SearchOut:
        return cls(
            id=search.id,
            name=search.name,
            state=search.state,
            spec=search.spec,
            budget_trials=search.budget_trials,
            created_at=search.created_at,
            updated_at=search.updated_at,
            started_at=search.started_at,
            finished_at=search.finished_at,
            error=search.error,
            progress=None if progress is None else ProgressOut(**progress.to_dict()),
            rank_agreement=rank_agreement,
            references_convergence=references_convergence,
            rung_agreement=rung_agreement,
        )


class Page(BaseModel, Generic[Item]):
    total: int
    offset: int
    limit: int
    items: list[Item]


class LeaderboardOut(BaseModel):
    search_id: str
    overhead: str
    total: int
    offset: int
    limit: int
    references: dict[str, dict[str, Any]] = Field(
        description="The best completed run of each reference (none, se, cbam) the search has."
    )
    entries: list[dict[str, Any]] = Field(
        description="Best first: the confirmation's architectures over their seeds once the "
        "search has any (else the exploration's trials), each with rank, pareto (on the front "
        "of the means), front (confirmed only: not significantly dominated, i.e. no "
        "architecture at most as costly is significantly more accurate), n_seeds, "
        "val_accuracy_mean, val_accuracy_ci95 ([low, high]: t over seeds, or one run's Wilson "
        "interval on the validation split), test_accuracy_mean and test_accuracy_ci95 (the "
        "held-out test set, over the same seeds; reported, never used to rank), and per "
        "reference delta_vs_<reference> (accuracy points) with delta_vs_<reference>_ci95 "
        "and verdict_vs_<reference> (better, worse, tied or untested; paired on shared "
        "seeds, Holm-corrected across the board), and <overhead>_delta_vs_<reference> "
        "(percent)."
    )
    confirmed: bool = Field(description="Whether the entries come from the confirmation.")
    top_group: list[str] = Field(
        description="Architecture ids not significantly worse than the best."
    )
    recommended: str | None = Field(
        description="The cheapest architecture of the top group by this overhead: the answer."
    )
    spread_pp: float | None = Field(
        default=None, description="The best mean accuracy on this page minus the worst (points)."
    )
    noise_floor_pp: float | None = Field(
        default=None,
        description="Half the width of one run's 95% Wilson interval at the page's best "
        "accuracy on the validation split (points).",
    )
    within_noise: bool | None = Field(
        default=None,
        description="True when the whole spread of the page is below one run's noise floor: "
        "no order on it means anything without more seeds.",
    )
