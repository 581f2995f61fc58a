"""Response models of the API (what /docs shows and a generated client reads). The request
body is the domain's own ``SearchSpec`` model, so the API and the CLI give the same messages.

Answers forbid keys they do not declare: a field the domain adds without its model here fails
the contract tests (tests/test_response_schemas.py) rather than reaching clients unannounced.
JSON the database stores as written (architectures, learning curves) allows more keys, so that
rows written by another version still answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from search.knobs import ARRANGEMENTS, ATTENTION_KINDS, BLOCK_CHOICES, POOL_TYPES, SPATIAL_POOLS
from search.pareto import OVERHEAD_COLUMNS
from search.results.queries import Progress
from search.space import REFERENCE_NAMES
from search.stats import VERDICTS
from search.store.models import Phase, Reference, ResultState, Search, SearchState

Item = TypeVar("Item")

Interval = list[float] | None
"""A 95 % interval as [low, high]; None where there is none (one value, no spread)."""


class Out(BaseModel):
    """An answer of the API: every key it may hold is declared."""

    model_config = ConfigDict(extra="forbid")


class Stored(BaseModel):
    """JSON stored as written: the keys below, and any a later version adds."""

    model_config = ConfigDict(extra="allow")


class ArchitectureOut(Stored):
    """One point of the search space: the attention kind, its knobs (None where the kind or
    the arrangement has no such knob) and where it goes."""

    backbone: str
    attention: Literal[ATTENTION_KINDS]  # type: ignore[valid-type]
    reduction: int | None = None
    pool_types: list[Literal[POOL_TYPES]] | None = None  # type: ignore[valid-type]
    kernel_size: int | None = None
    spatial_pool: Literal[SPATIAL_POOLS] | None = None  # type: ignore[valid-type]
    spatial_bn: bool | None = None
    mlp_bias: bool | None = None
    arrangement: Literal[ARRANGEMENTS] | None = None  # type: ignore[valid-type]
    stages: list[int] | None = Field(default=None, description="None: every stage.")
    blocks: Literal[BLOCK_CHOICES] = "all"  # type: ignore[valid-type]


class EpochOut(Stored):
    """One epoch of a learning curve. ``seconds`` covers training and validation,
    ``images_per_s`` the training part, ``lr`` is the epoch's last step's."""

    epoch: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    lr: float | None = None
    seconds: float | None = None
    images_per_s: float | None = None


class TrialSummaryOut(Out):
    """One attempt at one slot of a search (a page of trials lists these). Accuracies are
    fractions in [0, 1]; overheads absolute and in percent over the no-attention baseline."""

    id: int
    search_id: str
    number: int = Field(description="The slot: below the budget explores, above confirms.")
    optuna_number: int | None
    attempt: int
    architecture: ArchitectureOut
    arch_id: str
    label: str
    reference: Reference | None
    state: ResultState
    val_accuracy: float | None = Field(description="The best over the epochs.")
    final_val_accuracy: float | None = Field(description="The last epoch's.")
    test_accuracy: float | None = Field(description="The held-out test set's, once trained.")
    params: int | None
    macs: int | None
    attention_ops: int | None
    latency_ms: float | None
    train_step_ms: float | None
    peak_memory_bytes: int | None
    params_pct: float | None
    macs_pct: float | None
    latency_pct: float | None
    epochs_run: int
    phase: Phase
    seed: int | None = Field(description="The training seed (initialisation, data order).")
    fidelity_epochs: int | None = Field(description="The epochs its schedule trains for.")
    val_images: int | None = Field(description="The validation split's size, in images.")
    wall_time_s: float | None
    images_per_s: float | None
    device: str | None
    worker: str | None
    failure_reason: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class TrialOut(TrialSummaryOut):
    """One attempt in full: its learning curve and the files it can be downloaded as."""

    learning_curve: list[EpochOut]
    artifacts: dict[str, Any] | None = Field(description="Stored file name -> artifact id.")
    files: list[str] = Field(description="What .../files/{name} serves for this trial.")


class ConvergenceOut(Out):
    """Had a run finished learning? From its learning curve."""

    converged: bool | None = Field(
        description="Its validation accuracy rose by less than one run's noise over its last "
        "quarter of epochs; None below three epochs."
    )
    last_gain_pp: float | None = Field(description="The rise over that window, in points.")
    window: int | None = Field(description="The window's epochs.")
    noise_pp: float | None = None
    by_epoch: int | None = Field(
        default=None,
        description="Where it had not converged: the epoch by which a fitted exponential "
        "approach says it would have (None when the fit fails).",
    )


def _comparison_fields() -> dict[str, Any]:
    """Per reference: the accuracy delta (points), its interval and verdict, and the change of
    each overhead (percent). Declared one by one so that a client sees every key."""
    verdict = Literal[VERDICTS]  # type: ignore[valid-type]
    fields: dict[str, Any] = {}
    for name in REFERENCE_NAMES:
        fields[f"delta_vs_{name}"] = (
            float | None,
            Field(default=None, description=f"Accuracy minus the {name} reference's (points)."),
        )
        fields[f"delta_vs_{name}_ci95"] = (
            Interval,
            Field(default=None, description="Paired over shared seeds (points)."),
        )
        fields[f"verdict_vs_{name}"] = (
            verdict | None,
            Field(default=None, description="Holm-corrected across the board."),
        )
        for overhead in OVERHEAD_COLUMNS:
            fields[f"{overhead}_delta_vs_{name}"] = (
                float | None,
                Field(
                    default=None, description=f"{overhead} change over the {name} reference's (%)."
                ),
            )
    return fields


Comparisons = create_model(  # type: ignore[call-overload]
    "Comparisons", __base__=Out, __doc__="Against each reference.", **_comparison_fields()
)


class SeedStats(Comparisons):  # type: ignore[misc, valid-type]
    """An entry's statistics over its seeds (one run's Wilson interval where it has one)."""

    n_seeds: int
    val_accuracy_mean: float
    val_accuracy_ci95: Interval = Field(description="t over seeds, or one run's Wilson interval.")
    test_accuracy_mean: float | None = Field(description="Reported, never used to rank.")
    test_accuracy_ci95: Interval
    rank: int


class BoardStats(SeedStats):
    pareto: bool = Field(description="On the Pareto front of the means.")
    front: bool | None = Field(
        description="Confirmed only: not significantly dominated (no architecture at most as "
        "costly is significantly more accurate)."
    )


class ReferenceOut(BoardStats):
    """A reference's entry on the board (its confirmed runs, or its best exploration run)."""

    id: int
    number: int
    arch_id: str
    reference: Reference | None
    phase: Phase
    seed: int | None
    val_accuracy: float
    test_accuracy: float | None
    params: int | None
    macs: int | None
    latency_ms: float | None
    val_images: int | None


