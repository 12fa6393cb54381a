// Create model: six numbers (or a preset); the parameter count and training memory follow as you type.

import {api} from "./api.js";
import {refreshModels} from "./lists.js";
import {$, $$, PAGE, el, fmt, formValues, latest, say} from "./page.js";

const form = $("#create-form");
const FIELDS = Object.keys(PAGE.model).filter(f => f !== "dropout");
let edited = null;  // the field the user changed last: an error about it and a partner marks this one

// mark one field as wrong (or, with field null, clear every mark)
function fieldError(field, text) {
  $$(".field-error", form).forEach(s => { if (!field || s.dataset.for === field) s.textContent = field ? text : ""; });
  $$("input", form).forEach(i => {
    if (!field || i.name === field) i.classList.toggle("invalid", Boolean(field && text));
  });
}

// "d_model (130) must be divisible by num_heads (4); try num_heads in ..." names num_heads, but
// the user who just typed d_model wants to see d_model marked
function blamed(err) {
  const named = edited && new RegExp(`\\b${edited}\\b`).test(err.message);
  return named ? edited : err.field;
}

function usePreset(name) {
  for (const f of FIELDS) form.elements[f].value = PAGE.presets[name][f];
  $$("[data-preset]").forEach(b => b.classList.toggle("active", b.dataset.preset === name));
  edited = null;
  estimate.now();
}

function askEstimate() {
  const values = formValues(form, FIELDS);
  const missing = FIELDS.find(f => !(f in values));
  if (missing) throw Object.assign(new Error(`${missing} is required`), {field: missing});
  return api("GET", "/estimate?" + new URLSearchParams(values));
}

function showEstimate(e) {
  const m = e.memory, out = $("#estimate");
  fieldError(null);
  out.className = "estimate";
  out.replaceChildren(
    el("strong", {}, `${fmt.params(e.params)} parameters`),
    ` (${fmt.int(e.params)}) · memory for training at its peak ≈ `,
    el("strong", {}, fmt.bytes(m.total)),
    ` at batch ${e.batch_size}: weights ${fmt.bytes(m.weights)} + ` +
    `the optimizer's running averages ${fmt.bytes(m.optimizer_state)}` +
    ` (${e.optimizer}) + activations ${fmt.bytes(m.activations)} (the gradients, ${fmt.bytes(m.grads)}, come after them) · ` +
    `${fmt.params(e.flops_per_token)} arithmetic operations per token `, el("small", {className: "sym"}, "(FLOPs)"));
}

function estimateFailed(err) {
  const out = $("#estimate");
  fieldError(null);
  if (err.field) fieldError(blamed(err), err.message);
  out.className = "estimate bad";
  out.textContent = err.message;
}

const estimate = latest(askEstimate, {show: showEstimate, fail: estimateFailed, delay: 150});

$$("[data-preset]").forEach(b => b.addEventListener("click", () => usePreset(b.dataset.preset)));
FIELDS.forEach(f => form.elements[f].addEventListener("input", () => {
  $$("[data-preset]").forEach(b => b.classList.remove("active"));
  edited = f;
  estimate();
}));

form.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#create-msg");
  const body = {name: form.elements.name.value.trim(), ...formValues(form, FIELDS)};
  fieldError(null);
  if (!body.name) return fieldError("name", "give the model a name");
  try {
    const m = await api("POST", "/create_model", body);
    say(msg, `Created ${m.name}: ${fmt.params(m.params)} parameters. Next: upload a book, then train it.`);
    await refreshModels();
  } catch (err) {
    say(msg, err.message, "error");
    if (err.field || err.status === 409) fieldError(err.field ? blamed(err) : "name", err.message);
  }
});

usePreset("small");
