"""Dashboard render time at 10,000 trials in Chromium: our search page against optuna-dashboard's.

The search of ``benchmarks.leaderboard_latency`` (CIFAR ResNet-20, 10,000 trials written in bulk
with its ``populate``: most completed, some pruned, some failed and re-run, the three references)
in a throwaway SQLite database (``--database URL`` for another), served by the real app under
uvicorn (``serve_ours``) and opened in Debian's Chromium through Playwright (headless, software
rendering: WebGL runs on SwiftShader), 1280x900, with the API token in ``sessionStorage`` as a
signed-in session holds it.

Timed in the page (``performance.now()``, from navigation start), by an init script that watches
the DOM: a panel counts as drawn at the first frame painted after its content is in the DOM
(header text and progress bar; leaderboard rows; the scatter's SVG points; the knobs' parallel
categories axes; the importance bars and note; the ablation tables; the learning curves).

1. First render of the search page: the first view (the panels above the fold: header,
   scatter, leaderboard; the target), and every panel, with the page scrolled down through its
   sections (a frame each) as soon as the first view is drawn (the analysis charts below the
   fold draw when scrolled to; their answers are requested with the first view). With a cold
   browser cache (a new browser context per load: plotly.min.js, 4.7 MiB, 1.4 MiB gzipped, is
   fetched, parsed and run each time), once more with the server's cached answers dropped
   first (``search.results.cache.CACHE``: the leaderboard, scatter and analyses
   recomputed), and with the browser cache warm (a context that loaded the page twice before,
   so V8 may also keep plotly's compiled code).
2. Refresh of a loaded page, back to back in one page, by the page's own code
   (``window.dashboard``): with nothing new (the answers' ETags unchanged: nothing redrawn), and
   right after a trial completed (a completed row added to the database: the search's version
   changes, the server recomputes its answers and every chart redraws). The fast cycle the page
   runs every 3 s while a search is active (header, leaderboard, scatter: requests together) and
   the analysis cycle it runs every 15 s (knobs, importance, ablation tables, curves), each
   until its frame is painted.
3. First render of the searches list (browser cache cold): its rows and the new-search form.

The peer: optuna-dashboard's UI on the same study (its server in a child process, as in
``benchmarks.leaderboard_latency``, with its trial cache emptied before each load: it reads the
database, as ours does with its answers dropped), timed the same way until its study page shows
the history plot, the Pareto front, the timeline (SVG points each) and the best trials; above the
fold: history and Pareto front. Its hyperparameter importances are computed once before, untimed
(it caches them per trial count, and its single-threaded server would otherwise answer nothing
else for ~20 s). Ratios ours / peer use our loads with the server's answers dropped. One of our
loads that does not draw within its timeout stops the run; a peer's leaves the peer's rows out.

Loads run in interleaved rounds (each kind once per round). Printed: medians (and min-max) per
kind, PASS/FAIL against the targets (first render <= 2 s with a cold browser cache; fast refresh
<= 300 ms), where the time goes (plotly.min.js, each request, each ``Plotly.react``, long
tasks) and the machine.

    python -m benchmarks.dashboard_render [--trials 10000] [--loads 5] [--refreshes 15]
        [--analysis-refreshes 4] [--peer-loads 2] [--no-peer] [--database URL]

About 4 minutes on 2 busy CPU cores with the defaults (each peer load takes 15 to 40 s);
``--trials 1000 --loads 2 --refreshes 3 --analysis-refreshes 1 --peer-loads 1`` checks the
plumbing in about a minute. Needs Chromium at ``--chromium`` (default /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from sqlalchemy import func, insert, select

from benchmarks._timing import machine
from benchmarks.leaderboard_latency import Filled, populate, run, serve_peer, serving_ours
from search.results.cache import CACHE, completed
from search.space import REFERENCE_NAMES
from search.store.engine import Database
from search.store.models import TrialResult, utcnow

BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1280, "height": 900}
TARGET_FIRST_MS = 2000.0
TARGET_REFRESH_MS = 300.0
LOAD_TIMEOUT_MS = 120_000
PEER_TIMEOUT_MS = 300_000

# Each page's panels: name -> a JS expression (``q`` is querySelector) true once it is drawn.
SEARCH_PANELS = {
    "header": 'q("#search-state").textContent && q("#progress").children.length',
    "leaderboard": 'q("#leaderboard tbody tr")',
    "scatter": 'q("#pareto .scatterlayer .point")',
    "knobs": 'q("#knobs g.dimension")',
    "importance": 'q("#importance-note").textContent && q("#importance .barlayer .point")',
    "ablation": 'q("#ablation table")',
    "curves": 'q("#curves .scatterlayer .trace")',
}
SEARCH_ABOVE_FOLD = ("header", "scatter", "leaderboard")
LIST_PANELS = {
    "searches": 'q("#searches tbody tr")',
    "form": 'q("#new-search select[name=backbone] option")',
}
PEER_PANELS = {
    "history": 'q("#plot-history .point")',
    "pareto front": 'q("#graph-pareto-front .point")',
    "timeline": 'q("#graph-timeline .point")',
    "best trials": (
        '[...document.querySelectorAll("h5, h6")].some((h) => /^Trial \\d+/.test(h.textContent))'
    ),
}
PEER_ABOVE_FOLD = ("history", "pareto front")

# Installed before the page's own scripts: marks each panel at the first frame painted after it
# is drawn; records each Plotly.react (sync part and until its promise settles) by wrapping
# Plotly as plotly.min.js assigns ``window.Plotly``, the moment plotly.js finished evaluating,
# and long tasks.
INSTRUMENT = """
(() => {
  const b = (window.__bench = { marks: {}, found: {}, draws: [], longtasks: [] });
  const q = (s) => document.querySelector(s);
  const checks = { %s };
  const pending = new Set(Object.keys(checks));
  const check = () => {
    for (const name of [...pending]) {
      let ok = false;
      try { ok = Boolean(checks[name]()); } catch (_) { /* not there yet */ }
      if (!ok) continue;
      pending.delete(name);
      b.found[name] = performance.now();
      requestAnimationFrame(() => setTimeout(() => { b.marks[name] = performance.now(); }, 0));
    }
    if (!pending.size) observer.disconnect();
  };
  const observer = new MutationObserver(check);
  observer.observe(document, { subtree: true, childList: true, characterData: true });
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) b.longtasks.push([e.startTime, e.duration]);
    }).observe({ type: "longtask", buffered: true });
  } catch (_) { /* no long task timing */ }
  let plotly;
  Object.defineProperty(window, "Plotly", {
    configurable: true,
    get: () => plotly,
    set(value) {
      plotly = value;
      b.plotlyEvaluated = performance.now();
      const react = value.react;
      value.react = function (gd, ...rest) {
        const id = typeof gd === "string" ? gd : gd.id;
        const start = performance.now();
        const result = react.call(this, gd, ...rest);
        const sync = performance.now();
        const done = () => b.draws.push({ id, start, sync, end: performance.now() });
        Promise.resolve(result).then(done, done);
        return result;
      };
    },
  });
})();
"""

COLLECT = """(names) => ({
  marks: window.__bench.marks,
  draws: window.__bench.draws,
  longtasks: window.__bench.longtasks,
  plotlyEvaluated: window.__bench.plotlyEvaluated ?? null,
  dcl: performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd,
  resources: performance.getEntriesByType("resource").map((e) => ({
    url: e.name, start: e.startTime, end: e.responseEnd, size: e.encodedBodySize,
  })),
})"""

ALL_MARKED = "(names) => names.every((name) => name in window.__bench.marks)"

# Scroll down through the page's sections, a frame each, as a reader would.
SCROLL_THROUGH = """async () => {
  for (const section of document.querySelectorAll("main section")) {
    section.scrollIntoView();
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  }
}"""

# One refresh cycle of the page's own code (``window.dashboard``, set by app.js's searchPage):
# ``refresh`` (header, leaderboard, scatter: every 3 s while a search runs) or
# ``refreshAnalysis`` (knobs, importance, ablation, curves: every 15 s), until painted.
CYCLE = """async (name) => {
  const painted = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  const t0 = performance.now();
  await window.dashboard[name]();
  await painted();
  return { total: performance.now() - t0, t0 };
}"""

SINCE = """(t0) => ({
  draws: window.__bench.draws.filter((d) => d.start >= t0),
  resources: performance.getEntriesByType("resource").filter((e) => e.startTime >= t0).map((e) => ({
    url: e.name, start: e.startTime, end: e.responseEnd, size: e.encodedBodySize,
  })),
})"""


def instrument(panels: dict[str, str]) -> str:
    checks = ", ".join(f"{json.dumps(name)}: () => ({expr})" for name, expr in panels.items())
    return INSTRUMENT % checks


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def request_name(url: str) -> str:
    """``/api/v1/searches/<id>/knobs?x=1`` -> ``knobs``; the page's other files by path."""
    path = urlsplit(url).path
    if path.startswith("/api/v1/searches/"):
        rest = path.split("/", 5)[5:]
        return rest[0] if rest else "search"
    if path.startswith("/api/"):
        return path.removeprefix("/api/v1/").removeprefix("/api/")
    return path.rsplit("/", 1)[-1] or path