class LeaderboardEntryOut(TrialSummaryOut, BoardStats):
    """An architecture on the board: its best run's row, its statistics over seeds, its
    comparisons with the references and whether that run had finished learning."""

    convergence: ConvergenceOut
    converged: bool | None


class EvidenceOut(SeedStats):
    """Why /best answers what it does: the recommended architecture's statistics."""

    confirmed: bool
    top_group: list[str] = Field(description="Architecture ids not significantly worse.")


class BestOut(TrialOut):
    """The recommended architecture's best run, with ``evidence`` (None with ``max_pct``: then
    the most accurate trial within that budget)."""

    evidence: EvidenceOut | None = None


class BestSoFarOut(Out):
    number: int
    label: str
    val_accuracy: float | None
    params: int | None
    params_pct: float | None


class AgreementOut(Out):
    """Spearman's rho with its 95 % interval over ``n`` pairs (None below three)."""

    rho: float | None
    ci95: Interval
    n: int


class RungAgreementOut(AgreementOut):
    epoch: int


class ReferenceConvergenceOut(ConvergenceOut):
    number: int = Field(description="The reference's run the figures come from.")


class ProgressOut(Out):
    budget: int = Field(description="Trial slots the search may use.")
    done: int = Field(description="Slots finished (completed, pruned, over budget or failed).")
    completed: int
    running: int
    pruned: int
    failed: int
    over_budget: int
    requeued: int
    eta_s: float | None = Field(
        description="Seconds left: the exploration's slots and the confirmation's runs still to "
        "run, over the epochs trained per second so far (while a race may still stop arms, at "
        "most); None before anything has trained or once the search is over."
    )
    best: BestSoFarOut | None = Field(description="The best completed trial so far.")
    confirmation: dict[str, int] = Field(
        description="Confirmation runs by state: pending, running, completed, failed, requeued."
    )
    val_images: int | None = Field(description="The validation split's size, in images.")
    noise_floor_pp: float | None = Field(
        description="Half of one run's 95 % Wilson interval at the best accuracy, in points."
    )


class SearchOut(Out):
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
    rank_agreement: AgreementOut | None = Field(
        default=None,
        description="Spearman's rho (with ci95 and n) between the confirmed architectures' "
        "exploration accuracies and their confirmed means: whether the cheap phase could be "
        "trusted. Only on a single search's answer, once confirmation runs have completed.",
    )

    references_convergence: dict[str, ReferenceConvergenceOut] | None = Field(
        default=None,
        description="Per reference (its leaderboard run): converged (its validation accuracy "
        "rose by less than one run's noise over its last quarter of epochs), last_gain_pp, "
        "window, noise_pp and by_epoch (where it had not: when a fitted exponential approach "
        "says it would have). Only on a single search's answer.",
    )

    rung_agreement: list[RungAgreementOut] | None = Field(
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


class Page(Out, Generic[Item]):
    total: int
    offset: int
    limit: int
    items: list[Item]


class LeaderboardOut(Out):
    search_id: str
    overhead: str
    total: int
    offset: int
    limit: int
    references: dict[str, ReferenceOut] = Field(
        description="The best completed run of each reference (none, se, cbam) the search has."
    )
    entries: list[LeaderboardEntryOut] = Field(
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
        description="Architecture ids not significantly worse than another (every pair tested, "
        "Holm-corrected); the best is always among them."
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
