// The dashboard's scripts: read the API with the session's token, draw tables and plotly charts.
// No build step and no framework: one page function per template, chosen by <body data-page>.
"use strict";

const TOKEN_KEY = "cbamNasToken";
const TOKEN_COOKIE = "cbam_nas_token";
const REFRESH_MS = 3000;
const SLOW_REFRESH_MS = 15000;
const ACTIVE = new Set(["queued", "running"]);
const PLOT_CONFIG = { displaylogo: false, responsive: true };

// ---- helpers -----------------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = {
  pct: (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(2)),
  signed: (x, digits = 2) =>
    x === null || x === undefined ? "–" : (x > 0 ? "+" : "") + x.toFixed(digits),
  interval: (b) => (b ? `${(100 * b[0]).toFixed(2)}–${(100 * b[1]).toFixed(2)}` : "–"),
  si(x) {
    if (x === null || x === undefined) return "–";
    for (const [f, p] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (Math.abs(x) >= f) return (x / f).toFixed(3) + " " + p;
    }
    return String(Math.round(x * 1000) / 1000);
  },
  ms: (x) => (x === null || x === undefined ? "–" : x.toFixed(2) + " ms"),
  time: (iso) => (iso ? new Date(iso).toLocaleString() : "–"),
  duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  },
};

// Overhead name -> [absolute column, percent column, axis title, formatter]
const OVERHEADS = {
  params: ["params", "params_pct", "parameters", fmt.si],
  macs: ["macs", "macs_pct", "multiply-accumulates", fmt.si],
  latency: ["latency_ms", "latency_pct", "latency (ms)", fmt.ms],
};

// plotly.js (4.7 MB, about a second to parse and run) loads async on the search page: tables
// draw without it, charts wait for it. On other pages it is already there.
function plotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  const script = document.getElementById("plotly-js");
  if (!script) return Promise.reject(new Error("plotly.js is not on this page"));
  return new Promise((resolve, reject) => {
    script.addEventListener("load", () => resolve(window.Plotly));
    script.addEventListener("error", () => reject(new Error("plotly.js did not load")));
  });
}

function showAlert(message) {
  const box = $("#alert");
  box.textContent = message;
  box.hidden = !message;
}

// ---- the API and the token ----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(ApiError.describe(detail));
    this.status = status;
    this.detail = detail;
  }
  static describe(detail) {
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("\n");
    return typeof detail === "string" ? detail : JSON.stringify(detail);
  }
}

const auth = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    // For plain links (downloads): the server accepts this cookie for reads only.
    document.cookie = `${TOKEN_COOKIE}=${encodeURIComponent(token)}; path=/; SameSite=Strict`;
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    document.cookie = `${TOKEN_COOKIE}=; path=/; max-age=0; SameSite=Strict`;
  },
  // Reads need a token unless the server opened them; pages wait for one instead of failing.
  get usable() {
    return Boolean(this.token) || document.body.dataset.readOpen === "true";
  },
};

// What each panel last drew: the URL and ETag of its answer, for ``api(..., { panel })``.
const drawn = new Map();

// With ``panel`` (a name), answers null when that panel last drew this very answer: the same
// URL with the same ETag (the analysis routes send ETags; the browser revalidates them).
async function api(path, { method = "GET", body, params, panel } = {}) {
  const url = new URL("/api/v1" + path, location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const headers = {};
  if (auth.token) headers.Authorization = "Bearer " + auth.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail;
    } catch (_) {
      /* not JSON: keep the status text */
    }
    if (response.status === 401) {
      auth.clear();
      askForToken("The token was refused: " + ApiError.describe(detail));
    }
    throw new ApiError(response.status, detail);
  }
  if (panel) {
    const tag = response.headers.get("ETag");
    const seen = tag ? `${url.href} ${tag}` : null;
    if (seen && drawn.get(panel) === seen) return null;
    drawn.set(panel, seen);
  }
  return response.status === 204 ? null : response.json();
}

// What the caller's token may do (GET /me). Controls that change state show only where the
// server would accept them, and none before it has said so.
const rights = { canWrite: false, canAdmin: false };

async function loadRights() {
  const me = await api("/me");
  rights.canWrite = me.can_write;
  rights.canAdmin = me.can_admin;
  document.body.dataset.scope = me.scope;
  $("#token-state").textContent = me.name ? `token ${me.name} (${me.scope})` : "reads open";
}

function askForToken(message) {
  $("#token-form").hidden = false;
  $("#token-state").textContent = "";
  if (message) showAlert(message);
}

function setUpToken(start) {
  const form = $("#token-form");
  // The page starts once its rights are known; a refused token asks for another instead.
  const begin = async () => {
    try {
      await loadRights();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return;
      showAlert(String(error.message));  // the page still reads, with no control that writes
    }
    start();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#token-input").value.trim();
    if (!value) return;
    auth.set(value);
    form.hidden = true;
    showAlert("");
    $("#token-state").textContent = "token set";
    begin();
  });
  if (auth.token) auth.set(auth.token);  // the cookie lives as long as the browser session
  if (auth.usable) {
    $("#token-state").textContent = auth.token ? "token set" : "reads open";
    begin();
  } else {
    askForToken("Enter an API token to see the searches (cbam-nas serve printed one).");
  }
}

