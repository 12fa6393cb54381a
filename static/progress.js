// Training, the watching half: the job runs in the server (jobs.py), so the page polls its status
// and reads the model's metrics.jsonl; closing or reloading the tab loses nothing. The status
// panel, the log, the three charts, the samples and the latest self-play rollout live here.

import {api, path} from "./api.js";
import {LineChart} from "./chart.js";
import {refreshModels} from "./lists.js";
import {$, PAGE, el, fmt, say} from "./page.js";

const {active: ACTIVE, resumable: RESUMABLE} = PAGE.job_states;
export const isActive = job => ACTIVE.includes(job.state);

export const charts = [
  new LineChart($("#chart-loss"), {title: "Loss, lower is better (nats per token)", series: [
    {label: "training text", color: "#2a6fdb"}, {label: "held-out text", color: "#e0742b"}]}),
  new LineChart($("#chart-bpb"), {title: "Held-out bits per byte, lower is better", series: [
    {label: "bits per byte", color: "#7b3fb5"}]}),
  new LineChart($("#chart-selfplay"), {title: "Self-play: reward, higher is better", series: [
    {label: "reward", color: "#1f9d55"}, {label: "rollouts that wanted a repeat", color: "#b5651d"}]}),
];
export const drawCharts = () => charts.forEach(c => c.draw());

// self-play's reward for a metrics row: its own where it reports one, else 1 - the repeats wanted
const reward = sp => sp.reward ?? 1 - sp.repeat_rate;

const watch = {jobId: null, logSeq: 0, metricsNext: 0, runId: null, metricsState: null, state: "idle"};
const listeners = [];
export const onJob = fn => listeners.push(fn);  // called with every status the page receives

function resetWatch(job) {
  Object.assign(watch, {jobId: job.id, logSeq: 0, metricsNext: 0, runId: null, metricsState: null});
  $("#train-log").textContent = "";
  clearRun();
}

// a new run: its charts, samples and self-play rollout start empty
function clearRun() {
  charts.forEach(c => { c.clear(); c.draw(); });
  $("#samples").replaceChildren(el("li", {className: "muted"}, "none yet: they appear at each evaluation"));
  $("#selfplay-view").hidden = true;
}

// the timeline of samples, newest first: at each evaluation the same prompt, continued with the same seed
function addSample(step, sample) {
  const list = $("#samples");
  if (!$(".sample", list)) list.replaceChildren();
  list.prepend(el("li", {className: "sample"}, el("strong", {}, `step ${fmt.int(step)}: `),
                  el("span", {className: "prompt"}, sample.prompt), sample.text));
}

let pollTimer = null, polling = false;

export function pollSoon(ms = 0) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollStatus, ms);
}

// one poll at a time (two would both append the same log events); every second while a job runs
export async function pollStatus() {
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
    listeners.forEach(fn => fn(job));  // in the same moment: the form and the status never disagree
    appendLog(job.events);
    if (job.run_id && (isActive(job) || watch.metricsState !== job.state)) {
      await pollMetrics(job);  // while it runs, and once more when it ends
      watch.metricsState = job.state;
    }
  } catch (err) {
    $("#job-line").textContent = "cannot reach the server: " + err.message;
  } finally {
    polling = false;
  }
  pollSoon(job && isActive(job) ? 1000 : 3000);
}

async function pollMetrics(job) {
  if (job.run_id !== watch.runId) {
    watch.runId = job.run_id;
    watch.metricsNext = 0;
    clearRun();
  }
  const q = new URLSearchParams({since: watch.metricsNext, run: job.run_id});
  if (job.adapter) q.set("adapter", job.adapter);
  const m = await api("GET", `${path("models", job.model, "metrics")}?${q}`);
  if (m.reset) clearRun();
  watch.metricsNext = m.next;
  for (const r of m.rows) {
    charts[0].push(0, r.step, r.loss);
    charts[0].push(1, r.step, r.val_loss);
    charts[1].push(0, r.step, r.val_bpb);
    if (r.selfplay) {
      charts[2].push(0, r.step, reward(r.selfplay));
      charts[2].push(1, r.step, r.selfplay.looping);
    }
    if (r.sample) addSample(r.step, r.sample);
  }
  if (m.rows.length || m.reset) drawCharts();
  if (m.rows.some(r => r.selfplay)) await showSelfplayExample(job);
}

