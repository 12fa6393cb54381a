// The page: six tabs over the JSON API in server.py. Plain JS, no framework, no build step.
//
// State that matters lives on the server (the training job, metrics, models, books); the page
// polls it, so closing or reloading the tab loses nothing. Every API error arrives as
// {"error": "..."} and is shown next to the form that caused it.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
const PAGE = JSON.parse($("#page-data").textContent);  // presets, every settings field's default/range/help, upload limit
const CONFIG_FIELDS = Object.keys(PAGE.model).filter(f => f !== "dropout");
const ACTIVE = ["queued", "running"];
const RESUMABLE = ["stopped", "interrupted", "failed"];

// ----------------------------------------------------------------------------- helpers

async function api(method, path, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw apiError(r.status, data);
  return data;
}

function apiError(status, data) {
  const e = new Error(data.error || `HTTP ${status}`);
  e.status = status;
  e.field = data.field;
  return e;
}

function say(el, text, kind = "ok") {
  el.textContent = text;
  el.className = "msg " + (text ? kind : "");
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k in e && k !== "style") e[k] = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter(c => c != null));
  return e;
}

// the settings fields of a form (inputs marked data-setting), by name
const settingNames = form => $$("[data-setting]", form).map(i => i.name);

// form fields -> object; numbers become numbers, empty fields are left out
function formValues(form, names) {
  const out = {};
  for (const n of names) {
    const input = form.elements[n];
    const v = input.value.trim();
    if (v === "") continue;
    out[n] = input.type === "number" ? Number(v) : v;
  }
  return out;
}

const fmt = {
  int: n => Number(n).toLocaleString("en-US"),
  num: (x, d = 4) => (x == null ? "–" : Number(x).toFixed(d)),
  params: n => (n >= 1e9 ? (n / 1e9).toFixed(2) + " B" : n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(n)),
  bytes: n => (n >= 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GB" : n >= 2 ** 20 ? (n / 2 ** 20).toFixed(1) + " MB" : n >= 1024 ? (n / 1024).toFixed(1) + " KB" : n + " B"),
  secs: s => (s == null ? "–" : s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min` : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`),
  clock: t => new Date(t * 1000).toLocaleTimeString("en-GB"),
};

// ----------------------------------------------------------------------------- tabs

function showTab(name) {
  if (!$("#tab-" + name)) name = "create";
  $$(".tab").forEach(t => t.classList.toggle("active", t.id === "tab-" + name));
  $$("#tabs button").forEach(b => b.classList.toggle("active", b.dataset.tab === name));
  history.replaceState(null, "", "#" + name);
  if (name === "training") { charts.forEach(c => c.draw()); updateTrainEstimate(); }
  if (name === "inside") lookInside();
}

$$("#tabs button").forEach(b => b.addEventListener("click", () => showTab(b.dataset.tab)));

// ----------------------------------------------------------------------------- shared lists

let models = [], damagedModels = [];  // damaged: {name, damaged: what is wrong and what to do}

async function refreshModels() {
  const all = await api("GET", "/models");
  models = all.filter(m => !m.damaged);
  damagedModels = all.filter(m => m.damaged);
  for (const sel of $$("select.model-select")) {
    const keep = sel.value;
    const none = sel.classList.contains("optional") ? [el("option", {value: ""}, "(none)")] : [];
    sel.replaceChildren(...none, ...models.map(m => el("option", {value: m.name}, m.name)));
    if (models.some(m => m.name === keep)) sel.value = keep;
  }
  renderModelsTable();
  fillAttentionSelects();
  fillVersionSelect();
  if ($("#tab-inside").classList.contains("active")) lookInside();
  $$("select.adapter-select").forEach(fillAdapterSelect);
}

// an adapter select lists the adapters of the model chosen in the select named by data-model
function fillAdapterSelect(sel) {
  const m = models.find(x => x.name === sel.form.elements[sel.dataset.model].value);
  const keep = sel.value;
  sel.replaceChildren(el("option", {value: ""}, "(none)"), ...(m ? m.adapters : []).map(a => el("option", {value: a}, a)));
  sel.value = m && m.adapters.includes(keep) ? keep : "";
}

$$("select.adapter-select").forEach(sel =>
  sel.form.elements[sel.dataset.model].addEventListener("change", () => fillAdapterSelect(sel)));

async function refreshBooks() {
  const all = await api("GET", "/books");
  renderBooksTable(all);
  const books = all.filter(b => !b.damaged);  // damaged: {name, damaged: what is wrong and what to do}
  const checked = new Set($$("#train-books input:checked").map(c => c.value));
  $("#train-books").replaceChildren(...(books.length
    ? books.map(b => el("label", {className: "inline"},
        el("input", {type: "checkbox", name: "books", value: b.name, checked: checked.has(b.name) || books.length === 1}), " " + b.name))
    : [el("span", {className: "hint"}, "upload a book first")]));
  for (const sel of $$("select.book-select")) {
    const keep = sel.value;
    sel.replaceChildren(el("option", {value: ""}, sel.dataset.none || "(none)"), ...books.map(b => el("option", {value: b.name}, b.name)));
    sel.value = books.some(b => b.name === keep) ? keep : "";
  }
}

// ----------------------------------------------------------------------------- create model

const createForm = $("#create-form");
let estimateSeq = 0, estimateTimer = null;

function fieldError(form, field, text) {
  $$(".field-error", form).forEach(s => { if (!field || s.dataset.for === field) s.textContent = field ? text : ""; });
  $$("input", form).forEach(i => { if (!field || i.name === field) i.classList.toggle("invalid", Boolean(field && text)); });
}

function usePreset(name) {
  for (const f of CONFIG_FIELDS) createForm.elements[f].value = PAGE.presets[name][f];
  $$("[data-preset]").forEach(b => b.classList.toggle("active", b.dataset.preset === name));
  updateEstimate();
}

async function updateEstimate() {
  const seq = ++estimateSeq;
  fieldError(createForm, null);
  const values = formValues(createForm, CONFIG_FIELDS);
  const missing = CONFIG_FIELDS.find(f => !(f in values));
  const out = $("#estimate");
  if (missing) {
    fieldError(createForm, missing, "required");
    out.className = "estimate bad";
    out.textContent = `${missing} is required`;
    return;
  }
  try {
    const e = await api("GET", "/estimate?" + new URLSearchParams(values));
    if (seq !== estimateSeq) return;  // an older answer arriving late
    const m = e.memory;
    out.className = "estimate";
    out.replaceChildren(
      el("strong", {}, `${fmt.params(e.params)} parameters`), ` (${fmt.int(e.params)}) · training memory at its peak ≈ `,
      el("strong", {}, fmt.bytes(m.total)), ` at batch ${e.batch_size}: weights ${fmt.bytes(m.weights)} + AdamW ${fmt.bytes(m.adam)} + ` +
      `activations ${fmt.bytes(m.activations)} (the gradients, ${fmt.bytes(m.grads)}, come after them) · ` +
      `${fmt.params(e.flops_per_token)}FLOPs per token`);
  } catch (err) {
    if (seq !== estimateSeq) return;
    if (err.field) fieldError(createForm, err.field, err.message);
    out.className = "estimate bad";
    out.textContent = err.message;
  }
}

$$("[data-preset]").forEach(b => b.addEventListener("click", () => usePreset(b.dataset.preset)));
CONFIG_FIELDS.forEach(f => createForm.elements[f].addEventListener("input", () => {
  $$("[data-preset]").forEach(b => b.classList.remove("active"));
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(updateEstimate, 150);
}));

createForm.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#create-msg");
  const body = {name: createForm.elements.name.value.trim(), ...formValues(createForm, CONFIG_FIELDS)};
  fieldError(createForm, null);
  if (!body.name) return fieldError(createForm, "name", "give the model a name");
  try {
    const m = await api("POST", "/create_model", body);
    say(msg, `Created ${m.name}: ${fmt.params(m.params)} parameters. Next: upload a book, then train it.`);
    await refreshModels();
  } catch (err) {
    say(msg, err.message, "error");
    if (err.field || err.status === 409) fieldError(createForm, err.field || "name", err.message);
  }
});