// Run `task` now and every `ms` while `keepGoing()` holds; errors show in the alert box.
function every(ms, task, keepGoing = () => true) {
  let timer = null;
  const run = async () => {
    try {
      await task();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) showAlert(String(error.message));
    }
    if (keepGoing()) timer = setTimeout(run, document.hidden ? ms * 3 : ms);
  };
  run();
  return () => clearTimeout(timer);
}

function progressBar(progress) {
  const width = (n) => `${(100 * n) / Math.max(1, progress.budget)}%`;
  const bar = el("div", { class: "progress", title: progressText(progress) });
  for (const key of ["completed", "pruned", "failed", "running"]) {
    const n = key === "failed" ? progress.failed + progress.over_budget : progress[key];
    if (n > 0) bar.append(el("span", { class: key, style: `width:${width(n)}` }));
  }
  return bar;
}

// The schedule an entry's figures come from, marked where its run was still learning.
function epochsCell(e) {
  const epochs = e.fidelity_epochs ?? e.epochs_run;
  const check = e.convergence || {};
  if (e.converged !== false || check.last_gain_pp == null) {
    return el("td", { class: "epochs" }, epochs ?? "–");
  }
  const title =
    `still rising: +${check.last_gain_pp.toFixed(1)} points over its last ${check.window} ` +
    `epochs, beyond one run's noise (±${check.noise_pp.toFixed(1)})`;
  return el("td", { class: "epochs rising", title }, `${epochs} ↗`);
}

// The split is known once a trial has started; its noise floor only once one has a result.
function validationText(p) {
  if (!p.val_images) return "–";
  const floor = p.noise_floor_pp == null ? "" : `, one run ±${p.noise_floor_pp.toFixed(2)} points`;
  return `${p.val_images} images${floor}`;
}

const VERDICT_MARKS = { better: "↑", worse: "↓", tied: "≈" };

// A delta against a reference with its verdict's mark and, as a tooltip, its interval.
function verdictCell(entry, reference) {
  const verdict = entry[`verdict_vs_${reference}`] || "untested";
  const ci = entry[`delta_vs_${reference}_ci95`];
  const title = ci ? `${verdict}; 95% CI ${fmt.signed(ci[0])} to ${fmt.signed(ci[1])} points` : verdict;
  return el("td", { class: `verdict ${verdict}`, title },
    fmt.signed(entry[`delta_vs_${reference}`]) + (VERDICT_MARKS[verdict] || ""));
}

function progressText(p) {
  return (
    `${p.done}/${p.budget} done · ${p.completed} completed · ${p.running} running · ` +
    `${p.pruned} pruned · ${p.failed + p.over_budget} failed`
  );
}

function pager(container, { total, offset, limit }, go) {
  container.replaceChildren(
    el("button", { type: "button", disabled: offset <= 0, onclick: () => go(Math.max(0, offset - limit)) }, "‹ previous"),
    el("span", { class: "muted" }, total ? `${offset + 1}–${Math.min(total, offset + limit)} of ${total}` : "none"),
    el("button", { type: "button", disabled: offset + limit >= total, onclick: () => go(offset + limit) }, "next ›"),
  );
}

// ---- page: searches -----------------------------------------------------------------------

function searchesPage() {
  const limit = 20;
  let offset = 0;
  const filter = $("#state-filter");

  async function refresh() {
    const page = await api("/searches", { params: { state: filter.value, limit, offset } });
    const rows = page.items.map((s) =>
      el(
        "tr",
        { "data-id": s.id },
        el("td", {}, el("a", { href: `/searches/${s.id}` }, s.name || s.id.slice(0, 8)),
          " ", el("span", { class: "muted small" }, s.id.slice(0, 8))),
        el("td", {}, el("span", { class: `state ${s.state}` }, s.state)),
        el("td", {}, progressBar(s.progress), el("span", { class: "muted small" }, progressText(s.progress))),
        el("td", {}, s.progress.best ? fmt.pct(s.progress.best.val_accuracy) : "–"),
        el("td", {}, fmt.time(s.started_at)),
        el("td", {}, fmt.duration(s.progress.eta_s)),
        el("td", {}, ACTIVE.has(s.state) && rights.canWrite
          ? el("button", { type: "button", class: "cancel", onclick: () => cancel(s.id) }, "Cancel")
          : ""),
      ),
    );
    $("#searches tbody").replaceChildren(...rows);
    pager($("#searches-pager"), page, (next) => { offset = next; refresh(); });
  }

  async function cancel(id) {
    if (!confirm(`Cancel search ${id.slice(0, 8)}? Running trials stop at their next epoch.`)) return;
    try {
      await api(`/searches/${id}/cancel`, { method: "POST" });
    } catch (error) {
      showAlert(error.message);
    }
    refresh();
  }

  filter.addEventListener("change", () => { offset = 0; refresh(); });
  setUpToken(async () => {
    every(REFRESH_MS, refresh);
    $("#new-search-section").hidden = !rights.canWrite;
    if (rights.canWrite) newSearchForm(await api("/choices"));
  });
}

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => el("option", { value: v, selected: v === selected }, v)));
}

function fillChecks(container, name, values, checked) {
  container.replaceChildren(
    ...values.map((v) =>
      el("label", {}, el("input", { type: "checkbox", name, value: v, checked: checked.includes(v) }), v),
    ),
  );
}