// the run's latest self-play rollout, the repeats it pushed down struck out next to what it wrote instead
async function showSelfplayExample(job) {
  const q = job.adapter ? "?adapter=" + encodeURIComponent(job.adapter) : "";
  let x;
  try {
    x = await api("GET", path("models", job.model, "selfplay_example") + q);
  } catch (err) {
    if (err.status === 404) return;  // no self-play step written yet
    throw err;
  }
  if (x.run !== job.run_id) return;  // an earlier run's: not what this run learns from
  $("#selfplay-step").textContent = `— step ${x.step}`;
  $("#selfplay-text").replaceChildren(el("span", {className: "prompt"}, x.prompt), ...x.tokens.map(t =>
    t.pushed_down == null ? el("span", {className: "tok"}, t.text)
      : el("span", {className: "tok blocked", title: `greedy wanted ${JSON.stringify(t.pushed_down)} here: a repeat`},
           el("del", {}, t.pushed_down), t.text)));
  $("#selfplay-view").hidden = false;
}

const isBudget = job => Boolean(job.config && job.config.minutes);
// the budget in seconds: the run's own (budget_s: a plateau brings the end in), else the one asked for
const budgetSeconds = job => job.budget_s ?? job.config.minutes * 60;

// why the run ended, in words: the job's end_reason (azr_trainer.Trainer.run) or its state
function endReason(job) {
  const n = fmt.int(job.step ?? 0), c = job.config || {};
  if (job.state === "failed") return `Failed at step ${n}: see the error below.`;
  if (job.state === "interrupted") return `The server stopped while this ran (step ${n}); Resume continues.`;
  return {
    budget: `Ended: the ${c.minutes}-minute time budget ran out, after ${n} steps.`,
    early_stop: `Ended early at step ${n}: held-out bits per byte had stopped improving for ${c.patience} ` +
                "evaluations in a row (early stop).",
    plateau: `Ended at step ${n}, sooner than planned: held-out bits per byte stopped improving at the peak ` +
             "learning rate, so the run went back to its best weights and brought the learning rate down from there.",
    steps: `Ended: all ${n} steps done.`,
    stopped: `Stopped by you at step ${n}; Resume continues from the last checkpoint.`,
  }[job.end_reason] || `Ended at step ${n}.`;
}

// "1:12 / 2:00 of the time budget · step 800 of ≈ 1,449" or "step 800 / 1,000 · ETA 30 s"
function progressLine(job) {
  const step = fmt.int(job.step ?? 0), total = fmt.int(job.total ?? 0);
  const speed = job.tokens_per_s ? ` · ${fmt.int(Math.round(job.tokens_per_s))} tokens/s` : "";
  if (!isActive(job)) return `step ${step} / ${total}${speed}`;
  const left = job.eta_s != null ? ` · ${fmt.secs(job.eta_s)} left` : "";
  if (!isBudget(job)) return `step ${step} / ${total}${speed}${left}`;
  const budget = budgetSeconds(job);
  const clock = job.elapsed_s == null ? "starting"
    : `${fmt.clock(job.elapsed_s)} / ${fmt.clock(budget)} of the time budget`;
  return clock +
         ` · step ${step} of ≈ ${total}, projected from the speed this run measures${speed}`;
}

