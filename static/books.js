// Books: upload a file (any encoding, .fb2, .epub), see how it was read, preview or delete it.

import {api, apiError, path} from "./api.js";
import {lists, onBooks, refreshBooks} from "./lists.js";
import {$, PAGE, damagedRow, el, fmt, languageName, say} from "./page.js";

function renderBooksTable(books) {
  const rows = books.map(b => el("tr", {},
    el("td", {className: "name"}, b.name), el("td", {className: "num"}, fmt.bytes(b.text_bytes)),
    el("td", {className: "num"}, fmt.int(b.characters)), el("td", {}, b.encoding),
    el("td", {className: "name"}, languageName(b.language)), el("td", {}, b.format),
    el("td", {className: "actions"},
      el("button", {type: "button", onclick: () => previewBook(b.name)}, "Preview"),
      el("button", {type: "button", className: "danger", onclick: () => deleteBook(b.name)}, "Delete"))));
  rows.push(...lists.damagedBooks.map(b => damagedRow(b, 7, () => deleteBook(b.name))));
  const none = el("tr", {}, el("td", {colSpan: 7, className: "muted"}, "no books yet"));
  $("#books-table tbody").replaceChildren(...(rows.length ? rows : [none]));
}

async function previewBook(name) {
  try {
    showPreview(await api("GET", path("books", name)));
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
    await api("DELETE", path("books", name));
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
  const file = form.elements.file.files[0], limit = PAGE.max_upload_bytes;
  if (!file) return say(msg, "choose a file first", "error");
  if (file.size > limit) {
    return say(msg, `${file.name} is ${fmt.bytes(file.size)}; the upload limit is ${fmt.bytes(limit)}`, "error");
  }
  bar.hidden = false;
  bar.value = 0;
  say(msg, `uploading ${file.name}…`, "muted");
  try {
    const b = await uploadBook(file, form.elements.name.value.trim(), f => { bar.value = f; });
    say(msg, `Added "${b.name}": ${fmt.bytes(b.bytes)}, ${fmt.int(b.characters)} characters, ${b.encoding}, ` +
             `language ${languageName(b.language)}.`);
    showPreview(b);
    form.reset();
    await refreshBooks();
  } catch (err) {
    say(msg, err.message, "error");
  } finally {
    bar.hidden = true;
  }
});

onBooks(renderBooksTable);