// "3, 7" -> [3, 7]; anything that is not a number is sent as typed, for the server to name.
function numbers(text) {
  return text.split(/[\s,]+/).filter(Boolean).map((t) => (/^-?\d+$/.test(t) ? Number(t) : t));
}

function newSearchForm(choices) {
  const form = $("#new-search");
  const d = choices.defaults;
  // Ours are offered; a timm or torchvision model is typed by name (timm:resnet18).
  $("#backbones").replaceChildren(...Object.keys(choices.backbones).map((v) => el("option", { value: v })));
  form.backbone.value = d.backbone;
  fillSelect(form.dataset, choices.datasets, "cluttered-digits");
  fillSelect(form.sampler, choices.samplers, d.sampler);
  fillSelect(form.early_stopping, choices.early_stopping, d.early_stopping.policy);
  fillChecks($("#arrangements"), "arrangements", choices.arrangements, choices.arrangements);
  fillChecks($("#blocks"), "blocks", choices.blocks, choices.blocks);
  fillChecks($("#overheads"), "overheads", choices.overheads, ["params"]);
  form.trials.max = choices.max_trials;

  const checked = (name) => [...form.querySelectorAll(`input[name=${name}]:checked`)].map((i) => i.value);

  function spec() {
    const dataset = { name: form.dataset.value };
    const options = form.dataset_options.value.trim();
    if (options) {
      try {
        dataset.options = JSON.parse(options);
      } catch (error) {
        throw new ApiError(422, [{ field: "dataset.options", msg: `dataset.options: not JSON (${error.message})` }]);
      }
    }
    return {
      name: form.name.value,
      backbone: form.backbone.value.trim(),
      dataset,
      space: {
        arrangements: checked("arrangements"),
        reductions: numbers(form.reductions.value),
        pool_types: form.pool_types.value.split(",").map((s) => s.trim()).filter(Boolean)
          .map((s) => s.split("+").map((p) => p.trim())),
        kernel_sizes: numbers(form.kernel_sizes.value),
        blocks: checked("blocks"),
      },
      objectives: { overheads: checked("overheads") },
      budget: { trials: numbers(form.trials.value)[0] },
      training: { epochs: numbers(form.epochs.value)[0] },
      sampler: form.sampler.value,
      early_stopping: { policy: form.early_stopping.value },
      seed: numbers(form.seed.value)[0],
    };
  }

  function clearErrors() {
    for (const field of form.querySelectorAll(".field")) {
      field.classList.remove("invalid");
      $(".error", field).textContent = "";
    }
  }

  // The API names the field as a dotted path ("space.kernel_sizes[0]"); show the message next
  // to the form field for the nearest enclosing path.
  function showErrors(detail) {
    const items = Array.isArray(detail) ? detail : [{ msg: String(detail) }];
    for (const item of items) {
      let path = item.field || (item.loc || []).filter((p) => p !== "body" && typeof p === "string").join(".");
      path = (path || "spec").replace(/\[\d+\]/g, "");
      let field = null;
      for (let p = path; p && !field; p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "") {
        field = form.querySelector(`.field[data-field="${p}"]`);
      }
      field = field || form.querySelector('.field[data-field="spec"]');
      field.classList.add("invalid");
      const error = $(".error", field);
      error.textContent = (error.textContent ? error.textContent + "\n" : "") + item.msg;
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    $("#submit-result").textContent = "";
    try {
      const created = await api("/searches", { method: "POST", body: spec() });
      $("#submit-result").replaceChildren(
        "created ", el("a", { href: `/searches/${created.id}` }, created.id.slice(0, 8)),
      );
      location.assign(`/searches/${created.id}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 422) showErrors(error.detail);
      else if (error instanceof ApiError) showErrors(error.detail);
      else showAlert(error.message);
    }
  });
}

// ---- page: one search ---------------------------------------------------------------------

function searchPage() {
  const id = document.body.dataset.search;
  const view = { overhead: "params", sort: "rank", order: "asc", offset: 0, limit: 20, state: null };
  const overheadSelect = $("#overhead");

  const active = () => view.state === null || ACTIVE.has(view.state);

  async function header() {
    const search = await api(`/searches/${id}`);
    const wasActive = view.state !== null && active();  // not on the first call
    view.state = search.state;
    document.title = `${search.name || id.slice(0, 8)} · cbam-nas`;
    $("#search-title").textContent = search.name || `Search ${id.slice(0, 8)}`;
    const state = $("#search-state");
    state.textContent = search.state;
    state.className = `state ${search.state}`;
    $("#cancel").hidden = !(rights.canWrite && ACTIVE.has(search.state));
    $("#delete").hidden = !(rights.canAdmin && !ACTIVE.has(search.state));
    const p = search.progress;
    $("#progress").replaceChildren(
      progressBar(p),
      el("span", {}, progressText(p)),
      el("span", {}, "best: ", p.best ? `${fmt.pct(p.best.val_accuracy)} (trial ${p.best.number}, ${p.best.label})` : "–"),
      el("span", {}, "ETA: ", fmt.duration(p.eta_s)),
      el("span", { class: "muted" }, `${search.spec.backbone} on ${search.spec.dataset.name}`),
    );
    const c = p.confirmation || {};
    const runs = Object.entries(c).filter(([, n]) => n).map(([state, n]) => `${n} ${state}`);
    const agreement = search.rank_agreement;
    const unfinished = Object.entries(search.references_convergence || {})
      .filter(([, c]) => c.converged === false)
      .map(([name, c]) => `${name} (+${c.last_gain_pp.toFixed(2)} points over its last ${c.window} epochs` +
        (c.by_epoch ? `; by about epoch ${c.by_epoch}` : "") + ")");
    $("#convergence-warning").hidden = !unfinished.length;
    $("#convergence-warning").textContent = unfinished.length
      ? `The references had not finished learning: ${unfinished.join(", ")}. ` +
        "A longer schedule (confirm.epochs) may change the comparison."
      : "";
    const spearman = (r) => `Spearman ${fmt.signed(r.rho)}` +
      (r.ci95 ? ` (95% CI ${fmt.signed(r.ci95[0])} to ${fmt.signed(r.ci95[1])})` : "") + ` over ${r.n}`;
    const rungs = (search.rung_agreement || []).filter((r) => r.rho !== null);
    $("#reliability").replaceChildren(
      el("span", {}, "confirmation: ", runs.length ? runs.join(", ") : "none yet"),
      el("span", {}, "validation: ", validationText(p)),
      el("span", {}, "rank agreement (exploration vs confirmation): ",
        agreement && agreement.rho !== null ? spearman(agreement) : "–"),
      el("span", { id: "rung-agreement" }, "early-stopping rungs vs final: ",
        rungs.length ? rungs.map((r) => `epoch ${r.epoch}: ${spearman(r)}`).join("; ") : "–"),
    );
    if (wasActive && !active()) refreshAnalysis();  // once more with the final trials
  }

  async function leaderboard() {
    const [absolute, pctKey, , format] = OVERHEADS[view.overhead];
    const sort = view.sort === "overhead" ? absolute : view.sort;
    const board = await api(`/searches/${id}/leaderboard`, {
      params: { overhead: view.overhead, limit: view.limit, offset: view.offset, sort, order: view.order },
    });
    const o = view.overhead;
    const top = new Set(board.top_group);
    const answer = (e) =>
      e.arch_id === board.recommended ? "recommended" : top.has(e.arch_id) ? "top group" : "";
    const rows = board.entries.map((e) =>
      el(
        "tr",
        {
          class: [e.reference ? "reference" : "", answer(e).replace(" ", "-")].join(" ").trim(),
          "data-number": e.number,
        },
        el("td", {}, e.rank),
        el("td", { class: "number" }, el("a", { href: `/searches/${id}/trials/${e.number}` }, e.number)),
        el("td", {}, e.label, e.reference ? el("span", { class: "muted" }, ` (${e.reference})`) : ""),
        el("td", { class: "acc" }, fmt.pct(e.val_accuracy_mean ?? e.val_accuracy)),
        el("td", { class: "ci" }, fmt.interval(e.val_accuracy_ci95)),
        el("td", { class: "seeds" }, e.n_seeds ?? 1),
        el("td", { class: "test", title: fmt.interval(e.test_accuracy_ci95) },
          fmt.pct(e.test_accuracy_mean ?? e.test_accuracy)),
        ...["none", "se", "cbam"].map((ref) => verdictCell(e, ref)),
        el("td", { class: "overhead" }, format(e[absolute])),
        el("td", {}, e[pctKey] === null ? "–" : fmt.signed(e[pctKey]) + "%"),
        el("td", {}, e[`${o}_delta_vs_se`] === null ? "–" : fmt.signed(e[`${o}_delta_vs_se`]) + "%"),
        epochsCell(e),
        el("td", {}, e.pareto ? "★" : ""),
        el("td", { class: "answer" }, answer(e)),
      ),
    );
    $("#leaderboard tbody").replaceChildren(...rows);
    $("#leaderboard-note").textContent = board.confirmed
      ? "Confirmed: each architecture over its seeds, mean and 95% CI; Δ against each reference " +
        "paired on shared seeds (↑ better, ↓ worse, ≈ tied at α = 0.05, Holm-corrected). " +
        "The top group cannot be told apart from the best; the recommendation is its cheapest member."
      : "Exploration only: one seed per trial. The 95% CI is one run's noise floor on the " +
        "validation split; no difference here is tested. The confirmation's runs decide.";
    $("#noise-warning").hidden = !board.within_noise;
    $("#noise-warning").textContent = board.within_noise
      ? `The accuracies on this page span ${board.spread_pp.toFixed(2)} points, less than one ` +
        `run's noise floor on the validation split (±${board.noise_floor_pp.toFixed(2)}): ` +
        "their order is noise. More seeds (the confirmation) or a larger split would tell them apart."
      : "";
    $("#overhead-header").textContent = OVERHEADS[view.overhead][2];
    for (const th of document.querySelectorAll("#leaderboard th[data-sort]")) {
      th.classList.toggle("sorted-asc", th.dataset.sort === view.sort && view.order === "asc");
      th.classList.toggle("sorted-desc", th.dataset.sort === view.sort && view.order === "desc");
    }
    pager($("#leaderboard-pager"), board, (next) => { view.offset = next; leaderboard(); });
  }

  for (const th of document.querySelectorAll("#leaderboard th[data-sort]")) {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      // A new column starts with its best first: accuracy high to low, the rest low to high.
      if (view.sort === key) view.order = view.order === "asc" ? "desc" : "asc";
      else view.order = key === "val_accuracy" ? "desc" : "asc";
      view.sort = key;
      view.offset = 0;
      leaderboard().catch((error) => showAlert(error.message));
    });
  }

  // Charts draw as their answers (and plotly.js) arrive; unchanged answers (ETag) are not drawn
  // again. ``tables`` settles once the header and the leaderboard are drawn.
  function fast() {
    const tables = Promise.all([header(), leaderboard()]);
    return { tables, all: Promise.all([tables, scatterPlot(id, view.overhead)]) };
  }

  // The analysis panels sit below the fold. Their answers are requested with the first view
  // (the server computes them, the browser keeps them), but each chart draws when first
  // scrolled near: a plotly chart costs ~0.1 s of a slow machine's main thread, and the first
  // view should not wait for charts it does not show. After that they refresh with the slow
  // cycle. The ablation tables are plain HTML: they draw at once.
  const analysisPanels = [
    { element: $("#knobs"), draw: () => knobsPlot(id), path: "knob-paths" },
    { element: $("#importance"), draw: () => importancePlot(id), path: "importance" },
    { element: $("#ablation"), draw: () => ablationTables(id, view.overhead), eager: true },
    { element: $("#curves"), draw: () => curvesPlot(id), path: "curves", params: { top: 5 } },
  ];

  function refreshAnalysis() {
    return Promise.all(analysisPanels.filter((p) => p.seen || p.eager).map((p) => p.draw()))
      .catch((error) => showAlert(error.message));
  }

  function startAnalysis() {
    for (const panel of analysisPanels.filter((p) => p.path)) {
      api(`/searches/${id}/${panel.path}`, { params: panel.params }).catch(() => {});
    }
    const observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const panel = analysisPanels.find((p) => p.element === entry.target);
        if (!entry.isIntersecting || panel.seen) continue;
        panel.seen = true;
        observer.unobserve(entry.target);
        if (!panel.eager) panel.draw().catch((error) => showAlert(error.message));
      }
    }, { rootMargin: "200px" });
    for (const panel of analysisPanels) observer.observe(panel.element);
    every(SLOW_REFRESH_MS, refreshAnalysis, active);
  }

  // For scripts driving the page (the benchmarks, a console): run a refresh cycle now.
  window.dashboard = { refresh: () => fast().all, refreshAnalysis };

  overheadSelect.addEventListener("change", () => {
    view.overhead = overheadSelect.value;
    leaderboard();
    scatterPlot(id, view.overhead);
    ablationTables(id, view.overhead);
  });
  $("#cancel").addEventListener("click", async () => {
    if (!confirm("Cancel this search? Running trials stop at their next epoch.")) return;
    try {
      await api(`/searches/${id}/cancel`, { method: "POST" });
    } catch (error) {
      showAlert(error.message);
    }
    header();
  });
  $("#delete").addEventListener("click", async () => {
    if (!confirm("Delete this search with its trials and files? This cannot be undone.")) return;
    try {
      await api(`/searches/${id}`, { method: "DELETE" });
      location.assign("/");
    } catch (error) {
      showAlert(error.message);
    }
  });
  // The analysis requests go out once the tables are drawn (the server answers those first),
  // while plotly.js is still loading.
  setUpToken(() => {
    let first = true;
    every(REFRESH_MS, async () => {
      const cycle = fast();
      if (first) {
        first = false;
        cycle.tables.finally(startAnalysis);
      }
      await cycle.all;
    }, active);
  });
}