// ----------------------------------------------------------------------------- books

function renderBooksTable(books) {
  const rows = books.map(b => b.damaged ? damagedRow(b, 7, () => deleteBook(b.name)) : el("tr", {},
    el("td", {}, b.name), el("td", {}, fmt.bytes(b.text_bytes)), el("td", {}, fmt.int(b.characters)),
    el("td", {}, b.encoding), el("td", {}, b.language), el("td", {}, b.format),
    el("td", {className: "actions"},
      el("button", {type: "button", onclick: () => previewBook(b.name)}, "Preview"),
      el("button", {type: "button", className: "danger", onclick: () => deleteBook(b.name)}, "Delete"))));
  $("#books-table tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colSpan: 7, className: "muted"}, "no books yet"))]));
}

async function previewBook(name) {
  try {
    const b = await api("GET", "/books/" + encodeURIComponent(name));
    showPreview(b);
  } catch (err) { say($("#upload-msg"), err.message, "error"); }
}

function showPreview(b) {
  const box = $("#book-preview");
  box.hidden = false;
  $("h3", box).textContent = `${b.name} — ${b.notes.join("; ")}`;
  $("pre", box).textContent = b.preview;
}

async function deleteBook(name) {
  if (!confirm(`Delete the book "${name}"? Models trained on it keep their weights.`)) return;
  try {
    await api("DELETE", "/books/" + encodeURIComponent(name));
    $("#book-preview").hidden = true;
    await refreshBooks();
  } catch (err) { say($("#upload-msg"), err.message, "error"); }
}

// XMLHttpRequest, not fetch: only XHR reports upload progress
function uploadBook(file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const data = new FormData();
    data.append("file", file);
    if (name) data.append("name", name);
    xhr.upload.onprogress = e => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => {
      let body;
      try { body = JSON.parse(xhr.responseText); } catch { body = {error: `HTTP ${xhr.status}`}; }
      xhr.status < 300 ? resolve(body) : reject(apiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new Error("upload failed: the connection was closed"));
    xhr.open("POST", "/upload_book");
    xhr.send(data);
  });
}

$("#upload-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const form = ev.target, msg = $("#upload-msg"), bar = $("#upload-progress");
  const file = form.elements.file.files[0];
  if (!file) return say(msg, "choose a file first", "error");
  if (file.size > PAGE.max_upload_bytes) {
    return say(msg, `${file.name} is ${fmt.bytes(file.size)}; the upload limit is ${fmt.bytes(PAGE.max_upload_bytes)}`, "error");
  }
  bar.hidden = false;
  bar.value = 0;
  say(msg, `uploading ${file.name}…`, "muted");
  try {
    const b = await uploadBook(file, form.elements.name.value.trim(), f => { bar.value = f; });
    say(msg, `Added "${b.name}": ${fmt.bytes(b.bytes)}, ${fmt.int(b.characters)} characters, ${b.encoding}, language ${b.language}.`);
    showPreview(b);
    form.reset();
    await refreshBooks();
  } catch (err) {
    say(msg, err.message, "error");
  } finally {
    bar.hidden = true;
  }
});

// ----------------------------------------------------------------------------- training

const charts = [
  new LineChart($("#chart-loss"), {title: "Loss (nats per token)", series: [{label: "train", color: "#2a6fdb"}, {label: "val", color: "#e0742b"}]}),
  new LineChart($("#chart-bpb"), {title: "Validation bits per byte", series: [{label: "val bits/byte", color: "#7b3fb5"}]}),
  new LineChart($("#chart-selfplay"), {title: "Self-play: greedy wants to repeat itself", series: [
    {label: "share of tokens", color: "#1f9d55"}, {label: "share of rollouts", color: "#b5651d"}]}),
];
const trainForm = $("#train-form");
const watch = {jobId: null, logSeq: 0, metricsNext: 0, runId: null, metricsState: null, state: "idle"};

function resetWatch(job) {
  Object.assign(watch, {jobId: job.id, logSeq: 0, metricsNext: 0, runId: null, metricsState: null});
  $("#train-log").textContent = "";
  charts.forEach(c => { c.clear(); c.draw(); });
  clearSamples();
}

// the timeline of samples: at each evaluation the same prompt, continued with the same seed
function clearSamples() {
  $("#samples").replaceChildren(el("li", {className: "muted"}, "none yet: they appear at each evaluation"));
}

function addSample(step, sample) {
  const list = $("#samples");
  if (!$(".sample", list)) list.replaceChildren();
  list.append(el("li", {className: "sample"}, el("strong", {}, `step ${fmt.int(step)}: `),
                 el("span", {className: "prompt"}, sample.prompt), sample.text));
}

let pollTimer = null, polling = false;

function pollSoon(ms = 0) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollStatus, ms);
}

