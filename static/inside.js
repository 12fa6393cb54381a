// Look inside: five views of the model chosen at the top of the tab, each computed by the real
// model when asked. This module holds the choice and the two views about text: how the tokenizer
// cuts it, and what the model would write next; the three maps are in inside_maps.js.

import {api} from "./api.js";
import * as maps from "./inside_maps.js";
import {bookLine, findModel, onModels} from "./lists.js";
import {$, $$, el, fmt, formValues, latest, say, setDefault, settingNames} from "./page.js";

const form = $("#inside-form");
const insideModel = () => form.elements.model.value;
const visible = maps.visible;
let shown = null;  // the model whose views are on the page

export function lookInside(force = false) {
  const name = insideModel();
  if (!name || (!force && name === shown)) return;
  shown = name;
  maps.fillVersionSelect(name);
  setDefault($("#tokens-form").elements.text, bookLine(name));
  setDefault($("#next-form").elements.prompt, bookLine(name));
  const m = findModel(name);
  const views = [["tokens", showTokens], ["next", () => nextToken.now()], ["embed", () => maps.showEmbeddings(name)]];
  for (const [view, show] of views) {
    if (m && !m.has_tokenizer) {
      say($(`#${view}-msg`), `${name} is not trained yet: this view needs its tokenizer, which the first ` +
          "training run learns", "muted");
    } else show();
  }
  maps.showNF4(name);
  showRuns();
}

export const onShow = () => lookInside();

form.elements.model.addEventListener("change", () => lookInside());
$$("#inside-form .jump a").forEach(a => a.addEventListener("click", ev => {
  ev.preventDefault();  // scroll only: the address keeps naming the tab
  $(a.getAttribute("href")).scrollIntoView({behavior: "smooth"});
}));
form.addEventListener("submit", ev => { ev.preventDefault(); lookInside(true); });
onModels(() => {
  maps.fillVersionSelect(insideModel());
  if ($("#tab-inside").classList.contains("active")) lookInside();
});

// --- tokenizer: coloured chunks with their ids, bytes per token, the book's numbers, the longest merges

const CHUNK_COLOURS = ["#dbe8ff", "#ffe3c7", "#d7f2dd", "#f6d9f1", "#fff3b0", "#d6f0f5"];
const twoModels = compare => [insideModel(), compare].filter((n, i, all) => n && all.indexOf(n) === i);

async function showTokens() {
  const f = $("#tokens-form").elements, book = f.book.value || null;
  const body = book ? {text: "", book} : {text: f.text.value};
  const names = twoModels(f.compare.value);
  try {
    const views = await Promise.all(names.map(model => api("POST", "/inside/tokens", {model, ...body})));
    say($("#tokens-msg"), "");
    $("#tokens-out").replaceChildren(...views.map((v, i) => tokensPanel(names[i], v)));
  } catch (err) { say($("#tokens-msg"), err.message, "error"); }
}

function chunk(t, i) {
  return el("span", {className: "chunk", style: `background:${CHUNK_COLOURS[i % CHUNK_COLOURS.length]}`},
            el("span", {}, visible(t.text)), el("small", {}, String(t.id)));
}

function bookNumbers(b) {
  return el("p", {}, `The whole book "${b.name}": ${fmt.int(b.n_tokens)} tokens, ` +
    `${b.bytes_per_token.toFixed(2)} bytes per token. Its ${b.common_tokens} most common tokens make up `,
    el("strong", {}, fmt.pct(b.common_share)),
    " of it. The most common: ",
    ...b.commonest.flatMap(([t, share]) => [el("code", {className: "pill"}, `${visible(t)} ${fmt.pct(share)}`), " "]));
}

