// Models: every model with its numbers and downloads, one model's versions, runs and adapters
// (roll back, merge, delete), and the arena: two models on one prompt, side by side.

import {api, path} from "./api.js";
import {bookLine, lists, onModels, refreshModels} from "./lists.js";
import {$, damagedRow, el, fmt, formValues, say, setDefault, settingNames} from "./page.js";

const msg = () => $("#models-msg");

// the formats a model or an adapter downloads as: this app's zip, or an export (export.py) for other tools
const MODEL_FORMATS = [["native", "this app's zip"], ["hf", "Hugging Face folder (zip)"], ["gguf", "GGUF"],
                       ["ollama", "Ollama (zip)"]];
const ADAPTER_FORMATS = [["native", "this app's zip"], ["peft", "PEFT folder (zip)"]];

function downloadLinks(url, formats) {
  const links = formats.map(([f, label]) =>
    el("a", {href: `${url}?format=${f}`, download: "", className: "download"}, label));
  return el("span", {className: "downloads"}, "Download as: ", ...links.flatMap((a, i) => i ? [" · ", a] : [a]));
}

// a model's parent: another model, or a model + adapter it was merged from
const parentName = p => (!p ? "–" : typeof p === "string" ? p : `${p.model} + ${p.adapter}`);

const deleteButton = name =>
  el("button", {type: "button", className: "danger", onclick: () => deleteModel(name)}, "Delete");

function renderModelsTable() {
  const rows = lists.models.map(m => el("tr", {},
    el("td", {className: "name"}, el("a", {href: "#models", onclick: () => showModel(m.name)}, m.name)),
    el("td", {className: "num"}, fmt.params(m.params)), el("td", {className: "num"}, fmt.bytes(m.size_bytes)),
    el("td", {className: "num"}, fmt.int(m.steps)), el("td", {className: "num"}, fmt.num(m.best_val_bpb)),
    el("td", {className: "name"}, parentName(m.parent)), el("td", {}, m.books.map(b => b.name).join(", ") || "–"),
    el("td", {className: "num"}, String(m.versions.length)),
    el("td", {className: "actions"}, downloadLinks(path("download_model", m.name), MODEL_FORMATS),
       deleteButton(m.name))));
  rows.push(...lists.damaged.map(m => damagedRow(m, 9, () => deleteModel(m.name))));
  const none = el("tr", {}, el("td", {colSpan: 9, className: "muted"}, "no models yet: create one"));
  $("#models-table tbody").replaceChildren(...(rows.length ? rows : [none]));
}

const cells = (tag, ...texts) => el("tr", {}, ...texts.map(t => el(tag, {}, t)));

function versionsTable(m) {
  if (!m.versions.length) return el("p", {className: "muted"}, "no versions yet: each finished training run saves one");
  return el("table", {className: "list"}, cells("th", "version", "date", "steps", "best bits per byte", "note", ""),
    ...m.versions.map(v => el("tr", {}, el("td", {className: "name"}, v.version), el("td", {className: "name"}, v.date),
      el("td", {className: "num"}, fmt.int(v.steps)), el("td", {className: "num"}, fmt.num(v.best_val_bpb)),
      el("td", {}, v.note),
      el("td", {}, el("button", {type: "button", onclick: () => rollback(m.name, v.version)}, "Roll back to this")))));
}

function adaptersTable(m) {
  if (!m.adapters.length) return el("p", {className: "muted"}, "none yet: Training → Fine-tune with LoRA");
  const actions = a => el("td", {},
    downloadLinks(path("download_adapter", m.name, a.name), ADAPTER_FORMATS), " ",
    el("button", {type: "button", onclick: () => mergeAdapter(m.name, a.name)}, "Merge into a new model"), " ",
    el("button", {type: "button", className: "danger", onclick: () => deleteAdapter(m.name, a.name)}, "Delete"));
  return el("table", {className: "list"},
    cells("th", "adapter", "rank r / alpha", "layers", "trainable", "steps", "best bits per byte", ""),
    ...m.adapters.map(a => a.damaged ? damagedRow(a, 7, () => deleteAdapter(m.name, a.name)) :
      el("tr", {}, el("td", {className: "name"}, a.name),
      el("td", {className: "name"}, `${a.lora.r} / ${a.lora.alpha}${a.lora.nf4 ? " · NF4" : ""}`),
      el("td", {}, a.lora.targets.join(", ")),
      el("td", {className: "num"}, a.params ? fmt.params(a.params.trainable) : "–"),
      el("td", {className: "num"}, fmt.int((a.run || {}).steps ?? 0)),
      el("td", {className: "num"}, fmt.num((a.run || {}).best_val_bpb)), actions(a))));
}