// ---- the search page's charts ---------------------------------------------------------------

const REFERENCE_STYLE = {
  none: { symbol: "square", color: "#444", label: "no attention" },
  se: { symbol: "diamond", color: "#d08a00", label: "SE" },
  cbam: { symbol: "star", color: "#c8413b", label: "paper CBAM" },
};

// One point per completed trial, split into traces (each trace's points tagged "trial"):
// the Pareto front, the other trials, and each reference with its own marker; plus the front's
// line. Hover shows the architecture and the metrics; a click opens the trial.
async function scatterPlot(id, overhead) {
  const [data] = await Promise.all([
    api(`/searches/${id}/scatter`, { params: { overhead }, panel: "pareto" }), plotly(),
  ]);
  if (data === null) return;
  const [, , title, format] = OVERHEADS[overhead];
  const hover = (p) =>
    `trial ${p.number}: ${p.label}<br>val acc ${fmt.pct(p.val_accuracy)}%<br>` +
    `${title} ${format(p.overhead)} (${fmt.signed(p.overhead_pct)}%)`;
  const trace = (name, points, marker, extra = {}) => ({
    name, type: "scatter", mode: "markers", meta: "trial",
    x: points.map((p) => p.overhead), y: points.map((p) => 100 * p.val_accuracy),
    customdata: points.map((p) => p.number), text: points.map(hover),
    hovertemplate: "%{text}<extra></extra>", marker, ...extra,
  });
  const plain = data.points.filter((p) => !p.reference);
  const front = data.points.filter((p) => p.pareto);
  const traces = [
    { name: "Pareto front", type: "scatter", mode: "lines", meta: "front", hoverinfo: "skip",
      x: front.map((p) => p.overhead), y: front.map((p) => 100 * p.val_accuracy),
      line: { shape: "hv", color: "#2e9d5b", width: 1.5 } },
    trace("trials", plain.filter((p) => !p.pareto), { color: "#7d8fa3", size: 7, opacity: 0.7 }),
    trace("on the front", plain.filter((p) => p.pareto), { color: "#2e9d5b", size: 9 }),
    ...Object.entries(REFERENCE_STYLE).map(([name, style]) =>
      trace(style.label, data.points.filter((p) => p.reference === name),
        { symbol: style.symbol, color: style.color, size: 13, line: { width: 1, color: "#fff" } }),
    ),
  ];
  const board = await api(`/searches/${id}/leaderboard`, { params: { overhead, limit: 200 } });
  if (board && board.confirmed) {
    const [absolute] = OVERHEADS[overhead];
    const confirmed = board.entries.filter((e) => e.val_accuracy_ci95);
    traces.push({
      name: "confirmed (mean, 95% CI; filled: not significantly dominated)",
      type: "scatter", mode: "markers", meta: "confirmed",
      x: confirmed.map((e) => e[absolute]), y: confirmed.map((e) => 100 * e.val_accuracy_mean),
      error_y: {
        type: "data", symmetric: false, color: "#1f4e79",
        array: confirmed.map((e) => 100 * (e.val_accuracy_ci95[1] - e.val_accuracy_mean)),
        arrayminus: confirmed.map((e) => 100 * (e.val_accuracy_mean - e.val_accuracy_ci95[0])),
      },
      text: confirmed.map((e) => `${e.label}: ${fmt.pct(e.val_accuracy_mean)}% over ${e.n_seeds} seeds; ` +
        (e.front ? "not significantly dominated" : "a cheaper or equal architecture is significantly better")),
      hovertemplate: "%{text}<extra></extra>",
      marker: {
        symbol: confirmed.map((e) => (e.front ? "circle" : "circle-open")),
        size: 12, color: "#1f4e79", line: { width: 2 },
      },
    });
  }
  const div = $("#pareto");
  await Plotly.react(div, traces, {
    margin: { t: 30 },
    xaxis: { title: { text: title } },
    yaxis: { title: { text: "validation accuracy (%)" } },
    legend: { orientation: "h", y: 1.12 },
    uirevision: overhead,
  }, PLOT_CONFIG);
  if (!div.dataset.clicks) {
    div.dataset.clicks = "1";
    div.on("plotly_click", (event) => {
      const number = event.points[0] && event.points[0].customdata;
      if (number !== undefined) location.assign(`/searches/${id}/trials/${number}`);
    });
  }
  $("#scatter-note").textContent =
    `${data.total} completed trials` + (data.downsampled ? `, ${data.shown} drawn (every Pareto point and reference kept)` : "") +
    (data.missing ? `; ${data.missing} without this figure` : "");
}

