// What every tab uses: the page data the server put in the HTML, DOM helpers, number formats and
// the one helper for "the latest answer wins".

// presets, every settings field's default/range/help/kind, the job states, language names, upload limit
export const PAGE = JSON.parse(document.querySelector("#page-data").textContent);

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.addEventListener("click", v);
    else if (k in e && k !== "style") e[k] = v;
    else e.setAttribute(k, v);
  }
  e.append(...children.filter(c => c != null));
  return e;
}

// a model, book or adapter the server could not read: {name, damaged: what is wrong and what to do}, and Delete
export function damagedRow(r, columns, onDelete) {
  return el("tr", {className: "damaged"},
    el("td", {className: "name"}, r.name),
    el("td", {colSpan: columns - 2, className: "msg error"}, "damaged: " + r.damaged),
    el("td", {className: "actions"}, el("button", {type: "button", className: "danger", onclick: onDelete}, "Delete")));
}

export function say(box, text, kind = "ok") {
  box.textContent = text;
  box.className = "msg " + (text ? kind : "");
}

// the settings fields of a form or part of one (inputs marked data-setting), by name
export const settingNames = root => $$("[data-setting]", root).map(i => i.name);

// form fields -> object: numbers become numbers, a checkbox true/false, empty fields are left out
export function formValues(form, names) {
  const out = {};
  for (const n of names) {
    const input = form.elements[n];
    if (input.type === "checkbox") { out[n] = input.checked; continue; }
    const v = input.value.trim();
    if (v === "") continue;
    out[n] = input.type === "number" ? Number(v) : v;
  }
  return out;
}

// Put a default text (e.g. from the model's book) into a field, unless the user has typed their
// own: a field still holding the page's or our last default is ours to change.
export function setDefault(input, text) {
  if (!text) return;
  const ours = input.value === (input.dataset.auto ?? input.defaultValue);
  input.dataset.auto = text;
  if (ours) input.value = text;
}

// "Polish (pl)"
export const languageName = code => (PAGE.languages[code] && code !== "unknown" ? `${PAGE.languages[code]} (${code})`
                                                                                 : code);

const clock = s => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;

export const fmt = {
  int: n => Number(n).toLocaleString("en-US"),
  num: (x, d = 4) => (x == null ? "–" : Number(x).toFixed(d)),
  params: n => (n >= 1e9 ? (n / 1e9).toFixed(2) + " B" : n >= 1e6 ? (n / 1e6).toFixed(2) + " M"
    : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(n)),
  bytes: n => (n >= 2 ** 30 ? (n / 2 ** 30).toFixed(2) + " GB" : n >= 2 ** 20 ? (n / 2 ** 20).toFixed(1) + " MB"
    : n >= 1024 ? (n / 1024).toFixed(1) + " KB" : n + " B"),
  secs: s => (s == null ? "–" : s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`),
  clock,  // 72 -> "1:12"
  time: t => new Date(t * 1000).toLocaleTimeString("en-GB"),
  pct: (x, d = 1) => `${(100 * x).toFixed(d)}%`,
};

// Latest answer wins. `ask()` goes to the server; while a setting is being changed, answers can
// overtake each other, so only the answer to the newest question is shown: `show(answer)`, or
// `fail(error)`. With `delay`, a burst of calls asks once, after `delay` ms of quiet.
//   const refresh = latest(() => api(...), {show, fail, delay: 150});  refresh();  await refresh.now();
export function latest(ask, {show, fail, delay = 0}) {
  let asked = 0, timer = null;
  async function now() {
    clearTimeout(timer);
    const mine = ++asked;
    try {
      const answer = await ask();
      if (mine === asked) show(answer);
    } catch (err) {
      if (mine === asked) fail(err);
    }
  }
  const soon = () => { clearTimeout(timer); timer = setTimeout(now, delay); };
  soon.now = now;
  return soon;
}
