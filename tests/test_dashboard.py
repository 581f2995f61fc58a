"""The dashboard in a real browser (Debian's Chromium via Playwright) against a real server
holding a finished small search. Every test saves a screenshot under test-artifacts/."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Page, Route, expect
from safetensors.torch import load as load_safetensors
from support import SERVED_SPEC, SERVED_TRIALS, Served

from search.bundle import read_card
from service.dashboard.routes import plotly_js

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "screenshots"
TRIALS = SERVED_TRIALS
pytestmark = pytest.mark.e2e


@pytest.fixture
def server(served_search: Served) -> Served:
    """The shared served search (conftest.py): ``cbam-nas serve`` with one worker, after it
    finished a 5-trial search."""
    return served_search


@pytest.fixture
def errors(page: Page) -> list[str]:
    """Console errors and uncaught exceptions of the page, collected as it runs."""
    found: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            found.append(f"console: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: found.append(f"page error: {exc}"))
    return found


@pytest.fixture
def signed_in(page: Page, server: Served, errors: list[str]) -> Page:
    """A page whose session already holds the token (as if entered once before)."""
    page.add_init_script(f"sessionStorage.setItem('cbamNasToken', {json.dumps(server.token)})")
    return page


def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _plot_points(page: Page, selector: str, meta: str) -> int:
    return page.evaluate(
        """([selector, meta]) => (document.querySelector(selector).data || [])
            .filter((t) => t.meta === meta).reduce((n, t) => n + t.x.length, 0)""",
        [selector, meta],
    )


def test_token_entered_once_opens_the_searches_page(
    page: Page, server: Served, errors: list[str]
) -> None:
    page.goto(server.url + "/")
    expect(page.locator("#token-form")).to_be_visible()
    page.fill("#token-input", server.token)
    page.click("#token-form button")
    row = page.locator(f'#searches tr[data-id="{server.search_id}"]')
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text(f"{TRIALS}/{TRIALS} done")
    # Kept for the session: another page needs no token again.
    page.goto(f"{server.url}/searches/{server.search_id}")
    expect(page.locator("#search-state")).to_have_text("completed")
    expect(page.locator("#token-form")).to_be_hidden()
    page.goto(server.url + "/")
    expect(page.locator("#searches tbody tr")).to_have_count(1)
    _shot(page, "searches")
    assert errors == []


def test_a_wrong_token_is_refused_with_a_message(page: Page, server: Served) -> None:
    page.goto(server.url + "/")
    page.fill("#token-input", "cbn_1_" + "x" * 43)
    page.click("#token-form button")
    expect(page.locator("#alert")).to_contain_text("invalid or revoked token")
    expect(page.locator("#token-form")).to_be_visible()


def test_search_page_draws_every_completed_trial(
    signed_in: Page, server: Served, errors: list[str]
) -> None:
    page = signed_in
    page.goto(f"{server.url}/searches/{server.search_id}")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(TRIALS)
    page.wait_for_function(
        "() => (document.querySelector('#pareto').data || []).length > 0", timeout=20_000
    )
    assert _plot_points(page, "#pareto", "trial") == TRIALS
    # The references are marked, each once.
    names = page.evaluate(
        "() => document.querySelector('#pareto').data.filter((t) => t.x.length).map((t) => t.name)"
    )
    assert {"no attention", "SE", "paper CBAM"} <= set(names)
    # Switching the overhead redraws the same trials against latency.
    page.select_option("#overhead", "latency")
    expect(page.locator("#overhead-header")).to_have_text("latency (ms)")
    page.wait_for_function(
        "() => document.querySelector('#pareto').layout.xaxis.title.text === 'latency (ms)'"
    )
    assert _plot_points(page, "#pareto", "trial") == TRIALS
    # The analysis panels filled in.
    # The analysis charts draw when scrolled to.
    assert page.evaluate("() => document.querySelector('#curves').data === undefined")
    for panel in ("#knobs", "#importance", "#curves"):
        page.locator(panel).scroll_into_view_if_needed()
    # The knobs against accuracy bands: one path width per completed trial, in SVG.
    page.wait_for_function("() => (document.querySelector('#knobs').data || []).length === 1")
    knobs = page.evaluate("() => document.querySelector('#knobs').data[0]")
    assert knobs["type"] == "parcats" and sum(knobs["counts"]) == TRIALS
    assert knobs["dimensions"][-1]["label"] == "val accuracy"
    expect(page.locator("#knobs g.dimension")).to_have_count(len(knobs["dimensions"]))
    expect(page.locator("#ablation table").first).to_be_visible()
    page.wait_for_function("() => (document.querySelector('#curves').data || []).length === 5")
    expect(page.locator("#importance-note")).not_to_be_empty()
    _shot(page, "search")
    assert errors == []


# Whether the numbers in the cells matching the selector ascend.
ASCENDING = """(selector) => {
    const v = [...document.querySelectorAll(selector)].map((td) => parseFloat(td.textContent));
    return v.length > 0 && v.every((x, i) => !i || v[i - 1] <= x);
}"""


def _column(page: Page, css_class: str) -> list[float]:
    return [
        float(text) for text in page.locator(f"#leaderboard tbody td.{css_class}").all_inner_texts()
    ]


def test_leaderboard_sorts_by_a_clicked_column(
    signed_in: Page, server: Served, errors: list[str]
) -> None:
    page = signed_in
    page.goto(f"{server.url}/searches/{server.search_id}")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(TRIALS)
    ranked = _column(page, "acc")
    assert ranked == sorted(ranked, reverse=True)  # rank order: best first

    accuracy = page.locator('#leaderboard th[data-sort="val_accuracy"]')
    accuracy.click()  # best first again, now by the column
    expect(accuracy).to_have_class("sortable sorted-desc")
    accuracy.click()
    expect(accuracy).to_have_class("sortable sorted-asc")
    page.wait_for_function(ASCENDING, arg="#leaderboard tbody td.acc")
    assert _column(page, "acc") == sorted(ranked)

    page.locator('#leaderboard th[data-sort="number"]').click()
    page.wait_for_function(ASCENDING, arg="#leaderboard tbody td.number")
    numbers = [
        int(n)
        for n in page.locator("#leaderboard tbody tr").evaluate_all(
            "rows => rows.map((r) => r.dataset.number)"
        )
    ]
    assert numbers == list(range(TRIALS))
    _shot(page, "search-sorted")
    assert errors == []


def test_new_search_form_shows_validation_and_creates(
    signed_in: Page, server: Served, errors: list[str]
) -> None:
    page = signed_in
    page.goto(server.url + "/")
    form = page.locator("#new-search")
    expect(form.locator("#backbones option")).not_to_have_count(0)
    expect(form.locator("input[name=backbone]")).to_have_value("cifar_resnet20")
    form.locator("input[name=name]").fill("from the form")
    form.locator("select[name=dataset]").select_option("synthetic")
    form.locator("input[name=trials]").fill("3")
    # A library model without blocks CBAM can go into is refused next to the field.
    form.locator("input[name=backbone]").fill("timm:vit_small_patch16_224")
    form.locator("button[type=submit]").click()
    refused = form.locator('.field[data-field="backbone"] .error')
    expect(refused).to_contain_text("timm's ResNet family")
    form.locator("input[name=backbone]").fill("cifar_resnet20")
    form.locator("input[name=kernel_sizes]").fill("3, 4")
    form.locator("button[type=submit]").click()
    message = form.locator('.field[data-field="space.kernel_sizes"] .error')
    expect(message).to_contain_text("space.kernel_sizes[1]: 4 is not allowed")
    expect(message).to_contain_text("an odd integer from 1 to 9")
    _shot(page, "new-search-invalid")
    with server.api() as client:
        assert client.get("/searches").json()["total"] == 1  # nothing was created

    form.locator("input[name=kernel_sizes]").fill("3, 7")
    form.locator("button[type=submit]").click()
    page.wait_for_url(f"{server.url}/searches/*")
    new_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#search-title")).to_have_text("from the form")
    with server.api() as client:
        created = client.get(f"/searches/{new_id}").json()
        assert created["spec"]["space"]["kernel_sizes"] == [3, 7]
        assert created["budget_trials"] == 3
        client.post(f"/searches/{new_id}/cancel")  # keep the worker free for the other tests
    # The refused submit is logged by Chromium itself as a failed resource; nothing else is.
    assert [e for e in errors if "status of 422" not in e] == []


def test_trial_page_shows_attention_and_serves_the_weights(
    signed_in: Page, server: Served, errors: list[str]
) -> None:
    page = signed_in
    with server.api() as client:
        board = client.get(f"/searches/{server.search_id}/leaderboard").json()
    cbam = next(e for e in board["entries"] if e["reference"] == "cbam")
    page.goto(f"{server.url}/searches/{server.search_id}/trials/{cbam['number']}")
    expect(page.locator("#trial-state")).to_have_text("completed")
    expect(page.locator("#metrics")).to_contain_text("validation accuracy")
    page.wait_for_function(
        "() => document.querySelectorAll('#attention .attention-image').length > 0"
    )
    # ResNet-20 with CBAM in each of its 9 blocks: 9 spatial maps + Grad-CAM per image.
    heatmaps = page.evaluate(
        """() => [...document.querySelectorAll('#attention .attention-image')][0]
            .querySelectorAll('.heatmap-cell').length"""
    )
    assert heatmaps == 10
    traces = page.evaluate(
        """() => [...document.querySelectorAll('#attention .heatmap-cell')]
            .map((c) => (c.data || []).filter((t) => t.type === 'heatmap').length)"""
    )
    assert traces and all(n == 1 for n in traces)
    _shot(page, "trial")

    link = page.locator("#downloads a", has_text="weights.safetensors")
    with page.expect_download() as download_info:
        link.click()
    path = download_info.value.path()
    weights = load_safetensors(Path(path).read_bytes())
    assert "fc.weight" in weights and "conv1.weight" in weights
    # The model bundle: one archive a colleague loads with search.load_model.
    with page.expect_download() as bundle_info:
        page.locator("#downloads a.bundle").click()
    assert bundle_info.value.suggested_filename.endswith(".zip")
    card = read_card(bundle_info.value.path())
    assert card["backbone"] == "cifar_resnet20" and card["num_classes"] >= 2
    assert errors == []


def test_plotly_js_is_served_from_the_package_gzipped(server: Served) -> None:
    original = plotly_js().read_bytes()
    url = f"{server.url}/static/vendor/plotly.min.js"
    packed = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert packed.status_code == 200 and packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(original) / 2
    assert packed.content == original  # httpx decodes it
    plain = httpx.get(url, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.content == original
    assert "max-age" in plain.headers["cache-control"]


# -- what a token's scope shows ----------------------------------------------------------------


SCOPES = ("read", "write")  # besides serve's admin token


@pytest.fixture(scope="module")
def scoped_tokens(served_search: Served) -> dict[str, str]:
    """A token of each scope for the served search's server (admin: the one serve made)."""
    from search.store.engine import open_database
    from service.auth import create_token

    with open_database(f"sqlite:///{served_search.state / 'cbam-nas.db'}") as db:
        made = {scope: create_token(db, f"dashboard-{scope}", scope=scope) for scope in SCOPES}
    return {**made, "admin": served_search.token}


