// Layer activity: what each LoRA layer is learning. A heatmap of the latest
// sample (layers along x, module kinds along y), the per-layer totals of the
// top layers over time, and what a finished file moved, per layer.
// Fetched when the status' layer_activity_summary names a new sample, and when
// a file finishes (the queue's done count): no polling.
import { api } from '../api.js';
import { $, el } from '../dom.js';
import { fmt } from '../format.js';
import * as heat from '../heatmap.js';
import { STEP_INCRS, axis } from './charts.js';

const { uPlot } = window;
const TOP = 5;            // layers in the chart over time
const MAX_POINTS = 500;   // samples /api/activity may return for it
const MOVERS = 5;         // modules named under the heatmap and the file's bars
// The chart follows the heatmap's colour: per-layer totals of the same measure.
const SERIES_OF = { relative: 'relative', relative_change: 'relative_change' };
const NAMES = { relative: 'relative update', relative_change: 'recent change' };
const LINE_COLOURS = ['#4ea1ff', '#ffa94d', '#63e6be', '#f783ac', '#ffe066'];
const BAR_COLOUR = '#4ea1ff';

let measure = 'relative';          // the heatmap's colour: relative or relative_change
let activity = null;               // the last /api/activity answer
let grid = null, hover = null;     // the heatmap's layout (for hit-testing) and the cell pointed at
let moved = null, bars = null, barHover = null;  // the chosen file's record and its bars' layout
let files = [], chosen = null;     // done files (newest first); the one picked, null: the newest
let sampleKey, doneKey;            // undefined until the first status, so that it fetches
let chart = null, chartKey = '';
let activitySeq = 0, movedSeq = 0; // an answer older than the latest request is dropped

export function init() {
  for (const r of document.querySelectorAll('input[name=activity-measure]')) {
    r.addEventListener('change', () => { measure = r.value; drawHeatmap(); loadActivity(); });
  }
  $('activity-scale').style.backgroundImage = heat.gradientCss();
  const hm = $('activity-heatmap');
  hm.addEventListener('mousemove', pointAtCell);
  hm.addEventListener('mouseleave', () => { hover = null; $('activity-tip').hidden = true; drawHeatmap(); });
  const mb = $('moved-bars');
  mb.addEventListener('mousemove', pointAtBar);
  mb.addEventListener('mouseleave', () => { barHover = null; $('moved-tip').hidden = true; drawMoved(); });
  $('moved-file').addEventListener('change', (e) => { chosen = e.target.value; loadMoved(); });
  window.addEventListener('resize', () => {
    drawHeatmap(); drawMoved();
    if (chart) chart.setSize({ width: Math.max(300, $('activity-chart').clientWidth), height: chart.height });
  });
}

export function update(s) {
  const a = s.layer_activity_summary;
  const key = a ? `${a.job_id}|${a.global_step}|${a.sampled_at}` : null;
  if (key !== sampleKey) { sampleKey = key; loadActivity(); }
  const done = s.queue ? s.queue.done : null;
  if (done !== doneKey) { doneKey = done; loadFiles(); }
}

export function load() { loadActivity(); loadFiles(); }

async function loadActivity() {
  const my = ++activitySeq;
  try {
    const a = await api(`/api/activity?measure=${SERIES_OF[measure]}&top=${TOP}&max_points=${MAX_POINTS}`);
    if (my === activitySeq) { activity = a; render(); }
  } catch (e) { /* shown by the connection state; the next sample retries */ }
}

function render() {
  const s = activity.latest;
  $('activity-empty').hidden = !!s;
  $('activity-body').hidden = !s;
  $('activity-info').textContent = s ? `step ${fmt.int(s.step)} of ${fileName(s.job_id)}${s.final ? ' (its end)' : ''} · global step ${fmt.int(s.global_step)} · ${fmt.when(s.t)}` : '';
  if (!s) return;
  drawHeatmap();
  movers($('activity-movers'), s.top_movers, s.top_movers.length && s.top_movers[0].measure === 'relative_change'
    ? 'Changed most since the previous sample (change / ‖W₀‖)' : 'Moved most so far (‖ΔW‖ / ‖W₀‖)');
  drawChart();
}

const fileName = (jobId) => (jobId || '').replace(/^.*?--/, '');  // job ids are <time>-<n>--<name>

// ---------------------------------------------------------------- heatmap
function drawHeatmap() {
  const s = activity && activity.latest;
  if (!s) return;
  const canvas = $('activity-heatmap');
  const vals = s.values[measure] || [], upd = s.values.update || [];
  // null: no LoRA on that module (hatched); undefined: not measured yet (no change at a first sample)
  const cell = (i, j) => (upd[i] == null || upd[i][j] == null ? null : (vals[i] && vals[i][j] != null ? vals[i][j] : undefined));
  const present = vals.flat().filter((v) => v != null);
  const lo = present.length ? Math.min(...present) : 0, hi = present.length ? Math.max(...present) : 0;
  grid = heat.layout(canvas.parentElement.clientWidth, s.layers.length, s.kinds, s.kinds.length);
  const frozen = s.values.frozen || [];
  const mark = (i, j) => !!(frozen[i] && frozen[i][j] === 1);
  const n = heat.drawGrid(canvas, grid, { layers: s.layers, rowLabels: s.kinds, cell, lo, hi, hover, mark });
  Object.assign(canvas.dataset, { cells: n, layers: s.layers.length, kinds: s.kinds.length, measure, min: lo, max: hi,
    x0: grid.x0, y0: grid.y0, cellW: grid.w, cellH: grid.h,  // for the browser test: where a cell is
    frozen: frozen.flat().filter((v) => v === 1).length });
  layerNotes(s);
  $('activity-min').textContent = present.length ? fmt.sig(lo) : '';
  $('activity-max').textContent = present.length ? fmt.sig(hi) : 'no values yet: a change needs two samples';
}

