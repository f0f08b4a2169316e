/* layerscope dashboard: plain script, no build step. Reads only the public API. */
"use strict";

(() => {
  const KEY_STORAGE = "layerscope.apiKey";
  const MAIN_SCORES = ["variance", "sparsity", "avss", "navss", "cumulative"];
  const ACTIVE = new Set(["QUEUED", "RUNNING", "CANCELLING"]);
  const STATES = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED"];
  const REFRESH_MS = 3000;
  const COLORS = { a: "#1d4ed8", b: "#b45309", pruned: "#b91c1c", grid: "#e5e7eb", text: "#374151" };

  const view = { token: 0, timer: null, charts: [] };
  const main = document.getElementById("main");
  const banner = document.getElementById("banner");

  // ------------------------------------------------------------------ helpers

  /** Build an element; children are nodes or strings (always text, never HTML). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
    return String(Number(v.toPrecision(4)));
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  function duration(a) {
    if (!a.started_at) return "—";
    const end = a.finished_at ? new Date(a.finished_at) : new Date();
    const s = Math.max(0, (end - new Date(a.started_at)) / 1000);
    return s < 90 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`;
  }

  function fmtSize(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  const shortId = (id) => id.slice(0, 8);

  function datasetText(spec) {
    const d = spec.dataset || {};
    const src = d.name || d.hub || d.path || (d.rows ? `${d.rows.length} inline rows` : "?");
    return `${src} (limit ${d.limit}, ${d.max_tokens} tokens)`;
  }

  function stateBadge(s) {
    return h("span", { class: `badge state-${s.toLowerCase()}` }, s);
  }

  function labelChips(labels) {
    const entries = Object.entries(labels || {});
    if (!entries.length) return h("span", { class: "muted" }, "—");
    return h("ul", { class: "chips", "aria-label": "labels" },
      entries.map(([k, v]) => h("li", { class: "chip" }, `${k}=${v}`)));
  }

  function progressCell(a) {
    const p = a.progress || {};
    let pct = p.total ? Math.round((100 * p.done) / p.total) : 0;
    if (a.state === "SUCCEEDED") pct = 100;
    const text = ACTIVE.has(a.state)
      ? `${p.stage || "waiting"} ${p.done}/${p.total}`
      : a.state === "SUCCEEDED" ? "done" : (p.stage ? `stopped in ${p.stage} ${p.done}/${p.total}` : "—");
    return h("div", { class: "progress" },
      h("progress", { max: 100, value: pct, "aria-label": `progress ${pct}%` }),
      h("span", { class: "progress-text" }, text));
  }

  function setBanner(message) {
    if (!message) { banner.hidden = true; banner.textContent = ""; return; }
    banner.hidden = false;
    banner.textContent = message;
  }

  // -------------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(path, { allow404 = false } = {}) {
    let res;
    try {
      res = await fetch(path, { headers: { Accept: "application/json", ...authHeaders() } });
    } catch (err) {
      throw new ApiError(0, `The server did not answer (${err.message}).`);
    }
    if (res.status === 404 && allow404) return null;
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
      if (res.status === 429) detail += ` Retry after ${res.headers.get("Retry-After") || "a few"} s.`;
      throw new ApiError(res.status, detail);
    }
    return res.json();
  }

  function explain(err) {
    if (err.status === 401) {
      document.getElementById("api-key").focus({ preventScroll: true });
      return `This server needs an API key: enter one with the read scope above. (${err.message})`;
    }
    if (err.status === 403) return `Your key may not read analyses: ${err.message}`;
    return err.status ? `Error ${err.status}: ${err.message}` : err.message;
  }

  /** Download a file that needs the Authorization header (a plain link cannot send it). */
  async function download(url, filename) {
    try {
      const res = await fetch(url, { headers: authHeaders() });
      if (!res.ok) throw new ApiError(res.status, res.statusText);
      const blobUrl = URL.createObjectURL(await res.blob());
      const a = h("a", { href: blobUrl, download: filename });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(blobUrl), 10000);
    } catch (err) {
      setBanner(`Download of ${filename} failed: ${explain(err)}`);
    }
  }

  function downloadLink(url, filename, text) {
    return h("a", {
      href: url, class: "download",
      onclick: (ev) => { ev.preventDefault(); download(url, filename); },
    }, text || filename);
  }

  // ---------------------------------------------------------------- routing

  function parseRoute() {
    const raw = location.hash.replace(/^#/, "") || "/";
    const [path, query] = raw.split("?");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    const params = new URLSearchParams(query || "");
    if (parts[0] === "a" && parts[1]) return { name: "detail", id: parts[1], params };
    if (parts[0] === "compare" && parts[1] && parts[2]) return { name: "compare", a: parts[1], b: parts[2], params };
    return { name: "list", params };
  }

  function leaveView() {
    view.token += 1;
    clearTimeout(view.timer);
    view.timer = null;
    for (const c of view.charts.splice(0)) c.destroy();
    document.body.dataset.ready = "false";
  }

  function schedule(fn) {
    const token = view.token;
    clearTimeout(view.timer);
    view.timer = setTimeout(() => { if (token === view.token) fn(); }, REFRESH_MS);
  }

  async function render() {
    leaveView();
    const token = view.token;
    const route = parseRoute();
    document.body.dataset.view = route.name;
    setBanner("");
    main.replaceChildren(h("p", { class: "loading" }, "Loading…"));
    try {
      if (route.name === "detail") await renderDetail(route, token);
      else if (route.name === "compare") await renderCompare(route, token);
      else await renderList(route, token);
    } catch (err) {
      if (token !== view.token) return;
      main.replaceChildren(h("p", { class: "error" }, explain(err)));
      setBanner(explain(err));
    }
    if (token === view.token) document.body.dataset.ready = "true";
  }

  // ------------------------------------------------------------------- list

  const stageNames = (a) => Object.entries(a.spec.stages || {}).filter(([, v]) => v).map(([k]) => k);

  /** One line per stage from the stored summary: what the analysis found, in its own numbers. */
  function outcome(a) {
    if (a.error) return h("span", { class: "error-text" }, a.error.type);
    if (a.state !== "SUCCEEDED") return h("span", { class: "muted" }, "—");
    const s = a.summary || {};
    const parts = [];
    if (s.avss && s.avss.prune_layers) parts.push(`avss: prune ${s.avss.prune_layers.join(", ") || "none"}`);
    if (s.prune && Array.isArray(s.prune.table)) {
      for (const t of s.prune.table) {
        const best = (t.rows || []).filter((r) => r.scorer !== "random" && typeof r.retained_pct === "number")
          .sort((x, y) => y.retained_pct - x.retained_pct)[0];
        if (best) parts.push(`prune ${t.task}: best ${best.scorer} ${fmt(best.retained_pct)} % retained`);
      }
    }
    const c = s.hallucination && s.hallucination.counts;
    if (c && c.test_answered) parts.push(`hallucination: ${c.test_correct}/${c.test_answered} test answers correct`);
    if (s.mitigate && s.mitigate.layers) parts.push(`mitigate: tuned layers ${s.mitigate.layers.join(", ")}`);
    if (a.warnings && a.warnings.length) parts.push(`${a.warnings.length} warning${a.warnings.length > 1 ? "s" : ""}`);
    if (!parts.length) return h("span", { class: "muted" }, "done");
    return h("ul", { class: "outcome-list" }, parts.map((p) => h("li", {}, p)));
  }

  async function renderList(route, token) {
    const filters = {
      state: route.params.get("state") || "",
      model: route.params.get("model") || "",
      label: route.params.get("label") || "",
    };
    const selected = new Set();
    let items = [];
    let nextToken = null;

    const query = (pageToken, pageSize) => {
      const q = new URLSearchParams({ page_size: String(pageSize || 50) });
      if (filters.state) q.set("state", filters.state);
      if (filters.model) q.set("model", filters.model);
      if (filters.label) q.set("label", filters.label);
      if (pageToken) q.set("page_token", pageToken);
      return `/v1/analyses?${q}`;
    };

    const first = await api(query(null));
    if (token !== view.token) return;
    items = first.items;
    nextToken = first.next_page_token;

    const stateSelect = h("select", { id: "f-state", name: "state" },
      h("option", { value: "" }, "any"),
      STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s)));
    const modelInput = h("input", { id: "f-model", name: "model", value: filters.model, placeholder: "smollm2-135m" });
    const labelInput = h("input", { id: "f-label", name: "label", value: filters.label, placeholder: "team=search" });
    const filterForm = h("form", {
      class: "filters", role: "search",
      onsubmit: (ev) => {
        ev.preventDefault();
        const q = new URLSearchParams();
        if (stateSelect.value) q.set("state", stateSelect.value);
        if (modelInput.value.trim()) q.set("model", modelInput.value.trim());
        if (labelInput.value.trim()) q.set("label", labelInput.value.trim());
        location.hash = `#/?${q}`;
      },
    },
    h("label", { for: "f-state" }, "State"), stateSelect,
    h("label", { for: "f-model" }, "Model"), modelInput,
    h("label", { for: "f-label" }, "Label"), labelInput,
    h("button", { type: "submit" }, "Filter"));

    const compareBtn = h("button", {
      type: "button", id: "compare-selected", disabled: true,
      onclick: () => {
        const [a, b] = [...selected];
        location.hash = `#/compare/${encodeURIComponent(a)}/${encodeURIComponent(b)}`;
      },
    }, "Compare selected");
    const compareHint = h("span", { class: "muted", role: "status" }, "Tick two analyses to compare them.");
    const updateCompare = () => {
      compareBtn.disabled = selected.size !== 2;
      compareHint.textContent = selected.size === 2 ? "Ready to compare." : `Tick two analyses to compare them (${selected.size} ticked).`;
    };

    const tbody = h("tbody");
    const moreBtn = h("button", { type: "button", id: "load-more" }, "Load more");
    const refreshNote = h("p", { class: "muted refresh-note", role: "status" });

    const drawRows = () => {
      tbody.replaceChildren(...items.map((a) => h("tr", { dataset: { id: a.id, state: a.state } },
        h("td", {}, h("input", {
          type: "checkbox", checked: selected.has(a.id),
          "aria-label": `Select analysis ${shortId(a.id)} for comparison`,
          onchange: (ev) => {
            if (ev.target.checked) selected.add(a.id); else selected.delete(a.id);
            updateCompare();
          },
        })),
        h("td", {}, h("a", { href: `#/a/${encodeURIComponent(a.id)}`, title: a.id, class: "mono" }, shortId(a.id))),
        h("td", {}, stateBadge(a.state)),
        h("td", {}, a.spec.model.name),
        h("td", {}, datasetText(a.spec)),
        h("td", { class: "stages" }, stageNames(a).join(", ")),
        h("td", { class: "outcome" }, outcome(a)),
        h("td", {}, labelChips(a.labels)),
        h("td", {}, progressCell(a)),
        h("td", {}, fmtTime(a.created_at)),
        h("td", {}, duration(a)))));
      if (!items.length) {
        tbody.append(h("tr", {}, h("td", { colspan: 11, class: "muted" },
          "No analyses yet. Submit one with POST /v1/analyses or `layerscope submit`.")));
      }
      moreBtn.hidden = !nextToken;
      const running = items.filter((a) => ACTIVE.has(a.state)).length;
      refreshNote.textContent = running ? `${running} running or queued: refreshing every ${REFRESH_MS / 1000} s.` : "";
    };

    moreBtn.addEventListener("click", async () => {
      try {
        const page = await api(query(nextToken));
        if (token !== view.token) return;
        items = items.concat(page.items);
        nextToken = page.next_page_token;
        drawRows();
      } catch (err) { setBanner(explain(err)); }
    });

    const refresh = async () => {
      try {
        const page = await api(query(null, Math.min(200, Math.max(50, items.length))));
        if (token !== view.token) return;
        items = page.items;
        nextToken = page.next_page_token;
        drawRows();
        setBanner("");
      } catch (err) {
        if (token === view.token) setBanner(explain(err));
      }
      if (token === view.token && items.some((a) => ACTIVE.has(a.state))) schedule(refresh);
    };

    main.replaceChildren(
      h("h2", {}, "Analyses"),
      filterForm,
      h("div", { class: "toolbar" }, compareBtn, compareHint),
      h("div", { class: "table-wrap" }, h("table", { id: "analyses", class: "data" },
        h("caption", { class: "sr-only" }, "Analyses, newest first"),
        h("thead", {}, h("tr", {},
          ["", "ID", "State", "Model", "Dataset", "Stages", "Outcome", "Labels", "Progress", "Created", "Duration"]
            .map((t, i) => h("th", { scope: "col" }, i === 0 ? h("span", { class: "sr-only" }, "Select") : t)))),
        tbody)),
      moreBtn,
      refreshNote);
    drawRows();
    updateCompare();
    if (items.some((a) => ACTIVE.has(a.state))) schedule(refresh);
  }

  // ------------------------------------------------------------ layer data

  /** Rows grouped by "stage/scorer", each sorted by layer. */
  function groupLayers(rows) {
    const groups = new Map();
    for (const r of rows) {
      const key = `${r.stage}/${r.scorer}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(r);
    }
    for (const g of groups.values()) g.sort((x, y) => x.layer - y.layer);
    return groups;
  }

  function valueKeys(rows) {
    const keys = new Set();
    for (const r of rows) for (const [k, v] of Object.entries(r.values)) if (v === null || typeof v === "number" || typeof v === "boolean") keys.add(k);
    return [...keys];
  }

  /** A value as a chart reads it: flags (booleans) as 1/0, missing as null. */
  const plotted = (v) => (v === undefined ? null : typeof v === "boolean" ? Number(v) : v);

  function defaultScores(keys) {
    const main = MAIN_SCORES.filter((k) => keys.includes(k));
    return main.length ? main : keys.filter((k) => k !== "prune" && k !== "rank").slice(0, 4);
  }

  const isPruned = (r) => r.values.prune === true || r.values.prune === 1;  // a bool (older rows: 1)

  let stripes = null;
  function prunedFill() {
    if (stripes) return stripes;
    const c = document.createElement("canvas");
    c.width = 8; c.height = 8;
    const g = c.getContext("2d");
    g.fillStyle = "#fecaca";
    g.fillRect(0, 0, 8, 8);
    g.strokeStyle = COLORS.pruned;
    g.lineWidth = 2;
    g.beginPath(); g.moveTo(0, 8); g.lineTo(8, 0); g.moveTo(-2, 2); g.lineTo(2, -2); g.moveTo(6, 10); g.lineTo(10, 6); g.stroke();
    stripes = g.createPattern(c, "repeat");
    return stripes;
  }

  /** Shades the full height of every pruned layer's column, so a pruned layer shows whatever its value. */
  const prunedBands = {
    id: "prunedBands",
    beforeDatasetsDraw(chart, _args, opts) {
      const idx = opts.indices || [];
      if (!idx.length) return;
      const { ctx, chartArea, scales } = chart;
      const n = chart.data.labels.length;
      const w = (chartArea.right - chartArea.left) / Math.max(1, n);
      ctx.save();
      ctx.fillStyle = "rgba(254, 202, 202, 0.45)";
      for (const i of idx) {
        const x = scales.x.getPixelForValue(i);
        ctx.fillRect(x - w / 2, chartArea.top, w, chartArea.bottom - chartArea.top);
      }
      ctx.restore();
    },
  };

  function chartCard(score, description, logScale) {
    const canvas = h("canvas", { role: "img", "aria-label": description, dataset: { score } });
    const card = h("figure", { class: "chart-card", dataset: { score } },
      h("figcaption", {}, h("strong", {}, score), logScale ? h("span", { class: "muted" }, " (log scale)") : null),
      h("div", { class: "chart-box" }, canvas),
      h("p", { class: "chart-note muted" }, description));
    return { card, canvas };
  }

  function baseOptions(logScale, xTitle, yTitle) {
    return {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      plugins: { legend: { display: false } },
      scales: {
        x: { title: { display: true, text: xTitle }, grid: { color: COLORS.grid },
          ticks: { color: COLORS.text, autoSkip: false, maxRotation: 0, font: { size: 10 } } },
        y: { type: logScale ? "logarithmic" : "linear", title: { display: true, text: yTitle + (logScale ? " (log scale)" : "") },
          grid: { color: COLORS.grid }, ticks: { color: COLORS.text } },
      },
    };
  }

  function layerChart(container, rows, score, logScale) {
    const pruned = rows.filter(isPruned).map((r) => r.layer);
    const desc = `Bar chart of ${score} for ${rows.length} layers` +
      (pruned.length ? `; striped red bars on a shaded column are proposed for pruning: layers ${pruned.join(", ")}.` : ".");
    const { card, canvas } = chartCard(score, desc, logScale);
    canvas.dataset.points = String(rows.length);
    canvas.dataset.pruned = pruned.join(",");
    container.append(card);
    const options = baseOptions(logScale, "layer", score);
    canvas.dataset.scale = logScale ? "logarithmic" : "linear";
    // Every layer labelled: upright when there are many.
    if (rows.length > 16) Object.assign(options.scales.x.ticks, { minRotation: 90, maxRotation: 90 });
    options.scales.x.ticks.color = (ctx) => {
      const r = rows[ctx.tick ? ctx.tick.value : ctx.index];
      return r && isPruned(r) ? COLORS.pruned : COLORS.text;
    };
    options.plugins.prunedBands = { indices: rows.map((r, i) => (isPruned(r) ? i : -1)).filter((i) => i >= 0) };
    options.plugins.tooltip = {
      callbacks: {
        title: (items) => { const r = rows[items[0].dataIndex]; return `layer ${r.layer} (${r.block_name})`; },
        label: (item) => `${score}: ${fmt(item.raw)}`,
        afterLabel: (item) => (isPruned(rows[item.dataIndex]) ? "proposed for pruning" : ""),
      },
    };
    view.charts.push(new Chart(canvas, {
      type: "bar",
      plugins: [prunedBands],
      data: {
        labels: rows.map((r) => String(r.layer)),
        datasets: [{
          label: score,
          data: rows.map((r) => plotted(r.values[score])),
          backgroundColor: rows.map((r) => (isPruned(r) ? prunedFill() : "rgba(29, 78, 216, 0.75)")),
          borderColor: rows.map((r) => (isPruned(r) ? COLORS.pruned : COLORS.a)),
          borderWidth: 1,
        }],
      },
      options,
    }));
  }

  function overlayChart(container, sides, score, logScale, relative) {
    const parts = sides.map((s) => {
      const pruned = s.rows.filter(isPruned).map((r) => r.layer);
      return `${s.name}: ${s.rows.length} layers${pruned.length ? `, pruned ${pruned.join(", ")}` : ""}`;
    });
    const desc = `Line chart of ${score} per layer, ${parts.join("; ")}. Triangles mark layers proposed for pruning.`;
    const { card, canvas } = chartCard(score, desc, logScale);
    canvas.dataset.points = sides.map((s) => s.rows.length).join(",");
    container.append(card);
    const options = baseOptions(logScale, relative ? "relative depth (layer / (layers − 1))" : "layer", score);
    canvas.dataset.scale = logScale ? "logarithmic" : "linear";
    if (relative) options.scales.x.ticks.autoSkip = true;
    else if (Math.max(...sides.map((s) => s.rows.length)) > 16) Object.assign(options.scales.x.ticks, { minRotation: 90, maxRotation: 90 });
    options.scales.x.type = "linear";
    if (!relative) options.scales.x.ticks.stepSize = 1;
    options.plugins.legend = {
      display: true,
      labels: {
        color: COLORS.text,
        usePointStyle: true,
        // The legend shows each side's own marker, not its first point's (a pruned triangle).
        generateLabels: (chart) => Chart.defaults.plugins.legend.labels.generateLabels(chart).map((item) => ({
          ...item,
          pointStyle: item.datasetIndex === 0 ? "circle" : "rect",
          fillStyle: item.datasetIndex === 0 ? COLORS.a : COLORS.b,
          strokeStyle: item.datasetIndex === 0 ? COLORS.a : COLORS.b,
        })),
        sort: (x, y) => x.datasetIndex - y.datasetIndex,
      },
    };
    options.plugins.tooltip = {
      callbacks: {
        title: (items) => items.map((i) => `${sides[i.datasetIndex].name} layer ${sides[i.datasetIndex].rows[i.dataIndex].layer}`).join(" / "),
        label: (item) => `${score}: ${fmt(item.raw.y)}`,
        afterLabel: (item) => (isPruned(sides[item.datasetIndex].rows[item.dataIndex]) ? "proposed for pruning" : ""),
      },
    };
    view.charts.push(new Chart(canvas, {
      type: "line",
      data: {
        datasets: sides.map((s, i) => {
          const color = i === 0 ? COLORS.a : COLORS.b;
          const n = s.rows.length;
          return {
            label: s.name,
            data: s.rows.map((r, j) => ({
              x: relative ? (n > 1 ? j / (n - 1) : 0) : r.layer,
              y: plotted(r.values[score]),
            })),
            borderColor: color,
            backgroundColor: color,
            borderDash: i === 0 ? [] : [6, 4],
            borderWidth: i === 0 ? 3 : 2,
            order: sides.length - i, // B drawn over A: identical curves still show both

            pointStyle: s.rows.map((r) => (isPruned(r) ? "triangle" : i === 0 ? "circle" : "rect")),
            pointRadius: s.rows.map((r) => (isPruned(r) ? 7 : 3)),
            pointBackgroundColor: s.rows.map((r) => (isPruned(r) ? COLORS.pruned : color)),
            spanGaps: false,
          };
        }),
      },
      options,
    }));
  }

  // ------------------------------------------------------------- sections

  function section(id, title, ...body) {
    return h("section", { id, class: "panel", "aria-labelledby": `${id}-h` }, h("h3", { id: `${id}-h` }, title), ...body);
  }

  function infoList(a) {
    const rows = [
      ["Model", a.spec.model.name + (a.spec.model.revision ? ` @ ${a.spec.model.revision}` : "")],
      ["Dataset", datasetText(a.spec)],
      ["Stages", Object.entries(a.spec.stages).filter(([, v]) => v).map(([k]) => k).join(", ")],
      ["Labels", labelChips(a.labels)],
      ["Progress", progressCell(a)],
      ["Created", fmtTime(a.created_at)],
      ["Finished", fmtTime(a.finished_at)],
      ["Duration", duration(a)],
      ["Attempt", String(a.attempt)],
    ];
    return h("dl", { class: "info" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function problemsBox(a) {
    const out = [];
    if (a.error) {
      out.push(h("div", { class: "error", role: "alert" }, h("strong", {}, `${a.error.type}: `), a.error.detail));
    }
    if (a.warnings && a.warnings.length) {
      out.push(h("div", { class: "warnings", id: "warnings" },
        h("strong", {}, `Warnings (${a.warnings.length})`),
        h("ul", {}, a.warnings.map((w) => h("li", {}, w)))));
    }
    return out;
  }

  function metricsTable(items) {
    if (!items.length) return h("p", { class: "muted" }, "No evaluation metrics for this analysis.");
    return h("div", { class: "table-wrap" }, h("table", { id: "metrics-table", class: "data" },
      h("caption", { class: "sr-only" }, "Evaluation metrics with 95% confidence intervals"),
      h("thead", {}, h("tr", {}, ["Stage", "Scope", "Metric", "Value", "95% CI", "n"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, items.map((m) => h("tr", {},
        h("td", {}, m.stage), h("td", {}, m.scope), h("td", {}, m.name),
        h("td", { class: "num" }, fmt(m.value)),
        h("td", { class: "num" }, m.ci_low === null && m.ci_high === null ? "—" : `[${fmt(m.ci_low)}, ${fmt(m.ci_high)}]`),
        h("td", { class: "num" }, fmt(m.n)))))));
  }

  function artifactsTable(items) {
    if (!items.length) return h("p", { class: "muted" }, "No artifacts.");
    return h("div", { class: "table-wrap" }, h("table", { id: "artifacts-table", class: "data" },
      h("caption", { class: "sr-only" }, "Files the analysis produced"),
      h("thead", {}, h("tr", {}, ["Name", "Stage", "Type", "Size", "Created"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, items.map((f) => h("tr", {},
        h("td", {}, downloadLink(f.download_url, f.name.split("/").pop(), f.name)),
        h("td", {}, f.stage), h("td", {}, f.media_type),
        h("td", { class: "num" }, fmtSize(f.size)), h("td", {}, fmtTime(f.created_at)))))));
  }

  const first = (obj, ...keys) => { for (const k of keys) if (obj && obj[k] !== undefined && obj[k] !== null) return obj[k]; return undefined; };

  function passFail(v) {
    const p = first(v, "passed", "pass", "ok");
    if (typeof p === "boolean") return p;
    const word = first(v, "verdict", "result", "outcome", "status");
    if (typeof word === "string") return /^pass/i.test(word) ? true : /^fail/i.test(word) ? false : null;
    return null;
  }

  function verdictBadge(p) {
    if (p === true) return h("span", { class: "badge verdict-pass" }, "PASS");
    if (p === false) return h("span", { class: "badge verdict-fail" }, "FAIL");
    return h("span", { class: "badge" }, "?");
  }

  function ciText(r) {
    const ci = first(r, "ci", "confidence_interval");
    if (Array.isArray(ci)) return `[${fmt(ci[0])}, ${fmt(ci[1])}]`;
    if (ci && typeof ci === "object") return `[${fmt(first(ci, "low", "ci_low"))}, ${fmt(first(ci, "high", "ci_high"))}]`;
    const lo = first(r, "ci_low"); const hi = first(r, "ci_high");
    return lo === undefined && hi === undefined ? "—" : `[${fmt(lo)}, ${fmt(hi)}]`;
  }

  /** Gate verdicts, read defensively: the gate API is optional on a server. */
  function verdictsView(data) {
    const items = Array.isArray(data) ? data : (first(data, "items", "verdicts") || []);
    if (!items.length) return h("p", { class: "muted" }, "No gate verdicts for this analysis yet.");
    return h("div", { id: "verdicts-list" }, items.map((v) => {
      const policy = first(v, "policy", "policy_name", "name");
      const version = first(v, "policy_version", "version");
      const rules = first(v, "rules", "results", "checks") || [];
      const trigger = first(v, "trigger");
      const error = first(v, "error");
      return h("article", { class: "verdict", dataset: { passed: String(passFail(v)) } },
        h("h4", {}, verdictBadge(passFail(v)), " ",
          typeof policy === "object" ? JSON.stringify(policy) : `policy ${policy ?? "?"}`,
          version !== undefined ? ` v${version}` : "",
          h("span", { class: "muted" }, ` ${fmtTime(first(v, "created_at", "evaluated_at"))}`,
            trigger ? ` (${trigger === "spec" ? "named in the spec" : `via ${trigger}`})` : "")),
        error ? h("p", { class: "error" }, String(error)) : null,
        rules.length ? h("table", { class: "data" },
          h("thead", {}, h("tr", {}, ["Rule", "Observed", "Threshold", "95% CI", "n", "Result", "Note"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, rules.map((r) => {
            const rule = first(r, "rule", "expression", "expr") ??
              [first(r, "metric", "path", "field"), first(r, "op", "operator"), first(r, "threshold")].filter((x) => x !== undefined).join(" ");
            return h("tr", {},
              h("td", { class: "mono" }, typeof rule === "string" ? rule : JSON.stringify(rule)),
              h("td", { class: "num" }, fmt(first(r, "observed", "value", "actual"))),
              h("td", { class: "num" }, fmt(first(r, "threshold", "expected"))),
              h("td", { class: "num" }, ciText(r)),
              h("td", { class: "num" }, fmt(first(r, "n"))),
              h("td", {}, verdictBadge(passFail(r))),
              h("td", {}, first(r, "reason", "detail", "message") ?? ""));
          }))) : null);
    }));
  }

  function summaryView(summary) {
    const stages = Object.entries(summary || {}).filter(([, v]) => v && typeof v === "object");
    if (!stages.length) return h("p", { class: "muted" }, "No summary.");
    return stages.map(([stage, s]) => {
      const scalars = Object.entries(s).filter(([, v]) => v === null || typeof v !== "object" ||
        (Array.isArray(v) && v.every((x) => typeof x !== "object")));
      return h("div", { class: "summary-stage" },
        h("h4", {}, stage),
        h("dl", { class: "info" }, scalars.map(([k, v]) => [
          h("dt", {}, k),
          h("dd", { class: Array.isArray(v) ? "mono" : "" }, Array.isArray(v) ? (v.length ? v.join(", ") : "none") : fmt(v)),
        ])),
        h("details", {}, h("summary", {}, "Full summary (JSON)"), h("pre", {}, JSON.stringify(s, null, 2))));
    });
  }

  function layerTable(rows, keys) {
    return h("details", { class: "layer-table" },
      h("summary", {}, `All per-layer values (${rows.length} rows, ${keys.length} columns)`),
      h("div", { class: "table-wrap" }, h("table", { class: "data" },
        h("thead", {}, h("tr", {}, ["layer", "block", "pruned", ...keys].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows.map((r) => h("tr", { class: isPruned(r) ? "pruned" : "" },
          h("td", { class: "num" }, r.layer), h("td", { class: "mono" }, r.block_name),
          h("td", {}, isPruned(r) ? "yes" : ""),
          keys.map((k) => h("td", { class: "num" }, fmt(r.values[k])))))))));
  }

  /**
   * The chart panel: a stage/scorer picker, small multiples of the main scores,
   * and one more chart for any score the viewer picks. `sides` is one analysis or two.
   */
  function layerPanel(sides, { compare }) {
    const groupSets = sides.map((s) => groupLayers(s.rows));
    const groupNames = [...groupSets[0].keys()].filter((g) => groupSets.every((gs) => gs.has(g)));
    const panel = h("div", { id: "layer-charts" });
    if (!groupNames.length) {
      panel.append(h("p", { class: "muted" }, compare
        ? "These analyses share no per-layer results (stage/scorer) to compare."
        : "No per-layer results yet."));
      return panel;
    }
    const controls = h("div", { class: "toolbar" });
    const grid = h("div", { class: "chart-grid", id: "chart-grid" });
    const extra = h("div", { class: "chart-grid", id: "chart-extra" });
    const tableBox = h("div");

    const groupSelect = h("select", { id: "layer-group" }, groupNames.map((g) => h("option", { value: g }, g)));
    const scoreSelect = h("select", { id: "extra-score" });
    const scaleSel = h("select", { id: "layer-scale" }, ["auto", "linear", "log"].map((m) => h("option", { value: m }, m)));
    const relBox = h("input", { type: "checkbox", id: "relative-depth" });

    const draw = () => {
      for (const canvas of panel.querySelectorAll("canvas")) {
        const c = Chart.getChart(canvas);
        if (c) { view.charts.splice(view.charts.indexOf(c), 1); c.destroy(); }
      }
      grid.replaceChildren();
      extra.replaceChildren();
      const g = groupSelect.value;
      const sideRows = sides.map((s, i) => ({ name: s.name, rows: groupSets[i].get(g) }));
      const keys = valueKeys(sideRows.flatMap((s) => s.rows));
      const shared = keys.filter((k) => sideRows.every((s) => s.rows.some((r) => k in r.values)));
      const chosen = defaultScores(shared);
      const previous = scoreSelect.value;
      scoreSelect.replaceChildren(h("option", { value: "" }, "(none)"),
        ...shared.filter((k) => !chosen.includes(k)).map((k) => h("option", { value: k, selected: k === previous }, k)));
      const one = (container, k) => (compare
        ? overlayChart(container, sideRows, k, useLog(sideRows.flatMap((s) => s.rows), k), relBox.checked)
        : layerChart(container, sideRows[0].rows, k, useLog(sideRows[0].rows, k)));
      for (const k of chosen) one(grid, k);
      if (scoreSelect.value) one(extra, scoreSelect.value);
      tableBox.replaceChildren(...(compare ? [] : [layerTable(sideRows[0].rows, keys)]));
    };

    controls.append(
      h("label", { for: "layer-group" }, "Stage / scorer"), groupSelect,
      h("label", { for: "extra-score" }, "Chart another score"), scoreSelect,
      h("label", { for: "layer-scale" }, "Scale"), scaleSel,
      ...(compare ? [h("span", { class: "check" }, relBox, h("label", { for: "relative-depth" }, "Align by relative depth"))] : []));
    // Log scale where a score's values are all positive and span two decades or more (auto), or as picked.
    const useLog = (rows, k) => {
      const v = rows.map((r) => r.values[k]);
      if (scaleSel.value === "linear") return false;
      if (scaleSel.value === "log") return v.every((x) => x === null || x === undefined || x > 0);
      return panels.spansDecades(v);
    };
    for (const el of [groupSelect, scoreSelect, scaleSel, relBox]) el.addEventListener("change", draw);
    const legend = compare
      ? h("p", { class: "legend muted" }, "Solid line with circles: A. Dashed line with squares: B. Red triangles: layers proposed for pruning (values.prune true).")
      : h("p", { class: "legend muted" },
        h("span", { class: "swatch swatch-kept", "aria-hidden": "true" }), " kept layer ",
        h("span", { class: "swatch swatch-pruned", "aria-hidden": "true" }), " proposed for pruning (values.prune true: striped bar, shaded column, red tick label)");
    panel.append(controls, legend, grid, extra, tableBox);
    // Draw once the panel is in the document, so the charts get their size.
    queueMicrotask(draw);
    return panel;
  }

  // The per-stage panels (panels.js), given this page's helpers.
  const panels = window.layerscopePanels({ h, fmt, section, charts: view.charts });

  // ----------------------------------------------------------------- detail

  const ranStage = (a, stage) => Boolean(a.spec.stages && a.spec.stages[stage]);

  /** Every test-split answer of the hallucination stage (for the reliability diagrams), page by page. */
  async function loadAnswers(id) {
    const out = [];
    let pageToken = null;
    for (let i = 0; i < 50; i++) {
      const q = new URLSearchParams({ stage: "hallucination", split: "test", page_size: "1000" });
      if (pageToken) q.set("page_token", pageToken);
      const page = await api(`/v1/analyses/${encodeURIComponent(id)}/answers?${q}`, { allow404: true });
      if (!page) break;
      out.push(...page.items);
      pageToken = page.next_page_token;
      if (!pageToken) break;
    }
    return out;
  }

  /** A panel for each stage with stored results: a later stage's failure does not hide an earlier one's. */
  function stagePanels(a, res) {
    const s = a.summary || {};
    const stored = (stage) => ranStage(a, stage) &&
      (res.metrics.some((m) => m.stage === stage) || res.layers.some((r) => r.stage === stage));
    return [
      stored("prune") ? panels.prunePanel(res.metrics, res.layers) : null,
      stored("hallucination") ? panels.hallucinationPanel(s.hallucination, res.metrics, res.layers, res.answers) : null,
      stored("mitigate") ? panels.mitigationPanel(s.mitigate, res.metrics) : null,
    ].filter(Boolean);
  }

  async function loadResults(id, withAnswers) {
    const [layers, metrics, artifacts, verdicts, answers] = await Promise.all([
      api(`/v1/analyses/${encodeURIComponent(id)}/layers`),
      api(`/v1/analyses/${encodeURIComponent(id)}/metrics`),
      api(`/v1/analyses/${encodeURIComponent(id)}/artifacts`),
      api(`/v1/analyses/${encodeURIComponent(id)}/verdicts`, { allow404: true }).catch(() => null),
      withAnswers ? loadAnswers(id) : Promise.resolve([]),
    ]);
    return { layers: layers.items, metrics: metrics.items, artifacts: artifacts.items, verdicts, answers };
  }

  async function renderDetail(route, token) {
    const id = route.id;
    const base = `/v1/analyses/${encodeURIComponent(id)}`;
    const a = await api(base);
    const res = await loadResults(id, ranStage(a, "hallucination"));
    if (token !== view.token) return;

    const others = h("select", { id: "compare-with" }, h("option", { value: "" }, "pick an analysis…"));
    api("/v1/analyses?page_size=50&state=SUCCEEDED").then((page) => {
      for (const o of page.items) {
        if (o.id === id) continue;
        const labels = Object.entries(o.labels).map(([k, v]) => `${k}=${v}`).join(" ");
        others.append(h("option", { value: o.id }, `${shortId(o.id)} ${o.spec.model.name} ${labels}`));
      }
    }).catch(() => {});
    others.addEventListener("change", () => {
      if (others.value) location.hash = `#/compare/${encodeURIComponent(id)}/${encodeURIComponent(others.value)}`;
    });

    const content = [
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← all analyses")),
      h("h2", {}, "Analysis ", h("span", { class: "mono" }, shortId(id)), " ", stateBadge(a.state)),
      h("p", { class: "muted mono small" }, id),
      infoList(a),
      ...problemsBox(a),
      h("div", { class: "toolbar" },
        h("label", { for: "compare-with" }, "Compare with"), others),
    ];
    if (res.verdicts !== null) content.push(section("verdicts", "Gate verdicts", verdictsView(res.verdicts)));
    content.push(...stagePanels(a, res));
    content.push(
      section("layers", "Per-layer scores", layerPanel([{ name: shortId(id), rows: res.layers }], { compare: false }),
        h("p", { class: "small" }, downloadLink(`${base}/layers?format=csv`, `layers-${shortId(id)}.csv`, "Download per-layer CSV"))),
      section("metrics", "Evaluation metrics", metricsTable(res.metrics),
        res.metrics.length ? h("p", { class: "small" }, downloadLink(`${base}/metrics?format=csv`, `metrics-${shortId(id)}.csv`, "Download metrics CSV")) : null),
      section("artifacts", "Artifacts", artifactsTable(res.artifacts)),
      section("summary", "Summary", summaryView(a.summary)));
    main.replaceChildren(...content);

    if (ACTIVE.has(a.state)) {
      const poll = async () => {
        try {
          const now = await api(base);
          if (token !== view.token) return;
          if (now.state !== a.state || !ACTIVE.has(now.state)) { render(); return; }
          const cell = main.querySelector(".info .progress");
          if (cell) cell.replaceWith(progressCell(now));
        } catch (err) {
          if (token === view.token) setBanner(explain(err));
        }
        schedule(poll);
      };
      schedule(poll);
    }
  }

  // ---------------------------------------------------------------- compare

  function compareMetrics(ma, mb, names) {
    const key = (m) => `${m.stage}\u0000${m.scope}\u0000${m.name}`;
    const A = new Map(ma.map((m) => [key(m), m]));
    const B = new Map(mb.map((m) => [key(m), m]));
    const keys = [...new Set([...A.keys(), ...B.keys()])].sort();
    if (!keys.length) return h("p", { class: "muted" }, "Neither analysis has evaluation metrics.");
    const cell = (m) => (m ? `${fmt(m.value)}${m.ci_low !== null || m.ci_high !== null ? ` [${fmt(m.ci_low)}, ${fmt(m.ci_high)}]` : ""}${m.n !== null ? ` n=${m.n}` : ""}` : "—");
    return h("div", { class: "table-wrap" }, h("table", { id: "compare-metrics", class: "data" },
      h("caption", { class: "sr-only" }, "Metrics of both analyses"),
      h("thead", {}, h("tr", {}, ["Stage", "Scope", "Metric", `A ${names[0]}`, `B ${names[1]}`, "B − A"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, keys.map((k) => {
        const a = A.get(k); const b = B.get(k); const m = a || b;
        const delta = a && b && a.value !== null && b.value !== null ? b.value - a.value : null;
        return h("tr", {}, h("td", {}, m.stage), h("td", {}, m.scope), h("td", {}, m.name),
          h("td", { class: "num" }, cell(a)), h("td", { class: "num" }, cell(b)), h("td", { class: "num" }, fmt(delta)));
      }))));
  }

  /** Leaf paths of a spec ("stages.prune.scorers" -> JSON text); arrays are leaves. */
  function flatten(obj, prefix, out) {
    for (const [k, v] of Object.entries(obj || {})) {
      const path = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length) flatten(v, path, out);
      else out.set(path, JSON.stringify(v));
    }
    return out;
  }

  function specDiff(sa, sb, names) {
    const A = flatten(sa, "", new Map()); const B = flatten(sb, "", new Map());
    const paths = [...new Set([...A.keys(), ...B.keys()])].sort().filter((p) => A.get(p) !== B.get(p));
    if (!paths.length) return h("p", { class: "muted", id: "spec-diff-none" }, "The two specs are the same.");
    return h("div", { class: "table-wrap" }, h("table", { id: "spec-diff-table", class: "data" },
      h("thead", {}, h("tr", {}, ["Field", names[0], names[1]].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, paths.map((p) => h("tr", { dataset: { path: p } },
        h("td", { class: "mono" }, p),
        h("td", { class: "mono", dataset: { side: "a" } }, A.has(p) ? A.get(p) : "(not set)"),
        h("td", { class: "mono", dataset: { side: "b" } }, B.has(p) ? B.get(p) : "(not set)"))))));
  }

  async function renderCompare(route, token) {
    const ids = [route.a, route.b];
    const [a, b] = await Promise.all(ids.map((id) => api(`/v1/analyses/${encodeURIComponent(id)}`)));
    const [ra, rb] = await Promise.all(ids.map((id) => loadResults(id, false)));
    if (token !== view.token) return;
    const names = [`A ${shortId(a.id)}`, `B ${shortId(b.id)}`];
    const card = (x, tag, name) => h("div", { class: `panel side side-${tag}` },
      h("h3", {}, h("a", { href: `#/a/${encodeURIComponent(x.id)}` }, name), " ", stateBadge(x.state)),
      infoList(x), ...problemsBox(x));
    main.replaceChildren(
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← all analyses"), " · ",
        h("a", { href: `#/compare/${encodeURIComponent(b.id)}/${encodeURIComponent(a.id)}` }, "swap A and B")),
      h("h2", {}, "Compare ", h("span", { class: "mono" }, shortId(a.id)), " and ", h("span", { class: "mono" }, shortId(b.id))),
      h("div", { class: "sides" }, card(a, "a", names[0]), card(b, "b", names[1])),
      section("spec-diff", "How the specs differ", specDiff(a.spec, b.spec, names)),
      section("layers", "Per-layer scores, overlaid",
        layerPanel([{ name: names[0], rows: ra.layers }, { name: names[1], rows: rb.layers }], { compare: true })),
      section("metrics", "Evaluation metrics", compareMetrics(ra.metrics, rb.metrics, [shortId(a.id), shortId(b.id)])));
    if (ACTIVE.has(a.state) || ACTIVE.has(b.state)) {
      const poll = async () => {
        try {
          const now = await Promise.all(ids.map((id) => api(`/v1/analyses/${encodeURIComponent(id)}`)));
          if (token !== view.token) return;
          if (now[0].state !== a.state || now[1].state !== b.state) { render(); return; }
        } catch (err) {
          if (token === view.token) setBanner(explain(err));
        }
        schedule(poll);
      };
      schedule(poll);
    }
  }

  // -------------------------------------------------------------------- key

  function showKeyStatus() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    document.getElementById("key-status").textContent = key
      ? `key …${key.slice(-4)} in use (this tab only)`
      : "no key set";
    document.getElementById("api-key").placeholder = key ? "replace key" : "ls_…";
  }

  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("api-key");
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    input.value = "";
    showKeyStatus();
    render();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyStatus();
    render();
  });

  window.addEventListener("hashchange", () => { render().then(() => main.focus({ preventScroll: true })); });
  if (typeof Chart !== "undefined") {
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.color = COLORS.text;
  }
  showKeyStatus();
  render();
})();
