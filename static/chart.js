// Small charts on a <canvas>, written for this page (no library, works offline).
//
//   const c = new LineChart(canvas, {title: "Loss", series: [{label: "train", color: "#2a6fdb"}]});
//   c.empty = "why there is nothing yet";   // shown until the first point
//   c.push(0, step, loss);  c.draw();
//   histogram(canvas, {title, counts, lo: -1, hi: 1, marks: [{x, label}]});   // bars + vertical lines
//   new ScatterPlot(canvas, {title, points: [{x, y, color, label, tip}]});     // dots, hover for a tip
//
// Axes get "round" ticks (1, 2 or 5 times a power of ten), the canvas is drawn at the screen's
// pixel density so lines stay sharp, and hovering shows the values nearest the mouse.
export class LineChart {
  constructor(canvas, {title = "", series = [], xLabel = "step"} = {}) {
    this.canvas = canvas;
    this.title = title;
    this.xLabel = xLabel;
    this.series = series.map(s => ({...s, points: []}));
    this.hoverX = null;
    this.empty = "no data yet";
    canvas.addEventListener("mousemove", e => { this.hoverX = e.offsetX; this.draw(); });
    canvas.addEventListener("mouseleave", () => { this.hoverX = null; this.draw(); });
  }

  clear() { this.series.forEach(s => { s.points = []; }); }

  // Replace the series (a chart whose lines are not known in advance: one per training run).
  setSeries(series) { this.series = series.map(s => ({points: [], ...s})); }

  // Add a point; a point at or before the last x (a resumed run rewrites those steps) replaces them.
  push(i, x, y) {
    if (y == null || !isFinite(y)) return;
    const pts = this.series[i].points;
    while (pts.length && pts[pts.length - 1][0] >= x) pts.pop();
    pts.push([x, y]);
  }

  draw() {
    const ctx = sharpContext(this.canvas);
    if (!ctx) return;  // hidden tab: drawn when shown
    const W = this.canvas.clientWidth, H = this.canvas.clientHeight;
    const box = {left: 52, right: W - 12, top: 46, bottom: H - 26};
    box.top = this._legend(ctx, box) + 12;
    const all = this.series.flatMap(s => s.points);
    if (!all.length) {
      ctx.fillStyle = "#888";
      wrapText(ctx, this.empty, box.left - 40, (box.top + box.bottom) / 2 - 8, box.right - box.left + 40);
      return;
    }
    const xr = range(all.map(p => p[0]), false), yr = range(all.map(p => p[1]), true);
    const sx = x => box.left + (x - xr[0]) / (xr[1] - xr[0]) * (box.right - box.left);
    const sy = y => box.bottom - (y - yr[0]) / (yr[1] - yr[0]) * (box.bottom - box.top);
    this._axes(ctx, box, xr, yr, sx, sy);
    for (const s of this.series) this._line(ctx, s, sx, sy, box);
    if (this.hoverX != null && this.hoverX >= box.left && this.hoverX <= box.right) this._hover(ctx, box, sx, sy, xr);
  }

  // the title on the first line, then each series' colour, name and newest value, wrapping onto
  // more lines when they do not fit; -> the y where the legend ends
  _legend(ctx, box) {
    ctx.fillStyle = "#222";
    ctx.font = "bold 13px system-ui, sans-serif";
    ctx.fillText(this.title, box.left - 40, 16);
    ctx.font = "12px system-ui, sans-serif";
    let x = box.left - 40, y = 35;
    for (const s of this.series) {
      const text = s.label + (s.points.length ? " " + fmtTick(s.points[s.points.length - 1][1]) : "");
      const w = 16 + ctx.measureText(text).width + 18;
      if (x + w > box.right && x > box.left - 40) { x = box.left - 40; y += 16; }
      ctx.fillStyle = s.color;
      ctx.fillRect(x, y - 6, 12, 4);
      ctx.fillStyle = "#444";
      ctx.fillText(text, x + 16, y);
      x += w;
    }
    return y;
  }

  _axes(ctx, box, xr, yr, sx, sy) {
    ctx.strokeStyle = "#e4e4e4";
    ctx.fillStyle = "#666";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    for (const y of ticks(yr[0], yr[1], 5)) {
      ctx.beginPath(); ctx.moveTo(box.left, sy(y)); ctx.lineTo(box.right, sy(y)); ctx.stroke();
      ctx.fillText(fmtTick(y), box.left - 6, sy(y) + 4);
    }
    ctx.textAlign = "center";
    for (const x of ticks(xr[0], xr[1], 6, 1)) ctx.fillText(fmtTick(x), sx(x), box.bottom + 16);  // steps are whole
    ctx.textAlign = "left";
    ctx.strokeStyle = "#999";
    axesLines(ctx, box);
  }