// Frozen layers (lora.freeze_stalled) and intruder dimensions (activity.intruders), where the sample has them.
function layerNotes(s) {
  let host = $('activity-layers-note');
  if (!host) {
    host = el('p', { id: 'activity-layers-note', class: 'small muted' });
    $('activity-movers').before(host);
  }
  const sum = (rows) => rows.map((r) => r.reduce((a, v) => a + (v || 0), 0));
  const parts = [];
  if (s.values.frozen) {
    const per = sum(s.values.frozen), at = s.layers.filter((l, i) => per[i] > 0);
    parts.push(at.length ? `× frozen (lora.freeze_stalled): ${at.length === 1 ? 'layer' : 'layers'} ${at.map(heat.layerName).join(', ')}`
      : 'Nothing frozen (lora.freeze_stalled)');
  }
  if (s.values.intruders) {
    const per = sum(s.values.intruders), total = per.reduce((a, v) => a + v, 0);
    const most = s.layers.map((l, i) => [per[i], l]).filter(([v]) => v > 0).sort((a, b) => b[0] - a[0]).slice(0, 5);
    parts.push(`Intruder dimensions: ${total}` + (most.length ? ` (most in ${most.map(([v, l]) => `layer ${heat.layerName(l)}: ${v}`).join(', ')})` : ''));
  }
  host.textContent = parts.join(' · ');
  host.hidden = !parts.length;
  host.dataset.frozenLayers = s.values.frozen ? s.layers.filter((l, i) => sum(s.values.frozen)[i] > 0).join(',') : '';
}

function pointAtCell(e) {
  const s = activity && activity.latest;
  const r = e.currentTarget.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
  const c = s && grid ? heat.cellAt(grid, x, y) : null;
  const tip = $('activity-tip');
  if (!c) { tip.hidden = true; return; }
  if (!hover || hover.i !== c.i || hover.j !== c.j) { hover = c; drawHeatmap(); }
  const at = (m) => (s.values[m] ? s.values[m][c.i][c.j] : null);
  const v = at(measure), lora = at('update') != null;
  const text = `layer ${heat.layerName(s.layers[c.i])} · ${s.kinds[c.j]} · `
    + (!lora ? 'no LoRA' : v == null ? `${NAMES[measure]} not measured yet` : `${NAMES[measure]} ${fmt.sig(v, 4)}`);
  const detail = lora ? (at('frozen') === 1 ? 'frozen (lora.freeze_stalled) · ' : '')
    + (at('intruders') != null ? `intruders ${at('intruders')} · ` : '') + `‖ΔW‖ ${fmt.sig(at('update'))} · change ${fmt.sig(at('change'))} · ‖∇A‖ ${fmt.sig(at('grad_a'))} · ‖∇B‖ ${fmt.sig(at('grad_b'))}` : '';
  showTip(tip, x, y, text, detail);
  const out = $('activity-hover');  // the last cell pointed at stays readable (and testable)
  out.textContent = text; out.classList.remove('muted');
  Object.assign(out.dataset, { layer: s.layers[c.i], kind: s.kinds[c.j], value: v == null ? '' : v });
}

function showTip(tip, x, y, text, detail) {
  tip.replaceChildren(el('div', { text }), detail ? el('div', { class: 'muted', text: detail }) : null);
  tip.hidden = false;
  const wrap = tip.parentElement.clientWidth;  // flip to the pointer's left near the right edge
  tip.style.left = (x + 14 + tip.offsetWidth > wrap ? Math.max(0, x - 14 - tip.offsetWidth) : x + 14) + 'px';
  tip.style.top = (y + 14) + 'px';
}

function movers(host, list, what) {
  const shown = list.slice(0, MOVERS);
  host.replaceChildren(...(shown.length ? [el('span', { class: 'muted', text: what + ': ' }),
    ...shown.map((m) => el('span', { class: 'mover', text: `layer ${heat.layerName(m.layer)} ${m.kind} ${fmt.sig(m.value)}` }))] : []));
}