async function showModel(name) {
  const box = $("#model-detail");
  try {
    const m = await api("GET", path("models", name));
    const cfg = Object.entries(m.config).map(([k, v]) => `${k}=${v}`).join(" · ");
    const run = r => el("li", {}, `${r.date}: ${r.status}, ${fmt.int(r.steps)} steps on ` +
      r.books.map(b => b.name).join(", ") + (r.selfplay_every ? `, self-play every ${r.selfplay_every}` : ""));
    const runs = m.runs.length ? m.runs.map(run) : [el("li", {className: "muted"}, "never trained")];
    box.replaceChildren(
      el("h3", {}, m.name), el("p", {className: "muted"}, `created ${m.created} · ${cfg}`),
      el("h4", {}, "Versions"), versionsTable(m),
      el("h4", {}, "Runs"), el("ul", {}, ...runs),
      el("h4", {}, "LoRA adapters"), adaptersTable(m));
    box.hidden = false;
  } catch (err) { say(msg(), err.message, "error"); }
}

// a change to one model: say so, reload the lists, show the model again
async function changed(text, name) {
  say(msg(), text);
  await refreshModels();
  if (name) await showModel(name);
}

async function rollback(name, version) {
  const ask = `Make ${version} the current weights of ${name}? The current weights are replaced (saved versions stay).`;
  if (!confirm(ask)) return;
  try {
    await api("POST", path("models", name, "rollback"), {version});
    await changed(`${name} is now at ${version}`, name);
  } catch (err) { say(msg(), err.message, "error"); }
}

async function mergeAdapter(name, adapter) {
  const out = prompt(`Name of the new model (${name} with adapter ${adapter} merged into its weights):`,
                     `${name}-${adapter}`);
  if (!out) return;
  try {
    await api("POST", "/merge", {model: name, adapter, out});
    await changed(`created ${out}`);
  } catch (err) { say(msg(), err.message, "error"); }
}

async function deleteAdapter(name, adapter) {
  if (!confirm(`Delete the LoRA adapter "${adapter}" of ${name}? This cannot be undone.`)) return;
  try {
    await api("DELETE", path("models", name, "adapters", adapter));
    await changed(`deleted adapter ${adapter}`, name);
  } catch (err) { say(msg(), err.message, "error"); }
}

async function deleteModel(name) {
  if (!confirm(`Delete the model "${name}" with all its versions and checkpoints? This cannot be undone.`)) return;
  try {
    await api("DELETE", path("models", name));
    $("#model-detail").hidden = true;
    await changed(`deleted ${name}`);
  } catch (err) { say(msg(), err.message, "error"); }
}

// --- the arena: the same prompt and seed through two models; which one loops less

const arena = $("#arena-form");

arena.addEventListener("submit", async ev => {
  ev.preventDefault();
  const box = $("#arena-msg"), f = arena.elements;
  const body = {model_a: f.model_a.value, model_b: f.model_b.value, prompt: f.prompt.value,
                ...formValues(arena, ["adapter_a", "adapter_b", ...settingNames(arena)])};
  if (f.book.value) body.book = f.book.value;
  say(box, "running both models…", "muted");
  try {
    const r = await api("POST", "/arena", body);
    const tie = r.a.repeats === r.b.repeats ? "; both repeat themselves alike" : "";
    say(box, (body.temperature === 0 ? "greedy (temperature 0): each side takes its likeliest token, no randomness"
                                     : `the same random seed for both: ${r.seed}`) + tie);
    $("#arena-out").replaceChildren(...["a", "b"].map(s => arenaSide(r, s, body.prompt)));
  } catch (err) { say(box, err.message, "error"); }
});

// one side: its text, its bits per byte on the book, its repetition score; the side that loops less is marked
function arenaSide(r, s, prompt) {
  const me = r[s], other = r[s === "a" ? "b" : "a"], less = me.repeats < other.repeats;
  return el("div", {className: "panel" + (less ? " wins" : "")},
    el("h4", {}, me.model + (me.adapter ? " + " + me.adapter : ""),
       less ? el("span", {className: "badge done"}, "loops less") : null),
    me.bits_per_byte != null ? el("p", {}, el("strong", {}, fmt.num(me.bits_per_byte)),
                                  ` bits per byte on ${r.book} (lower is better)`) : null,
    el("p", {}, el("strong", {}, fmt.pct(me.repeats)), " of its 4-token pieces repeat an earlier one ",
       el("small", {className: "sym"}, "seq-rep-4, lower loops less")),
    el("pre", {className: "text"}, el("span", {className: "prompt"}, prompt), me.text));
}

const arenaPrompt = () => setDefault(arena.elements.prompt, bookLine(arena.elements.model_a.value));
onModels(() => { renderModelsTable(); arenaPrompt(); });
arena.elements.model_a.addEventListener("change", arenaPrompt);
