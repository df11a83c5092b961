// Forgetting: after each file, how the probes and the earlier files' keep-sets scored (GET /api/forgetting).
// A heatmap of files (rows, in learning order) × sets (columns: probes, then keep-sets in learning order),
// coloured by the change in loss — keep-sets since they were learnt, probes since the version before the file —
// on a diverging scale (red: forgotten, blue: better), a cell over its limit outlined; the probes' loss as lines
// over files with their baseline; consolidations and rollbacks marked; the gate's message when it tripped.
// Fetched when the status' `forgetting` block names a new report: no polling.
import { api } from '../api.js';
import { $, el } from '../dom.js';
import { fmt } from '../format.js';
import * as heat from '../heatmap.js';
import { axis } from './charts.js';

const { uPlot } = window;
const FILES = 50;          // rows asked for (the API's default bound)
const MIN_SPAN = 0.05;     // the colour's full scale is at least ±5%: tiny changes stay dark
const MARK_ROOM = 110;     // px right of the grid for a marker's label
const LINE_COLOURS = ['#4ea1ff', '#ffa94d', '#63e6be', '#f783ac', '#ffe066', '#b197fc', '#ff8787', '#a9e34b'];

let doc = null;                    // the last /api/forgetting answer
let grid = null, hover = null;     // the heatmap's layout and the cell pointed at
let chart = null, chartKey = '';
let reportKey;                     // undefined until the first status, so that it fetches
let generation = null;             // null: the current one
let seq = 0;                       // an answer older than the latest request is dropped

export function init() {
  $('forgetting-scale').style.backgroundImage = heat.divergingCss();
  const hm = $('forgetting-heatmap');
  hm.addEventListener('mousemove', pointAt);
  hm.addEventListener('mouseleave', () => { hover = null; $('forgetting-tip').hidden = true; draw(); });
  $('forgetting-generation').addEventListener('change', (e) => {
    generation = e.target.value === '' ? null : Number(e.target.value); load();
  });
  window.addEventListener('resize', () => {
    draw();
    if (chart) chart.setSize({ width: Math.max(300, $('forgetting-probes').clientWidth), height: chart.height });
  });
}

export function update(s) {
  const f = s.forgetting;
  gate(f);
  const key = f ? `${f.job_id}|${f.outcome}|${f.version}|${f.generation}` : null;
  if (key !== reportKey) { reportKey = key; load(); }
}

// The last report's gate, when it tripped: what was forgotten, by how much, and what the gate did.
function gate(f) {
  const b = $('forgetting-gate');
  const g = f && f.gate;
  b.hidden = !(g && g.tripped);
  if (b.hidden) return;
  const did = { warn: 'the version became current anyway (warn)', hold: 'the version is held: trainctl adapters accept|reject',
    rollback: 'the adapter was rolled back and the file failed' }[g.action] || g.action;
  b.replaceChildren(el('strong', { text: `Forgetting gate tripped by ${f.original_name || f.job_id}: ` }),
    el('span', { text: g.message || (g.over || []).join(', ') }), el('span', { class: 'muted', text: ` — ${did}.` }));
  b.dataset.action = g.action;
}

export async function load() {
  const my = ++seq;
  try {
    const q = `/api/forgetting?files=${FILES}` + (generation == null ? '' : `&generation=${generation}`);
    const d = await api(q);
    if (my === seq) { doc = d; render(); }
  } catch (e) { /* shown by the connection state; the next report retries */ }
}

const pct = (v) => (v == null ? '—' : `${v >= 0 ? '+' : ''}${(v * 100).toFixed(1)}%`);
const fileLabel = (f) => `${f.index}  ${f.name || f.job_id}${f.outcome !== 'done' ? ` (${f.outcome})` : ''}`;

function heads(sets) {
  let p = 0;
  return sets.map((s) => (s.kind === 'probe' ? `P${++p}` : `K${s.learnt_at}`));
}