// ---------------------------------------------------------------- top layers over time
function drawChart() {
  const se = activity.series, host = $('activity-chart');
  const data = [se.global_steps, ...se.layers.map((_, k) => se.values.map((row) => row[k]))];
  const key = se.measure + '|' + se.layers.join(',');
  if (chart && key === chartKey) chart.setData(data);
  else {  // other layers (or another measure): other series
    if (chart) chart.destroy();
    chartKey = key;
    chart = new uPlot({
      width: Math.max(300, host.clientWidth), height: 190,
      scales: { x: { time: false } }, legend: { live: true }, cursor: { drag: { x: false, y: false } },
      axes: [axis({ label: 'global step', incrs: STEP_INCRS }), axis({ size: 64, values: (u, vals) => vals.map((v) => (v == null ? '' : fmt.sig(v))) })],
      series: [{ label: 'step' }].concat(se.layers.map((l, k) => ({
        label: `layer ${heat.layerName(l)}`, stroke: LINE_COLOURS[k % LINE_COLOURS.length], width: 1.5, spanGaps: true,
        value: (u, v) => fmt.sig(v, 4) }))),
    }, data, host);
  }
  host.dataset.measure = se.measure;
  host.dataset.series = String(se.layers.length);
  host.dataset.points = String(se.global_steps.length);
  const what = se.measure === 'relative_change' ? 'change since the previous sample, ‖ΔW − ΔW before‖/‖W₀‖'
    : 'relative update ‖ΔW‖/‖W₀‖';
  const which = se.layers.length < activity.latest.layers.length ? `the ${se.layers.length} largest now` : 'every layer';
  $('activity-chart-note').textContent = `(per-layer ${what}; ${which}${activity.downsampled ? `; ${fmt.int(se.global_steps.length)} of ${fmt.int(activity.total_rows)} samples drawn` : ''})`;
}

// ---------------------------------------------------------------- what a file moved
async function loadFiles() {
  let q;
  try { q = await api('/api/queue'); } catch (e) { return; }
  files = q.done;
  if (!files.some((f) => f.job_id === chosen)) chosen = null;  // gone from the list: back to the newest
  const sel = $('moved-file');
  sel.replaceChildren(...files.map((f) => el('option', { value: f.job_id, text: f.original_name + (f.adapter_version != null ? ` → adapter v${f.adapter_version}` : '') })));
  sel.value = chosen || (files.length ? files[0].job_id : '');
  sel.hidden = files.length < 2;
  loadMoved();
}

async function loadMoved() {
  const f = files.find((x) => x.job_id === (chosen || (files.length ? files[0].job_id : null)));
  const my = ++movedSeq;
  if (!f) return showMoved(null, 'No file has finished yet: what a file moved is recorded when it finishes.');
  if (f.duplicate_of) {  // done without training: nothing moved, and the earlier file is the one to look at
    const d = f.duplicate_of;
    return showMoved(null, `${f.original_name} was not trained: its content repeats ${d.original_name || d.job_id}` +
      `${d.version != null ? ', already in adapter v' + d.version : ''}, so nothing moved.`);
  }
  // No record kept (trained before traind measured activity): asking would only log a 404 in the console.
  if (!f.has_activity) return showMoved(null, `No record of what ${f.original_name} moved: it was trained before traind measured layer activity.`);
  try {
    const m = await api(`/api/activity/jobs/${encodeURIComponent(f.job_id)}`);
    if (my === movedSeq) showMoved(m);
  } catch (e) {
    if (my !== movedSeq) return;
    showMoved(null, e.status === 404 ? `No record of what ${f.original_name} moved: it was trained before traind measured layer activity.`
      : `Could not load what ${f.original_name} moved: ${e.message}`);
  }
}

function showMoved(m, why) {
  moved = m;
  const info = $('moved-info');
  info.classList.toggle('muted', !m);
  info.textContent = m ? `${m.original_name || m.job_id} · ${fmt.int(m.steps)} steps · adapter v${m.adapter_version ?? '—'}` : why;
  $('moved-bars').hidden = !m;
  if (!m) { $('moved-top').replaceChildren(); return; }
  drawMoved();
  movers($('moved-top'), m.top, 'Moved most (moved / ‖W₀‖)');
}

function drawMoved() {
  if (!moved) return;
  const canvas = $('moved-bars'), m = moved;
  // the same columns as the heatmap when the layers are the same: a layer reads straight down
  bars = heat.layout(canvas.parentElement.clientWidth, m.layers.length, m.kinds, 1, 64);
  const max = heat.drawBars(canvas, bars, { layers: m.layers, values: m.per_layer.moved_relative || [], fill: BAR_COLOUR, hover: barHover });
  Object.assign(canvas.dataset, { layers: m.layers.length, max });
}

function pointAtBar(e) {
  const r = e.currentTarget.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
  const c = moved && bars ? heat.cellAt(bars, x, y) : null;
  const tip = $('moved-tip');
  if (!c) { tip.hidden = true; return; }
  if (!barHover || barHover.i !== c.i) { barHover = c; drawMoved(); }
  const rel = moved.per_layer.moved_relative || [], abs = moved.per_layer.moved || [];
  showTip(tip, x, y, `layer ${heat.layerName(moved.layers[c.i])} · moved ${fmt.sig(rel[c.i], 4)} of ‖W₀‖`, `‖ΔW after − ΔW before‖ ${fmt.sig(abs[c.i])}`);
}