function tokensPanel(name, v) {
  const merge = m => el("li", {}, el("code", {}, visible(m.left)), " + ", el("code", {}, visible(m.right)), " → ",
                        el("code", {}, visible(m.result)),
                        el("small", {className: "muted"}, ` merge #${fmt.int(m.rank)}`));
  return el("div", {className: "side"},
    el("h4", {}, `${name}'s tokenizer (${fmt.int(v.vocab_size)} tokens)`),
    el("div", {className: "chunks"}, ...v.tokens.map(chunk)),
    el("p", {}, `${fmt.int(v.n_tokens)} tokens for ${fmt.int(v.n_bytes)} bytes of text: `,
      el("strong", {}, `${v.bytes_per_token.toFixed(2)} bytes per token`),
      v.shown < v.n_tokens ? ` (the first ${v.shown} are shown)` : ""),
    v.book ? bookNumbers(v.book) : null,
    el("p", {className: "muted"}, "Longest merges learned (merge number = when BPE learned it; the first merges " +
                                  "are the commonest pairs):"),
    el("ol", {className: "merges"}, ...v.longest_merges.map(merge)));
}

$("#tokens-form").addEventListener("submit", ev => { ev.preventDefault(); showTokens(); });

// --- next token: the model's probabilities (grey) and sampling's (blue), live as the settings change

const nextForm = $("#next-form");
const pct = fmt.pct;

function askNextToken() {
  const body = {model: insideModel(), prompt: nextForm.elements.prompt.value,
                ...formValues(nextForm, settingNames(nextForm))};
  return api("POST", "/inside/next_token", body);
}

// one next-token candidate: its two probabilities as bars, scaled so the longest bar (`top`) fills the row
function bar(t, top) {
  const title = `token id ${t.id}, the model's #${t.rank + 1}` + (t.seen ? ", already in the prompt" : "");
  const why = t.cut === "greedy" ? "greedy takes the likeliest" : "cut by " + t.cut;
  const fate = t.cut ? `never (${why})` : pct(t.p_sample);
  return el("div", {className: "bar-row" + (t.cut ? " cut" : "")},
    el("code", {className: "bar-label", title}, visible(t.text)),
    el("div", {className: "bar"}, el("span", {className: "p-model", style: `width:${100 * t.p / top}%`}),
                                  el("span", {className: "p-sample", style: `width:${100 * t.p_sample / top}%`})),
    el("span", {className: "bar-num"}, `${pct(t.p)} → ${fate}`));
}

function drawNextToken(v) {
  say($("#next-msg"), "");
  const top = Math.max(...v.tokens.map(t => Math.max(t.p, t.p_sample)), 1e-9), s = v.sampling;
  $("#next-out").replaceChildren(
    el("p", {}, "After ", el("code", {}, v.prompt_tokens.map(visible).join("|")),
      ` (${v.prompt_tokens.length} tokens), at temperature ${s.temperature}, top-k ${s.top_k || "off"}, ` +
      `top-p ${s.top_p < 1 ? s.top_p : "off"}: sampling can pick `,
      el("strong", {}, `${fmt.int(v.kept)} of ${fmt.int(v.vocab_size)}`), " tokens."),
    el("div", {className: "legend"}, el("span", {className: "key p-model"}), " the model's probability ",
       el("span", {className: "key p-sample"}), " the probability of being sampled"),
    ...v.tokens.map(t => bar(t, top)),
    el("p", {className: "muted"}, `all other tokens together: ${pct(v.other.p)} → ${pct(v.other.p_sample)}`));
}

const nextToken = latest(askNextToken, {show: drawNextToken, fail: err => say($("#next-msg"), err.message, "error"),
                                        delay: 120});
nextForm.addEventListener("input", () => nextToken());
nextForm.addEventListener("submit", ev => { ev.preventDefault(); nextToken.now(); });

// --- the three maps

const showRuns = () => maps.showRuns(twoModels($("#runs-form").elements.compare.value));
const showEmbeddings = () => maps.showEmbeddings(insideModel());
const showNF4 = () => maps.showNF4(insideModel());

$("#embed-form").addEventListener("submit", ev => { ev.preventDefault(); showEmbeddings(); });
$("#embed-form").elements.version.addEventListener("change", showEmbeddings);
$("#nf4-form").addEventListener("submit", ev => { ev.preventDefault(); showNF4(); });
$("#nf4-form").elements.layer.addEventListener("change", showNF4);
$("#runs-form").addEventListener("submit", ev => { ev.preventDefault(); showRuns(); });
$("#runs-form").elements.compare.addEventListener("change", showRuns);