# -- loads ---------------------------------------------------------------------------------------


@dataclass
class Load:
    """One page load: when each panel was painted, its requests, draws and long tasks."""

    marks: dict[str, float]
    draws: list[dict[str, Any]]
    resources: list[dict[str, Any]]
    longtasks: list[list[float]]
    dcl: float
    plotly_evaluated: float | None

    def until(self, names: tuple[str, ...] | list[str]) -> float:
        return max(self.marks[name] for name in names)


@dataclass
class Kind:
    """A kind of measurement and its samples (ms), with the loads behind them where any."""

    name: str
    target: float | None = None
    ms: list[float] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)

    def add_parts(self, parts: dict[str, float]) -> None:
        for key, value in parts.items():
            self.parts.setdefault(key, []).append(value)


class Browsing:
    """Chromium and the pages it opens, each with the token and the instrumentation."""

    def __init__(self, browser: Browser, token: str) -> None:
        self.browser = browser
        self.token = token

    def context(self, panels: dict[str, str], signed_in: bool = True) -> BrowserContext:
        context = self.browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
        if signed_in:
            context.add_init_script(
                f"sessionStorage.setItem('cbamNasToken', {json.dumps(self.token)})"
            )
        context.add_init_script(instrument(panels))
        return context

    @staticmethod
    def load(
        context: BrowserContext,
        url: str,
        panels: dict[str, str],
        timeout: float,
        keep: bool = False,
        scroll_after: list[str] | None = None,
    ) -> tuple[Load, Page | None]:
        """Open ``url`` until every panel is drawn, scrolling down through the page as soon as the
        ``scroll_after`` panels are (panels below the fold draw when scrolled to)."""
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url, wait_until="commit")
        names = list(panels)
        try:
            if scroll_after:
                page.wait_for_function(ALL_MARKED, arg=scroll_after, timeout=timeout, polling=20)
                page.evaluate(SCROLL_THROUGH)
            page.wait_for_function(ALL_MARKED, arg=names, timeout=timeout, polling=200)
        except Exception as error:
            missing = page.evaluate("(n) => n.filter((k) => !(k in window.__bench.marks))", names)
            raise RuntimeError(f"{url}: not drawn: {missing}; page errors: {errors}") from error
        raw = page.evaluate(COLLECT, names)
        load = Load(
            raw["marks"], raw["draws"], raw["resources"], raw["longtasks"], raw["dcl"],
            raw["plotlyEvaluated"],
        )  # fmt: skip
        if not keep:
            page.close()
            return load, None
        return load, page