// one poll at a time (two would both append the same log events); every second while a job runs
async function pollStatus() {
  if (polling) return pollSoon(200);
  polling = true;
  let job = null;
  try {
    job = await api("GET", `/training_status?since=${watch.logSeq}`);
    if (job.id !== watch.jobId || job.seq < watch.logSeq) {  // a new job, or the server restarted
      resetWatch(job);
      job = await api("GET", "/training_status?since=0");
    }
    renderStatus(job);
    appendLog(job.events);
    if (job.run_id && (ACTIVE.includes(job.state) || watch.metricsState !== job.state)) {
      await pollMetrics(job);  // while it runs, and once more when it ends
      watch.metricsState = job.state;
    }
  } catch (err) {
    $("#job-line").textContent = "cannot reach the server: " + err.message;
  } finally {
    polling = false;
  }
  pollSoon(job && ACTIVE.includes(job.state) ? 1000 : 3000);
}

async function pollMetrics(job) {
  if (job.run_id !== watch.runId) {
    watch.runId = job.run_id;
    watch.metricsNext = 0;
    charts.forEach(c => c.clear());
    clearSamples();
  }
  const q = new URLSearchParams({since: watch.metricsNext, run: job.run_id});
  if (job.adapter) q.set("adapter", job.adapter);
  const m = await api("GET", `/models/${encodeURIComponent(job.model)}/metrics?${q}`);
  if (m.reset) {
    charts.forEach(c => c.clear());
    clearSamples();
  }
  watch.metricsNext = m.next;
  for (const r of m.rows) {
    charts[0].push(0, r.step, r.loss);
    charts[0].push(1, r.step, r.val_loss);
    charts[1].push(0, r.step, r.val_bpb);
    if (r.selfplay) {
      charts[2].push(0, r.step, r.selfplay.repeat_rate);
      charts[2].push(1, r.step, r.selfplay.looping);
    }
    if (r.sample) addSample(r.step, r.sample);
  }
  if (m.rows.length || m.reset) charts.forEach(c => c.draw());
  if (m.rows.some(r => r.selfplay)) showSelfplayExample(job);
}

// the latest self-play rollout, with the repeats it pushed down struck out next to what it wrote instead
async function showSelfplayExample(job) {
  const q = job.adapter ? "?adapter=" + encodeURIComponent(job.adapter) : "";
  try {
    const x = await api("GET", `/models/${encodeURIComponent(job.model)}/selfplay_example${q}`);
    $("#selfplay-step").textContent = `— step ${x.step}`;
    $("#selfplay-text").replaceChildren(el("span", {className: "prompt"}, x.prompt), ...x.tokens.map(t =>
      t.pushed_down == null ? el("span", {className: "tok"}, t.text)
        : el("span", {className: "tok blocked", title: `greedy wanted ${JSON.stringify(t.pushed_down)} here: a repeat`},
             el("del", {}, t.pushed_down), t.text)));
    $("#selfplay-view").hidden = false;
  } catch (err) { /* no self-play step yet */ }
}

function renderStatus(job) {
  const active = ACTIVE.includes(job.state);
  for (const badge of [$("#job-state"), $("#job-badge")]) {
    badge.className = "badge " + job.state;
  }
  $("#job-state").textContent = job.state;
  $("#job-badge").textContent = job.state === "idle" ? "no job" : `${job.model}: ${job.state} ${job.step ?? 0}/${job.total ?? "?"}`;
  $("#job-title").textContent = job.model ?
    `${job.model}${job.adapter ? ", LoRA adapter " + job.adapter : ""} on ${job.books.join(", ")}` : "no training job yet";
  $("#job-progress").value = job.total ? job.step / job.total : 0;
  $("#job-line").textContent = job.state === "idle" ? "" :
    `step ${fmt.int(job.step ?? 0)} / ${fmt.int(job.total ?? 0)}` +
    (job.tokens_per_s ? ` · ${fmt.int(Math.round(job.tokens_per_s))} tokens/s` : "") +
    (active && job.eta_s != null ? ` · ETA ${fmt.secs(job.eta_s)}` : "");
  $("#n-loss").textContent = fmt.num(job.loss);
  $("#n-val_loss").textContent = fmt.num(job.val_loss);
  $("#n-val_bpb").textContent = fmt.num(job.val_bpb);
  $("#n-repeat_rate").textContent = fmt.num(job.repeat_rate, 3);
  const errBox = $("#job-error");
  errBox.hidden = !job.error;
  errBox.textContent = job.error || "";
  $("#train-start").disabled = active;
  $("#train-stop").disabled = !active;
  $("#train-resume").disabled = !RESUMABLE.includes(job.state);
  if (watch.state !== job.state && !active && watch.state !== "idle") refreshModels();  // a run finished: new steps/versions
  watch.state = job.state;
}

function logLine(e) {
  const t = fmt.clock(e.time);
  switch (e.type) {
    case "start": return `${t} started at step ${e.step}/${e.total} on ${e.device} (${e.precision}); ` +
      `${fmt.int(e.tokens.train)} train and ${fmt.int(e.tokens.val)} validation tokens; ` +
      `torch.compile ${e.compiled ? "on" : "off"} (${e.compile_reason})`;
    case "step": return `${t} step ${e.step}/${e.total} loss ${fmt.num(e.loss)}` +
      (e.val_loss != null ? ` · val loss ${fmt.num(e.val_loss)} · bits/byte ${fmt.num(e.val_bpb)}` : "") +
      (e.selfplay ? ` · self-play: greedy wanted ${fmt.num(100 * e.selfplay.repeat_rate, 1)}% repeats` : "") +
      ` · ${fmt.int(Math.round(e.tokens_per_s))} tok/s`;
    case "stop_requested": return `${t} stop requested: finishing the current step`;
    case "stopped": return `${t} stopped at step ${e.step}/${e.total}; checkpoint saved, Resume continues from here`;
    case "done": return `${t} done: ${e.step} steps, best val bits/byte ${fmt.num(e.best && e.best[0])}` +
      (e.best ? ` (step ${e.best[1]})` : "");
    case "failed": return `${t} failed: ${e.error}`;
    case "warning": return `${t} warning: ${e.message}`;
    case "info": return `${t} ${e.message}`;
    default: return `${t} ${JSON.stringify(e)}`;
  }
}

function appendLog(events) {
  if (!events.length) return;
  const log = $("#train-log");
  log.textContent += events.map(e => logLine(e) + "\n").join("");
  watch.logSeq = events[events.length - 1].seq;
  log.scrollTop = log.scrollHeight;
}

