// Look inside, three of its views: where the token vectors sit (a PCA map), what NF4 does to one
// layer's weights, and every training run of one or two models on one chart. Each is one request
// to /inside/... whose numbers come from inside.py; this module only draws them.

import {api} from "./api.js";
import {LineChart, ScatterPlot, histogram} from "./chart.js";
import {findModel} from "./lists.js";
import {$, PAGE, el, fmt, say} from "./page.js";

// a token's text with its invisible characters made visible: · a space, ↵ a new line, ⇥ a tab
export const visible = t => t.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");

// --- embeddings: a PCA map of the commonest tokens, for the current weights or a saved version

const TOKEN_KINDS = [
  ["starts a word (a space, then letters)", "#2a6fdb", t => /^ \p{L}/u.test(t)],
  ["letters inside a word", "#1f9d55", t => /^\p{L}+$/u.test(t)],
  ["space or new line", "#9aa1ad", t => /^\s+$/.test(t)],
  ["punctuation, digits, other", "#e0742b", () => true],
];
export const embedPlot = new ScatterPlot($("#embed-canvas"),
                                         {legend: TOKEN_KINDS.map(([label, color]) => ({label, color}))});
const embedForm = $("#embed-form");

export function fillVersionSelect(model) {
  const sel = embedForm.elements.version, m = findModel(model), keep = sel.value;
  sel.replaceChildren(el("option", {value: ""}, "current weights"),
    ...(m ? m.versions : []).map(v => el("option", {value: v.version}, `${v.version} (${fmt.int(v.steps)} steps)`)));
  sel.value = m && m.versions.some(v => v.version === keep) ? keep : "";
}

export async function showEmbeddings(model) {
  const f = embedForm.elements, q = new URLSearchParams({model, n: f.n.value || 150});
  if (f.version.value) q.set("version", f.version.value);
  if (f.book.value) q.set("book", f.book.value);
  try {
    const v = await api("GET", "/inside/embeddings?" + q);
    say($("#embed-msg"), "");
    embedPlot.title = `${v.model}, ${v.version || "current weights"}: ` +
                      `the ${v.points.length} most common tokens of "${v.book}"`;
    embedPlot.points = v.points.map(p => ({x: p.x, y: p.y, label: visible(p.text),
      color: TOKEN_KINDS.find(k => k[2](p.text))[1],
      tip: `${visible(p.text)} · id ${p.id} · ${fmt.int(p.count)} times in the book`}));
    embedPlot.draw();
    $("#embed-info").textContent = `Each dot is one token's ${v.d_model}-number embedding; the horizontal axis holds ` +
      `${fmt.pct(v.explained[0])} of their variance, the vertical ${fmt.pct(v.explained[1])}. The 40 most common are ` +
      "labelled; hover a dot for any other.";
  } catch (err) { say($("#embed-msg"), err.message, "error"); }
}

// --- NF4: one layer's block-normalised weights with the 16 levels on top, and what 4 bits cost

export const nf4 = {view: null};  // the view on the page: redrawn when the window is resized

export async function showNF4(model) {
  const sel = $("#nf4-form").elements.layer, q = new URLSearchParams({model});
  if (sel.value) q.set("layer", sel.value);
  try {
    nf4.view = await api("GET", "/inside/nf4?" + q);
    say($("#nf4-msg"), "");
    sel.replaceChildren(...nf4.view.layers.map(l => el("option", {value: l}, l)));
    sel.value = nf4.view.layer;
    drawNF4();
  } catch (err) { say($("#nf4-msg"), err.message, "error"); }
}