  _line(ctx, s, sx, sy, box) {
    const pts = decimate(s.points, Math.max(50, box.right - box.left));
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 1.6;
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
    ctx.stroke();
    if (pts.length < 40) pts.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(sx(x), sy(y), 2.5, 0, 7); ctx.fill(); });
  }

  _hover(ctx, box, sx, sy, xr) {
    const x = xr[0] + (this.hoverX - box.left) / (box.right - box.left) * (xr[1] - xr[0]);
    const lines = [];
    for (const s of this.series) {
      const p = nearest(s.points, x);
      if (!p) continue;
      ctx.fillStyle = s.color;
      ctx.beginPath(); ctx.arc(sx(p[0]), sy(p[1]), 4, 0, 7); ctx.fill();
      lines.push(`${s.label} @ ${this.xLabel} ${fmtTick(p[0])}: ${fmtTick(p[1])}`);
    }
    ctx.strokeStyle = "#bbb";
    ctx.beginPath(); ctx.moveTo(this.hoverX, box.top); ctx.lineTo(this.hoverX, box.bottom); ctx.stroke();
    const w = Math.max(...lines.map(l => ctx.measureText(l).width)) + 12;
    const left = this.hoverX + w + 8 > box.right ? this.hoverX - w - 8 : this.hoverX + 8;
    ctx.fillStyle = "rgba(255,255,255,0.92)";
    ctx.fillRect(left, box.top + 4, w, lines.length * 16 + 6);
    ctx.fillStyle = "#222";
    lines.forEach((l, i) => ctx.fillText(l, left + 6, box.top + 18 + i * 16));
  }
}

// Bars of `counts` over equal bins from lo to hi, with labelled vertical lines at `marks`.
export function histogram(canvas, {title = "", counts, lo, hi, marks = [], color = "#9db4d9", markColor = "#d23c3c"}) {
  const ctx = sharpContext(canvas);
  if (!ctx) return;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  const box = {left: 52, right: W - 12, top: 52, bottom: H - 26};
  ctx.fillStyle = "#222";
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.fillText(title, 12, 16);
  ctx.font = "12px system-ui, sans-serif";
  const top = Math.max(...counts) * 1.05 || 1;
  const sx = x => box.left + (x - lo) / (hi - lo) * (box.right - box.left);
  const sy = y => box.bottom - y / top * (box.bottom - box.top);
  const w = (box.right - box.left) / counts.length;
  ctx.fillStyle = color;
  counts.forEach((c, i) => ctx.fillRect(box.left + i * w, sy(c), Math.max(1, w - 1), box.bottom - sy(c)));
  ctx.fillStyle = "#666";
  ctx.textAlign = "right";
  for (const y of ticks(0, top, 4)) ctx.fillText(fmtTick(y), box.left - 6, sy(y) + 4);
  ctx.textAlign = "center";
  for (const x of ticks(lo, hi, 8)) ctx.fillText(fmtTick(x), sx(x), box.bottom + 16);
  ctx.strokeStyle = markColor;
  ctx.fillStyle = markColor;
  ctx.font = "10px system-ui, sans-serif";
  marks.forEach((m, i) => {
    ctx.beginPath(); ctx.moveTo(sx(m.x), box.top - 4); ctx.lineTo(sx(m.x), box.bottom); ctx.stroke();
    if (m.label) ctx.fillText(m.label, sx(m.x), box.top - (i % 2 ? 8 : 20));  // two rows: neighbours do not overlap
  });
  ctx.textAlign = "left";
  ctx.strokeStyle = "#999";
  axesLines(ctx, box);
}

// Points with a colour each; the first `labelled` get their label drawn, hovering any shows its tip.
export class ScatterPlot {
  constructor(canvas, {title = "", points = [], labelled = 40, legend = []} = {}) {
    Object.assign(this, {canvas, title, points, labelled, legend, hover: null});
    canvas.onmousemove = e => { this.hover = this._nearest(e.offsetX, e.offsetY); this.draw(); };
    canvas.onmouseleave = () => { this.hover = null; this.draw(); };
  }