@contextmanager
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        try:
            yield launched
        finally:
            launched.close()


# -- the benchmark ---------------------------------------------------------------------------------


def first_render_kinds() -> dict[str, Kind]:
    return {
        "recomputed": Kind("search page, browser cold, server answers dropped", TARGET_FIRST_MS),
        "cold": Kind("search page, browser cold, server answers cached", TARGET_FIRST_MS),
        "warm": Kind("search page, browser warm, server answers cached", TARGET_FIRST_MS),
    }


def add_completed_trial(db: Database, search_id: str) -> None:
    """A copy of the search's latest completed row under the next number, finished now: the
    search's version changes as when a worker tells a trial (answers recomputed, ETags new)."""
    columns = [c for c in TrialResult.__table__.columns if c.key != "id"]
    with db.session() as session:
        latest = session.execute(
            select(*columns)
            .where(*completed(search_id))
            .order_by(TrialResult.finished_at.desc(), TrialResult.id.desc())
            .limit(1)
        ).one()
        number = session.scalar(
            select(func.max(TrialResult.number)).where(TrialResult.search_id == search_id)
        )
        row = {**latest._asdict(), "number": number + 1, "optuna_number": None}
        row.update(reference=None, finished_at=utcnow())
        session.execute(insert(TrialResult), [row])


