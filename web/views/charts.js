// The training charts (loss with smoothing and eval points, learning rate,
// tokens/s): history loading as steps arrive, and zoom with full detail.
// uPlot is the vendored classic script (vendor/uplot/uPlot.iife.min.js), a global.
import { state } from '../state.js';
import { api } from '../api.js';
import { $ } from '../dom.js';
import { fmt } from '../format.js';

const { uPlot } = window;
const MAX_POINTS = 2000;          // what /api/history may return per request
const SMOOTH_WEIGHT = 0.9;        // EMA weight, as TensorBoard's smoothing slider
export const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7];  // steps are whole

// An axis with the dashboard's look (fresh objects each time: uPlot keeps what it is given).
// Shared with the other step chart, views/activity.js.
export const axis = (opts) => ({ stroke: '#9aa5b1', grid: { stroke: '#2a3440' }, ticks: { stroke: '#2a3440' }, ...opts });

let lossChart, lrChart, tpsChart;

export function init() {
  lossChart = makeChart('chart-loss', [
    { label: 'loss', stroke: 'rgba(100,160,230,0.45)', width: 1, spanGaps: true, value: (u, v) => fmt.loss(v) },
    { label: 'smoothed', stroke: '#4ea1ff', width: 2, spanGaps: true, value: (u, v) => fmt.loss(v) },
    { label: 'eval', stroke: '#ffa94d', width: 0, paths: () => null, points: { show: true, size: 8, fill: '#ffa94d' }, value: (u, v) => fmt.loss(v) },
    // eval.file, scored after each file (one point where the file ended): did it help what was learnt before?
    { label: 'eval set', stroke: '#ff6b9a', width: 0, paths: () => null, points: { show: true, size: 9, fill: '#ff6b9a' }, value: (u, v) => fmt.loss(v) },
  ], (vals) => distinctLabels(vals, (v, d) => v.toFixed(d), 2), { draw: [drawSeriesStart] });
  lrChart = makeChart('chart-lr', [{ label: 'lr', stroke: '#b197fc', width: 1.5, spanGaps: true, value: (u, v) => fmt.sci(v) }],
    (vals) => distinctLabels(vals, (v, d) => v.toExponential(d), 1));
  tpsChart = makeChart('chart-tps', [{ label: 'tokens/s', stroke: '#63e6be', width: 1.5, spanGaps: true, value: (u, v) => fmt.int(v) }],
    (vals) => vals.map((v) => (v == null ? '' : fmt.int(v))));
  window.addEventListener('resize', () => {
    for (const c of state.charts) c.setSize({ width: Math.max(300, c.root.parentElement.clientWidth), height: c.height });
  });
  $('btn-reset-zoom').addEventListener('click', resetZoom);
  load();
}

// What changed decides what to fetch: no polling of history.
export function update(s, prev) {
  if (s.global_step < state.lastStep || (prev && prev.job_id !== s.job_id && s.global_step <= state.lastStep)) {
    load();  // a resume replayed steps: the history rows were replaced
  } else if (s.global_step > state.lastStep) {
    appendHistory();
  }
}

// The whole history, downsampled to at most MAX_POINTS.
export async function load() {
  try {
    const h = await api(`/api/history?max_points=${MAX_POINTS}`);
    state.overview = { points: h.points, evals: h.evals, evalSet: h.eval_set || [], markers: h.markers || [], total_rows: h.total_rows, downsampled: h.downsampled, bucket_width: h.bucket_width };
    state.series = { shown: h.series, all: h.all_series || [] };
    state.detail = null;
    state.lastStep = h.last_global_step == null ? -1 : h.last_global_step;
    draw();
  } catch (e) { /* shown by the connection state; retried on the next status */ }
}

async function appendHistory() {
  if (!state.overview) return load();
  if (state.historyBusy) return;
  state.historyBusy = true;
  try {
    const h = await api(`/api/history?since=${state.lastStep}&max_points=${MAX_POINTS}`);
    if (h.downsampled || state.overview.points.length + h.points.length > 2 * MAX_POINTS) return await load();
    const o = state.overview;
    o.points = o.points.concat(h.points); o.evals = o.evals.concat(h.evals); o.total_rows += h.total_rows;
    o.evalSet = (o.evalSet || []).concat(h.eval_set || []);
    o.markers = h.markers || o.markers;  // every marker comes each time (a handful)
    if (h.last_global_step != null) state.lastStep = h.last_global_step;
    draw();
  } catch (e) { /* next status event retries */ } finally { state.historyBusy = false; }
}