  draw() {
    const ctx = sharpContext(this.canvas);
    if (!ctx || !this.points.length) return;
    const W = this.canvas.clientWidth, H = this.canvas.clientHeight;
    const box = {left: 16, right: W - 16, top: 44, bottom: H - 16};
    ctx.fillStyle = "#222";
    ctx.font = "bold 13px system-ui, sans-serif";
    ctx.fillText(this.title, 12, 16);
    ctx.font = "12px system-ui, sans-serif";
    let x = 12;
    for (const l of this.legend) {
      ctx.fillStyle = l.color;
      ctx.beginPath(); ctx.arc(x + 4, 30, 4, 0, 7); ctx.fill();
      ctx.fillStyle = "#444";
      ctx.fillText(l.label, x + 12, 34);
      x += 12 + ctx.measureText(l.label).width + 18;
    }
    const xr = range(this.points.map(p => p.x), true), yr = range(this.points.map(p => p.y), true);
    this.sx = v => box.left + (v - xr[0]) / (xr[1] - xr[0]) * (box.right - box.left);
    this.sy = v => box.bottom - (v - yr[0]) / (yr[1] - yr[0]) * (box.bottom - box.top);
    ctx.strokeStyle = "#eee";
    ctx.beginPath(); ctx.moveTo(this.sx(0), box.top); ctx.lineTo(this.sx(0), box.bottom);
    ctx.moveTo(box.left, this.sy(0)); ctx.lineTo(box.right, this.sy(0)); ctx.stroke();
    this.points.forEach((p, i) => {
      ctx.fillStyle = p.color;
      ctx.beginPath(); ctx.arc(this.sx(p.x), this.sy(p.y), i < this.labelled ? 3.5 : 2.5, 0, 7); ctx.fill();
      if (i < this.labelled) { ctx.fillStyle = "#333"; ctx.fillText(p.label, this.sx(p.x) + 5, this.sy(p.y) - 4); }
    });
    if (this.hover) this._tip(ctx, this.hover, box);
  }

  _tip(ctx, p, box) {
    const x = this.sx(p.x), y = this.sy(p.y), w = ctx.measureText(p.tip).width + 12;
    ctx.strokeStyle = "#222";
    ctx.beginPath(); ctx.arc(x, y, 6, 0, 7); ctx.stroke();
    const left = x + w + 10 > box.right ? x - w - 10 : x + 10;
    ctx.fillStyle = "rgba(29,35,48,0.92)";
    ctx.fillRect(left, y - 22, w, 20);
    ctx.fillStyle = "#fff";
    ctx.fillText(p.tip, left + 6, y - 8);
  }

  _nearest(mx, my) {
    if (!this.sx) return null;
    let best = null, bestD = 100;  // within 10 px
    for (const p of this.points) {
      const d = (this.sx(p.x) - mx) ** 2 + (this.sy(p.y) - my) ** 2;
      if (d < bestD) { best = p; bestD = d; }
    }
    return best;
  }
}

// the y axis and the x axis: two lines along the box's left and bottom edges
function axesLines(ctx, box) {
  ctx.beginPath();
  ctx.moveTo(box.left, box.top);
  ctx.lineTo(box.left, box.bottom);
  ctx.lineTo(box.right, box.bottom);
  ctx.stroke();
}

// Words over as many lines of at most `width` pixels as they need, from (x, y) down.
function wrapText(ctx, text, x, y, width) {
  let line = "";
  for (const word of text.split(" ")) {
    if (line && ctx.measureText(line + " " + word).width > width) {
      ctx.fillText(line, x, y);
      y += 16;
      line = word;
    } else line = line ? line + " " + word : word;
  }
  ctx.fillText(line, x, y);
}

// The canvas's 2-D context, its backing store sized to the screen's pixel density and cleared;
// null while the canvas is hidden (it has no size then).
function sharpContext(canvas) {
  const W = canvas.clientWidth, H = canvas.clientHeight, dpr = window.devicePixelRatio || 1;
  if (!W || !H) return null;
  canvas.width = Math.round(W * dpr);
  canvas.height = Math.round(H * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  return ctx;
}

// [min, max] of values, widened so a flat line or a single point still has a visible range.
function range(values, pad) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  if (pad) { const d = (hi - lo) * 0.06; lo -= d; hi += d; }
  return [lo, hi];
}

// About n round numbers between lo and hi: steps of 1, 2 or 5 times a power of ten, at least minStep.
function ticks(lo, hi, n, minStep = 0) {
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = Math.max(minStep, [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  return out;
}

function fmtTick(v) {
  const a = Math.abs(v);
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
  return String(Number(a >= 1 ? v.toFixed(2) : v.toPrecision(3)));  // 0.500 -> 0.5
}

// At most ~max points: every k-th, always keeping the last (the newest value matters most).
function decimate(points, max) {
  if (points.length <= max) return points;
  const k = Math.ceil(points.length / max);
  const out = points.filter((_, i) => i % k === 0);
  if (out[out.length - 1] !== points[points.length - 1]) out.push(points[points.length - 1]);
  return out;
}

function nearest(points, x) {
  let best = null;
  for (const p of points) if (!best || Math.abs(p[0] - x) < Math.abs(best[0] - x)) best = p;
  return best;
}