def _as_running(route: Route) -> None:
    """The server's answer with its searches reported running, so that cancel would apply."""
    response = route.fetch()
    data = response.json()
    for search in data.get("items", [data]):
        search["state"] = "running"
    route.fulfill(response=response, json=data)


def _shown(page: Page, selector: str, visible: bool) -> None:
    if visible:
        expect(page.locator(selector)).to_be_visible()
    else:
        expect(page.locator(selector)).to_be_hidden()


@pytest.mark.parametrize("scope", ["read", "write", "admin"])
def test_controls_follow_the_token_scope(
    page: Page, server: Served, scoped_tokens: dict[str, str], errors: list[str], scope: str
) -> None:
    """The new-search form and cancel need a write token, delete an admin one: a page shows only
    the controls its token may use (GET /me), so a read token's page changes nothing."""
    writes, admins = scope != "read", scope == "admin"
    token = json.dumps(scoped_tokens[scope])
    page.add_init_script(f"sessionStorage.setItem('cbamNasToken', {token})")
    answers = {"/api/v1/searches", f"/api/v1/searches/{server.search_id}"}
    page.route(lambda url: urlsplit(url).path in answers, _as_running)

    page.goto(server.url + "/")
    expect(page.locator("#token-state")).to_contain_text(f"({scope})")
    row = page.locator(f'#searches tr[data-id="{server.search_id}"]')
    expect(row).to_contain_text("running")
    expect(row.locator("button.cancel")).to_have_count(1 if writes else 0)
    _shown(page, "#new-search-section", writes)
    _shot(page, f"searches-{scope}")

    page.goto(f"{server.url}/searches/{server.search_id}")
    expect(page.locator("#search-state")).to_have_text("running")
    _shown(page, "#cancel", writes)
    expect(page.locator("#delete")).to_be_hidden()  # not while it runs, whoever asks

    page.unroute_all(behavior="ignoreErrors")
    page.reload()
    expect(page.locator("#search-state")).to_have_text("completed")
    expect(page.locator("#cancel")).to_be_hidden()
    _shown(page, "#delete", admins)
    assert errors == []