function makeChart(id, series, yFmt, hooks = {}) {
  const host = $(id);
  const opts = {
    width: Math.max(300, host.clientWidth), height: id === 'chart-loss' ? 260 : 170,
    cursor: { sync: { key: 'traind' }, drag: { x: true, y: false } },
    scales: { x: { time: false } },
    legend: { live: true },
    axes: [
      axis({ label: 'global step', incrs: STEP_INCRS }),
      axis({ size: 64, values: (u, vals) => yFmt(vals) }),
    ],
    series: [{ label: 'step' }].concat(series),
    // consolidations and rollbacks are marked on every chart; a chart may draw more of its own (`hooks.draw`)
    hooks: { setScale: [(u, key) => { if (key === 'x') onZoom(u); }], draw: [drawMarkers, ...(hooks.draw || [])] },
  };
  const empty = [[]].concat(series.map(() => []));
  const chart = new uPlot(opts, empty, host);
  state.charts.push(chart);
  return chart;
}

// Consolidations and rollbacks: a dashed line at the last step trained before each, labelled on the loss chart.
const MARKER_COLOR = { consolidation: '#ffd43b', rollback: '#ff6b6b' };
function drawMarkers(u) {
  const marks = (state.overview && state.overview.markers) || [];
  const { ctx } = u;
  const { top, height } = u.bbox;
  ctx.save();
  ctx.setLineDash([5, 4]);
  ctx.lineWidth = Math.max(1, devicePixelRatio);
  ctx.font = `${11 * devicePixelRatio}px sans-serif`;
  for (const m of marks) {
    const x = Math.round(u.valToPos(m.global_step, 'x', true));
    if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
    ctx.strokeStyle = ctx.fillStyle = MARKER_COLOR[m.kind] || '#ced4da';
    ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
    if (u.root.parentElement && u.root.parentElement.id === 'chart-loss') ctx.fillText(m.kind, x + 4, top + 12 * devicePixelRatio);
  }
  ctx.restore();
}

function draw() {
  const d = chartData();
  const marks = (state.overview && state.overview.markers) || [];
  $('chart-loss').dataset.markers = marks.map((m) => `${m.kind}@${m.global_step}`).join(',');
  const keep = state.zoomed;  // a zoomed view stays where the person put it
  state.syncing = true;
  try {
    lossChart.setData(d.loss, !keep);
    lrChart.setData(d.lr, !keep);
    tpsChart.setData(d.tps, !keep);
  } finally { state.syncing = false; }
  $('chart-loss').dataset.points = String(d.n);
  showSeries();
  const o = state.overview;
  $('chart-info').textContent = o
    ? `${fmt.int(o.total_rows)} steps${o.downsampled ? `, drawn as ${fmt.int(d.n)} points (min/max kept per ${o.bucket_width}-step bucket)` : ''}${state.detail ? ' · zoomed detail' : ''}`
    : '';
}

// The charts show one series of steps: one adapter's, from global step 0. A `config approve` that starts
// a new adapter starts a new series; the earlier ones stay in the history (/api/history?series=N).
function showSeries() {
  const el = $('chart-series');
  const s = state.series;
  const began = s && s.shown && s.shown.id > 0 ? s.shown : null;
  el.hidden = !began;
  if (!began) { el.textContent = ''; el.dataset.series = s && s.shown ? String(s.shown.id) : '0'; return; }
  el.dataset.series = String(began.id);
  el.textContent = `series ${began.id + 1} of ${s.all.length}: a new adapter since ${fmt.when(began.started_at)}` +
    (began.reason ? ` (${began.reason})` : '');
  el.title = `the earlier series stay in the history: ${s.all.filter((x) => x.id !== began.id).map((x) => `/api/history?series=${x.id}`).join(', ')}`;
}

// Where the series shown began: a dashed line at its first step, labelled.
function drawSeriesStart(u) {
  const s = state.series, o = state.overview;
  if (!s || !s.shown || s.shown.id === 0 || !o || !o.points.length) return;
  const x = Math.round(u.valToPos(o.points[0].global_step, 'x', true));
  if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) return;
  const ctx = u.ctx;
  ctx.save();
  ctx.strokeStyle = '#ffd43b'; ctx.setLineDash([4, 4]); ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
  ctx.setLineDash([]); ctx.fillStyle = '#ffd43b'; ctx.font = `${Math.round(11 * devicePixelRatio)}px sans-serif`;
  ctx.textAlign = 'left'; ctx.textBaseline = 'top';  // uPlot leaves its axes' alignment behind
  ctx.fillText(`new adapter (series ${s.shown.id + 1})`, x + 4 * devicePixelRatio, u.bbox.top + 2 * devicePixelRatio);
  ctx.restore();
}