function renderStatus(job) {
  const active = isActive(job), idle = job.state === "idle";
  for (const badge of [$("#job-state"), $("#job-badge")]) badge.className = "badge " + job.state;
  $("#job-state").textContent = job.state;
  $("#job-badge").textContent = idle ? "no job" : `${job.model}: ${job.state} ${job.step ?? 0}/${job.total ?? "?"}`;
  const what = job.adapter ? `${job.model}, LoRA adapter ${job.adapter}` : job.model;
  $("#job-title").textContent = job.model ? `${what} on ${job.books.join(", ")}` : "no training job yet";
  const budget = isBudget(job) && job.elapsed_s != null && active;
  $("#job-progress").value = budget ? job.elapsed_s / budgetSeconds(job) : job.total ? job.step / job.total : 0;
  $("#job-line").textContent = idle ? "" : progressLine(job);
  $("#job-end").hidden = idle || active;
  $("#job-end").textContent = idle || active ? "" : endReason(job);
  $("#n-loss").textContent = fmt.num(job.loss);
  $("#n-val_loss").textContent = fmt.num(job.val_loss);
  $("#n-val_bpb").textContent = fmt.num(job.val_bpb);
  $("#n-reward").textContent = job.repeat_rate == null ? "–" : fmt.num(reward(job), 3);
  $("#job-error").hidden = !job.error;
  $("#job-error").textContent = job.error || "";
  $("#train-start").disabled = active;
  $("#train-stop").disabled = !active;
  $("#train-resume").disabled = !RESUMABLE.includes(job.state);
  setEmptyCharts(job);
  if (watch.state !== job.state && !active && watch.state !== "idle") refreshModels();  // new steps, versions
  watch.state = job.state;
}

// what each chart waits for, said while it is empty: the first step, the first evaluation, or
// self-play, which starts at selfplay_start of the steps (or is off)
function setEmptyCharts(job) {
  const c = job.config;
  if (!c) return charts.forEach(chart => { chart.empty = "no run yet: start one above"; });
  charts[0].empty = "The first point comes with the first step.";
  charts[1].empty = `The first point comes with the first evaluation, at step ${fmt.int(c.eval_every)}.`;
  const start = Math.ceil(c.selfplay_start * (job.total || c.steps));
  charts[2].empty = !c.selfplay_every ? "Self-play is off for this run: nothing to show."
    : `Self-play starts at step ${fmt.int(start)} (${fmt.pct(c.selfplay_start, 0)} of the steps` +
      `${isBudget(job) ? ", as far as the budget is projected" : ""}); until then there is nothing to show.`;
}

function logLine(e) {
  const t = fmt.time(e.time);
  switch (e.type) {
    case "start": return `${t} started at step ${e.step}/${e.total} on ${e.device} (${e.precision}); ` +
      `${fmt.int(e.tokens.train)} training and ${fmt.int(e.tokens.val)} held-out tokens; ` +
      `torch.compile ${e.compiled ? "on" : "off"} (${e.compile_reason})`;
    case "step": return `${t} step ${e.step}/${e.total} ` + (e.loss != null ? `loss ${fmt.num(e.loss)}` : "self-play") +
      (e.val_loss != null ? ` · held-out loss ${fmt.num(e.val_loss)} · bits per byte ${fmt.num(e.val_bpb)}` : "") +
      (e.elapsed_s != null ? ` · ${fmt.clock(e.elapsed_s)} of ${fmt.clock(e.budget_s)}` : "") +
      ` · ${fmt.int(Math.round(e.tokens_per_s))} tokens/s`;
    case "stop_requested": return `${t} stop requested: finishing the current step`;
    case "stopped": return `${t} stopped at step ${e.step}/${e.total}; checkpoint saved, Resume continues from here`;
    case "done": return `${t} done: ${e.step} steps` + (e.end_reason === "budget" ? ", the time budget ran out" :
      e.end_reason === "early_stop" ? ", stopped early" : e.end_reason === "plateau" ? ", ended after a plateau's decay" : "") +
      `; best held-out bits per byte ${fmt.num(e.best && e.best[0])}` + (e.best ? ` (step ${e.best[1]})` : "");
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

export async function stopJob() {
  try { await api("POST", "/stop_training"); say($("#train-msg"), "stopping after the current step…", "muted"); }
  catch (err) { say($("#train-msg"), err.message, "error"); }
  pollSoon();
}

export async function resumeJob() {
  try { await api("POST", "/resume_training"); say($("#train-msg"), "resumed from the last checkpoint"); }
  catch (err) { say($("#train-msg"), err.message, "error"); }
  pollSoon();
}