trainForm.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#train-msg");
  const body = {model: trainForm.elements.model.value, books: $$("#train-books input:checked").map(c => c.value),
                ...formValues(trainForm, settingNames($("#train-form .fields")))};
  body.selfplay_every = trainForm.elements.selfplay.checked ? Number(trainForm.elements.selfplay_every.value) : 0;
  if (!body.model) return say(msg, "create a model first", "error");
  if (!body.books.length) return say(msg, "tick at least one book", "error");
  if (trainForm.elements.mode.value === "lora") {
    Object.assign(body, {mode: "lora", lora_targets: $$("#lora-options [name=lora_targets]:checked").map(c => c.value),
                         lora_nf4: trainForm.elements.lora_nf4.checked,
                         ...formValues(trainForm, ["adapter", ...settingNames($("#lora-options"))])});
  }
  try {
    const job = await api("POST", "/train", body);
    say(msg, `job ${job.id} started`);
    pollSoon();
  } catch (err) { say(msg, err.message, "error"); }
});

// What a run will cost, before Start: a probe of a few steps on this machine (runs.step_time)
let trainEstimateSeq = 0, trainEstimateTimer = null;

async function updateTrainEstimate() {
  const seq = ++trainEstimateSeq, out = $("#train-estimate"), model = trainForm.elements.model.value;
  if (!model) { out.textContent = ""; return; }
  const v = formValues(trainForm, ["steps", "minutes", "batch_size"]);
  out.className = "estimate muted";
  out.textContent = "timing a few training steps on this machine…";
  try {
    const e = await api("GET", `/models/${encodeURIComponent(model)}/step_time?` + new URLSearchParams(v));
    if (seq !== trainEstimateSeq) return;
    const minutes = Number(v.minutes || 0), per1000 = 1000 * e.seconds_per_step;
    const cost = minutes > 0 ? `a ${minutes}-minute budget fits ≈ ${fmt.int(Math.floor(minutes * 60 / e.seconds_per_step))} steps`
                             : v.steps ? `${fmt.int(v.steps)} steps take ≈ ${fmt.secs(v.steps * e.seconds_per_step)}` : "";
    out.className = "estimate";
    out.replaceChildren(el("strong", {}, `≈ ${fmt.secs(per1000)} per 1000 steps`),
      ` on this machine (${e.seconds_per_step.toFixed(3)} s per step, ${e.precision}, measured without torch.compile)${cost && ": " + cost}` +
      ` · torch.compile ${e.compile ? "on" : "off"}: ${e.compile_reason}` +
      " · evaluations and checkpoints add a little");
  } catch (err) {
    if (seq !== trainEstimateSeq) return;
    out.className = "estimate muted";
    out.textContent = err.message;
  }
}

trainForm.elements.model.addEventListener("change", updateTrainEstimate);
["steps", "minutes", "batch_size"].forEach(f => trainForm.elements[f].addEventListener("input", () => {
  clearTimeout(trainEstimateTimer);
  trainEstimateTimer = setTimeout(updateTrainEstimate, 300);
}));

$$("#train-form [name=mode]").forEach(r => r.addEventListener("change", () => {
  $("#lora-options").hidden = trainForm.elements.mode.value !== "lora";
}));

$("#train-stop").addEventListener("click", async () => {
  try { await api("POST", "/stop_training"); say($("#train-msg"), "stopping after the current step…", "muted"); pollSoon(); }
  catch (err) { say($("#train-msg"), err.message, "error"); }
});

$("#train-resume").addEventListener("click", async () => {
  try { await api("POST", "/resume_training"); say($("#train-msg"), "resumed from the last checkpoint"); pollSoon(); }
  catch (err) { say($("#train-msg"), err.message, "error"); }
});

// ----------------------------------------------------------------------------- generation

const genForm = $("#gen-form");
const SAMPLING = ["adapter", ...settingNames(genForm)];
let genAbort = null;

function tokenColour(p) { return `hsl(${Math.round(120 * p)}, 75%, 85%)`; }  // red = unlikely, green = likely

function addToken(out, piece) {
  if (!piece.text) return;  // half of a multi-byte character: it arrives with the next token
  const span = el("span", {className: "tok"}, piece.text);
  if (piece.prob != null) {
    span.style.background = tokenColour(piece.prob);
    span.dataset.info = JSON.stringify({p: piece.prob, top: piece.top});
  }
  out.append(span);
}

// Server-Sent Events over fetch (EventSource cannot POST): blocks separated by a blank line
async function readEvents(response, onEvent) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const type = (block.match(/^event: (.*)$/m) || [, "message"])[1];
      const data = block.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data) onEvent(type, JSON.parse(data));  // a block of only ": ping" comments keeps the connection alive
    }
  }
}

genForm.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#gen-msg"), out = $("#gen-output"), stats = $("#gen-stats");
  const body = {model: genForm.elements.model.value, prompt: genForm.elements.prompt.value, ...formValues(genForm, SAMPLING)};
  if (!body.model) return say(msg, "create and train a model first", "error");
  out.replaceChildren(el("span", {className: "prompt"}, body.prompt));
  say(msg, "");
  stats.textContent = "";
  genAbort = new AbortController();
  $("#gen-start").disabled = true;
  $("#gen-stop").disabled = false;
  const t0 = performance.now();
  let first = null, n = 0;
  try {
    const r = await fetch("/generate_stream", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify(body), signal: genAbort.signal});
    if (!r.ok) throw apiError(r.status, await r.json().catch(() => ({})));
    await readEvents(r, (type, data) => {
      if (type === "error") throw new Error(data.error);
      if (type === "done") {
        stats.textContent = `${data.tokens} tokens in ${data.seconds.toFixed(2)} s · first token after ${((first - t0) / 1000).toFixed(3)} s in this browser`;
        return;
      }
      first = first ?? performance.now();
      n++;
      addToken(out, data);
    });
  } catch (err) {
    if (err.name !== "AbortError") say(msg, err.message, "error");
    else stats.textContent = `stopped after ${n} tokens`;
  } finally {
    $("#gen-start").disabled = false;
    $("#gen-stop").disabled = true;
  }
});

$("#gen-stop").addEventListener("click", () => genAbort && genAbort.abort());

