// The page: six tabs over the JSON API in app/web/, as ES modules with no build step. One module
// per tab (create, books, training + progress, generation, models, inside + inside_maps), the
// shared lists of models and books (lists.js), the requests (api.js) and small helpers (page.js).
//
// State that matters lives on the server (the training job, metrics, models, books); the page
// polls it, so closing or reloading the tab loses nothing.

import "./books.js";
import "./create.js";
import "./generation.js";
import {embedPlot, drawNF4, runCharts} from "./inside_maps.js";
import * as inside from "./inside.js";
import {refreshBooks, refreshModels} from "./lists.js";
import "./models.js";
import {$, $$, say} from "./page.js";
import {charts, pollStatus} from "./progress.js";
import * as training from "./training.js";

const ON_SHOW = {training: training.onShow, inside: inside.onShow};

function showTab(name) {
  if (!$("#tab-" + name)) name = "create";
  $$(".tab").forEach(t => t.classList.toggle("active", t.id === "tab-" + name));
  $$("#tabs button").forEach(b => b.classList.toggle("active", b.dataset.tab === name));
  history.replaceState(null, "", "#" + name);
  if (ON_SHOW[name]) ON_SHOW[name]();
}

$$("#tabs button").forEach(b => b.addEventListener("click", () => showTab(b.dataset.tab)));
window.addEventListener("resize", () => {
  [...charts, ...runCharts, embedPlot].forEach(c => c.draw());
  drawNF4();
});

showTab(location.hash.slice(1) || "create");
// the lists before the first status, so that the training form can show the job's model
await Promise.all([
  refreshModels().catch(err => say($("#models-msg"), err.message, "error")),
  refreshBooks().catch(err => say($("#upload-msg"), err.message, "error")),
]);
pollStatus();