def run_ours(
    browsing: Browsing, db: Database, base: str, search_id: str, args: argparse.Namespace
) -> dict[str, Kind]:
    search_url = f"{base}/searches/{search_id}"
    kinds = first_render_kinds()
    every = {key: Kind(kind.name + ", every panel") for key, kind in kinds.items()}
    listing = Kind("searches list, browser cold", TARGET_FIRST_MS)
    fast = Kind("fast refresh, nothing new", TARGET_REFRESH_MS)
    fast_new = Kind("fast refresh after a trial completed", TARGET_REFRESH_MS)
    slow = Kind("analysis refresh, nothing new")
    slow_new = Kind("analysis refresh after a trial completed")

    def open_search(context: BrowserContext, keep: bool = False) -> tuple[Load, Page | None]:
        return browsing.load(
            context, search_url, SEARCH_PANELS, LOAD_TIMEOUT_MS, keep, list(SEARCH_ABOVE_FOLD)
        )

    # Untimed: the server's answers computed once, the first request of each kind served.
    warm_context = browsing.context(SEARCH_PANELS)
    for _ in range(2):  # twice: V8 keeps the compiled code of a script run twice from the cache
        open_search(warm_context)

    def cold(key: str) -> None:
        if key == "recomputed":
            CACHE.clear()
        context = browsing.context(SEARCH_PANELS)
        try:
            load, _ = open_search(context)
        finally:
            context.close()
        record(key, load)

    def record(key: str, load: Load) -> None:
        kinds[key].ms.append(load.until(SEARCH_ABOVE_FOLD))
        kinds[key].loads.append(load)
        every[key].ms.append(load.until(list(SEARCH_PANELS)))

    for _ in range(args.loads):
        cold("recomputed")
        cold("cold")
        load, _ = open_search(warm_context)
        record("warm", load)
        context = browsing.context(LIST_PANELS)
        try:
            load, _ = browsing.load(context, f"{base}/", LIST_PANELS, LOAD_TIMEOUT_MS)
        finally:
            context.close()
        listing.ms.append(load.until(list(LIST_PANELS)))
        listing.loads.append(load)

    # Refreshes, in one loaded page (the search is finished: the page's own timers have stopped).
    _, page = open_search(warm_context, keep=True)
    assert page is not None

    def refresh(kind: Kind, cycle: str, new_trial: bool) -> None:
        if new_trial:
            add_completed_trial(db, search_id)
        time.sleep(0.1)
        result = page.evaluate(CYCLE, cycle)
        kind.ms.append(result.pop("total"))
        since = page.evaluate(SINCE, result.pop("t0"))
        for resource in since["resources"]:
            name = request_name(resource["url"])
            result[f"request {name}"] = resource["end"] - resource["start"]
        for draw in since["draws"]:
            result[f"Plotly.react {draw['id']}"] = draw["end"] - draw["start"]
        kind.add_parts(result)

    refresh(fast, "refresh", False)  # untimed warm-up of the code paths
    fast.ms.clear()
    fast.parts.clear()
    # The analysis cycle after a new trial also finds the answers the fast cycle's trial changed.
    for i in range(args.refreshes):
        refresh(fast_new, "refresh", True)
        refresh(fast, "refresh", False)
        if i < args.analysis_refreshes:
            refresh(slow_new, "refreshAnalysis", True)
            refresh(slow, "refreshAnalysis", False)
    page.close()
    warm_context.close()
    return {
        **{f"first {key}": kind for key, kind in kinds.items()},
        **{f"every {key}": kind for key, kind in every.items()},
        "list": listing,
        "fast": fast,
        "fast new": fast_new,
        "slow": slow,
        "slow new": slow_new,
    }