// the top-5 tooltip of the token view
const tooltip = $("#tooltip");
$("#gen-output").addEventListener("mouseover", ev => {
  const span = ev.target.closest(".tok");
  if (!span || !span.dataset.info) return;
  const {p, top} = JSON.parse(span.dataset.info);
  tooltip.replaceChildren(
    el("div", {}, el("strong", {}, JSON.stringify(span.textContent)), ` had probability ${(100 * p).toFixed(1)}%`),
    el("table", {}, ...top.map(([t, q]) => el("tr", {}, el("td", {}, el("code", {}, JSON.stringify(t))), el("td", {}, `${(100 * q).toFixed(1)}%`)))));
  const r = span.getBoundingClientRect();
  tooltip.style.left = `${r.left + window.scrollX}px`;
  tooltip.style.top = `${r.bottom + window.scrollY + 4}px`;
  tooltip.hidden = false;
});
$("#gen-output").addEventListener("mouseout", () => { tooltip.hidden = true; });

// ----------------------------------------------------------------------------- attention view

const attnForm = $("#attn-form");

function fillAttentionSelects() {
  const m = models.find(x => x.name === genForm.elements.model.value);
  if (!m) return;
  const {num_layers: L, num_heads: H} = m.config;
  const keep = [attnForm.elements.layer.value, attnForm.elements.head.value];
  attnForm.elements.layer.replaceChildren(...Array.from({length: L}, (_, i) => el("option", {value: i}, String(i))));
  attnForm.elements.head.replaceChildren(el("option", {value: ""}, "mean of all"),
    ...Array.from({length: H}, (_, i) => el("option", {value: i}, String(i))));
  if (keep[0] < L) attnForm.elements.layer.value = keep[0];
  attnForm.elements.head.value = keep[1] !== "" && keep[1] < H ? keep[1] : "0";
}

genForm.elements.model.addEventListener("change", fillAttentionSelects);

attnForm.addEventListener("submit", async ev => {
  ev.preventDefault();
  const head = attnForm.elements.head.value;
  try {
    const a = await api("POST", "/attention", {model: genForm.elements.model.value, adapter: genForm.elements.adapter.value || null,
                                              prompt: genForm.elements.prompt.value,
                                              layer: Number(attnForm.elements.layer.value), head: head === "" ? null : Number(head)});
    say($("#attn-msg"), "");
    drawAttention(a);
  } catch (err) { say($("#attn-msg"), err.message, "error"); }
});