def _just_started(route: Route) -> None:
    """The server's answer as it reads while the first trial trains: the split is known, no
    trial has a result yet, so there is no best and no noise floor."""
    response = route.fetch()
    data = response.json()
    data["progress"].update(best=None, noise_floor_pp=None, val_images=300)
    route.fulfill(response=response, json=data)


def test_a_search_whose_first_trial_runs_shows_its_split(
    signed_in: Page, server: Served, errors: list[str]
) -> None:
    page = signed_in
    page.route(
        lambda url: urlsplit(url).path == f"/api/v1/searches/{server.search_id}", _just_started
    )
    page.goto(f"{server.url}/searches/{server.search_id}")
    expect(page.locator("#reliability")).to_contain_text("validation: 300 images")
    expect(page.locator("#reliability")).not_to_contain_text("one run ±")
    assert errors == []


# -- a confirmed search ------------------------------------------------------------------------

# Per seed: two candidates tied at the top, the references behind.
CONFIRMED_SCORES = {
    "none": [0.900, 0.905, 0.880],
    "se": [0.910, 0.915, 0.890],
    "cbam": [0.905, 0.912, 0.884],
    "small": [0.930, 0.934, 0.910],
    "wide": [0.931, 0.933, 0.911],
}


@pytest.fixture(scope="module")
def confirmed(served_search: Served) -> str:
    """A finished, confirmed search written straight into the served database (completed from
    the start, so that the server's worker never takes it)."""
    from search.space import Architecture, reference_architectures
    from search.spec import SearchSpec
    from search.store.engine import open_database
    from search.store.models import (
        Phase,
        Reference,
        ResultState,
        Search,
        SearchState,
        TrialResult,
        utcnow,
    )
    from search.study.studies import create_study

    # Three seeds each, as a race of exactly three rounds would leave them (one look).
    spec = SearchSpec.from_dict(
        {
            **SERVED_SPEC,
            "name": "confirmed",
            "budget": {"trials": 5},
            "confirm": {"min_seeds": 3, "max_seeds": 3},
        }
    )
    archs = {
        **reference_architectures(spec.backbone),
        "small": Architecture(spec.backbone, stages=(3,), kernel_size=3),
        "wide": Architecture(spec.backbone, kernel_size=3),
    }
    params = {"none": 269_722, "se": 271_000, "cbam": 272_995, "small": 270_500, "wide": 272_600}
    with open_database(f"sqlite:///{served_search.state / 'cbam-nas.db'}") as db:
        now = utcnow()
        search = Search(
            name="confirmed",
            spec=spec.to_dict(),
            state=SearchState.completed,
            budget_trials=5,
            claimed=5,
            started_at=now,
            finished_at=now,
        )
        create_study(db.optuna_storage(), spec, search.study_name)
        rows = []
        for number, (name, arch) in enumerate(archs.items()):
            reference = Reference(name) if name in ("none", "se", "cbam") else None
            common = {
                "search_id": search.id,
                "architecture": arch.to_dict(),
                "arch_id": arch.id,
                "label": arch.describe(),
                "reference": reference,
                "state": ResultState.completed,
                "params": params[name],
                "params_pct": 100 * (params[name] / params["none"] - 1),
                "val_images": 1000,
                "finished_at": now,
            }
            explored = CONFIRMED_SCORES[name][0] - 0.01 * (name == "wide")
            rows.append(
                TrialResult(number=number, val_accuracy=explored, seed=0, epochs_run=2, **common)
            )
            for round_, accuracy in enumerate(CONFIRMED_SCORES[name]):
                rows.append(
                    TrialResult(
                        number=5 + 5 * round_ + number,
                        val_accuracy=accuracy,
                        phase=Phase.confirm,
                        seed=1 + round_,
                        fidelity_epochs=4,
                        epochs_run=4,
                        learning_curve=_rising(accuracy) if name == "wide" else [],
                        **common,
                    )
                )
        with db.session() as session:
            session.add(search)
            session.flush()
            session.add_all(rows)
        return search.id