def run_peer(browsing: Browsing, db: Database, filled: Filled, args: argparse.Namespace) -> Kind:
    peer = Kind("optuna-dashboard, browser cold, trial cache emptied")
    study_id = db.optuna_storage().get_study_id_from_name(filled.study_name)
    with serve_peer(db.url) as peer_url, httpx.Client(base_url=peer_url, timeout=900) as client:
        # Untimed: its importances (cached per trial count), else they hold its one thread.
        client.get(f"/api/studies/{study_id}/param_importances").raise_for_status()
        for _ in range(args.peer_loads):
            client.get("/__bench__/clear-cache").raise_for_status()
            context = browsing.context(PEER_PANELS, signed_in=False)
            try:
                url = f"{peer_url}/dashboard/studies/{study_id}"
                load, _ = browsing.load(context, url, PEER_PANELS, PEER_TIMEOUT_MS)
            finally:
                context.close()
            peer.ms.append(load.until(list(PEER_PANELS)))
            peer.loads.append(load)
            peer.add_parts({"above the fold": load.until(PEER_ABOVE_FOLD)})
    return peer


def benchmark(db: Database, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    filled = populate(db, args)
    populate_s = time.perf_counter() - start
    with serving_ours(db, tmp, args.trials) as (base, token), browser(args.chromium) as chromium:
        browsing = Browsing(chromium, token)
        start = time.perf_counter()
        kinds = run_ours(browsing, db, base, filled.search_id, args)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        peer = None
        if args.peer_loads:
            try:
                peer = run_peer(browsing, db, filled, args)
            except RuntimeError as error:  # ours still reported
                print(f"optuna-dashboard: {error}")
        peer_s = time.perf_counter() - start
        version = chromium.version
    return {
        "filled": filled,
        "populate_s": populate_s,
        "ours_s": ours_s,
        "peer_s": peer_s,
        "kinds": kinds,
        "peer": peer,
        "chromium": version,
    }


# -- report ----------------------------------------------------------------------------------------


def _verdict(ms: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"{'PASS' if ms <= target else 'FAIL'} (<= {target:,.0f})"


def _row(label: str, samples: list[float], target: float | None = None) -> str:
    if not samples:
        return f"  {label:<62}{'-':>5}"
    p50 = median(samples)
    spread = f"{min(samples):,.0f}-{max(samples):,.0f}"
    return f"  {label:<62}{len(samples):>5}{p50:>10,.0f}{spread:>15}  {_verdict(p50, target)}"


def _breakdown(loads: list[Load], indent: str = "    ") -> list[str]:
    """Where a first render's time goes: plotly.min.js, each request and draw, long tasks."""
    lines = []
    plotly = [
        (r, load) for load in loads for r in load.resources if r["url"].endswith("plotly.min.js")
    ]
    if plotly:
        size = plotly[0][0]["size"] / 1024
        download = median([r["end"] - r["start"] for r, _ in plotly])
        evaluated = [
            load.plotly_evaluated - r["end"] for r, load in plotly if load.plotly_evaluated
        ]
        ready = [load.plotly_evaluated for _, load in plotly if load.plotly_evaluated]
        lines.append(
            f"{indent}plotly.min.js {size:,.0f} KiB: transfer {download:,.0f} ms, parse + run "
            f"{median(evaluated):,.0f} ms, Plotly ready at {median(ready):,.0f} ms"
        )
    lines.append(f"{indent}DOMContentLoaded at {median([load.dcl for load in loads]):,.0f} ms")
    panels = sorted(loads[0].marks, key=lambda name: median([ld.marks[name] for ld in loads]))
    painted = ", ".join(
        f"{name} {median([ld.marks[name] for ld in loads]):,.0f}" for name in panels
    )
    lines.append(f"{indent}painted at (ms): {painted}")
    requests: dict[str, list[dict[str, Any]]] = {}
    for load in loads:
        for r in load.resources:
            name = request_name(r["url"])
            if r["url"].endswith((".js", ".css")) and "/api/" not in r["url"]:
                continue
            requests.setdefault(name, []).append(r)
    if requests:
        lines.append(f"{indent}{'request':<24}{'per load':>9}{'KiB':>8}{'ms':>8}{'done at':>9}")
        for name, rs in sorted(requests.items(), key=lambda kv: median([r["end"] for r in kv[1]])):
            lines.append(
                f"{indent}{name:<24}{len(rs) / len(loads):>9.1f}{rs[0]['size'] / 1024:>8,.0f}"
                f"{median([r['end'] - r['start'] for r in rs]):>8,.0f}"
                f"{median([r['end'] for r in rs]):>9,.0f}"
            )
    draws: dict[str, list[dict[str, Any]]] = {}
    for load in loads:
        for d in load.draws:
            draws.setdefault(d["id"], []).append(d)
    if draws:
        text = ", ".join(
            f"{div} {median([d['end'] - d['start'] for d in ds]):,.0f} ms"
            + (f" (x{len(ds) / len(loads):.1f})" if len(ds) != len(loads) else "")
            for div, ds in sorted(draws.items(), key=lambda kv: -median([d["end"] for d in kv[1]]))
        )
        lines.append(f"{indent}Plotly.react per chart: {text}")
    busy = [sum(d for _, d in load.longtasks) for load in loads]
    longest = [max((d for _, d in load.longtasks), default=0.0) for load in loads]
    lines.append(
        f"{indent}long tasks (> 50 ms): {median(busy):,.0f} ms in all, longest "
        f"{median(longest):,.0f} ms"
    )
    return lines


def report(result: dict[str, Any], db: Database, args: argparse.Namespace) -> bool:
    import optuna_dashboard
    import plotly

    filled: Filled = result["filled"]
    kinds: dict[str, Kind] = result["kinds"]
    peer: Kind | None = result["peer"]
    counts = ", ".join(f"{n:,} {state}" for state, n in sorted(filled.counts.items()))
    print(
        f"dashboard render: {args.trials:,} trials ({filled.rows:,} attempts: {counts}) in "
        f"{db.dialect}; Chromium {result['chromium']} headless (software WebGL), "
        f"{VIEWPORT['width']}x{VIEWPORT['height']}; plotly.js of plotly {plotly.__version__}; "
        f"peer optuna-dashboard {optuna_dashboard.__version__}"
    )
    print(
        f"populate {result['populate_s']:.1f} s, ours {result['ours_s']:.0f} s, "
        f"peer {result['peer_s']:.0f} s; times in ms from navigation start (first render) or "
        f"from the cycle's first request (refresh), until painted"
    )
    print(f"  {'':<62}{'n':>5}{'median':>10}{'min-max':>15}  target")
    print("first render")
    for key in ("recomputed", "cold", "warm"):
        first, every = kinds[f"first {key}"], kinds[f"every {key}"]
        print(_row(first.name + ": first view", first.ms, first.target))
        print(_row("  every panel (scrolled down once the first view is drawn)", every.ms))
    print(_row(kinds["list"].name, kinds["list"].ms, kinds["list"].target))
    if peer is not None:
        print(_row(peer.name + ": every plot", peer.ms))
        print(_row("  above the fold (history, Pareto front)", peer.parts["above the fold"]))
    print("refresh")
    for key in ("fast", "fast new", "slow", "slow new"):
        print(_row(kinds[key].name, kinds[key].ms, kinds[key].target))

    if peer is not None:
        print(
            "ours / peer (medians; our server's answers dropped, the peer's trial cache emptied):"
        )
        ours_all, ours_above = kinds["every recomputed"].ms, kinds["first recomputed"].ms
        for label, mine, theirs in (
            ("first view / above the fold", ours_above, peer.parts["above the fold"]),
            ("every panel / every plot", ours_all, peer.ms),
        ):
            a, b = median(mine), median(theirs)
            faster = f"ours {b / a:.1f}x faster" if a <= b else f"ours {a / b:.1f}x slower"
            print(f"  {label:<30} {a:8,.0f} / {b:8,.0f} ms = {a / b:.3f} ({faster})")

    print("where the time goes")
    for key in ("cold", "recomputed", "warm"):
        print(f"  first render, {kinds[f'first {key}'].name.split(', ', 1)[1]}:")
        for line in _breakdown(kinds[f"first {key}"].loads):
            print(line)
    if peer is not None:
        print("  optuna-dashboard study page:")
        for line in _breakdown(peer.loads):
            print(line)
    for key in ("fast", "fast new", "slow", "slow new"):
        kind = kinds[key]
        done, requests, draws = [], [], []
        for name, values in kind.parts.items():
            into = requests if name.startswith("request ") else done
            into = draws if name.startswith("Plotly.react ") else into
            into.append(f"{name.split(' ', 1)[-1]} {median(values):,.0f}")
        print(f"  {kind.name} (medians, ms):")
        if done:
            print(f"    done at: {', '.join(done)}")
        print(f"    requests: {', '.join(requests)}; Plotly.react: {', '.join(draws) or '-'}")

    first = [median(kinds[f"first {key}"].ms) for key in ("cold", "recomputed")]
    first_ok = max(first) <= TARGET_FIRST_MS
    refresh_ok = max(median(kinds["fast"].ms), median(kinds["fast new"].ms)) <= TARGET_REFRESH_MS
    print(
        f"target first render <= {TARGET_FIRST_MS:,.0f} ms (browser cache cold, first view, "
        f"server answers cached / dropped): {'PASS' if first_ok else 'FAIL'} "
        f"({first[0]:,.0f} / {first[1]:,.0f} ms; every panel, scrolled down at once: "
        f"{median(kinds['every cold'].ms):,.0f} / {median(kinds['every recomputed'].ms):,.0f} ms)"
    )
    print(
        f"target refresh <= {TARGET_REFRESH_MS:,.0f} ms (fast panels, nothing new / after a "
        f"trial completed): {'PASS' if refresh_ok else 'FAIL'} ({median(kinds['fast'].ms):,.0f}"
        f" / {median(kinds['fast new'].ms):,.0f} ms)"
    )
    print(f"machine: {machine()}; {os.cpu_count()} CPUs visible")
    return first_ok and refresh_ok


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=5, help="timed first renders of each kind")
    parser.add_argument("--refreshes", type=int, default=15, help="timed fast refreshes")
    parser.add_argument("--analysis-refreshes", type=int, default=4)
    parser.add_argument(
        "--peer-loads", type=int, default=2, help="optuna-dashboard loads (0: no peer)"
    )
    parser.add_argument("--no-peer", dest="peer_loads", action="store_const", const=0)
    parser.add_argument(
        "--database", default=None, help="a database URL (default: a temporary SQLite file)"
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < len(REFERENCE_NAMES) + 1:
        parser.error(f"--trials must be at least {len(REFERENCE_NAMES) + 1}")
    if args.loads < 1 or args.refreshes < 1:
        parser.error("--loads and --refreshes must be at least 1")
    args.add_trials = False  # what populate reads
    args.intermediate_values = True
    return run(args, benchmark, report)


if __name__ == "__main__":
    main()