function render() {
  const has = doc.files.length > 0;
  $('forgetting-empty').hidden = has;
  $('forgetting-body').hidden = !has;
  const sel = $('forgetting-generation');
  sel.replaceChildren(el('option', { value: '', text: 'current generation' }),
    ...doc.generations.map((g) => el('option', { value: String(g), text: `generation ${g}` })));
  sel.value = generation == null ? '' : String(generation);
  sel.hidden = doc.generations.length < 2;
  if (!has) {
    $('forgetting-info').textContent = doc.generations.length ? `generation ${doc.generation}: no file scored yet` : '';
    return;
  }
  const last = doc.files[doc.files.length - 1];
  const bwt = last.backward_transfer;
  $('forgetting-info').textContent = `generation ${doc.generation} · files ${doc.first_index}–${last.index} of ${doc.total_files}`
    + ` · after ${last.name}: backward transfer ${bwt ? `${bwt.loss >= 0 ? '+' : ''}${fmt.sig(bwt.loss)} loss` : '—'}`
    + (last.worst ? `, worst ${last.worst.name ? `${last.worst.id.startsWith('probe:') ? 'probe' : 'keep-set'} ${last.worst.name}` : setName(last.worst.id)} ${pct(last.worst.change)}` : '')
    + (last.sampled ? ' · sampled (budget)' : '');
  draw();
  drawChart();
  // The probes by name; a keep-set's column K<i> is the file of row i (its name is on that row).
  const probeHeads = heads(doc.sets).filter((_, i) => doc.sets[i].kind === 'probe');
  $('forgetting-sets').replaceChildren(...probeHeads.map((h, i) => el('span', { class: 'mover', text: `${h} probe ${doc.probes[i].name}` })),
    el('span', { class: 'mover muted', text: 'K<i>: the keep-set of file i (row i), scored against right after it was learnt' }));
  $('forgetting-omitted').textContent = doc.omitted_sets ? `${doc.omitted_sets} more set(s) scored: keep-sets of files before these, or probes past the first 20 (trainctl forgetting --json).` : '';
}

const setName = (id) => {
  const s = doc && doc.sets.find((x) => x.id === id);
  return s ? `${s.kind === 'probe' ? 'probe' : 'keep-set'} ${s.name}` : id;
};

// ---------------------------------------------------------------- heatmap
function cellOf(i, j) {
  const s = doc.sets[i], f = doc.files[j], c = doc.cells[j][i];
  if (s.kind !== 'probe' && s.job_id === f.job_id) return 'self';  // its own keep-set: the reference is now
  if (!c) return undefined;
  return { value: c.change, over: c.over, text: pct(c.change) };
}

function span() {
  const all = doc.cells.flat().filter((c) => c && c.change != null).map((c) => Math.abs(c.change));
  return Math.max(MIN_SPAN, ...all);
}

function draw() {
  if (!doc || !doc.files.length) return;
  const canvas = $('forgetting-heatmap');
  const rowLabels = doc.files.map(fileLabel);
  grid = heat.layout(canvas.parentElement.clientWidth - MARK_ROOM, doc.sets.length, rowLabels, doc.files.length,
    doc.files.length > 20 ? 16 : 24);  // 50 files stay a screen tall
  const lines = doc.markers.filter((m) => m.after != null).map((m) => ({ row: m.after - doc.first_index, label: m.kind }));
  if (lines.length) grid.width += MARK_ROOM;
  const sp = span();
  const n = heat.drawSigned(canvas, grid, { colLabels: heads(doc.sets), rowLabels, cell: cellOf, span: sp, hover, lines });
  const over = doc.cells.flat().filter((c) => c && c.over).length;
  Object.assign(canvas.dataset, { cells: n, rows: doc.files.length, cols: doc.sets.length, over, markers: lines.length,
    x0: grid.x0, y0: grid.y0, cellW: grid.w, cellH: grid.h });  // for the browser test: where a cell is
  $('forgetting-min').textContent = pct(-sp);
  $('forgetting-max').textContent = pct(sp);
}

