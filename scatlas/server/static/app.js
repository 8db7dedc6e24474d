// scatlas serve: the page's script. Plain JavaScript, nothing loaded from elsewhere. Every value from the server
// is put into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const TOKEN_KEY = "scatlas-token";
  const POLL_MS = 500;
  const needToken = document.body.dataset.tokenRequired === "true";
  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (response.status === 401) {
      askToken("The token was not accepted: enter it again.");
      throw new ApiError(401, "the server needs its access token");
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error || message;
      } catch (e) {
        // not JSON: keep the status line
      }
      throw new ApiError(response.status, message);
    }
    return response;
  }

  async function blobUrl(path) {
    const response = await api(path);
    return URL.createObjectURL(await response.blob());
  }

  // -- small DOM helpers ----------------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function table(headers, rows, className = "data") {
    const head = el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h))));
    const body = el("tbody", {}, ...rows.map((row) => el("tr", {}, ...row.map((cell) => el("td", {}, cell)))));
    return el("table", { class: className }, head, body);
  }

  const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : n === null || n === undefined ? "–" : String(n));
  const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "–");
  const num = (x, digits = 3) => (typeof x === "number" ? x.toFixed(digits) : "–");

  // -- the token ------------------------------------------------------------------------------------------------
  function askToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("#main").hidden = true;
    $("#token-panel").hidden = false;
    const error = $("#token-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("#token-input").focus();
  }

  function start() {
    $("#token-panel").hidden = true;
    $("#main").hidden = false;
    loadOverview().catch((err) => {
      if (err.status !== 401) $("#overview-line").textContent = "Could not load the atlas: " + err.message;
    });
  }

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
    $("#token-input").value = "";
    start();
  });

  // -- the atlas overview ---------------------------------------------------------------------------------------
  async function loadOverview() {
    const info = await (await api("/api/index")).json();
    const overview = await (await api("/api/overview")).json();
    const datasets = info.datasets || [];
    $("#overview-line").textContent =
      `${fmt(info.cells)} cells in ${fmt(datasets.length)} dataset(s) · embedder ${info.embedder} ` +
      `(${info.dim} dims) · ${info.factory}` + (typeof info.recall === "number" ? ` · recall@${info.k || 30} ${num(info.recall, 3)}` : "");
    $("#labels-head").textContent = overview.label_column ? `${overview.label_column} (top labels)` : "labels";
    const byDataset = overview.labels_by_dataset || {};
    const body = $("#datasets-table tbody");
    body.replaceChildren(...datasets.map((d) => {
      const labels = (byDataset[d.dataset_id] || []).map(([label, n]) => `${label} ${fmt(n)}`).join(", ");
      return el("tr", {}, el("td", {}, d.dataset_id), el("td", { class: "num" }, fmt(d.cells)), el("td", { class: "labels" }, labels || "–"));
    }));
    const heads = Object.entries(info.label_heads || {}).map(([k, h]) => `${k} (${h.classes} classes)`).join(", ");
    const rows = [
      ["label columns", Object.entries(info.label_columns || {}).map(([k, n]) => `${k} (${n})`).join(", ") || "–"],
      ["label heads", heads || "none (neighbour vote)"],
      ["index", `${fmt(info.shards)} shard(s), version ${info.version}, built ${info.built || "–"}`],
    ];
    $("#index-table tbody").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
    const keys = overview.label_columns && overview.label_columns.length ? overview.label_columns : ["cell_type"];
    for (const select of $$("select.label-keys")) {
      select.replaceChildren(...keys.map((k, i) => {
        const option = el("option", { value: k }, k);
        option.selected = i === 0;
        return option;
      }));
    }
    if (overview.has_map) {
      $("#atlas-map").src = await blobUrl("/api/map.png");
      $("#atlas-map-figure").hidden = false;
    }
    showWarnings(overview.warnings);
    if (!warningTimer) warningTimer = setInterval(refreshWarnings, 60000);
  }

  // the server's warnings (an index it could not load in part, a newer build on disk): shown, and checked again
  let warningTimer = null;
  function showWarnings(warnings) {
    $("#overview-warnings").replaceChildren(...(warnings || []).map((w) => el("p", { class: "warning" }, w)));
  }
  async function refreshWarnings() {
    try {
      showWarnings((await (await api("/api/overview")).json()).warnings);
    } catch (err) {
      /* a failed check leaves the last warnings shown; the next one tries again */
    }
  }

  // -- tabs ----------------------------------------------------------------------------------------------------
  for (const tab of $$(".tab")) {
    tab.addEventListener("click", () => {
      for (const other of $$(".tab")) other.classList.toggle("active", other === tab);
      for (const panel of $$(".job-panel")) panel.hidden = panel.id !== tab.dataset.tab;
    });
  }

  // -- jobs ----------------------------------------------------------------------------------------------------
  for (const panel of $$(".job-panel")) {
    const form = $("form", panel);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      runJob(panel, form).catch((err) => showError(panel, err.message));
    });
    const cancel = $("button.cancel", panel);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`/api/jobs/${encodeURIComponent(panel.dataset.job)}`, { method: "DELETE" });
      } catch (err) {
        cancel.disabled = false;
        showError(panel, err.message);
      }
    });
  }

  function showError(panel, message) {
    const box = $(".error", panel);
    box.textContent = message;
    box.hidden = false;
    $("button.cancel", panel).hidden = true;
    const line = $(".job-line", panel);
    if (line.textContent === "Uploading…") line.textContent = "Refused:";
    $("button[type=submit]", panel).disabled = false;
  }

  async function runJob(panel, form) {
    const kind = panel.dataset.kind;
    const data = new FormData(form);
    for (const [name, value] of Array.from(data.entries())) {
      if (typeof value === "string" && value.trim() === "") data.delete(name);
    }
    const jobBox = $(".job", panel);
    jobBox.hidden = false;
    $(".error", panel).hidden = true;
    $(".result", panel).hidden = true;
    $("progress", panel).value = 0;
    $(".job-line", panel).textContent = "Uploading…";
    $("button[type=submit]", panel).disabled = true;
    const response = await api(`/api/${kind}`, { method: "POST", body: data });
    const { job } = await response.json();
    panel.dataset.job = job;
    const cancel = $("button.cancel", panel);
    cancel.disabled = false;
    cancel.hidden = false;
    await poll(panel, kind, job);
  }

  async function poll(panel, kind, job) {
    let misses = 0;
    for (;;) {
      let state;
      try {
        state = await (await api(`/api/jobs/${encodeURIComponent(job)}`)).json();
        misses = 0;
      } catch (err) {
        if (err.status === 404) {
          showError(panel, "the server no longer has this job (it was restarted, or the job was removed after the " +
            "retention time): run it again");
          return;
        }
        if (err.status !== undefined || ++misses > 120) throw err;  // an answer that is an error, or 10 minutes
        $(".job-line", panel).textContent = `${kind} job: no answer from the server, trying again…`;
        await new Promise((resolve) => setTimeout(resolve, 5000));
        continue;
      }
      $("progress", panel).value = state.progress;
      $(".job-line", panel).textContent = `${kind} job ${state.status}` +
        (state.status === "running" ? ` (${state.stage}, about ${Math.round(100 * state.progress)}%)` : "");
      if (state.status !== "queued" && state.status !== "running") $("button.cancel", panel).hidden = true;
      if (state.status === "cancelled") {
        $("button[type=submit]", panel).disabled = false;
        return;
      }
      if (state.status === "failed") {
        showError(panel, state.error || "the job failed");
        return;
      }
      if (state.status === "done") {
        $("button[type=submit]", panel).disabled = false;
        await render(panel, kind, state);
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  async function render(panel, kind, state) {
    const result = state.result || {};
    const summary = $(".summary", panel);
    summary.replaceChildren(...(kind === "annotate" ? annotateSummary(panel, result)
      : kind === "search" ? searchSummary(result) : huntSummary(result)));
    $(".result", panel).hidden = false;
    const base = `/api/jobs/${encodeURIComponent(state.job)}/`;
    $(".downloads", panel).replaceChildren("Download: ", ...state.files.map((name) => downloadLink(base, name)));
    if (state.files.includes("umap.png")) {
      $(".job-map", panel).src = await blobUrl(base + "umap.png");
      $(".map-figure", panel).hidden = false;
    }
    if (state.files.includes("enrichment.png") && $(".job-enrichment", panel)) {
      $(".job-enrichment", panel).src = await blobUrl(base + "enrichment.png");
      $(".enrichment-figure", panel).hidden = false;
    }
    panel.dataset.done = "true";
  }

  function downloadLink(base, name) {
    const link = el("a", { href: "#", class: "download", "data-file": name }, name);
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      try {
        const url = await blobUrl(base + name);
        const save = el("a", { href: url, download: name });
        document.body.append(save);
        save.click();
        save.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60000);
      } catch (err) {
        link.textContent = `${name} (${err.message})`;
      }
    });
    return el("span", { class: "download-item" }, link, " ");
  }

  function annotateSummary(panel, r) {
    const parts = [];
    const overlap = r.gene_overlap || {};
    const mapping = r.mapping || {};
    const verdicts = { maps_well: "maps onto the atlas", maps_poorly: "maps poorly onto the atlas",
      too_few_cells: "too few cells for a query-level verdict" };
    parts.push(el("p", {}, `${fmt(r.cells)} cells annotated in ${r.seconds} s · gene overlap ${fmt(overlap.n_matched)} of ` +
      `${fmt(overlap.n_target_genes)} embedder genes · the query ${verdicts[mapping.verdict] || mapping.verdict || "–"}` +
      (typeof mapping.score === "number" ? ` (${pct(mapping.score)} of its cells map as the atlas' own datasets' do)` : "")));
    for (const warning of r.warnings || []) parts.push(el("p", { class: "warning" }, warning));
    let first = true;
    for (const [key, lab] of Object.entries(r.labels || {})) {
      const levels = Object.entries(lab.levels || {}).map(([lv, n]) => `${lv} ${fmt(n)}`).join(", ");
      parts.push(el("h3", {}, `${key}: unknown ${pct(lab.unknown_rate)}; ${levels}; median confidence ${num(lab.median_confidence, 2)}`));
      parts.push(table(["predicted " + key, "cells", "share"],
        (lab.top || []).map(([label, n]) => [label, fmt(n), pct(n / Math.max(r.cells, 1))]), "data summary-table"));
      if (first) {
        $(".histogram", panel).replaceChildren(histogram(lab.confidence_histogram, key));
        first = false;
      }
    }
    return parts;
  }

  function searchSummary(r) {
    const q = r.query || {};
    const hits = r.hits || {};
    const parts = [el("p", {}, `${fmt(q.cells_used)} query cells used (of ${fmt(q.n_cells)}) · ${fmt(hits.rows)} hits, ` +
      `${fmt(hits.atlas_cells)} distinct atlas cells of ${fmt(hits.atlas_cells_searched)} searched · median similarity ` +
      `${num(hits.median_similarity, 3)} · ${r.seconds} s`)];
    if ((r.hit_labels || []).length) {
      parts.push(el("h3", {}, "Atlas cells hit, by cell type"));
      parts.push(table(["cell type", "atlas cells hit"], r.hit_labels.map(([label, n]) => [label, fmt(n)]), "data summary-table"));
    }
    const enriched = Object.entries(r.enriched || {}).filter(([, groups]) => groups.length);
    if (enriched.length) {
      parts.push(el("h3", {}, "Enriched among the hits (q ≤ 0.05)"));
      parts.push(table(["column", "group", "hits", "fold", "q"],
        enriched.flatMap(([column, groups]) => groups.map((g) => [column, g.group, fmt(g.n_hits), num(g.fold, 2), g.qvalue.toExponential(1)]))));
    }
    return parts;
  }

  function huntSummary(r) {
    const c = r.classifier || {};
    const s = r.sweep || {};
    const parts = [
      el("p", {}, `classifier: ${fmt(c.positives)} positives, ${fmt(c.negatives)} negatives; cross-validated precision ` +
        `${num(c.precision)}, recall ${num(c.recall)}, AUPRC ${num(c.auprc)} at threshold ${num(c.threshold, 4)}`),
      el("p", {}, `swept ${fmt(s.cells)} atlas cells: ${fmt(s.hits)} hits` +
        (s.training_positive_hits ? ` (${fmt(s.training_positive_hits)} of them the classifier's own training positives)` : "") +
        (r.where ? `; ${fmt(r.hits)} of them match ${r.where}` : "") + ` · ${r.seconds} s`),
    ];
    for (const [column, groups] of Object.entries(r.by || {})) {
      parts.push(el("h3", {}, `Hits by ${column}`));
      parts.push(table([column, "hits", "atlas cells", "share hit", "q"],
        groups.map((g) => [g.group, fmt(g.n_hits), fmt(g.n_cells), pct(g.fraction), g.qvalue.toExponential(1)]), "data summary-table"));
    }
    if ((r.genes_up || []).length) parts.push(el("p", {}, "genes up in the hits: " + r.genes_up.join(", ")));
    else if (r.de_skipped) parts.push(el("p", { class: "hint" }, "differential expression skipped: " + r.de_skipped));
    return parts;
  }

  function histogram(h, key) {
    const NS = "http://www.w3.org/2000/svg";
    const width = 360;
    const height = 180;
    const pad = 28;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.setAttribute("class", "histogram-svg");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `${key} confidence histogram`);
    const counts = (h && h.counts) || [];
    const top = Math.max(1, ...counts);
    const bar = (width - 2 * pad) / Math.max(counts.length, 1);
    counts.forEach((n, i) => {
      const rect = document.createElementNS(NS, "rect");
      const tall = ((height - 2 * pad) * n) / top;
      rect.setAttribute("x", String(pad + i * bar + 1));
      rect.setAttribute("y", String(height - pad - tall));
      rect.setAttribute("width", String(Math.max(bar - 2, 1)));
      rect.setAttribute("height", String(tall));
      const title = document.createElementNS(NS, "title");
      title.textContent = `${h.edges[i]}–${h.edges[i + 1]}: ${n} cells`;
      rect.append(title);
      svg.append(rect);
    });
    for (const [x, label] of [[pad, "0"], [width / 2, "0.5"], [width - pad, "1"]]) {
      const text = document.createElementNS(NS, "text");
      text.setAttribute("x", String(x));
      text.setAttribute("y", String(height - 8));
      text.setAttribute("text-anchor", "middle");
      text.textContent = label;
      svg.append(text);
    }
    const text = document.createElementNS(NS, "text");
    text.setAttribute("x", String(pad));
    text.setAttribute("y", "14");
    text.textContent = `${key} confidence (max ${top} cells per bin)`;
    svg.append(text);
    return svg;
  }

  if (needToken && !sessionStorage.getItem(TOKEN_KEY)) askToken("");
  else start();
})();