// Parallel categories (plotly's parcats, drawn in SVG) of the knobs against accuracy bands:
// trials with the same knob values in the same band are one path, as wide as their count.
// Every knob is categorical in the search space; WebGL parallel coordinates cost seconds to
// draw where the browser renders WebGL in software.
const BAND_COLORS = ["#1a9850", "#91cf60", "#fdae61", "#bbbbbb"];

async function knobsPlot(id) {
  const [data] = await Promise.all([api(`/searches/${id}/knob-paths`, { panel: "knobs" }), plotly()]);
  if (data === null) return;
  const note = $("#knobs-note");
  if (!data.paths.length) {
    Plotly.purge("knobs");
    $("#knobs").replaceChildren();
    note.textContent = "No completed trials yet.";
    return;
  }
  const range = (b) => (b.count ? ` (${fmt.pct(b.min)}–${fmt.pct(b.max)}%)` : "");
  const bandNames = data.bands.map((b) => b.name + range(b));
  // Only the values some path has: plotly's parcats fails on an empty category.
  const dimensions = data.columns.map((column, j) => {
    const values = data.paths.map((p) => p.values[j]);
    const present = new Set(values);
    return {
      label: column.name, values, categoryorder: "array",
      categoryarray: column.values.filter((v) => present.has(v)),
    };
  });
  dimensions.push({
    label: "val accuracy", values: data.paths.map((p) => bandNames[p.band]),
    categoryorder: "array", categoryarray: bandNames.filter((_, i) => data.bands[i].count),
  });
  const last = BAND_COLORS.length - 1;
  await Plotly.react("knobs", [{
    type: "parcats", dimensions, counts: data.paths.map((p) => p.count),
    line: {
      color: data.paths.map((p) => p.band), cmin: 0, cmax: last, shape: "hspline",
      colorscale: BAND_COLORS.map((c, i) => [i / last, c]),
    },
    hoveron: "color", arrangement: "freeform",
    labelfont: { size: 12 }, tickfont: { size: 10 },
  }], { margin: { t: 40, l: 40, r: 120, b: 20 } }, PLOT_CONFIG);
  note.textContent =
    `${data.total} completed trials in accuracy bands by rank` +
    (data.sampled < data.total ? `; paths drawn from a random sample of ${data.sampled}` : "") +
    ". Hover a path for its trials; drag a category to reorder.";
}