def _rising(final: float) -> list[dict[str, float]]:
    """A run still gaining 15 points over its last epochs: far beyond 1000 images' noise."""
    return [
        {"epoch": e, "val_accuracy": final - 0.05 * (4 - e), "train_loss": 1.0, "val_loss": 1.0}
        for e in range(1, 5)
    ]


def test_a_confirmed_leaderboard_shows_intervals_verdicts_and_the_answer(
    signed_in: Page, server: Served, confirmed: str, errors: list[str]
) -> None:
    page = signed_in
    page.goto(f"{server.url}/searches/{confirmed}")
    expect(page.locator("#leaderboard tbody tr")).to_have_count(5)
    expect(page.locator("#leaderboard-note")).to_contain_text("Confirmed")
    # Three points between the best and the worst, one run's noise floor is 1.6 on 1000 images.
    expect(page.locator("#noise-warning")).to_be_hidden()
    # Each entry's schedule; the one whose runs were still rising says so.
    expect(page.locator("#leaderboard tbody td.epochs")).to_have_count(5)
    expect(page.locator("#leaderboard tbody td.epochs.rising")).to_have_count(1)
    expect(page.locator("#leaderboard tbody td.epochs.rising")).to_have_text("4 ↗")
    expect(page.locator("#leaderboard tbody tr.recommended td.epochs")).to_have_text("4")
    # The two tied candidates are the top group; the cheaper one is the answer.
    expect(page.locator("#leaderboard tbody tr.recommended")).to_have_count(1)
    expect(page.locator("#leaderboard tbody tr.recommended")).to_contain_text("@s3")
    expect(page.locator("#leaderboard tbody tr.top-group")).to_have_count(1)
    expect(page.locator("#leaderboard tbody tr.recommended td.seeds")).to_have_text("3")
    expect(
        page.locator("#leaderboard tbody tr.recommended td.verdict.better").first
    ).to_be_visible()
    ci = page.locator("#leaderboard tbody tr.recommended td.ci").inner_text()
    low, high = (float(x) for x in ci.split("–"))
    assert low < high
    expect(page.locator("#reliability")).to_contain_text("Spearman")
    expect(page.locator("#rung-agreement")).to_contain_text("early-stopping rungs vs final")
    # The scatter draws each confirmed architecture with its interval as an error bar.
    page.wait_for_function(
        """() => ((document.querySelector('#pareto').data || [])
            .find((t) => t.meta === 'confirmed') || {x: []}).x.length === 5"""
    )
    bars = page.evaluate(
        """() => document.querySelector('#pareto').data
            .find((t) => t.meta === 'confirmed').error_y.array"""
    )
    assert len(bars) == 5 and all(bar > 0 for bar in bars)
    _shot(page, "search-confirmed")
    assert errors == []