function drawAttention(a) {
  const canvas = $("#attn-canvas"), T = a.tokens.length;
  const cell = Math.max(8, Math.min(28, Math.floor(560 / T))), margin = 96;
  const size = margin + T * cell + 4, dpr = window.devicePixelRatio || 1;
  canvas.style.width = canvas.style.height = size + "px";
  canvas.width = canvas.height = size * dpr;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = `${Math.min(12, cell)}px ui-monospace, monospace`;
  const label = t => JSON.stringify(t).slice(1, -1).slice(0, 12);
  a.attention.forEach((row, i) => row.forEach((w, j) => {
    ctx.fillStyle = j > i ? "#f6f6f6" : `rgba(30, 70, 160, ${Math.sqrt(w)})`;  // sqrt: small weights stay visible
    ctx.fillRect(margin + j * cell, margin + i * cell, cell - 1, cell - 1);
  }));
  ctx.fillStyle = "#333";
  ctx.textAlign = "right";
  a.tokens.forEach((t, i) => ctx.fillText(label(t), margin - 4, margin + i * cell + cell * 0.75));
  a.tokens.forEach((t, j) => {
    ctx.save();
    ctx.translate(margin + j * cell + cell * 0.75, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(label(t), 0, 0);
    ctx.restore();
  });
  canvas.onmousemove = e => {
    const i = Math.floor((e.offsetY - margin) / cell), j = Math.floor((e.offsetX - margin) / cell);
    if (i < 0 || j < 0 || i >= T || j >= T) return;
    $("#attn-info").textContent = `"${label(a.tokens[i])}" (row ${i}) → "${label(a.tokens[j])}" (column ${j}): ${a.attention[i][j].toFixed(3)}`;
  };
  $("#attn-info").textContent = `layer ${a.layer}, ${a.head == null ? "mean of all heads" : "head " + a.head} · ${T} tokens · hover a cell`;
}

// ----------------------------------------------------------------------------- models

function renderModelsTable() {
  const rows = models.map(m => el("tr", {},
    el("td", {}, el("a", {href: "#models", onclick: () => showModel(m.name)}, m.name)),
    el("td", {}, fmt.params(m.params)), el("td", {}, fmt.bytes(m.size_bytes)), el("td", {}, fmt.int(m.steps)),
    el("td", {}, fmt.num(m.best_val_bpb)), el("td", {}, parentName(m.parent)),
    el("td", {}, m.books.map(b => b.name).join(", ") || "–"), el("td", {}, String(m.versions.length)),
    el("td", {className: "actions"},
      downloadLinks("/download_model/" + encodeURIComponent(m.name), MODEL_FORMATS),
      el("button", {type: "button", className: "danger", onclick: () => deleteModel(m.name)}, "Delete"))));
  rows.push(...damagedModels.map(m => damagedRow(m, 9, () => deleteModel(m.name))));
  $("#models-table tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colSpan: 9, className: "muted"}, "no models yet: create one"))]));
}

// a model, book or adapter the server could not read: {name, damaged: what is wrong and what to do}, and Delete
function damagedRow(r, columns, onDelete) {
  return el("tr", {className: "damaged"},
    el("td", {}, r.name), el("td", {colSpan: columns - 2, className: "msg error"}, "damaged: " + r.damaged),
    el("td", {className: "actions"}, el("button", {type: "button", className: "danger", onclick: onDelete}, "Delete")));
}

// the formats a model or an adapter downloads as: this app's zip, or an export (export.py) for other tools
const MODEL_FORMATS = [["native", "this app's zip"], ["hf", "Hugging Face folder (zip)"], ["gguf", "GGUF"],
                       ["ollama", "Ollama (zip)"]];
const ADAPTER_FORMATS = [["native", "this app's zip"], ["peft", "PEFT folder (zip)"]];

function downloadLinks(url, formats) {
  const links = formats.map(([f, label]) => el("a", {href: `${url}?format=${f}`, download: "", className: "download"}, label));
  return el("span", {className: "downloads"}, "Download as: ", ...links.flatMap((a, i) => i ? [" · ", a] : [a]));
}

// a model's parent: another model, or a model + adapter it was merged from
function parentName(p) {
  return !p ? "–" : typeof p === "string" ? p : `${p.model} + ${p.adapter}`;
}

async function showModel(name) {
  const box = $("#model-detail");
  try {
    const m = await api("GET", "/models/" + encodeURIComponent(name));
    const cfg = Object.entries(m.config).map(([k, v]) => `${k}=${v}`).join(" · ");
    box.replaceChildren(
      el("h3", {}, m.name), el("p", {className: "muted"}, `created ${m.created} · ${cfg}`),
      el("h4", {}, "Versions"),
      m.versions.length ? el("table", {className: "list"},
        el("tr", {}, el("th", {}, "version"), el("th", {}, "date"), el("th", {}, "steps"), el("th", {}, "best bits/byte"), el("th", {}, "note"), el("th", {})),
        ...m.versions.map(v => el("tr", {}, el("td", {}, v.version), el("td", {}, v.date), el("td", {}, fmt.int(v.steps)),
          el("td", {}, fmt.num(v.best_val_bpb)), el("td", {}, v.note),
          el("td", {}, el("button", {type: "button", onclick: () => rollback(m.name, v.version)}, "Roll back to this"))))) :
        el("p", {className: "muted"}, "no versions yet: each finished training run saves one"),
      el("h4", {}, "Runs"),
      el("ul", {}, ...(m.runs.length ? m.runs.map(r => el("li", {},
        `${r.date}: ${r.status}, ${fmt.int(r.steps)} steps on ${r.books.map(b => b.name).join(", ")}` +
        (r.selfplay_every ? `, self-play every ${r.selfplay_every}` : ""))) : [el("li", {className: "muted"}, "never trained")])),
      el("h4", {}, "LoRA adapters"),
      m.adapters.length ? el("table", {className: "list"},
        el("tr", {}, el("th", {}, "adapter"), el("th", {}, "rank r / alpha"), el("th", {}, "layers"), el("th", {}, "trainable"),
           el("th", {}, "steps"), el("th", {}, "best bits/byte"), el("th", {})),
        ...m.adapters.map(a => a.damaged ? damagedRow(a, 7, () => deleteAdapter(m.name, a.name)) :
          el("tr", {}, el("td", {}, a.name), el("td", {}, `${a.lora.r} / ${a.lora.alpha}${a.lora.nf4 ? " · NF4" : ""}`),
          el("td", {}, a.lora.targets.join(", ")), el("td", {}, a.params ? fmt.params(a.params.trainable) : "–"),
          el("td", {}, fmt.int((a.run || {}).steps ?? 0)), el("td", {}, fmt.num((a.run || {}).best_val_bpb)),
          el("td", {}, downloadLinks(`/download_adapter/${encodeURIComponent(m.name)}/${encodeURIComponent(a.name)}`, ADAPTER_FORMATS), " ",
                       el("button", {type: "button", onclick: () => mergeAdapter(m.name, a.name)}, "Merge into a new model"), " ",
                       el("button", {type: "button", className: "danger", onclick: () => deleteAdapter(m.name, a.name)}, "Delete"))))) :
        el("p", {className: "muted"}, "none yet: Training → Fine-tune with LoRA"));
    box.hidden = false;
  } catch (err) { say($("#models-msg"), err.message, "error"); }
}

async function rollback(name, version) {
  if (!confirm(`Make ${version} the current weights of ${name}? The current weights are replaced (saved versions stay).`)) return;
  try {
    await api("POST", `/models/${encodeURIComponent(name)}/rollback`, {version});
    say($("#models-msg"), `${name} is now at ${version}`);
    await refreshModels();
    await showModel(name);
  } catch (err) { say($("#models-msg"), err.message, "error"); }
}

async function mergeAdapter(name, adapter) {
  const out = prompt(`Name of the new model (${name} with adapter ${adapter} merged into its weights):`, `${name}-${adapter}`);
  if (!out) return;
  try {
    await api("POST", "/merge", {model: name, adapter, out});
    say($("#models-msg"), `created ${out}`);
    await refreshModels();
  } catch (err) { say($("#models-msg"), err.message, "error"); }
}

async function deleteAdapter(name, adapter) {
  if (!confirm(`Delete the LoRA adapter "${adapter}" of ${name}? This cannot be undone.`)) return;
  try {
    await api("DELETE", `/models/${encodeURIComponent(name)}/adapters/${encodeURIComponent(adapter)}`);
    say($("#models-msg"), `deleted adapter ${adapter}`);
    await refreshModels();
    await showModel(name);
  } catch (err) { say($("#models-msg"), err.message, "error"); }
}

async function deleteModel(name) {
  if (!confirm(`Delete the model "${name}" with all its versions and checkpoints? This cannot be undone.`)) return;
  try {
    await api("DELETE", "/models/" + encodeURIComponent(name));
    say($("#models-msg"), `deleted ${name}`);
    $("#model-detail").hidden = true;
    await refreshModels();
  } catch (err) { say($("#models-msg"), err.message, "error"); }
}

$("#arena-form").addEventListener("submit", async ev => {
  ev.preventDefault();
  const form = ev.target, msg = $("#arena-msg"), out = $("#arena-out");
  const body = {model_a: form.elements.model_a.value, model_b: form.elements.model_b.value, prompt: form.elements.prompt.value,
                ...formValues(form, ["adapter_a", "adapter_b", ...settingNames(form)])};
  if (form.elements.book.value) body.book = form.elements.book.value;
  say(msg, "running both models…", "muted");
  try {
    const r = await api("POST", "/arena", body);
    say(msg, `same seed for both: ${r.seed}`);
    out.replaceChildren(...["a", "b"].map(s => el("div", {className: "panel"},
      el("h4", {}, r[s].model + (r[s].adapter ? " + " + r[s].adapter : "")),
      r[s].bits_per_byte != null ? el("p", {}, el("strong", {}, fmt.num(r[s].bits_per_byte)), ` bits/byte on ${r.book}`) : null,
      el("pre", {className: "text"}, el("span", {className: "prompt"}, body.prompt), r[s].text))));
  } catch (err) { say(msg, err.message, "error"); }
});

// ----------------------------------------------------------------------------- look inside
//
// Five views of the model chosen at the top of the tab, each one request to /inside/... whose
// numbers come from inside.py; the page only draws them.

const insideForm = $("#inside-form");
const insideModel = () => insideForm.elements.model.value;
const pct = (x, d = 1) => `${(100 * x).toFixed(d)}%`;
let insideShown = null;  // the model whose views are on the page

// a token's text with its invisible characters made visible: · a space, ↵ a new line, ⇥ a tab
const visible = t => t.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");

function lookInside(force = false) {
  const name = insideModel();
  if (!name || (!force && name === insideShown)) return;
  insideShown = name;
  fillVersionSelect();
  const m = models.find(x => x.name === name);
  const needsTraining = m && !m.has_tokenizer;
  for (const [view, show] of [["tokens", showTokens], ["next", showNextToken], ["embed", showEmbeddings]]) {
    if (needsTraining) say($(`#${view}-msg`), `${name} is not trained yet: this view needs its tokenizer, which the first training run learns`, "muted");
    else show();
  }
  showNF4();
  showRuns();
}

insideForm.elements.model.addEventListener("change", () => lookInside());
$$("#inside-form .jump a").forEach(a => a.addEventListener("click", ev => {
  ev.preventDefault();  // scroll only: the address keeps naming the tab
  $(a.getAttribute("href")).scrollIntoView({behavior: "smooth"});
}));
insideForm.addEventListener("submit", ev => { ev.preventDefault(); lookInside(true); });

// --- tokenizer: coloured chunks with their ids, bytes per token, the book's numbers, the longest merges

const CHUNK_COLOURS = ["#dbe8ff", "#ffe3c7", "#d7f2dd", "#f6d9f1", "#fff3b0", "#d6f0f5"];

async function showTokens() {
  const form = $("#tokens-form"), book = form.elements.book.value || null;
  const body = book ? {text: "", book} : {text: form.elements.text.value};
  const names = [insideModel(), form.elements.compare.value].filter((n, i, all) => n && all.indexOf(n) === i);
  try {
    const views = await Promise.all(names.map(model => api("POST", "/inside/tokens", {model, ...body})));
    say($("#tokens-msg"), "");
    $("#tokens-out").replaceChildren(...views.map((v, i) => tokensPanel(names[i], v)));
  } catch (err) { say($("#tokens-msg"), err.message, "error"); }
}

function tokensPanel(name, v) {
  const b = v.book;
  return el("div", {className: "side"},
    el("h4", {}, `${name}'s tokenizer (${fmt.int(v.vocab_size)} tokens)`),
    el("div", {className: "chunks"}, ...v.tokens.map((t, i) => el("span", {className: "chunk", style: `background:${CHUNK_COLOURS[i % CHUNK_COLOURS.length]}`},
      el("span", {}, visible(t.text)), el("small", {}, String(t.id))))),
    el("p", {}, `${fmt.int(v.n_tokens)} tokens for ${fmt.int(v.n_bytes)} bytes of text: `,
      el("strong", {}, `${v.bytes_per_token.toFixed(2)} bytes per token`), v.shown < v.n_tokens ? ` (the first ${v.shown} are shown)` : ""),
    b ? el("p", {}, `The whole book "${b.name}": ${fmt.int(b.n_tokens)} tokens, ${b.bytes_per_token.toFixed(2)} bytes per token. Its ${b.common_tokens} most common tokens make up `,
      el("strong", {}, pct(b.common_share)), " of it. The most common: ",
      ...b.commonest.flatMap(([t, share]) => [el("code", {className: "pill"}, `${visible(t)} ${pct(share)}`), " "])) : null,
    el("p", {className: "muted"}, "Longest merges learned (merge number = when BPE learned it; the first merges are the commonest pairs):"),
    el("ol", {className: "merges"}, ...v.longest_merges.map(m => el("li", {},
      el("code", {}, visible(m.left)), " + ", el("code", {}, visible(m.right)), " → ", el("code", {}, visible(m.result)),
      el("small", {className: "muted"}, ` merge #${fmt.int(m.rank)}`)))));
}

$("#tokens-form").addEventListener("submit", ev => { ev.preventDefault(); showTokens(); });

// --- next token: the model's probabilities (grey) and sampling's (blue), live as the settings change

const nextForm = $("#next-form");
let nextSeq = 0, nextTimer = null;

async function showNextToken() {
  const seq = ++nextSeq;  // answers can overtake each other while a setting is being changed
  const body = {model: insideModel(), prompt: nextForm.elements.prompt.value, ...formValues(nextForm, settingNames(nextForm))};
  try {
    const v = await api("POST", "/inside/next_token", body);
    if (seq !== nextSeq) return;
    say($("#next-msg"), "");
    drawNextToken(v);
  } catch (err) { if (seq === nextSeq) say($("#next-msg"), err.message, "error"); }
}

function drawNextToken(v) {
  const top = Math.max(...v.tokens.map(t => Math.max(t.p, t.p_sample)), 1e-9);
  const bar = t => el("div", {className: "bar-row" + (t.cut ? " cut" : "")},
    el("code", {className: "bar-label", title: `token id ${t.id}, the model's #${t.rank + 1}` + (t.seen ? ", already in the prompt" : "")}, visible(t.text)),
    el("div", {className: "bar"}, el("span", {className: "p-model", style: `width:${100 * t.p / top}%`}),
                                  el("span", {className: "p-sample", style: `width:${100 * t.p_sample / top}%`})),
    el("span", {className: "bar-num"}, `${pct(t.p)} → ` + (t.cut ? `never (${t.cut === "greedy" ? "greedy takes the likeliest" : "cut by " + t.cut})` : pct(t.p_sample))));
  const s = v.sampling;
  $("#next-out").replaceChildren(
    el("p", {}, "After ", el("code", {}, v.prompt_tokens.map(visible).join("|")), ` (${v.prompt_tokens.length} tokens), at temperature ${s.temperature}, ` +
      `top-k ${s.top_k || "off"}, top-p ${s.top_p < 1 ? s.top_p : "off"}: sampling can pick `, el("strong", {}, `${fmt.int(v.kept)} of ${fmt.int(v.vocab_size)}`), " tokens."),
    el("div", {className: "legend"}, el("span", {className: "key p-model"}), " the model's probability ", el("span", {className: "key p-sample"}), " the probability of being sampled"),
    ...v.tokens.map(bar),
    el("p", {className: "muted"}, `all other tokens together: ${pct(v.other.p)} → ${pct(v.other.p_sample)}`));
}

nextForm.addEventListener("input", () => { clearTimeout(nextTimer); nextTimer = setTimeout(showNextToken, 120); });
nextForm.addEventListener("submit", ev => { ev.preventDefault(); showNextToken(); });

// --- embeddings: a PCA map of the commonest tokens, for the current weights or a saved version

const TOKEN_KINDS = [
  ["starts a word (a space, then letters)", "#2a6fdb", t => /^ \p{L}/u.test(t)],
  ["letters inside a word", "#1f9d55", t => /^\p{L}+$/u.test(t)],
  ["space or new line", "#9aa1ad", t => /^\s+$/.test(t)],
  ["punctuation, digits, other", "#e0742b", () => true],
];
const embedPlot = new ScatterPlot($("#embed-canvas"), {legend: TOKEN_KINDS.map(([label, color]) => ({label, color}))});

function fillVersionSelect() {
  const sel = $("#embed-form").elements.version, m = models.find(x => x.name === insideModel());
  const keep = sel.value;
  sel.replaceChildren(el("option", {value: ""}, "current weights"),
    ...(m ? m.versions : []).map(v => el("option", {value: v.version}, `${v.version} (${fmt.int(v.steps)} steps)`)));
  sel.value = m && m.versions.some(v => v.version === keep) ? keep : "";
}

async function showEmbeddings() {
  const f = $("#embed-form"), q = new URLSearchParams({model: insideModel(), n: f.elements.n.value || 150});
  if (f.elements.version.value) q.set("version", f.elements.version.value);
  if (f.elements.book.value) q.set("book", f.elements.book.value);
  try {
    const v = await api("GET", "/inside/embeddings?" + q);
    say($("#embed-msg"), "");
    embedPlot.title = `${v.model}, ${v.version || "current weights"}: the ${v.points.length} most common tokens of "${v.book}"`;
    embedPlot.points = v.points.map(p => ({x: p.x, y: p.y, label: visible(p.text), color: TOKEN_KINDS.find(k => k[2](p.text))[1],
                                           tip: `${visible(p.text)} · id ${p.id} · ${fmt.int(p.count)} times in the book`}));
    embedPlot.draw();
    $("#embed-info").textContent = `Each dot is one token's ${v.d_model}-number embedding; the horizontal axis holds ${pct(v.explained[0])} of their ` +
      `variance, the vertical ${pct(v.explained[1])}. The 40 most common are labelled; hover a dot for any other.`;
  } catch (err) { say($("#embed-msg"), err.message, "error"); }
}

$("#embed-form").addEventListener("submit", ev => { ev.preventDefault(); showEmbeddings(); });
$("#embed-form").elements.version.addEventListener("change", showEmbeddings);

// --- NF4: one layer's block-normalised weights with the 16 levels on top, and what 4 bits cost

let nf4View = null;

async function showNF4() {
  const sel = $("#nf4-form").elements.layer, q = new URLSearchParams({model: insideModel()});
  if (sel.value) q.set("layer", sel.value);
  try {
    nf4View = await api("GET", "/inside/nf4?" + q);
    say($("#nf4-msg"), "");
    sel.replaceChildren(...nf4View.layers.map(l => el("option", {value: l}, l)));
    sel.value = nf4View.layer;
    drawNF4();
  } catch (err) { say($("#nf4-msg"), err.message, "error"); }
}

function drawNF4() {
  const v = nf4View;
  if (!v) return;
  histogram($("#nf4-canvas"), {
    title: `${v.layer} (${v.shape.join(" × ")}): its ${fmt.int(v.params)} weights, each divided by the largest |w| of its block of ${v.block}`,
    counts: v.histogram, lo: -1, hi: 1, marks: v.levels.map((x, i) => ({x, label: pct(v.level_share[i], 0)}))});
  const m = v.whole_model, row = (...cells) => el("tr", {}, ...cells.map((c, i) => el(i % 2 ? "td" : "th", {}, c)));
  $("#nf4-numbers").replaceChildren(
    row("reconstruction error (this layer)", `RMSE ${v.rmse.toExponential(2)} · ${pct(v.rel_frobenius)} of the weights' norm`,
        "bits per weight", `${v.bits_per_weight.toFixed(3)} (4 for the level + the block's scale)`),
    row("this layer's memory", `${fmt.bytes(v.bytes_before)} → ${fmt.bytes(v.bytes_after)}`,
        `whole model, its ${m.quantized_layers} linear layers in NF4`, `${fmt.bytes(m.bytes_before)} → ${fmt.bytes(m.bytes_after)} · error ${pct(m.rel_frobenius)}`));
}

$("#nf4-form").addEventListener("submit", ev => { ev.preventDefault(); showNF4(); });
$("#nf4-form").elements.layer.addEventListener("change", showNF4);

// --- runs: every run of one or two models on one chart, with the settings that set them apart

const RUN_COLOURS = ["#2a6fdb", "#e0742b", "#1f9d55", "#7b3fb5", "#c0392b", "#0e9aa7", "#b5651d", "#6b7280"];
const runCharts = [new LineChart($("#runs-loss"), {title: "Train loss (nats per token)"}),
                   new LineChart($("#runs-bpb"), {title: "Validation bits per byte"})];

async function showRuns() {
  const names = [insideModel(), $("#runs-form").elements.compare.value].filter((n, i, all) => n && all.indexOf(n) === i);
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
  const settings = r => !r.config ? ["(not recorded)"] : keys.filter(k => differs.has(k) || (k in PAGE.train && value(r, k) !== JSON.stringify(PAGE.train[k].default)))
    .map(k => el(differs.has(k) ? "strong" : "span", {}, `${k}=${r.config[k] ?? "none"} `));
  $("#runs-table").replaceChildren(
    el("tr", {}, ...["", "model", "run", "date", "status", "steps", "books", "best val bits/byte", "settings changed from the defaults (bold: differs between these runs)"].map(h => el("th", {}, h))),
    ...runs.map((r, i) => el("tr", {},
      el("td", {}, el("span", {className: "swatch", style: `background:${series[i].color}`})), el("td", {}, r.model), el("td", {}, el("code", {}, r.run || "–")),
      el("td", {}, r.date ? r.date.replace("T", " ").slice(0, 16) : "–"), el("td", {}, r.status), el("td", {}, fmt.int(r.steps ?? 0)), el("td", {}, r.books.join(", ") || "–"),
      el("td", {}, r.best ? `${fmt.num(r.best[0])} (step ${r.best[1]})` : "–"), el("td", {}, ...settings(r)))));
}

$("#runs-form").addEventListener("submit", ev => { ev.preventDefault(); showRuns(); });
$("#runs-form").elements.compare.addEventListener("change", showRuns);

// ----------------------------------------------------------------------------- start

window.addEventListener("resize", () => {
  [...charts, ...runCharts, embedPlot].forEach(c => c.draw());
  drawNF4();
});
showTab(location.hash.slice(1) || "create");
usePreset("small");
refreshModels().catch(err => say($("#models-msg"), err.message, "error"));
refreshBooks().catch(err => say($("#upload-msg"), err.message, "error"));
pollStatus();