async function importancePlot(id) {
  const [data] = await Promise.all([api(`/searches/${id}/importance`, { panel: "importance" }), plotly()]);
  if (data === null) return;
  const entries = Object.entries(data.importances).sort((a, b) => a[1] - b[1]);
  $("#importance-note").textContent = entries.length
    ? `${data.evaluator} over ${data.trials} completed trials, for validation accuracy; ` +
      "bars: the 5th to 95th percentile over bootstrap resamples of the trials"
    : data.reason || "no importances yet";
  const spread = data.spread || {};
  Plotly.react("importance", entries.length ? [{
    type: "bar", orientation: "h", x: entries.map((e) => e[1]), y: entries.map((e) => e[0]),
    marker: { color: "#2f6fdb" }, hovertemplate: "%{y}: %{x:.3f}<extra></extra>",
    error_x: {
      type: "data", symmetric: false, color: "#1f2d4d",
      array: entries.map(([k, v]) => (spread[k] ? Math.max(0, spread[k][1] - v) : 0)),
      arrayminus: entries.map(([k, v]) => (spread[k] ? Math.max(0, v - spread[k][0]) : 0)),
    },
  }] : [], { margin: { t: 10, l: 110 }, xaxis: { title: { text: "importance" } } }, PLOT_CONFIG);
}

