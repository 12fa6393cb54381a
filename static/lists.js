// The models and books every tab chooses from: fetched here, put into every <select> that lists
// them, and handed to the tabs that registered with onModels / onBooks.

import {api} from "./api.js";
import {$, $$, el} from "./page.js";

// damaged, damagedBooks: {name, damaged: what is wrong, what to do}
export const lists = {models: [], damaged: [], books: [], damagedBooks: []};
const modelListeners = [], bookListeners = [];

export const onModels = fn => modelListeners.push(fn);
export const onBooks = fn => bookListeners.push(fn);
export const findModel = name => lists.models.find(m => m.name === name);

export async function refreshModels() {
  const all = await api("GET", "/models");
  lists.models = all.filter(m => !m.damaged);
  lists.damaged = all.filter(m => m.damaged);
  for (const sel of $$("select.model-select")) {
    const none = sel.classList.contains("optional") ? [el("option", {value: ""}, "(none)")] : [];
    refill(sel, none, lists.models.map(m => m.name));
  }
  $$("select.adapter-select").forEach(fillAdapterSelect);
  modelListeners.forEach(fn => fn(lists.models));
}

// a select's options become `first` (e.g. "(none)") and `names`; the chosen one stays chosen while it is there
function refill(sel, first, names) {
  const keep = sel.value;
  sel.replaceChildren(...first, ...names.map(n => el("option", {value: n}, n)));
  sel.value = names.includes(keep) ? keep : first.length ? "" : sel.value;
}

// an adapter select lists the adapters of the model chosen in the select named by data-model
function fillAdapterSelect(sel) {
  const m = findModel(sel.form.elements[sel.dataset.model].value);
  const keep = sel.value;
  const adapters = m ? m.adapters : [];
  sel.replaceChildren(el("option", {value: ""}, "(none)"), ...adapters.map(a => el("option", {value: a}, a)));
  sel.value = m && m.adapters.includes(keep) ? keep : "";
}

$$("select.adapter-select").forEach(sel =>
  sel.form.elements[sel.dataset.model].addEventListener("change", () => fillAdapterSelect(sel)));

export async function refreshBooks() {
  const all = await api("GET", "/books");
  lists.books = all.filter(b => !b.damaged);
  lists.damagedBooks = all.filter(b => b.damaged);
  for (const sel of $$("select.book-select")) {
    refill(sel, [el("option", {value: ""}, sel.dataset.none || "(none)")], lists.books.map(b => b.name));
  }
  bookListeners.forEach(fn => fn(lists.books));
  modelListeners.forEach(fn => fn(lists.models));  // their default prompts come from the books
}

// A prompt in the style of what the model read: the first line of its first book (as the samples
// during training use), while that book is still here.
export function bookLine(modelName) {
  const m = findModel(modelName), first = m && m.books[0];
  const book = first && (lists.books.find(b => b.sha256 === first.sha256)
                         || lists.books.find(b => b.name === first.name));
  return book ? book.first_line : null;
}
