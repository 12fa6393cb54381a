// Training, the form half: what to train on which books with which settings, what it will cost
// before Start, and Start / Stop / Resume. The watching half is progress.js.

import {api, path} from "./api.js";
import {findModel, onBooks, onModels} from "./lists.js";
import {$, $$, el, fmt, formValues, latest, say, settingNames} from "./page.js";
import {drawCharts, isActive, onJob, pollSoon, resumeJob, stopJob} from "./progress.js";

const form = $("#train-form");
let picked = false;  // the user chose a model here: the job's model no longer overrides the choice
let job = {state: "idle"};  // the latest status
let probed = null;  // the model the estimate box speaks of

// every TrainConfig field on the form (the LoRA fieldset has its own), self-play's handled apart
const trainSettings = () => $$("[data-setting]", form).filter(i => !i.closest("#lora-options")).map(i => i.name);

onBooks(books => {
  const checked = new Set($$("#train-books input:checked").map(c => c.value));
  $("#train-books").replaceChildren(...(books.length
    ? books.map(b => el("label", {className: "inline"}, el("input", {type: "checkbox", name: "books", value: b.name,
        checked: checked.has(b.name) || books.length === 1}), " " + b.name))
    : [el("span", {className: "hint"}, "upload a book first")]));
});

function requestBody() {
  const body = {model: form.elements.model.value, books: $$("#train-books input:checked").map(c => c.value),
                ...formValues(form, trainSettings())};
  const every = form.elements.selfplay_every.value.trim();
  if (form.elements.selfplay.checked && !every) throw new Error("self-play is on: say how often (every N steps)");
  body.selfplay_every = form.elements.selfplay.checked ? Number(every) : 0;
  if (form.elements.mode.value === "lora") {
    const lora = ["adapter", "lora_nf4", ...settingNames($("#lora-options"))];
    Object.assign(body, {mode: "lora", lora_targets: $$("#lora-options [name=lora_targets]:checked").map(c => c.value),
                         ...formValues(form, lora)});
  }
  return body;
}

form.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#train-msg");
  try {
    const body = requestBody();
    if (!body.model) return say(msg, "create a model first", "error");
    if (!body.books.length) return say(msg, "tick at least one book", "error");
    const j = await api("POST", "/train", body);
    const what = j.adapter ? `${j.model}'s LoRA adapter ${j.adapter}` : j.model;
    say(msg, `Training started: ${what} on ${j.books.join(", ")} (job ${j.id})`);
    pollSoon();
  } catch (err) { say(msg, err.message, "error"); }
});

// --- what a run will cost: before Start a probe of a few steps on this machine (runs.step_time);
// while the chosen model trains, the run's own projection, the one number its status shows too

const out = $("#train-estimate");
const probeFields = () => formValues(form, ["steps", "minutes", "batch_size", "seq_len", "grad_accum", "precision",
                                            "compile"].filter(f => form.elements[f]));

function showEstimate(kind, ...content) {
  out.hidden = !content.length;
  out.className = "estimate " + kind;
  out.replaceChildren(...content);
}

async function askProbe() {
  const model = probed = form.elements.model.value;
  if (!model || (isActive(job) && job.model === model)) return null;  // nothing to time, or the run says it
  showEstimate("muted", "timing a few training steps on this machine…");
  const v = probeFields();
  return {v, e: await api("GET", `${path("models", model, "step_time")}?` + new URLSearchParams(v))};
}

function showProbe(answer) {
  if (!answer) return showRun();
  const {v, e} = answer, minutes = Number(v.minutes || 0), per = e.seconds_per_step;
  const cost = minutes > 0 ? `a ${minutes}-minute budget fits ≈ ${fmt.int(Math.floor(minutes * 60 / per))} steps`
    : v.steps ? `${fmt.int(v.steps)} steps take ≈ ${fmt.secs(v.steps * per)}` : "";
  showEstimate("", el("strong", {}, `≈ ${fmt.secs(1000 * per)} per 1000 steps`),
    ` on this machine (${per.toFixed(3)} s per step, ${e.precision}, measured without torch.compile)` +
    `${cost && ": " + cost} · torch.compile ${e.compile ? "on" : "off"}: ${e.compile_reason}` +
    " · evaluations and checkpoints add a little" +
    (minutes > 0 ? ". Once it runs, the run times itself and fits its steps to the budget: " +
                   "its count replaces this one." : ""));
}

// the chosen model is training now: one number, the run's own projection (also in its status)
function showRun() {
  if (!(isActive(job) && job.model === form.elements.model.value)) return showEstimate("");
  const total = fmt.int(job.total ?? 0);
  showEstimate("", job.config.minutes
    ? `Running: ≈ ${total} steps fit the ${job.config.minutes}-minute budget, ` +
      "projected from the speed this run measures."
    : `Running: ${total} steps` + (job.eta_s != null ? `, about ${fmt.secs(job.eta_s)} left at its speed.` : "."));
}

const estimate = latest(askProbe, {show: showProbe, fail: err => showEstimate("muted", err.message), delay: 300});
export const onShow = () => { drawCharts(); estimate.now(); };

// the status panel and the form name one model: until the user picks one, the form follows the job
onJob(j => {
  const was = job;
  job = j;
  if (!picked && j.model && findModel(j.model) && form.elements.model.value !== j.model) {
    form.elements.model.value = j.model;
    $$("#train-books input").forEach(c => { c.checked = j.books.includes(c.value); });
    estimate.now();
  } else if (isActive(j)) showRun();
  else if (isActive(was)) estimate.now();  // the run ended: the probe may time again
});

// a probe trains a few steps on the server: only for a model the box has not spoken of yet
onModels(() => {
  if ($("#tab-training").classList.contains("active") && form.elements.model.value !== probed) estimate();
});
form.elements.model.addEventListener("change", () => { picked = true; estimate.now(); });
["steps", "minutes", "batch_size"].forEach(f => form.elements[f].addEventListener("input", () => estimate()));
$$("[name=mode]", form).forEach(r => r.addEventListener("change", () => {
  $("#lora-options").hidden = form.elements.mode.value !== "lora";
}));
$("#train-stop").addEventListener("click", stopJob);
$("#train-resume").addEventListener("click", resumeJob);
