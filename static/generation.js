// Generation: stream a continuation token by token, each coloured by how the model rated it, copy
// or download the text; and the attention view of the prompt.

import {api, apiError, readEvents} from "./api.js";
import {bookLine, findModel, onModels} from "./lists.js";
import {$, el, formValues, say, setDefault, settingNames} from "./page.js";

const form = $("#gen-form");
const SAMPLING = ["adapter", ...settingNames(form)];
let abort = null;

// The colour of a generated token: its probability against the model's first choice at that
// point (1 = it took the favourite: green; far below it: red). Absolute probability would paint
// a small model's text red even when it always takes its favourite (temperature 0).
function tokenColour(p, top) {
  const best = Math.max(p, ...top.map(([, q]) => q));
  return `hsl(${Math.round(120 * p / best)}, 75%, 85%)`;
}

function addToken(out, piece) {
  if (!piece.text) return;  // half of a multi-byte character: it arrives with the next token
  const span = el("span", {className: "tok"}, piece.text);
  if (piece.prob != null) {
    span.style.background = tokenColour(piece.prob, piece.top);
    span.dataset.info = JSON.stringify({p: piece.prob, top: piece.top});
  }
  out.append(span);
}

form.addEventListener("submit", async ev => {
  ev.preventDefault();
  const msg = $("#gen-msg"), out = $("#gen-output"), stats = $("#gen-stats");
  const body = {model: form.elements.model.value, prompt: form.elements.prompt.value, ...formValues(form, SAMPLING)};
  if (!body.model) return say(msg, "create and train a model first", "error");
  out.replaceChildren(el("span", {className: "prompt"}, body.prompt));
  say(msg, "");
  stats.textContent = "";
  abort = new AbortController();
  setRunning(true);
  const t0 = performance.now();
  let first = null, n = 0;
  try {
    const r = await fetch("/generate_stream", {method: "POST", headers: {"Content-Type": "application/json"},
                                               body: JSON.stringify(body), signal: abort.signal});
    if (!r.ok) throw apiError(r.status, await r.json().catch(() => ({})));
    await readEvents(r, (type, data) => {
      if (type === "error") throw new Error(data.error);
      if (type === "done") {
        stats.textContent = `${data.tokens} tokens in ${data.seconds.toFixed(2)} s · first token after ` +
                            `${((first - t0) / 1000).toFixed(3)} s in this browser`;
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
    setRunning(false);
  }
});

function setRunning(running) {
  $("#gen-start").disabled = running;
  $("#gen-stop").disabled = !running;
  $("#gen-copy").disabled = $("#gen-download").disabled = running || !$("#gen-output .tok");
}

$("#gen-stop").addEventListener("click", () => abort && abort.abort());

// --- the generated text, to take away: the prompt and what the model wrote after it

const generatedText = () => $("#gen-output").textContent;

$("#gen-copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(generatedText());
    say($("#gen-copied"), "copied");
  } catch (err) { say($("#gen-copied"), "the browser refused the clipboard: " + err.message, "error"); }
});

$("#gen-download").addEventListener("click", () => {
  const url = URL.createObjectURL(new Blob([generatedText()], {type: "text/plain;charset=utf-8"}));
  el("a", {href: url, download: `${form.elements.model.value || "generated"}.txt`}).click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
});

// --- the top-5 tooltip of the token view

const tooltip = $("#tooltip");
$("#gen-output").addEventListener("mouseover", ev => {
  const span = ev.target.closest(".tok");
  if (!span || !span.dataset.info) return;
  const {p, top} = JSON.parse(span.dataset.info);
  const rank = top.findIndex(([t]) => t === span.textContent);
  tooltip.replaceChildren(
    el("div", {}, el("strong", {}, JSON.stringify(span.textContent)), ` had probability ${(100 * p).toFixed(1)}%` +
       (rank >= 0 ? `, the model's choice #${rank + 1}` : ", below the model's top 5")),
    el("table", {}, ...top.map(([t, q]) => el("tr", {}, el("td", {}, el("code", {}, JSON.stringify(t))),
                                                         el("td", {}, `${(100 * q).toFixed(1)}%`)))));
  const r = span.getBoundingClientRect();
  tooltip.style.left = `${r.left + window.scrollX}px`;
  tooltip.style.top = `${r.bottom + window.scrollY + 4}px`;
  tooltip.hidden = false;
});
$("#gen-output").addEventListener("mouseout", () => { tooltip.hidden = true; });

// --- the default prompt: the model's book, in its language

function usePromptOf() {
  setDefault(form.elements.prompt, bookLine(form.elements.model.value));
  fillAttentionSelects();
}

onModels(usePromptOf);
form.elements.model.addEventListener("change", usePromptOf);

// --- the attention view: which earlier tokens each token of the prompt looks at

const attnForm = $("#attn-form");

// layers and heads of the chosen model; layer 0 and head 0 until the user picks others
function fillAttentionSelects() {
  const m = findModel(form.elements.model.value);
  if (!m) return;
  const {num_layers: L, num_heads: H} = m.config, {layer, head} = attnForm.elements;
  const keep = [layer.value, head.value];
  const numbers = n => Array.from({length: n}, (_, i) => el("option", {value: i}, String(i)));
  layer.replaceChildren(...numbers(L));
  head.replaceChildren(el("option", {value: ""}, "mean of all"), ...numbers(H));
  layer.value = keep[0] !== "" && keep[0] < L ? keep[0] : "0";
  head.value = keep[1] !== "" && keep[1] < H ? keep[1] : "0";
}

attnForm.addEventListener("submit", async ev => {
  ev.preventDefault();
  const head = attnForm.elements.head.value;
  try {
    const a = await api("POST", "/attention", {
      model: form.elements.model.value, adapter: form.elements.adapter.value || null,
      prompt: form.elements.prompt.value, layer: Number(attnForm.elements.layer.value),
      head: head === "" ? null : Number(head)});
    say($("#attn-msg"), "");
    drawAttention(a);
  } catch (err) { say($("#attn-msg"), err.message, "error"); }
});

function drawAttention(a) {
  const canvas = $("#attn-canvas"), T = a.tokens.length;
  const cell = Math.max(8, Math.min(28, Math.floor(560 / T))), margin = 96;
  const size = margin + T * cell + 4, dpr = window.devicePixelRatio || 1;
  canvas.hidden = false;  // hidden until there is something to draw
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
  const info = $("#attn-info");
  canvas.onmousemove = e => {
    const i = Math.floor((e.offsetY - margin) / cell), j = Math.floor((e.offsetX - margin) / cell);
    if (i < 0 || j < 0 || i >= T || j >= T) return;
    info.textContent = `"${label(a.tokens[i])}" (row ${i}) → "${label(a.tokens[j])}" (column ${j}): ` +
                       a.attention[i][j].toFixed(3);
  };
  info.textContent = `layer ${a.layer}, ${a.head == null ? "mean of all heads" : "head " + a.head} · ${T} tokens · ` +
                     "hover a cell";
}