function pointAt(e) {
  const r = e.currentTarget.getBoundingClientRect(), x = e.clientX - r.left, y = e.clientY - r.top;
  const c = doc && grid ? heat.cellAt(grid, x, y) : null;
  const tip = $('forgetting-tip');
  if (!c) { tip.hidden = true; return; }
  if (!hover || hover.i !== c.i || hover.j !== c.j) { hover = c; draw(); }
  const s = doc.sets[c.i], f = doc.files[c.j], v = doc.cells[c.j][c.i];
  const who = `after ${f.name}${f.version != null ? ` (v${f.version})` : ''} · ${setName(s.id)}`;
  let text, detail = '';
  if (s.kind !== 'probe' && s.job_id === f.job_id) text = `${who}: learnt here (its reference)`;
  else if (!v) text = `${who}: not scored`;
  else {
    const since = s.kind === 'probe' ? 'the version before' : 'right after it was learnt';
    text = `${who}: loss ${fmt.sig(v.loss, 4)}, ${pct(v.change)} since ${since}` + (v.over ? ` — over its limit ${pct(v.limit)}` : '');
    detail = `reference loss ${fmt.sig(v.reference && v.reference.loss, 4)} · accuracy ${fmt.sig(v.accuracy, 3)}`
      + (v.drift != null ? ` · drift ${pct(v.drift)} since the generation began` : '') + ` · ${fmt.int(v.examples)} examples`;
  }
  tip.replaceChildren(el('div', { text }), detail ? el('div', { class: 'muted', text: detail }) : null);
  tip.hidden = false;
  const wrap = tip.parentElement.clientWidth;
  tip.style.left = (x + 14 + tip.offsetWidth > wrap ? Math.max(0, x - 14 - tip.offsetWidth) : x + 14) + 'px';
  tip.style.top = (y + 14) + 'px';
  const out = $('forgetting-hover');
  out.textContent = text; out.classList.remove('muted');
}

// ---------------------------------------------------------------- probes over files
function drawMarkers(u) {
  const ctx = u.ctx;
  ctx.save();
  ctx.strokeStyle = '#b197fc'; ctx.fillStyle = '#b197fc'; ctx.lineWidth = 1.5 * devicePixelRatio; ctx.textAlign = 'left';
  ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
  ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
  for (const m of doc.markers) {
    if (m.after == null) continue;
    const x = Math.round(u.valToPos(m.after + 0.5, 'x', true));
    ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    ctx.fillText(m.kind, x + 4 * devicePixelRatio, u.bbox.top + 12 * devicePixelRatio);
  }
  ctx.restore();
}

// The files, with room for a marker after the last one (a consolidation ends a generation).
function xRange(u, lo, hi) {
  const after = doc.markers.filter((m) => m.after != null).map((m) => m.after + 0.5);
  return [lo - 0.25, Math.max(hi, ...after) + 0.25];
}

function drawChart() {
  const host = $('forgetting-probes');
  const probes = doc.probes;
  $('forgetting-probes-wrap').hidden = !probes.length;
  if (!probes.length) { if (chart) { chart.destroy(); chart = null; chartKey = ''; } return; }
  const xs = doc.files.map((f) => f.index);
  const data = [xs];
  const series = [{ label: 'file' }];
  probes.forEach((p, k) => {
    const colour = LINE_COLOURS[k % LINE_COLOURS.length];
    data.push(p.loss);
    series.push({ label: p.name, stroke: colour, width: 2, spanGaps: true, points: { show: true, size: 6 },
      value: (u, v) => fmt.sig(v, 4) });
    data.push(xs.map(() => (p.baseline ? p.baseline.loss : null)));
    series.push({ label: `${p.name} baseline`, stroke: colour, width: 1, dash: [4, 4], value: (u, v) => fmt.sig(v, 4) });
  });
  const key = probes.map((p) => p.id).join('|') + `|${doc.generation}|${doc.markers.length}`;
  if (chart && key === chartKey) chart.setData(data);
  else {
    if (chart) chart.destroy();
    chartKey = key;
    chart = new uPlot({
      width: Math.max(300, host.clientWidth), height: 200,
      scales: { x: { time: false, range: xRange } }, legend: { live: true }, cursor: { drag: { x: false, y: false } },
      axes: [axis({ label: 'file', incrs: [1, 2, 5, 10, 20, 50, 100], values: (u, vals) => vals.map((v) => (v == null ? '' : String(v))) }),
        axis({ size: 60, values: (u, vals) => vals.map((v) => (v == null ? '' : fmt.sig(v))) })],
      series, hooks: { draw: [drawMarkers] },
    }, data, host);
  }
  host.dataset.series = String(probes.length);
  host.dataset.points = String(xs.length);
}
