/* mechedit result viewer: draws a saved result.json of any mechedit result type with plotly.js.
 *
 * A result file is one JSON object whose "format" tag ("mechedit.causal_trace/1", ...) names its type; the
 * renderers below read the same fields the Python result classes write (see their to_json_dict) and draw
 * what their .plot() draws. Nothing here talks to a server except ?src=URL, which fetches that one file.
 *
 * For tests and scripts: window.mechedit.show(object) draws a parsed result, window.mechedit.load(text) a
 * JSON string; <body data-state> is "empty", "loading", "ready" or "error", and #status says why.
 */
(function () {
  "use strict";

  // -- helpers -------------------------------------------------------------------------------------------------

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  /* Text for plotly (which reads a few HTML tags and entities in labels): escaped so a token such as "<br>"
   * shows as itself. */
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  /* A token for an axis: whitespace and quotes made visible (as Python's repr), marked tokens suffixed "*". */
  function tok(t, marked) {
    return esc(JSON.stringify(String(t)).slice(1, -1)) + (marked ? "*" : "");
  }

  function tokenLabels(tokens, marked) {
    const set = new Set(marked || []);
    return tokens.map((t, i) => tok(t, set.has(i)));
  }

  function range(n) { return Array.from({ length: n }, (_, i) => i); }
  function transpose(m) { return m.length ? m[0].map((_, j) => m.map((row) => row[j])) : []; }
  function isNum(v) { return typeof v === "number" && Number.isFinite(v); }
  function fmt(v, digits) {
    return !isNum(v) ? String(v) : Number.isInteger(v) ? String(v) : v.toPrecision(digits || 4);
  }
  function maxOf(m) {
    let best = -Infinity;
    for (const v of m.flat(Infinity)) if (isNum(v) && v > best) best = v;
    return best;
  }
  function subjectPositions(r) {
    return r.subject_range ? range(r.subject_range[1] - r.subject_range[0]).map((i) => i + r.subject_range[0]) : [];
  }

  /* Python's json writes NaN and Infinity, which JSON.parse rejects: turn them (outside strings) into null. */
  function parseResult(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      const fixed = text.replace(/"(?:[^"\\]|\\.)*"|-?\bInfinity\b|\bNaN\b/g, (m) => (m[0] === '"' ? m : "null"));
      return JSON.parse(fixed);
    }
  }

  /* ColorBrewer scales, low to high (plotly.js names some of these too, but dark-to-light, and has no Purples):
   * the same colours as the Python figures. */
  const SCALES = {
    Purples: ["#fcfbfd", "#efedf5", "#dadaeb", "#bcbddc", "#9e9ac8", "#807dba", "#6a51a3", "#54278f", "#3f007d"],
    Greens: ["#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c", "#00441b"],
    Reds: ["#fff5f0", "#fee0d2", "#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c", "#cb181d", "#a50f15", "#67000d"],
    Blues: ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"],
    BuRd: ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d",
      "#b2182b", "#67001f"],  // diverging: blue below the midpoint, red above
  };
  function scale(name) {
    const c = SCALES[name];
    return c ? c.map((colour, i) => [i / (c.length - 1), colour]) : name;
  }

  const ROW_PX = 22;  // height of one heatmap row
  const BASE_LAYOUT = { margin: { l: 140, r: 30, t: 50, b: 60 }, font: { size: 12 } };

  /* One plotly figure in its own div: returns the promise of Plotly.newPlot. */
  function panel(parent, traces, layout, opts) {
    const div = el("div", { class: "panel" });
    parent.append(div);
    const full = Object.assign({}, BASE_LAYOUT, layout);
    if (typeof full.title === "string") {  // left-aligned: the mode bar sits on the right
      full.title = { text: full.title, font: { size: 13 }, x: 0.01, xanchor: "left" };
    }
    return Plotly.newPlot(div, traces, full, Object.assign({ responsive: false, displaylogo: false }, opts));
  }

  function section(title, note) {
    const s = el("section", {});
    if (title) s.append(el("h2", {}, title));
    if (note) s.append(el("p", { class: "note" }, note));
    const panels = el("div", { class: "panels" });
    s.append(panels);
    $("#figures").append(s);
    return panels;
  }

  function heatmapHeight(nRows) { return Math.max(300, 120 + ROW_PX * nRows); }

  // -- causal trace ----------------------------------------------------------------------------------------------

  const KIND_STYLE = {
    hidden: ["Restoring the hidden state", "single restored layer", "Purples"],
    mlp: ["Restoring MLP output", "centre of {w} restored MLP layers", "Greens"],
    attn: ["Restoring attention output", "centre of {w} restored attention layers", "Reds"],
  };

  function causalTrace(r, parent) {
    const labels = tokenLabels(r.tokens, subjectPositions(r));
    const answer = String(r.answer).trim() || JSON.stringify(r.answer);
    const out = [];
    parent = parent || section(`Causal trace: ${JSON.stringify(r.prompt)} → ${JSON.stringify(r.answer)}`,
      `clean p = ${fmt(r.high_score)}, corrupted p = ${fmt(r.low_score)}; subject tokens marked *; ` +
      "colour from the corrupted score up.");
    for (const [kind, s] of Object.entries(r.scores)) {  // s [layer][position]
      const [title, xTitle, colours] = KIND_STYLE[kind] || [kind, "layer", "Viridis"];
      const nLayers = s.length;
      out.push(panel(parent, [{
        type: "heatmap", z: transpose(s), x: range(nLayers), y: range(labels.length), colorscale: scale(colours),
        zmin: r.low_score, zmax: Math.max(maxOf(s), r.low_score + 1e-9), name: kind,
        customdata: labels.map((lab) => Array(nLayers).fill(lab)),
        hovertemplate: "token %{customdata} (position %{y})<br>layer %{x}<br>p = %{z:.4f}<extra>" + kind + "</extra>",
        colorbar: { title: { text: `p(${esc(answer)})`, side: "right" }, thickness: 14 },
      }], {
        title, width: 380 + 8 * nLayers, height: heatmapHeight(labels.length),
        xaxis: { title: { text: xTitle.replace("{w}", r.config && r.config.window) } },
        yaxis: { tickvals: range(labels.length), ticktext: labels, autorange: "reversed" },
      }));
    }
    return out;
  }

  // -- activation and attribution patching -----------------------------------------------------------------------

  const RESIDUAL = new Set(["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]);

  function axesOf(name) {
    if (RESIDUAL.has(name)) return ["position"];
    if (name.endsWith("_by_pos")) return ["head", "position"];
    if (name === "mlp_pre" || name === "mlp_post") return ["neuron"];
    return ["head"];
  }

  function siteScores(r, what, parent) {
    const labels = tokenLabels(r.tokens, r.differing);
    const cfg = r.config || {};
    const corrupted = r.corrupted_prompt != null ? JSON.stringify(r.corrupted_prompt) : "noise on the subject";
    parent = parent || section(
      `${what} (${cfg.direction}, ${cfg.metric}): ${JSON.stringify(r.clean_prompt)} → ${JSON.stringify(r.answer)}`,
      `corrupted: ${corrupted}; clean ${fmt(r.clean_metric)}, corrupted ${fmt(r.corrupted_metric)}; ` +
      "score 1 = clean, 0 = corrupted; tokens that differ marked *.");
    const colour = { colorscale: scale("BuRd"), zmid: 0 };
    const out = [];
    for (const [name, s] of Object.entries(r.scores)) {
      const axes = axesOf(name);
      const nLayers = s.length;
      if (axes[0] === "neuron") {
        const denoise = cfg.direction !== "noise";
        const hits = [];
        s.forEach((row, layer) => row.forEach((v, n) => { if (isNum(v)) hits.push([denoise ? v : 1 - v, layer, n, v]); }));
        hits.sort((a, b) => b[0] - a[0]);
        const top = hits.slice(0, cfg.top_k || 10);
        out.push(panel(parent, [{
          type: "bar", x: top.map((h) => `L${h[1]} N${h[2]}`), y: top.map((h) => h[3]), name,
          hovertemplate: "%{x}<br>score %{y:.4f}<extra>" + name + "</extra>",
        }], { title: `${name}: top ${top.length} neurons (all positions)`, width: 700, height: 340,
          yaxis: { title: { text: "score" } } }));
        continue;
      }
      let z, x, y, ytext, xTitle = "layer";
      if (axes.length === 1 && axes[0] === "position") {
        z = transpose(s); x = range(nLayers); y = range(labels.length); ytext = labels;
      } else if (axes.length === 1) {  // head x layer
        z = transpose(s); x = range(nLayers); y = range(s[0].length); ytext = y.map((h) => `head ${h}`);
      } else {  // [layer][head][position] -> rows: positions, columns: (layer, head)
        const nHeads = s[0].length;
        x = []; for (let l = 0; l < nLayers; l++) for (let h = 0; h < nHeads; h++) x.push(`L${l} H${h}`);
        z = range(labels.length).map((p) => x.map((_, i) => s[Math.floor(i / nHeads)][i % nHeads][p]));
        y = range(labels.length); ytext = labels; xTitle = "layer, head";
      }
      const title = { position: "position × layer", head: "head × layer (all positions)" }[axes.length === 1 ? axes[0] : ""]
        || "position × (layer, head)";
      out.push(panel(parent, [Object.assign({
        type: "heatmap", z, x, y, name, hovertemplate: "%{x} / %{y}<br>score %{z:.4f}<extra>" + name + "</extra>",
        colorbar: { title: { text: "score" }, thickness: 14 },
      }, colour)], {
        title: `${name}: ${title}`, width: Math.max(420, 200 + 14 * x.length), height: heatmapHeight(y.length),
        xaxis: { title: { text: xTitle } }, yaxis: { tickvals: y, ticktext: ytext, autorange: "reversed" },
      }));
    }
    return out;
  }

  function agreement(r, parent) {
    parent = parent || section(`Attribution vs activation patching (${r.direction}, ${r.metric})`,
      "one point per entry compared; the dotted diagonal is perfect agreement.");
    return Object.entries(r.components).map(([name, a]) => {
      const x = r.estimate[name], y = r.exact[name];
      const finite = x.concat(y).filter(isNum);
      const lo = finite.length ? Math.min(...finite) : 0, hi = finite.length ? Math.max(...finite) : 1;
      return panel(parent, [
        { type: "scatter", mode: "lines", x: [lo, hi], y: [lo, hi], line: { color: "grey", dash: "dot" },
          hoverinfo: "skip", showlegend: false },
        { type: "scatter", mode: "markers", x, y, name, marker: { size: 5, opacity: 0.7 },
          hovertemplate: "estimate %{x:.4f}<br>exact %{y:.4f}<extra>" + name + "</extra>" },
      ], { title: `${name}: ρ = ${fmt(a.spearman, 3)}, top-${a.k} overlap ${fmt(a.top_k_overlap, 3)}`,
        width: 420, height: 400, showlegend: false, margin: { l: 60, r: 20, t: 50, b: 50 },
        xaxis: { title: { text: "attribution estimate" } }, yaxis: { title: { text: "exact patching" } } });
    });
  }

  // -- logit lens ------------------------------------------------------------------------------------------------

  function logitLens(r, parent) {
    const nDepths = r.answer_token_prob.length, nTokens = r.tokens.length;
    const labels = tokenLabels(r.tokens, subjectPositions(r));
    const rows = ["embeddings"].concat(range(nDepths - 1).map((d) => `block ${d}`));
    const answer = String(r.answer).trim() || JSON.stringify(r.answer);
    parent = parent || section(`Logit lens: ${JSON.stringify(r.prompt)} → ${JSON.stringify(r.answer)}`,
      "each cell: the lens's top token at that depth and position; colour: p(answer's first token); hover for " +
      "its rank.");
    const text = range(nDepths).map((d) => range(nTokens).map((p) => tok(r.top_tokens[d][p][0])));
    const custom = range(nDepths).map((d) => range(nTokens).map((p) =>
      [r.top_probs[d][p][0], r.answer_rank[d][p], labels[p], rows[d]]));
    const grid = panel(parent, [{
      type: "heatmap", z: r.answer_token_prob, x: range(nTokens), y: range(nDepths), text, customdata: custom,
      texttemplate: "%{text}", textfont: { size: 10 }, colorscale: scale("Blues"), zmin: 0,
      zmax: Math.max(maxOf(r.answer_token_prob), 1e-9), name: "logit lens",
      colorbar: { title: { text: `p(${esc(answer)})`, side: "right" } },
      hovertemplate: "%{customdata[3]}, token %{customdata[2]} (position %{x})<br>" +
        "top token %{text} (p = %{customdata[0]:.4f})<br>" +
        `answer ${esc(JSON.stringify(r.answer))}: p = %{z:.4f}, rank %{customdata[1]}<extra></extra>`,
    }], {
      title: "Logit lens grid", width: Math.max(480, 180 + 70 * nTokens), height: Math.max(320, 120 + 28 * nDepths),
      xaxis: { tickvals: range(nTokens), ticktext: labels, title: { text: "token" } },
      yaxis: { tickvals: range(nDepths), ticktext: rows, title: { text: "residual stream after" } },
    });
    const line = panel(parent, [{
      type: "scatter", mode: "lines+markers", x: rows, y: r.answer_prob, name: "p(answer)",
      hovertemplate: "%{x}<br>p(whole answer) = %{y:.4f}<extra></extra>",
    }], { title: "p(whole answer) by depth, teacher-forced", width: 420, height: 320,
      margin: { l: 60, r: 20, t: 50, b: 80 }, yaxis: { rangemode: "tozero" } });
    return [grid, line];
  }

  // -- gradient norms --------------------------------------------------------------------------------------------

  function gradients(r, parent) {
    const labels = tokenLabels(r.tokens, subjectPositions(r));
    parent = parent || section(`Gradient norms of log p(${JSON.stringify(r.answer)}) for ${JSON.stringify(r.prompt)}`,
      `log p = ${fmt(r.log_prob)}`);
    const kinds = Object.keys(r.modules);
    const nLayers = kinds.length ? r.modules[kinds[0]].length : Object.values(r.sites)[0].length;
    const out = [panel(parent, kinds.map((kind) => ({
      type: "bar", x: range(nLayers), y: r.modules[kind], name: kind, customdata: r.module_names[kind],
      hovertemplate: "layer %{x}<br>%{customdata}<br>norm = %{y:.4g}<extra>" + kind + "</extra>",
    })), { title: "‖∂ log p / ∂ module parameters‖ per module", barmode: "group", width: Math.max(600, 60 * nLayers + 300),
      height: 360, margin: { l: 60, r: 30, t: 50, b: 50 },
      xaxis: { title: { text: "layer" }, tickvals: range(nLayers) }, yaxis: { title: { text: "gradient norm" } } })];
    for (const [comp, g] of Object.entries(r.sites)) {  // g [layer][position]
      out.push(panel(parent, [{
        type: "heatmap", z: transpose(g), x: range(g.length), y: range(labels.length), colorscale: scale("Blues"),
        name: comp, customdata: labels.map((lab) => Array(g.length).fill(lab)),
        hovertemplate: "token %{customdata} (position %{y})<br>layer %{x}<br>norm = %{z:.4g}<extra>" + comp + "</extra>",
      }], { title: `‖∂ log p / ∂ ${comp}‖`, width: 360 + 8 * g.length, height: heatmapHeight(labels.length),
        xaxis: { title: { text: "layer" } }, yaxis: { tickvals: range(labels.length), ticktext: labels, autorange: "reversed" } }));
    }
    return out;
  }

  // -- activation magnitudes -------------------------------------------------------------------------------------

  function magnitudes(r, parent) {
    const labels = tokenLabels(r.tokens, subjectPositions(r));
    parent = parent || section(`Activation magnitudes: ${JSON.stringify(r.prompt)}`,
      `against ${r.baseline_prompts.length} baseline prompts; bars: norm / baseline mean (1 = usual size).`);
    const out = [];
    for (const [comp, n] of Object.entries(r.norms)) {  // n [layer][position]
      const nLayers = n.length;
      out.push(panel(parent, [{
        type: "heatmap", z: transpose(n), x: range(nLayers), y: range(labels.length), colorscale: "Viridis",
        name: comp, customdata: labels.map((lab) => Array(nLayers).fill(lab)),
        hovertemplate: "token %{customdata} (position %{y})<br>layer %{x}<br>‖·‖ = %{z:.4g}<extra>" + comp + "</extra>",
      }], { title: `‖${comp}‖ on the prompt`, width: 360 + 8 * nLayers, height: heatmapHeight(labels.length),
        xaxis: { title: { text: "layer" } }, yaxis: { tickvals: range(labels.length), ticktext: labels, autorange: "reversed" } }));
      const bars = r.comparisons.map((name, j) => {
        const pos = r.positions[j], mean = r.baseline_mean[comp][j], std = r.baseline_std[comp][j];
        const ratio = range(nLayers).map((l) => (isNum(mean[l]) && mean[l] !== 0 ? n[l][pos] / mean[l] : null));
        const z = range(nLayers).map((l) => (isNum(std[l]) && std[l] !== 0 ? (n[l][pos] - mean[l]) / std[l] : null));
        return { type: "bar", x: range(nLayers), y: ratio, name: `${name} (${labels[pos]})`,
          customdata: range(nLayers).map((l) => [mean[l], std[l], z[l]]),
          hovertemplate: `${comp}, ${name} (position ${pos})<br>layer %{x}<br>ratio %{y:.3f}<br>` +
            "baseline mean %{customdata[0]:.4g} ± %{customdata[1]:.3g}<br>z = %{customdata[2]:.2f}<extra></extra>" };
      });
      out.push(panel(parent, bars, { title: `${comp}: norm / baseline mean`, barmode: "group", width: 460,
        height: 320, margin: { l: 60, r: 20, t: 50, b: 50 }, xaxis: { title: { text: "layer" } },
        shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 1, y1: 1, line: { dash: "dot", color: "grey" } }] }));
    }
    return out;
  }

  // -- locate ----------------------------------------------------------------------------------------------------

  function locate(r, parent) {
    parent = parent || section(`Locate: ${JSON.stringify(r.prompt)} → ${JSON.stringify(r.answer)}`,
      `clean p = ${fmt(r.high_score)}, corrupted p = ${fmt(r.low_score)}; edit module ${r.edit_module}; ` +
      `adapter: ${r.adapter_modules.length} modules.`);
    const nums = r.edit_decision.numbers;
    const column = nums.scores, layers = range(column.length);
    const out = [panel(parent, [{
      type: "bar", x: layers, y: column.map((s) => s - r.low_score), customdata: column, name: "MLP indirect effect",
      marker: { color: layers.map((l) => (l === r.edit_layer ? "#1b7837" : "#a6dba0")) },
      hovertemplate: "layer %{x}<br>p = %{customdata:.4f}<br>indirect effect %{y:+.4f}<extra></extra>",
    }], { title: `Edit layer ${r.edit_layer}: MLP indirect effect at the last subject token ` +
        `${esc(JSON.stringify(String(nums.token)))} (window ${nums.window})`, width: Math.max(520, 40 * layers.length + 200),
      height: 320, margin: { l: 60, r: 20, t: 50, b: 50 },
      xaxis: { title: { text: "centre of restored MLP layers" }, tickvals: layers }, yaxis: { title: { text: "p − corrupted p" } } })];
    const kinds = (r.adapter_decision.numbers && r.adapter_decision.numbers.kinds) ||
      Array.from(new Set(r.ranking.map((m) => m.kind)));
    const cell = new Map(r.ranking.map((m) => [`${m.kind}/${m.layer}`, m]));
    const chosen = new Map(r.adapter_modules.map((m, i) => [m, i + 1]));
    const get = (k, l) => cell.get(`${k}/${l}`) || null;
    out.push(panel(parent, [{
      type: "heatmap", x: layers, y: kinds, zmin: 0, zmax: 1, colorscale: "Viridis", name: "combined",
      z: kinds.map((k) => layers.map((l) => (get(k, l) ? get(k, l).combined : null))),
      text: kinds.map((k) => layers.map((l) => (get(k, l) && chosen.has(get(k, l).module) ? String(chosen.get(get(k, l).module)) : ""))),
      texttemplate: "%{text}",
      customdata: kinds.map((k) => layers.map((l) => (get(k, l) ? [get(k, l).module, get(k, l).patch_effect, get(k, l).grad_norm] : ["", null, null]))),
      hovertemplate: "%{customdata[0]}<br>combined %{z:.3f}<br>patching effect %{customdata[1]:.4f}<br>" +
        "gradient norm %{customdata[2]:.4g}<extra></extra>",
      colorbar: { title: { text: "combined" } },
    }], { title: "Combined score per module (numbers: adapter modules by rank)",
      width: Math.max(520, 40 * layers.length + 260), height: 140 + 30 * kinds.length,
      xaxis: { title: { text: "layer" }, tickvals: layers } }));
    const cfg = r.config, wp = cfg.patch_weight, wg = cfg.grad_weight;
    const top = r.ranking.slice(0, Math.max(2 * r.adapter_modules.length, 10));
    const opacity = top.map((m) => (chosen.has(m.module) ? 1 : 0.4));
    out.push(panel(parent, [
      ["patching", (m) => (wp * m.patch_score) / (wp + wg), "#2166ac"],
      ["gradient", (m) => (wg * m.grad_score) / (wp + wg), "#b2182b"],
    ].map(([label, part, colour]) => ({
      type: "bar", x: top.map((m) => m.module), y: top.map(part), name: label, marker: { color: colour, opacity },
      hovertemplate: "%{x}<br>" + label + " part %{y:.3f}<extra></extra>",
    })), { title: "Top of the ranking: weighted patching + weighted gradient parts", barmode: "stack",
      width: Math.max(700, 40 * top.length + 200), height: 460, margin: { l: 60, r: 20, t: 50, b: 220 },
      yaxis: { title: { text: "combined score" } } }));
    for (const [name, sub] of Object.entries(r.evidence || {})) {
      if (!sub) continue;
      const render = rendererFor(sub.format);
      if (!render) continue;
      const p = section(`Evidence: ${name} (${r.edit_decision.sources[name] || (r.adapter_decision.sources || {})[name] || "given"})`);
      out.push(...render(sub, p));
    }
    return out;
  }

  // -- trace summary ---------------------------------------------------------------------------------------------

  function traceSummary(r, parent) {
    const labels = r.roles.map((role, i) => `${esc((r.labels || r.roles)[i])} (${r.counts[i]})`);
    parent = parent || section(`Causal traces averaged over ${r.n_records} facts (${r.model_name})`,
      `mean clean p = ${fmt(r.high_score)}, corrupted p = ${fmt(r.low_score)}; rows: token role (records with it).`);
    return Object.entries(r.effects).map(([kind, e]) => {  // e [role][layer]
      const [title, xTitle, colours] = KIND_STYLE[kind] || [kind, "layer", "Viridis"];
      const nLayers = e[0].length;
      return panel(parent, [{
        type: "heatmap", z: e, x: range(nLayers), y: range(labels.length), colorscale: scale(colours),
        zmin: 0, zmax: Math.max(maxOf(e), 1e-9), name: kind, customdata: labels.map((lab) => Array(nLayers).fill(lab)),
        hovertemplate: "%{customdata}<br>layer %{x}<br>average indirect effect %{z:.4f}<extra>" + kind + "</extra>",
        colorbar: { title: { text: "AIE", side: "right" }, thickness: 12 },
      }], { title: `Average indirect effect: ${title}`, width: 460 + 8 * nLayers, height: 360,
        margin: { l: 190, r: 30, t: 50, b: 60 }, xaxis: { title: { text: xTitle.replace("{w}", r.window) } },
        yaxis: { tickvals: range(labels.length), ticktext: labels, autorange: "reversed" } });
    });
  }

  // -- dispatch --------------------------------------------------------------------------------------------------

  const RENDERERS = {
    "mechedit.causal_trace": causalTrace,
    "mechedit.patching": (r, p) => siteScores(r, "Activation patching", p),
    "mechedit.attribution": (r, p) => siteScores(r, "Attribution patching (first-order estimate)", p),
    "mechedit.attribution_agreement": agreement,
    "mechedit.logit_lens": logitLens,
    "mechedit.gradient_norms": gradients,
    "mechedit.activation_magnitudes": magnitudes,
    "mechedit.locate": locate,
    "mechedit.trace_summary": traceSummary,
  };

  function rendererFor(format) {
    return RENDERERS[String(format || "").split("/")[0]] || null;
  }

  const FACTS = [  // [key, label]: shown above the figures when present
    ["format", "format"], ["model_name", "model"], ["prompt", "prompt"], ["clean_prompt", "clean prompt"],
    ["corrupted_prompt", "corrupted prompt"], ["subject", "subject"], ["answer", "answer"],
    ["high_score", "high score (clean)"], ["low_score", "low score (corrupted)"], ["edit_module", "edit module"],
    ["adapter_modules", "adapter modules"], ["n_records", "records"], ["model_fingerprint", "fingerprint"],
  ];

  function showFacts(r) {
    const dl = el("dl", {});
    for (const [key, label] of FACTS) {
      if (r[key] === undefined || r[key] === null) continue;
      const v = r[key];
      dl.append(el("dt", {}, label), el("dd", {}, isNum(v) ? fmt(v, 6) : JSON.stringify(v)));
    }
    $("#facts").replaceChildren(dl);
  }

  function setState(state, message) {
    document.body.dataset.state = state;
    $("#status").textContent = message;
  }

  function fail(message) {
    setState("error", message);
    return Promise.resolve(false);
  }

  /* Draw a parsed result; resolves true once every figure is drawn. */
  function show(r, source) {
    $("#figures").replaceChildren();
    $("#facts").replaceChildren();
    if (typeof window.Plotly === "undefined") {
      return fail("plotly.min.js did not load. It is not kept in git: run `python viz/build.py` to copy it next " +
        "to this page from the installed plotly package, or open a page built with --standalone.");
    }
    if (!r || typeof r !== "object" || Array.isArray(r)) return fail(`${source}: not a JSON object`);
    const render = rendererFor(r.format);
    if (!render) {
      return fail(`${source}: not a mechedit result this viewer knows (format ${JSON.stringify(r.format)}); known: ` +
        Object.keys(RENDERERS).map((k) => k + "/1").join(", "));
    }
    setState("loading", `drawing ${source} …`);
    showFacts(r);
    let drawn;
    try {
      drawn = render(r);
    } catch (e) {
      return fail(`${source}: cannot draw this ${r.format} (${e.message}); is a field missing?`);
    }
    return Promise.all(drawn).then(() => {
      setState("ready", `${source}: ${r.format}, ${drawn.length} figure${drawn.length === 1 ? "" : "s"}`);
      return true;
    }, (e) => fail(`${source}: plotly failed (${e && e.message})`));
  }

  function load(text, source) {
    let r;
    try {
      r = parseResult(text);
    } catch (e) {
      return fail(`${source}: not JSON (${e.message})`);
    }
    return show(r, source);
  }

  function loadFile(file) {
    setState("loading", `reading ${file.name} …`);
    return file.text().then((text) => load(text, file.name), (e) => fail(`${file.name}: cannot read (${e.message})`));
  }

  function loadUrl(url) {
    setState("loading", `fetching ${url} …`);
    return fetch(url).then((res) => {
      if (!res.ok) throw new Error(`HTTP ${res.status} ${res.statusText}`);
      return res.text();
    }).then((text) => load(text, url), (e) => fail(
      `${url}: cannot fetch (${e.message}).` + (location.protocol === "file:"
        ? " Browsers do not let a page opened from a file read other files: serve the folder " +
          "(python -m http.server) and open the page through http://, or use the file picker."
        : "")));
  }

  // -- wiring ----------------------------------------------------------------------------------------------------

  window.mechedit = { show, load, loadUrl, renderers: RENDERERS };

  $("#file").addEventListener("change", (ev) => { if (ev.target.files[0]) loadFile(ev.target.files[0]); });
  let depth = 0;  // dragenter/dragleave fire for every child element
  document.addEventListener("dragenter", (ev) => { ev.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (ev) => ev.preventDefault());
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    const file = ev.dataTransfer && ev.dataTransfer.files[0];
    if (file) loadFile(file);
  });

  const embedded = document.getElementById("mechedit-result");  // written by `build.py --standalone --result`
  const src = new URLSearchParams(location.search).get("src");
  if (embedded) load(embedded.textContent, embedded.dataset.name || "embedded result");
  else if (src) loadUrl(src);
  else if (typeof window.Plotly === "undefined") show(null, "");  // says how to get plotly.min.js
})();
