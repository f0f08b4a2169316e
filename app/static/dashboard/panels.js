/* layerscope dashboard: one panel per stage's result (prune, hallucination, mitigate).
 * Plain script, no build step. Reads only what the public API returns: metrics
 * (stage/scope/name/value/ci), per-layer rows and, for the reliability diagrams,
 * the per-answer rows. Every number drawn is also in a table with data-* attributes. */
"use strict";

window.layerscopePanels = (lib) => {
  const { h, fmt, section, charts } = lib;
  const C = { bar: "rgba(29, 78, 216, 0.75)", line: "#1d4ed8", ref: "#111827", band: "rgba(180, 83, 9, 0.18)",
    bandLine: "#b45309", top: "#b91c1c", grid: "#e5e7eb", text: "#374151" };
  const VARIANT_COLORS = { base: "#6b7280", eavss: "#1d4ed8", random: "#b45309" };
  const BINS = 10;

  // ---------------------------------------------------------------- helpers

  /** "task=perplexity,scorer=avss" -> {task: "perplexity", scorer: "avss"}. */
  function parseScope(scope) {
    const out = {};
    for (const part of (scope || "").split(",")) {
      const i = part.indexOf("=");
      if (i > 0) out[part.slice(0, i)] = part.slice(i + 1);
    }
    return out;
  }

  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
  /** Exact number for a data-* attribute (String(x) round-trips a double); "" for none. */
  const raw = (v) => (num(v) === null ? "" : String(v));

  /** True when every value is positive and they span at least two decades: log scale by default. */
  function spansDecades(values) {
    const v = values.filter((x) => num(x) !== null);
    if (v.length < 2 || v.some((x) => x <= 0)) return false;
    return Math.max(...v) / Math.min(...v) >= 100;
  }

  function scaleFor(mode, values) {
    if (mode === "log") return values.every((x) => num(x) === null || x > 0) ? "logarithmic" : "linear";
    if (mode === "linear") return "linear";
    return spansDecades(values) ? "logarithmic" : "linear";
  }

  function scaleSelect(id, onChange) {
    const sel = h("select", { id }, ["auto", "linear", "log"].map((m) => h("option", { value: m }, m)));
    sel.addEventListener("change", onChange);
    return [h("label", { for: id }, "Scale"), sel];
  }

  /** Whiskers from each dataset's `ci` ([low, high] per point) and horizontal reference lines and bands. */
  const overlays = {
    id: "lsOverlays",
    beforeDatasetsDraw(chart, _a, opts) {
      const { ctx, chartArea, scales } = chart;
      ctx.save();
      for (const b of opts.bands || []) {
        const y1 = scales.y.getPixelForValue(b.low); const y2 = scales.y.getPixelForValue(b.high);
        ctx.fillStyle = b.color || C.band;
        ctx.fillRect(chartArea.left, Math.min(y1, y2), chartArea.right - chartArea.left, Math.max(2, Math.abs(y2 - y1)));
      }
      ctx.restore();
    },
    afterDatasetsDraw(chart, _a, opts) {
      const { ctx, chartArea, scales } = chart;
      ctx.save();
      for (const l of opts.lines || []) {
        if (l.points) { // a diagonal, in data coordinates
          ctx.strokeStyle = l.color || C.ref; ctx.setLineDash(l.dash || [5, 4]); ctx.lineWidth = 1.5;
          ctx.beginPath();
          l.points.forEach(([x, y], i) => {
            const px = scales.x.getPixelForValue(x); const py = scales.y.getPixelForValue(y);
            if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
          });
          ctx.stroke();
          continue;
        }
        const y = scales.y.getPixelForValue(l.value);
        if (y < chartArea.top - 1 || y > chartArea.bottom + 1) continue;
        ctx.strokeStyle = l.color || C.ref; ctx.setLineDash(l.dash || [6, 4]); ctx.lineWidth = 1.5;
        ctx.beginPath(); ctx.moveTo(chartArea.left, y); ctx.lineTo(chartArea.right, y); ctx.stroke();
        if (l.label) {
          ctx.setLineDash([]); ctx.fillStyle = l.color || C.ref; ctx.font = "11px sans-serif";
          ctx.textAlign = l.align === "right" ? "right" : "left";
          ctx.fillText(l.label, l.align === "right" ? chartArea.right - 4 : chartArea.left + 4, y - 4);
        }
      }
      ctx.setLineDash([]);
      chart.data.datasets.forEach((ds, i) => {
        if (!ds.ci) return;
        const meta = chart.getDatasetMeta(i);
        if (meta.hidden) return;
        ctx.strokeStyle = ds.whiskerColor || C.ref; ctx.lineWidth = 1.5;
        meta.data.forEach((el, j) => {
          const ci = ds.ci[j];
          if (!ci || num(ci[0]) === null || num(ci[1]) === null) return;
          const x = el.x; const lo = scales.y.getPixelForValue(ci[0]); const hi = scales.y.getPixelForValue(ci[1]);
          ctx.beginPath();
          ctx.moveTo(x, lo); ctx.lineTo(x, hi);
          ctx.moveTo(x - 5, lo); ctx.lineTo(x + 5, lo);
          ctx.moveTo(x - 5, hi); ctx.lineTo(x + 5, hi);
          ctx.stroke();
        });
      });
      ctx.restore();
    },
  };

  function options({ xTitle, yTitle, yType, legend, allTicks }) {
    return {
      animation: false, responsive: true, maintainAspectRatio: false,
      plugins: { legend: { display: !!legend } },
      scales: {
        x: { title: { display: true, text: xTitle }, grid: { color: C.grid },
          ticks: { color: C.text, autoSkip: !allTicks, font: allTicks ? { size: 10 } : undefined,
            // Every layer labelled: upright when there are many.
            minRotation: allTicks && allTicks > 16 ? 90 : 0, maxRotation: allTicks ? (allTicks > 16 ? 90 : 0) : 50 } },
        y: { type: yType || "linear", title: { display: true, text: yTitle }, grid: { color: C.grid },
          ticks: { color: C.text, callback: (v) => fmt(v) } },
      },
    };
  }

  /** Make the y axis hold every value drawn (bars, whiskers, bands, lines), not only the bars. */
  function fitY(opts, values) {
    const v = values.filter((x) => num(x) !== null);
    if (!v.length) return opts;
    const lo = Math.min(...v); const hi = Math.max(...v);
    const y = opts.scales.y;
    if (y.type === "logarithmic") {
      y.min = 10 ** Math.floor(Math.log10(lo));
      y.max = 10 ** Math.ceil(Math.log10(hi));
    } else {
      y.suggestedMin = Math.min(0, lo);
      y.suggestedMax = hi;
    }
    return opts;
  }

  function card(id, title, note) {
    const canvas = h("canvas", { role: "img", "aria-label": `${title}. ${note}`, id });
    return { canvas, el: h("figure", { class: "chart-card" }, h("figcaption", {}, h("strong", {}, title)),
      h("div", { class: "chart-box" }, canvas), h("p", { class: "chart-note muted" }, note)) };
  }

  function draw(canvas, config) {
    canvas.dataset.scale = config.options.scales.y.type;
    charts.push(new Chart(canvas, config));
  }

  const ciText = (m) => (m && (num(m.ci_low) !== null || num(m.ci_high) !== null) ? `[${fmt(m.ci_low)}, ${fmt(m.ci_high)}]` : "—");

  function metricCells(m) {
    return [
      h("td", { class: "num", dataset: { value: raw(m && m.value) } }, fmt(m ? m.value : null)),
      h("td", { class: "num", dataset: { low: raw(m && m.ci_low), high: raw(m && m.ci_high) } }, ciText(m)),
      h("td", { class: "num" }, fmt(m ? m.n : null)),
    ];
  }

  /** Spearman correlation of two rank vectors (ties get their average rank); null when undefined. */
  function spearman(a, b) {
    const rank = (v) => {
      const idx = v.map((x, i) => [x, i]).sort((p, q) => p[0] - q[0]);
      const r = new Array(v.length);
      for (let i = 0; i < idx.length;) {
        let j = i;
        while (j + 1 < idx.length && idx[j + 1][0] === idx[i][0]) j++;
        for (let k = i; k <= j; k++) r[idx[k][1]] = (i + j) / 2 + 1;
        i = j + 1;
      }
      return r;
    };
    const ra = rank(a); const rb = rank(b);
    const mean = (v) => v.reduce((s, x) => s + x, 0) / v.length;
    const ma = mean(ra); const mb = mean(rb);
    let sab = 0; let saa = 0; let sbb = 0;
    for (let i = 0; i < ra.length; i++) {
      sab += (ra[i] - ma) * (rb[i] - mb); saa += (ra[i] - ma) ** 2; sbb += (rb[i] - mb) ** 2;
    }
    return saa > 0 && sbb > 0 ? sab / Math.sqrt(saa * sbb) : null;
  }

  // ------------------------------------------------------------------ prune

  function prunePanel(metrics, layers) {
    const pm = metrics.filter((m) => m.stage === "prune");
    const rows = layers.filter((r) => r.stage === "prune");
    if (!pm.length && !rows.length) return null;
    const byTask = new Map();
    for (const m of pm) {
      const s = parseScope(m.scope);
      if (!s.task || !s.scorer || s.removed !== undefined || s.variant !== undefined) continue;  // curve / healed rows: own panels
      if (!byTask.has(s.task)) byTask.set(s.task, []);
      byTask.get(s.task).push({ ...m, scorer: s.scorer, seed: s.seed });
    }
    const body = [];
    const chartsBox = h("div", { class: "chart-grid" });
    const mode = scaleSelect("prune-scale", () => redraw());
    const tableRows = [];
    const plans = [];
    for (const [task, ms] of byTask) {
      // The task's primary metric: its retained share is stored as plain `retained_pct`; any other
      // metric's as `retained_pct_<metric>`.
      const suffixed = new Set(ms.filter((m) => m.name.startsWith("retained_pct_")).map((m) => m.name.slice("retained_pct_".length)));
      const ownNames = ms.filter((m) => m.scorer === "original").map((m) => m.name);
      const name = ownNames.find((n) => !suffixed.has(n)) || ownNames[0] ||
        (ms.find((m) => !m.name.startsWith("retained_pct") && !m.name.endsWith("_std")) || ms[0]).name;
      const get = (scorer, metric) => ms.find((m) => m.scorer === scorer && !m.seed && m.name === metric);
      const original = get("original", name);
      const scorers = [...new Set(ms.map((m) => m.scorer))].filter((s) => s !== "original" && s !== "random");
      const seeds = ms.filter((m) => m.scorer === "random" && m.seed !== undefined && m.name === name && num(m.value) !== null);
      const random = get("random", name);
      const band = seeds.length
        ? { low: Math.min(...seeds.map((m) => m.value)), high: Math.max(...seeds.map((m) => m.value)) } : null;
      for (const s of [...scorers, "random"]) {
        const m = get(s, name);
        if (!m) continue;
        const retained = get(s, "retained_pct");
        const keptCi = retained && num(retained.ci_low) !== null ? ` [${fmt(retained.ci_low)}, ${fmt(retained.ci_high)}]` : "";
        tableRows.push(h("tr", { dataset: { task, scorer: s, metric: name } },
          h("td", {}, task), h("td", {}, s === "random" ? `random (median of ${seeds.length || m.n} seeds)` : s),
          h("td", {}, name), ...metricCells(m),
          h("td", { class: "num", dataset: { retained: raw(retained && retained.value), low: raw(retained && retained.ci_low), high: raw(retained && retained.ci_high) } },
            retained ? `${fmt(retained.value)} %${keptCi}` : "—")));
      }
      if (original) {
        tableRows.push(h("tr", { dataset: { task, scorer: "original", metric: name } },
          h("td", {}, task), h("td", {}, "original (no layer removed)"), h("td", {}, name), ...metricCells(original), h("td", { class: "num" }, "100 %")));
      }
      plans.push({ task, name, original, scorers, random, band, seeds, get });
    }
    const redraw = () => {
      for (const p of plans) {
        if (p.chart) { charts.splice(charts.indexOf(p.chart), 1); p.chart.destroy(); }
        const canvas = p.canvas || (() => {
          const c = card(`prune-chart-${p.task}`, `${p.task}: ${p.name} after removing layers, per scorer`,
            `Bars: ${p.name} of the pruned model per scorer, whiskers its 95% interval. ` +
            (p.band ? `Shaded band: the random control's range over ${p.seeds.length} seeds (dashed line their median). ` : "") +
            (p.original ? "Solid line: the original model." : ""));
          chartsBox.append(c.el); p.canvas = c.canvas; return c.canvas;
        })();
        const ms = p.scorers.map((s) => p.get(s, p.name));
        const values = [...ms.map((m) => m && m.value), ...ms.map((m) => m && m.ci_low), ...ms.map((m) => m && m.ci_high),
          p.original && p.original.value, p.band && p.band.low, p.band && p.band.high];
        const yType = scaleFor(mode[1].value, values);
        const opts = fitY(options({ xTitle: "scorer", yTitle: p.name + (yType === "logarithmic" ? " (log scale)" : ""), yType }),
          [...values, p.random && p.random.value]);
        opts.plugins.lsOverlays = {
          bands: p.band ? [p.band] : [],
          lines: [
            ...(p.original ? [{ value: p.original.value, color: C.ref, dash: [], label: `original ${fmt(p.original.value)}` }] : []),
            ...(p.random ? [{ value: p.random.value, color: C.bandLine, align: "right", label: `random ${fmt(p.random.value)}` }] : []),
          ],
        };
        draw(canvas, { type: "bar", plugins: [overlays], data: { labels: p.scorers, datasets: [{
          label: p.name, data: ms.map((m) => (m ? m.value : null)), ci: ms.map((m) => (m ? [m.ci_low, m.ci_high] : null)),
          backgroundColor: C.bar, borderColor: C.line, borderWidth: 1 }] }, options: opts });
        p.chart = charts[charts.length - 1];
      }
    };
    if (plans.length) {
      body.push(h("h4", {}, "Retained performance per scorer against the random control"),
        h("div", { class: "toolbar" }, ...mode), chartsBox,
        h("div", { class: "table-wrap" }, h("table", { class: "data", id: "prune-table" },
          h("thead", {}, h("tr", {}, ["Task", "Scorer", "Metric", "Value", "95% CI", "n", "Retained [paired 95% CI]"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, tableRows))));
    }
    // Layers removed: a layers-by-scorers grid, every layer labelled.
    const scorers = [...new Set(rows.map((r) => r.scorer))];
    const layerIds = [...new Set(rows.map((r) => r.layer))].sort((a, b) => a - b);
    if (scorers.length) {
      const at = new Map(rows.map((r) => [`${r.scorer}/${r.layer}`, r]));
      body.push(h("h4", {}, "Layers removed per scorer"),
        h("div", { class: "table-wrap" }, h("table", { class: "grid", id: "prune-grid" },
          h("caption", { class: "sr-only" }, "Rows: scorers. Columns: layers. A filled cell: the scorer removes that layer."),
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "scorer \\ layer"), layerIds.map((l) => h("th", { scope: "col" }, String(l))))),
          h("tbody", {}, scorers.map((s) => h("tr", { dataset: { scorer: s } },
            h("th", { scope: "row" }, s, h("span", { class: "muted" }, ` (${rows.filter((r) => r.scorer === s && (r.values.prune === true || r.values.prune === 1)).length})`)),
            layerIds.map((l) => {
              const r = at.get(`${s}/${l}`);
              const removed = r && (r.values.prune === true || r.values.prune === 1);
              return h("td", { class: removed ? "removed" : "", dataset: { layer: l, removed: removed ? "1" : "0", rank: raw(r && r.values.rank) },
                title: r ? `${s}, layer ${l}: rank ${fmt(r.values.rank)}, score ${fmt(r.values.score)}${removed ? ", removed" : ""}` : "" },
              removed ? "■" : "");
            })))))),
        h("p", { class: "legend muted" }, "■ removed by that scorer (values.prune true); hover a cell for its rank and score."));
      // Scorer rank agreement: Spearman between each pair of scorers' rankings over the same layers.
      const ranks = new Map(scorers.map((s) => [s, layerIds.map((l) => { const r = at.get(`${s}/${l}`); return r ? num(r.values.rank) : null; })]));
      if (scorers.length > 1) {
        body.push(h("h4", {}, "Scorer rank agreement (Spearman ρ of the layer rankings)"),
          h("div", { class: "table-wrap" }, h("table", { class: "data agreement", id: "rank-agreement" },
            h("thead", {}, h("tr", {}, h("th", { scope: "col" }, ""), scorers.map((s) => h("th", { scope: "col" }, s)))),
            h("tbody", {}, scorers.map((a) => h("tr", {}, h("th", { scope: "row" }, a), scorers.map((b) => {
              const ra = ranks.get(a); const rb = ranks.get(b);
              const ok = ra.every((x) => x !== null) && rb.every((x) => x !== null);
              const rho = ok ? spearman(ra, rb) : null;
              const shade = rho === null ? "" : `agree-${Math.round(Math.max(0, rho) * 4)}`;
              return h("td", { class: `num ${shade}`, dataset: { a, b, value: raw(rho) } }, fmt(rho === null ? null : Number(rho.toFixed(3))));
            })))))));
      }
    }
    const panel = section("prune-panel", "Prune: retained performance, layers removed, scorer agreement", ...body);
    queueMicrotask(redraw);
    return panel;
  }

  // ---------------------------------------------------------- hallucination

  /** Equal-width confidence bins over [0, 1]: count, mean confidence and accuracy per bin. */
  function reliabilityBins(answers, detector) {
    const bins = Array.from({ length: BINS }, (_, i) => ({ i, n: 0, conf: 0, correct: 0 }));
    for (const a of answers) {
      const c = a.confidence ? num(a.confidence[detector]) : null;
      if (c === null || typeof a.correct !== "boolean") continue;
      const b = bins[Math.min(BINS - 1, Math.max(0, Math.floor(c * BINS)))];
      b.n += 1; b.conf += c; b.correct += a.correct ? 1 : 0;
    }
    return bins.map((b) => ({ ...b, conf: b.n ? b.conf / b.n : null, acc: b.n ? b.correct / b.n : null }));
  }

  const VERDICT_TEXT = { better: "better", worse: "worse", not_distinguishable: "tie (CI holds 0)", no_interval: "no interval",
    undefined: "n/a" };

  /** The detector leaderboard (summary.leaderboard, also GET .../leaderboard): sorted by test AUROC, each
   * detector's AUROC difference against the length baseline and the best toolkit estimator. */
  function leaderboardTable(board, choice) {
    if (!board || !Array.isArray(board.rows) || !board.rows.length) return null;
    const mets = board.metrics || [];
    const cmp = (c) => {
      if (!c) return [h("td", { class: "num" }, "reference"), h("td", {}, "—")];
      const d = c.auroc_difference || {};
      return [h("td", { class: "num", dataset: { value: raw(d.value), low: raw(d.ci_low), high: raw(d.ci_high) } },
        `${fmt(d.value)} ${ciText(d)}`), h("td", { dataset: { verdict: c.verdict } }, VERDICT_TEXT[c.verdict] || c.verdict)];
    };
    const role = (r) => [r.reference.includes("length") ? "length baseline" : "", r.reference.includes("toolkit")
      ? "best toolkit" : (r.toolkit ? "toolkit" : "")].filter(Boolean).join(", ");
    const layersOf = (d) => {
      const ls = choice && Array.isArray(choice[d]) ? choice[d] : null;
      if (!ls) return "";
      return ls.length > 1 && ls.length === choice.n_layers ? `all ${ls.length}` : ls.join(", ");
    };
    const table = h("table", { class: "data", id: "hallucination-leaderboard" },
      h("caption", {}, `Detectors by test AUROC (N = ${board.n}); Δ AUROC with a paired 95% interval against the ` +
        `length baseline (${board.length_baseline || "not run"}) and the best toolkit estimator (${board.best_toolkit || "none run"})`),
      h("thead", {}, h("tr", {}, ["rank", "detector", "role", "layers", ...mets.map((m) => `${m} [95% CI]`),
        "Δ AUROC vs length", "", "Δ AUROC vs toolkit", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, board.rows.map((r) => h("tr", { dataset: { detector: r.detector, rank: r.rank } },
        h("td", { class: "num" }, r.rank), h("th", { scope: "row" }, r.detector), h("td", {}, role(r)),
        h("td", {}, layersOf(r.detector)),
        mets.map((m) => {
          const c = r.metrics[m];
          return h("td", { class: "num", dataset: { metric: m, value: raw(c && c.value), low: raw(c && c.ci_low), high: raw(c && c.ci_high) } },
            c ? `${fmt(c.value)} ${ciText(c)}` : "—");
        }),
        cmp(r.vs_length), cmp(r.vs_toolkit)))));
    const notes = [];
    if (choice && Array.isArray(choice.eavss_layers) && choice.eavss_layers.length) {
      notes.push(`EAVSS's layers among all ${choice.n_layers}: ` + choice.eavss_layers.map((e) =>
        `${e.layer} (training-CV rank ${e.train_cv_rank ?? "—"}, test-AUROC rank ${e.test_auroc_rank ?? "—"})`).join(", ") + ".");
    }
    return h("div", { class: "table-wrap" }, table, ...notes.map((t) => h("p", { class: "muted", id: "layer-choice-note" }, t)));
  }

  function hallucinationPanel(summary, metrics, layers, answers) {
    const eav = layers.filter((r) => r.stage === "hallucination" && r.scorer === "eavss").sort((a, b) => a.layer - b.layer);
    const probes = layers.filter((r) => r.stage === "hallucination" && r.scorer === "layer_probe").sort((a, b) => a.layer - b.layer);
    const hm = metrics.filter((m) => m.stage === "hallucination");
    if (!eav.length && !hm.length) return null;
    const top = new Set(((summary && summary.layer_scores) || {}).top_layers || []);
    const box = h("div", { class: "chart-grid" });
    const mode = scaleSelect("hallucination-scale", () => redraw());
    const board = leaderboardTable(summary && summary.leaderboard, summary && summary.layer_choice);
    const body = [...(board ? [board] : []), h("div", { class: "toolbar" }, ...mode), box];
    const plans = [];
    if (eav.length) {
      const c = card("eavss-chart", "EAVSS by layer",
        `EAVSS of each layer on the training answers${top.size ? `; red bars: the top layers behind the probe (${[...top].join(", ")})` : ""}.`);
      c.canvas.dataset.values = JSON.stringify(eav.map((r) => r.values.eavss));
      box.append(c.el);
      plans.push(() => {
        const values = eav.map((r) => num(r.values.eavss));
        const yType = scaleFor(mode[1].value, values);
        draw(c.canvas, { type: "bar", data: { labels: eav.map((r) => String(r.layer)), datasets: [{ label: "eavss", data: values,
          backgroundColor: eav.map((r) => (top.has(r.layer) ? C.top : C.bar)) }] },
        options: options({ xTitle: "layer", yTitle: "EAVSS" + (yType === "logarithmic" ? " (log scale)" : ""), yType, allTicks: eav.length }) });
      });
    }
    if (probes.length) {
      const allNull = probes.every((r) => num(r.values.auroc) === null);
      const c = card("probe-auroc-chart", "Per-layer probe AUROC (test split)",
        "AUROC of a logistic probe on each layer's activations, whiskers its 95% interval; dashed line: chance (0.5)." +
        (allNull ? " No AUROC here: the test answers are all of one class." : ""));
      box.append(c.el);
      plans.push(() => {
        const opts = options({ xTitle: "layer", yTitle: "AUROC", allTicks: probes.length });
        opts.scales.y.min = 0; opts.scales.y.max = 1;
        opts.plugins.lsOverlays = { lines: [{ value: 0.5, color: C.bandLine, label: "chance" }] };
        draw(c.canvas, { type: "line", plugins: [overlays], data: { labels: probes.map((r) => String(r.layer)), datasets: [{
          label: "auroc", data: probes.map((r) => num(r.values.auroc)), ci: probes.map((r) => [r.values.auroc_ci_low, r.values.auroc_ci_high]),
          borderColor: C.line, backgroundColor: C.line, pointRadius: 4, spanGaps: false }] }, options: opts });
      });
    }
    // Reliability diagram per detector, from the test split's answers.
    const detectors = [...new Set(hm.map((m) => parseScope(m.scope).detector).filter(Boolean))];
    const test = answers.filter((a) => a.stage === "hallucination" && a.split === "test");
    const relTables = [];
    for (const d of detectors) {
      const bins = reliabilityBins(test, d);
      const n = bins.reduce((s, b) => s + b.n, 0);
      const ece = hm.find((m) => m.scope === `detector=${d}` && m.name === "ece");
      const c = card(`reliability-${d}`, `Reliability: ${d}`,
        `Accuracy of the test answers in each confidence bin (${BINS} equal bins, ${n} answers with a confidence); ` +
        `dashed diagonal: perfect calibration. ECE ${fmt(ece ? ece.value : null)} ${ciText(ece)}.`);
      c.canvas.dataset.detector = d;
      box.append(c.el);
      plans.push(() => {
        const opts = options({ xTitle: `confidence (${d})`, yTitle: "accuracy" });
        opts.scales.x.type = "linear"; opts.scales.x.min = 0; opts.scales.x.max = 1;
        opts.scales.y.min = 0; opts.scales.y.max = 1;
        opts.plugins.lsOverlays = { lines: [{ points: [[0, 0], [1, 1]], color: C.ref }] };
        opts.plugins.tooltip = { callbacks: { label: (item) => { const b = bins[item.raw.bin]; return `bin ${b.i}: accuracy ${fmt(b.acc)}, mean confidence ${fmt(b.conf)}, n ${b.n}`; } } };
        draw(c.canvas, { type: "scatter", plugins: [overlays], data: { datasets: [{
          label: d, data: bins.filter((b) => b.n).map((b) => ({ x: b.conf, y: b.acc, bin: b.i })),
          pointRadius: bins.filter((b) => b.n).map((b) => Math.min(14, 3 + Math.sqrt(b.n) * 1.5)),
          backgroundColor: "rgba(29, 78, 216, 0.55)", borderColor: C.line }] }, options: opts });
      });
      relTables.push(h("tr", { dataset: { detector: d } }, h("th", { scope: "row" }, d),
        bins.map((b) => h("td", { class: "num", dataset: { bin: b.i, n: b.n, acc: raw(b.acc), conf: raw(b.conf) } },
          b.n ? `${fmt(b.acc)} (${b.n})` : "—"))));
    }
    if (relTables.length) {
      body.push(h("div", { class: "table-wrap" }, h("table", { class: "data", id: "reliability-table" },
        h("caption", {}, "Accuracy (answers) per confidence bin, test split"),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "detector"),
          Array.from({ length: BINS }, (_, i) => h("th", { scope: "col" }, `${(i / BINS).toFixed(1)}–${((i + 1) / BINS).toFixed(1)}`)))),
        h("tbody", {}, relTables))));
    }
    if (probes.length || eav.length) {
      const probeAt = new Map(probes.map((r) => [r.layer, r]));
      body.push(h("details", { class: "layer-table" }, h("summary", {}, "EAVSS and probe AUROC per layer (table)"),
        h("table", { class: "data", id: "hallucination-layers" },
          h("thead", {}, h("tr", {}, ["layer", "EAVSS", "EAVSS rank", "probe AUROC", "95% CI"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, eav.map((r) => {
            const p = probeAt.get(r.layer);
            return h("tr", { dataset: { layer: r.layer } },
              h("td", { class: "num" }, r.layer), h("td", { class: "num", dataset: { eavss: raw(r.values.eavss) } }, fmt(r.values.eavss)),
              h("td", { class: "num" }, fmt(r.values.rank)),
              h("td", { class: "num", dataset: { auroc: raw(p && p.values.auroc) } }, fmt(p ? p.values.auroc : null)),
              h("td", { class: "num" }, p ? ciText({ ci_low: p.values.auroc_ci_low, ci_high: p.values.auroc_ci_high }) : "—"));
          })))));
    }
    const redraw = () => {
      for (const c of box.querySelectorAll("canvas")) {
        const ch = Chart.getChart(c);
        if (ch) { charts.splice(charts.indexOf(ch), 1); ch.destroy(); }
      }
      for (const p of plans) p();
    };
    const panel = section("hallucination-panel", "Hallucination: detector leaderboard, EAVSS and probe AUROC by layer, reliability per detector", ...body);
    queueMicrotask(redraw);
    return panel;
  }

  // -------------------------------------------------------------- mitigate

  function mitigationPanel(summary, metrics) {
    const mm = metrics.filter((m) => m.stage === "mitigate");
    if (!mm.length) return null;
    const variants = []; const deltas = []; const names = [];
    for (const m of mm) {
      const s = parseScope(m.scope);
      const key = s.detector ? `${s.detector} ${m.name}` : m.name;
      if (s.variant && !variants.includes(s.variant)) variants.push(s.variant);
      if (s.delta && !deltas.includes(s.delta)) deltas.push(s.delta);
      if (!names.some((n) => n.key === key)) names.push({ key, name: m.name, detector: s.detector });
    }
    const find = (kind, v, n) => mm.find((m) => {
      const s = parseScope(m.scope);
      return s[kind] === v && (s.detector || undefined) === n.detector && m.name === n.name;
    });
    // The charts: accuracy, perplexity and each detector's ECE, before (base) and after (eavss, random).
    const charted = names.filter((n) => n.name === "accuracy" || n.name === "perplexity" || n.name === "ece");
    const box = h("div", { class: "chart-grid" });
    const mode = scaleSelect("mitigation-scale", () => redraw());
    const plans = charted.map((n) => {
      const ms = variants.map((v) => find("variant", v, n));
      const c = card(`mitigation-${n.key.replace(/[^a-z0-9_@]+/gi, "-")}`, `${n.key}: before and after`,
        "Bars: base (before), then per method its EAVSS-chosen layers (eavss) and the random-layer control (random), whiskers the 95% intervals.");
      box.append(c.el);
      return () => {
        const values = ms.flatMap((m) => (m ? [m.value, m.ci_low, m.ci_high] : []));
        const yType = scaleFor(mode[1].value, values);
        draw(c.canvas, { type: "bar", plugins: [overlays], data: { labels: variants, datasets: [{ label: n.key,
          data: ms.map((m) => (m ? num(m.value) : null)), ci: ms.map((m) => (m ? [m.ci_low, m.ci_high] : null)),
          backgroundColor: variants.map((v) => VARIANT_COLORS[v] || C.bar) }] },
        options: fitY(options({ xTitle: "variant", yTitle: n.key + (yType === "logarithmic" ? " (log scale)" : ""), yType }), values) });
      };
    });
    const redraw = () => {
      for (const c of box.querySelectorAll("canvas")) {
        const ch = Chart.getChart(c);
        if (ch) { charts.splice(charts.indexOf(ch), 1); ch.destroy(); }
      }
      for (const p of plans) p();
    };
    const layersText = summary
      ? `Tuned layers: ${(summary.layers || []).join(", ") || "—"}; random control layers: ${(summary.control_layers || []).join(", ") || "—"}.`
      : "";
    const variantTable = h("table", { class: "data", id: "mitigation-variants" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "metric"), variants.map((v) => h("th", { scope: "col", colspan: 2 }, v)))),
      h("tbody", {}, names.filter((n) => variants.some((v) => find("variant", v, n))).map((n) => h("tr", { dataset: { metric: n.key } },
        h("th", { scope: "row" }, n.key),
        variants.flatMap((v) => { const m = find("variant", v, n); return [
          h("td", { class: "num", dataset: { variant: v, value: raw(m && m.value) } }, fmt(m ? m.value : null)),
          h("td", { class: "num", dataset: { variant: v, low: raw(m && m.ci_low), high: raw(m && m.ci_high) } }, ciText(m))]; })))));
    // Each method's EAVSS variant against its random-layer control ("eavss-random"; with several
    // methods "<method>_eavss-<method>_random"): whether the interval excludes 0.
    const controls = deltas.filter((d) => !d.endsWith("-base"));
    const verdict = (m) => {
      if (!m || num(m.ci_low) === null || num(m.ci_high) === null) return "—";
      if (m.ci_low > 0) return "above 0";
      if (m.ci_high < 0) return "below 0";
      return "includes 0";
    };
    const deltaTable = deltas.length ? h("table", { class: "data", id: "mitigation-deltas" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "metric"),
        deltas.map((d) => h("th", { scope: "col" }, d.replace("-", " − "))),
        controls.map((d) => h("th", { scope: "col" }, `${d.replace("-", " − ")}: 95% CI`)))),
      h("tbody", {}, names.filter((n) => deltas.some((d) => find("delta", d, n))).map((n) => {
        return h("tr", { dataset: { metric: n.key } }, h("th", { scope: "row" }, n.key),
          deltas.map((d) => { const m = find("delta", d, n); return h("td", { class: "num", dataset: { delta: d, value: raw(m && m.value), low: raw(m && m.ci_low), high: raw(m && m.ci_high) } },
            m && num(m.value) !== null ? `${fmt(m.value)} ${ciText(m)}` : "—"); }),
          controls.map((d) => { const v = verdict(find("delta", d, n)); return h("td", { dataset: { verdict: v, control: d } }, v); }));
      }))) : null;
    const panel = section("mitigation-panel", "Mitigation: before and after, EAVSS layers against the random control",
      h("p", {}, layersText), h("div", { class: "toolbar" }, ...mode), box,
      h("h4", {}, "Per variant (95% intervals)"), h("div", { class: "table-wrap" }, variantTable),
      deltaTable ? h("h4", {}, "Differences (paired, 95% intervals): is tuning the EAVSS layers better than tuning random ones?") : null,
      deltaTable ? h("div", { class: "table-wrap" }, deltaTable) : null);
    queueMicrotask(redraw);
    return panel;
  }

  return { prunePanel, hallucinationPanel, mitigationPanel, spansDecades, parseScope };
};