// Zoom: sync the x range across charts, then fetch full detail for the range
// when the overview was downsampled (a month of steps zooms down to single steps).
let zoomTimer = null;
function onZoom(u) {
  if (state.syncing) return;
  const { min, max } = u.scales.x;
  state.syncing = true;
  try { for (const c of state.charts) if (c !== u) c.setScale('x', { min, max }); } finally { state.syncing = false; }
  const o = state.overview;
  const pts = o ? o.points : [];
  const full = !pts.length || (min <= pts[0].global_step && max >= pts[pts.length - 1].global_step);
  state.zoomed = !full;
  clearTimeout(zoomTimer);
  if (full) {
    if (state.detail) { state.detail = null; draw(); }
    return;
  }
  if (!o.downsampled) return;
  zoomTimer = setTimeout(async () => {
    try {
      const lo = Math.floor(min), hi = Math.ceil(max);
      const h = await api(`/api/history?since=${lo - 1}&until=${hi}&max_points=${MAX_POINTS}`);
      state.detail = { min: lo, max: hi, points: h.points, evals: h.evals };
      draw();
    } catch (e) { /* keep the overview */ }
  }, 250);
}

function resetZoom() {
  state.zoomed = false; state.detail = null;
  draw();
}

// ---------------------------------------------------------------- chart data
function ema(values) {
  const out = new Array(values.length); let acc = 0, n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v == null || !isFinite(v)) { out[i] = null; continue; }
    acc = SMOOTH_WEIGHT * acc + (1 - SMOOTH_WEIGHT) * v; n++;
    out[i] = acc / (1 - Math.pow(SMOOTH_WEIGHT, n));  // debiased, so the line starts at the data
  }
  return out;
}

// The points to draw: the overview, with the detail of a zoomed range spliced in.
function composed() {
  const o = state.overview; if (!o) return { points: [], evals: [], evalSet: [] };
  const d = state.detail;
  if (!d) return o;
  const outside = (p) => p.global_step < d.min || p.global_step > d.max;
  const merge = (a, b) => a.filter(outside).concat(b).sort((x, y) => x.global_step - y.global_step);
  return { points: merge(o.points, d.points), evals: merge(o.evals, d.evals), evalSet: o.evalSet || [] };
}

function chartData() {
  const { points, evals, evalSet } = composed();
  const xs = points.map((p) => p.global_step);
  const evalAt = new Map(evals.map((e) => [e.global_step, e.eval_loss]));
  const setAt = new Map((evalSet || []).map((e) => [e.global_step, e.after]));
  // uPlot wants one x array: put eval steps that have no metric row in too.
  const have = new Set(xs);
  const extra = [...new Set([...evalAt.keys(), ...setAt.keys()])].filter((g) => !have.has(g));
  let rows = points.map((p) => [p.global_step, p.loss, p.lr, p.tokens_per_sec]);
  if (extra.length) rows = rows.concat(extra.map((g) => [g, null, null, null])).sort((a, b) => a[0] - b[0]);
  const x = rows.map((r) => r[0]);
  const loss = rows.map((r) => r[1]);
  return {
    loss: [x, loss, ema(loss), x.map((g) => (evalAt.has(g) ? evalAt.get(g) : null)), x.map((g) => (setAt.has(g) ? setAt.get(g) : null))],
    lr: [x, rows.map((r) => r[2])],
    tps: [x, rows.map((r) => r[3])],
    n: points.length,
  };
}

// Axis labels with as many digits as it takes for neighbouring ticks to differ
// (zoomed in, "1.9e-3" on every tick says nothing).
function distinctLabels(vals, fmtAt, from) {
  const shown = vals.filter((v) => v != null);
  for (let d = from; d < from + 6; d++) {
    const labels = vals.map((v) => (v == null ? '' : fmtAt(v, d)));
    if (new Set(labels.filter(Boolean)).size === shown.length) return labels;
  }
  return vals.map((v) => (v == null ? '' : fmtAt(v, from + 6)));
}
