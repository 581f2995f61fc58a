"""The convergence check of a learning curve (search/results/convergence.py)."""

from __future__ import annotations

import math

from search.results.convergence import convergence


def _curve(values: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate(values)]


def test_a_run_still_rising_beyond_noise_has_not_converged_and_says_when_it_would() -> None:
    rising = _curve([0.98 - 0.9 * math.exp(-e / 4) for e in range(1, 11)])
    check = convergence(rising, 300)
    assert check["converged"] is False and check["window"] == 2
    assert check["last_gain_pp"] > check["noise_pp"]
    # The fit recovers tau = 4, b = 0.9: the gain left falls under the noise near epoch 14.
    assert 12 <= check["by_epoch"] <= 16


def test_a_flat_tail_has_converged() -> None:
    flat = _curve([0.3, 0.7, 0.9, 0.95, 0.96, 0.961, 0.962, 0.96, 0.961, 0.962])
    check = convergence(flat, 300)
    assert check["converged"] is True and check["by_epoch"] is None


def test_a_larger_split_sees_smaller_gains() -> None:
    creeping = _curve([0.5, 0.8, 0.9, 0.92, 0.93, 0.935, 0.94, 0.945])  # half a point an epoch
    assert convergence(creeping, 100)["converged"] is True  # within 100 images' noise
    assert convergence(creeping, 100_000)["converged"] is False


def test_too_short_a_curve_says_nothing() -> None:
    assert convergence(_curve([0.5, 0.9]), 300)["converged"] is None
    assert convergence([], None)["converged"] is None


def test_status_warns_when_the_references_had_not_converged() -> None:
    from rich.console import Console

    from service.cli.render import status_table

    rising = convergence(_curve([0.98 - 0.9 * math.exp(-e / 4) for e in range(1, 11)]), 300)
    search = {
        "id": "s",
        "state": "completed",
        "spec": {"confirm": {"enabled": False}},
        "progress": {"budget": 3, "done": 3},
        "references_convergence": {"none": {"number": 0, **rising}},
    }
    console = Console(width=300, record=True)
    console.print(status_table(search))
    text = console.export_text()
    assert "had not finished learning: none (+" in text and "by about epoch" in text