async function ablationTables(id, overhead) {
  const data = await api(`/searches/${id}/ablation`, { params: { overhead }, panel: "ablation" });
  if (data === null) return;
  const meanStd = (mean, std, scale = 1, digits = 2) =>
    mean === null ? "–" : (scale * mean).toFixed(digits) + (std === null ? "" : " ± " + (scale * std).toFixed(digits));
  const table = (title, rows) =>
    el("table", { class: "grid ablation-table" },
      el("caption", {}, title),
      el("thead", {}, el("tr", {}, ["value", "n", "val acc (%)", "95% CI", "best (%)", `${overhead} overhead (%)`].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {},
        el("td", {}, String(r.value)), el("td", {}, r.n),
        el("td", {}, meanStd(r.accuracy_mean, r.accuracy_std, 100)),
        el("td", { class: "ci" }, fmt.interval(r.accuracy_ci95)),
        el("td", {}, r.accuracy_max === null ? "–" : (100 * r.accuracy_max).toFixed(2)),
        el("td", {}, meanStd(r.overhead_pct_mean, r.overhead_pct_std))))));
  const tables = data.tables.filter((t) => t.rows.length).map((t) => table(t.title, t.rows));
  if (data.baselines.length) tables.unshift(table("References", data.baselines));
  $("#ablation").replaceChildren(...(tables.length ? tables : [el("p", { class: "muted" }, "No completed trials yet.")]));
}

async function curvesPlot(id) {
  const [curves] = await Promise.all([
    api(`/searches/${id}/curves`, { params: { top: 5 }, panel: "curves" }), plotly(),
  ]);
  if (curves === null) return;
  Plotly.react("curves", curves.map((c) => ({
    name: `#${c.number} ${c.label}`, x: c.curve.epoch, y: c.curve.val_accuracy.map((v) => (v === null ? null : 100 * v)),
    mode: "lines+markers",
  })), {
    margin: { t: 10 }, xaxis: { title: { text: "epoch" }, dtick: 1 },
    yaxis: { title: { text: "validation accuracy (%)" } }, legend: { orientation: "h", y: -0.25 },
  }, PLOT_CONFIG);
}

// ---- page: one trial ----------------------------------------------------------------------

function trialPage() {
  const id = document.body.dataset.search;
  const number = document.body.dataset.trial;

  async function load() {
    const t = await api(`/searches/${id}/trials/${number}`);
    const state = $("#trial-state");
    state.textContent = t.state;
    state.className = `state ${t.state}`;
    $("#trial-label").textContent = t.label + (t.reference ? ` (reference: ${t.reference})` : "");
    if (t.failure_reason) {
      $("#failure").hidden = false;
      $("#failure").textContent = "Failure: " + t.failure_reason;
    }
    const rows = [
      ["validation accuracy (best)", fmt.pct(t.val_accuracy)],
      ["validation accuracy (final)", fmt.pct(t.final_val_accuracy)],
      ["test accuracy", fmt.pct(t.test_accuracy)],
      ["parameters", `${fmt.si(t.params)} (${fmt.signed(t.params_pct)}%)`],
      ["multiply-accumulates", `${fmt.si(t.macs)} (${fmt.signed(t.macs_pct)}%)`],
      ["latency", `${fmt.ms(t.latency_ms)} (${fmt.signed(t.latency_pct)}%)`],
      ["training step", fmt.ms(t.train_step_ms)],
      ["peak memory", t.peak_memory_bytes ? (t.peak_memory_bytes / 2 ** 20).toFixed(1) + " MiB" : "–"],
      ["epochs run", t.epochs_run],
      ["wall time", fmt.duration(t.wall_time_s)],
      ["images / s", t.images_per_s ? t.images_per_s.toFixed(0) : "–"],
      ["device", t.device || "–"],
      ["worker", t.worker || "–"],
      ["attempt", t.attempt],
    ];
    $("#metrics").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
    $("#architecture").textContent = JSON.stringify(t.architecture, null, 2);
    const bundle = `/api/v1/searches/${id}/trials/${number}/bundle`;
    $("#downloads").replaceChildren(
      ...(t.files.length
        ? [
            ...(t.files.includes("weights.safetensors")
              ? [el("li", {}, el("a", { href: bundle, download: "", class: "download bundle" }, "model bundle (.zip): weights, model.json, README"))]
              : []),
            ...t.files.map((name) =>
              el("li", {}, el("a", { href: `/api/v1/searches/${id}/trials/${number}/files/${name}`, download: name, class: "download" }, name)),
            ),
          ]
        : [el("li", { class: "muted" }, "no files: only completed trials store them")]),
    );
    curvePlot(t.learning_curve);
    if (t.files.length) attention(id, number);
    else $("#attention").replaceChildren(el("p", { class: "muted" }, "Only completed trials have stored weights."));
  }

  setUpToken(() => load().catch((error) => showAlert(error.message)));
}