export function drawNF4() {
  const v = nf4.view;
  if (!v) return;
  histogram($("#nf4-canvas"), {
    title: `${v.layer} (${v.shape.join(" × ")}): its ${fmt.int(v.params)} weights, each divided by the largest |w| ` +
           `of its block of ${v.block}`,
    counts: v.histogram, lo: -1, hi: 1, marks: v.levels.map((x, i) => ({x, label: fmt.pct(v.level_share[i], 0)}))});
  const m = v.whole_model, row = (...cells) => el("tr", {}, ...cells.map((c, i) => el(i % 2 ? "td" : "th", {}, c)));
  $("#nf4-numbers").replaceChildren(
    row("reconstruction error (this layer)",
        `RMSE ${v.rmse.toExponential(2)} · ${fmt.pct(v.rel_frobenius)} of the weights' norm`,
        "bits per weight", `${v.bits_per_weight.toFixed(3)} (4 for the level + the block's scale)`),
    row("this layer's memory", `${fmt.bytes(v.bytes_before)} → ${fmt.bytes(v.bytes_after)}`,
        `whole model, its ${m.quantized_layers} linear layers in NF4`,
        `${fmt.bytes(m.bytes_before)} → ${fmt.bytes(m.bytes_after)} · error ${fmt.pct(m.rel_frobenius)}`));
}

// --- runs: every run of one or two models on one chart, with the settings that set them apart

const RUN_COLOURS = ["#2a6fdb", "#e0742b", "#1f9d55", "#7b3fb5", "#c0392b", "#0e9aa7", "#b5651d", "#6b7280"];
export const runCharts = [
  new LineChart($("#runs-loss"), {title: "Loss on training text, lower is better (nats per token)"}),
  new LineChart($("#runs-bpb"), {title: "Held-out bits per byte, lower is better"}),
];

export async function showRuns(names) {
  const q = new URLSearchParams();
  names.forEach(n => q.append("model", n));
  try {
    const {runs} = await api("GET", "/inside/runs?" + q);
    say($("#runs-msg"), runs.length ? "" : `${names.join(" and ")}: no training runs yet`, "muted");
    const series = runs.map((r, i) => ({label: `${r.model} ${r.run}`, color: RUN_COLOURS[i % RUN_COLOURS.length]}));
    runCharts.forEach(c => c.setSeries(series));
    runs.forEach((r, i) => {
      r.loss.forEach(([x, y]) => runCharts[0].push(i, x, y));
      r.val_bpb.forEach(([x, y]) => runCharts[1].push(i, x, y));
    });
    runCharts.forEach(c => c.draw());
    renderRunsTable(runs, series);
  } catch (err) { say($("#runs-msg"), err.message, "error"); }
}

// settings a run changed from the defaults; in bold those that differ between the runs shown
function renderRunsTable(runs, series) {
  const value = (r, k) => JSON.stringify(r.config ? r.config[k] : undefined);
  const keys = [...new Set(runs.flatMap(r => Object.keys(r.config || {})))];
  const differs = new Set(keys.filter(k => new Set(runs.map(r => value(r, k))).size > 1));
  const isDefault = (r, k) => k in PAGE.train && value(r, k) === JSON.stringify(PAGE.train[k].default);
  const changed = (r, k) => differs.has(k) || (k in PAGE.train && !isDefault(r, k));
  const setting = (r, k) => el(differs.has(k) ? "strong" : "span", {}, `${k}=${r.config[k] ?? "none"} `);
  const settings = r => !r.config ? ["(not recorded)"] : keys.filter(k => changed(r, k)).map(k => setting(r, k));
  const td = (text, className = "") => el("td", {className}, text);
  $("#runs-table").replaceChildren(
    el("tr", {}, ...["", "model", "run", "date", "status", "steps", "books", "best held-out bits per byte",
                     "settings changed from the defaults (bold: differs between these runs)"]
      .map(h => el("th", {}, h))),
    ...runs.map((r, i) => el("tr", {},
      td(el("span", {className: "swatch", style: `background:${series[i].color}`})), td(r.model, "name"),
      td(el("code", {}, r.run || "–")), td(r.date ? r.date.replace("T", " ").slice(0, 16) : "–", "name"),
      td(r.status), td(fmt.int(r.steps ?? 0), "num"), td(r.books.join(", ") || "–"),
      td(r.best ? `${fmt.num(r.best[0])} (step ${r.best[1]})` : "–", "name"), el("td", {}, ...settings(r)))));
}