function curvePlot(curve) {
  const epochs = curve.map((c) => c.epoch);
  const line = (name, key, axis, scale = 1) => ({
    name, x: epochs, y: curve.map((c) => c[key] * scale), yaxis: axis, mode: "lines+markers",
  });
  Plotly.react(
    "curve",
    [
      line("val accuracy %", "val_accuracy", "y", 100),
      line("train accuracy %", "train_accuracy", "y", 100),
      line("val loss", "val_loss", "y2"),
      line("train loss", "train_loss", "y2"),
    ],
    {
      margin: { t: 20 },
      xaxis: { title: { text: "epoch" }, dtick: 1 },
      yaxis: { title: { text: "accuracy (%)" } },
      yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right" },
      legend: { orientation: "h", y: -0.25 },
    },
    PLOT_CONFIG,
  );
}

// The attention pictures of a trial: per image, the image itself, each module's spatial map
// and Grad-CAM as heat maps over it (maps come at their own resolution; plotly stretches and
// smooths them over the image), and the channel gates of every module.
async function attention(id, number) {
  const box = $("#attention");
  let report;
  try {
    report = await api(`/searches/${id}/trials/${number}/attention`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "muted" }, error.message));
    return;
  }
  const [height, width] = report.image_size;
  const draws = [];
  const figures = report.images.map((image) => {
    const figure = el("div", { class: "attention-image", "data-index": image.index });
    figure.append(
      el("div", { class: "caption" },
        `validation image ${image.index}: label ${image.label}, predicted ${image.prediction} ` +
        `(${(100 * image.probability).toFixed(1)}%)`),
    );
    const panels = [
      { title: "image", map: null },
      ...image.spatial.map((s) => ({ title: `spatial gate ${s.module}`, map: s })),
      { title: `Grad-CAM ${image.grad_cam.module}`, map: image.grad_cam },
    ];
    for (const panel of panels) {
      const cell = el("div", { class: "cell" + (panel.map ? " heatmap-cell" : "") });
      figure.append(cell);
      draws.push(() => overlay(cell, image.image, panel, width, height));
    }
    if (image.channel.length) {
      const gates = el("div", { class: "gates" });
      figure.append(gates);
      draws.push(() => channelGates(gates, image.channel));
    }
    return figure;
  });
  if (!figures.length) figures.push(el("p", { class: "muted" }, "No sample images were stored."));
  if (report.images.length && !report.modules.length) {
    figures.unshift(el("p", { class: "muted" }, "This architecture has no attention modules: Grad-CAM only."));
  }
  box.replaceChildren(...figures);
  for (const draw of draws) draw();
}

function overlay(cell, source, panel, width, height) {
  const traces = [];
  if (panel.map) {
    const [h, w] = panel.map.size;
    traces.push({
      type: "heatmap", z: panel.map.map, x0: width / w / 2, dx: width / w, y0: height / h / 2,
      // Each map on its own scale: gates sit near 0.5 after BatchNorm, and the picture is
      // about where they differ (the hover shows the absolute values).
      dy: height / h, zauto: true, colorscale: "Jet", opacity: 0.5, zsmooth: "best",
      showscale: false, hovertemplate: "%{z:.3f}<extra></extra>",
    });
  }
  Plotly.newPlot(cell, traces, {
    title: { text: panel.title, font: { size: 11 } },
    margin: { l: 4, r: 4, t: 26, b: 4 },
    xaxis: { range: [0, width], visible: false },
    yaxis: { range: [height, 0], visible: false, scaleanchor: "x" },
    images: [{ source, xref: "x", yref: "y", x: 0, y: 0, sizex: width, sizey: height, sizing: "stretch", layer: "below" }],
  }, { ...PLOT_CONFIG, staticPlot: false, displayModeBar: false });
}

function channelGates(container, channel) {
  Plotly.newPlot(container, channel.map((c) => ({
    name: c.module, y: c.values, mode: "lines", hovertemplate: "channel %{x}: %{y:.3f}",
  })), {
    title: { text: "channel gates (sigmoid M_c) per module", font: { size: 12 } },
    margin: { t: 30, b: 30 }, xaxis: { title: { text: "channel" } },
    yaxis: { range: [0, 1], title: { text: "gate" } }, legend: { font: { size: 10 } },
  }, PLOT_CONFIG);
}

// ---- start --------------------------------------------------------------------------------

const PAGES = { searches: searchesPage, search: searchPage, trial: trialPage };
document.addEventListener("DOMContentLoaded", () => PAGES[document.body.dataset.page]());
