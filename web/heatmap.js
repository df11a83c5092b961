// A grid of values on a <canvas> (rows × columns, one column per layer), and
// bars sharing its columns: the colour scale, the layout that fits a 2-layer
// and an 80-layer model in the same width, axis labels and hit-testing. No library.
import { fmt } from './format.js';

// Viridis (perceptually uniform, readable in grey and by most colour-blind
// eyes), as matplotlib's 9 evenly spaced stops; interpolated linearly between them.
const VIRIDIS = ['#440154', '#472c7a', '#3b518b', '#2c718e', '#21908d', '#27ad81', '#5cc863', '#aadc32', '#fde725']
  .map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
const FONT = '12px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
const MAX_COL = 88, MIN_COL = 3;  // px per layer: big cells for 2 layers, 80 still fit ~1300 px
const LABEL_ROW = 18;             // px under the grid for the layer labels
const TEXT = '#9aa5b1', EMPTY = '#212a34', HATCH = '#4a5868';

export function colour(t) {
  const x = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export const gradientCss = () => `linear-gradient(to right, ${VIRIDIS.map((c) => `rgb(${c.join(',')})`).join(', ')})`;

export const layerName = (l) => (l < 0 ? 'other' : String(l));

// Where things go: `x0` leaves room for the row labels, columns share what is left
// of `width`, rows are a little taller than columns are wide (hover needs a target)
// unless `rowH` says how tall.
export function layout(width, nCols, rowLabels, nRows, rowH) {
  const ctx = document.createElement('canvas').getContext('2d');
  ctx.font = FONT;
  const x0 = Math.ceil(Math.max(40, ...rowLabels.map((s) => ctx.measureText(s).width)) + 12);
  const w = Math.max(MIN_COL, Math.min(MAX_COL, Math.floor((width - x0 - 8) / Math.max(1, nCols))));
  const h = rowH || Math.max(16, Math.min(32, Math.round(w * 1.3)));
  return { x0, y0: 2, w, h, cols: nCols, rows: nRows, width: x0 + nCols * w + 8, height: 2 + nRows * h + LABEL_ROW };
}

// The column and row under (x, y) in CSS pixels of the canvas, or null.
export function cellAt(g, x, y) {
  const i = Math.floor((x - g.x0) / g.w), j = Math.floor((y - g.y0) / g.h);
  return i >= 0 && i < g.cols && j >= 0 && j < g.rows ? { i, j } : null;
}

function context(canvas, g) {
  const dpr = window.devicePixelRatio || 1;  // crisp on HiDPI screens
  canvas.width = Math.round(g.width * dpr); canvas.height = Math.round(g.height * dpr);
  canvas.style.width = g.width + 'px'; canvas.style.height = g.height + 'px';
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = FONT;
  return ctx;
}

// Layer labels under the columns, thinned to every 2nd/5th/10th… so that none overlap.
function layerLabels(ctx, g, layers) {
  const widest = Math.max(...layers.map((l) => ctx.measureText(layerName(l)).width)) + 8;
  const every = [1, 2, 5, 10, 20, 50, 100, 200, 500].find((k) => k * g.w >= widest) || 1000;
  ctx.fillStyle = TEXT; ctx.textAlign = 'center'; ctx.textBaseline = 'top';
  const y = g.y0 + g.rows * g.h + 4;
  let right = -Infinity;
  layers.forEach((l, i) => {
    if (l >= 0 && l % every) return;
    const s = layerName(l), x = g.x0 + (i + 0.5) * g.w, half = ctx.measureText(s).width / 2;
    if (x - half < right + 4) return;
    ctx.fillText(s, x, y); right = x + half;
  });
  ctx.textAlign = 'right';
  ctx.fillText('layer', g.x0 - 8, y);
}

// Diagonal hatching: "no LoRA here", which must not read as a zero.
function hatch(ctx) {
  const c = document.createElement('canvas'); c.width = c.height = 6;
  const p = c.getContext('2d');
  p.fillStyle = EMPTY; p.fillRect(0, 0, 6, 6);
  p.strokeStyle = HATCH; p.beginPath(); p.moveTo(0, 6); p.lineTo(6, 0); p.stroke();
  return ctx.createPattern(c, 'repeat');
}

export const FROZEN = '#f1f3f5';  // the cross over a frozen module

function cross(ctx, x, y, w, h) {
  const m = Math.min(w, h) * 0.2;
  ctx.save(); ctx.strokeStyle = FROZEN; ctx.lineWidth = Math.max(1, Math.min(w, h) / 10);
  ctx.beginPath(); ctx.moveTo(x + m, y + m); ctx.lineTo(x + w - m, y + h - m);
  ctx.moveTo(x + w - m, y + m); ctx.lineTo(x + m, y + h - m); ctx.stroke(); ctx.restore();
}

// cell(i, j) -> a number, null (no LoRA: hatched) or undefined (not measured yet: left empty).
// Returns how many cells got a colour.
// mark(i, j) (optional): true draws a cross over the cell (a frozen module: it keeps its colour, its value is
// what it reached before it froze).
export function drawGrid(canvas, g, { layers, rowLabels, cell, lo, hi, hover, mark }) {
  const ctx = context(canvas, g);
  const gap = g.w >= 6 ? 1 : 0, span = hi - lo;
  const showText = g.w >= 52 && g.h >= 22;
  const pattern = hatch(ctx);
  let n = 0;
  for (let j = 0; j < g.rows; j++) {
    for (let i = 0; i < g.cols; i++) {
      const v = cell(i, j), x = g.x0 + i * g.w, y = g.y0 + j * g.h;
      if (v == null) { ctx.fillStyle = v === null ? pattern : EMPTY; ctx.fillRect(x, y, g.w - gap, g.h - gap); continue; }
      const t = span > 0 ? (v - lo) / span : 0.5;
      ctx.fillStyle = colour(t); ctx.fillRect(x, y, g.w - gap, g.h - gap); n++;
      if (mark && mark(i, j)) cross(ctx, x, y, g.w - gap, g.h - gap);
      if (showText) {
        ctx.fillStyle = t > 0.6 ? '#11161c' : '#e6edf3'; ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
        ctx.fillText(fmt.sig(v), x + (g.w - gap) / 2, y + (g.h - gap) / 2);
      }
    }
  }
  ctx.fillStyle = TEXT; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  rowLabels.forEach((s, j) => ctx.fillText(s, g.x0 - 8, g.y0 + (j + 0.5) * g.h));
  layerLabels(ctx, g, layers);
  if (hover) {
    ctx.strokeStyle = '#ffffff'; ctx.lineWidth = 2;
    ctx.strokeRect(g.x0 + hover.i * g.w + 1, g.y0 + hover.j * g.h + 1, g.w - gap - 2, g.h - gap - 2);
  }
  return n;
}

// One bar per column (a null value draws nothing), its height against the largest,
// which it returns.
export function drawBars(canvas, g, { layers, values, fill, hover }) {
  const ctx = context(canvas, g);
  const max = Math.max(0, ...values.filter((v) => v != null));
  const gap = g.w >= 6 ? 1 : 0, top = g.y0 + 4, base = g.y0 + g.rows * g.h;
  values.forEach((v, i) => {
    const x = g.x0 + i * g.w;
    if (hover && hover.i === i) { ctx.fillStyle = '#2a3440'; ctx.fillRect(x, g.y0, g.w - gap, base - g.y0); }
    if (v == null || !max) return;
    const hgt = Math.max(1, (v / max) * (base - top));
    ctx.fillStyle = fill; ctx.fillRect(x, base - hgt, g.w - gap, hgt);
  });
  ctx.strokeStyle = '#3a4654'; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(g.x0, base + 0.5); ctx.lineTo(g.x0 + g.cols * g.w, base + 0.5); ctx.stroke();
  ctx.fillStyle = TEXT; ctx.textAlign = 'right';
  ctx.textBaseline = 'top'; ctx.fillText(fmt.sig(max), g.x0 - 8, top);
  ctx.textBaseline = 'bottom'; ctx.fillText('0', g.x0 - 8, base);
  layerLabels(ctx, g, layers);
  return max;
}

// ---------------------------------------------------------------- a signed change (the forgetting matrix)
// Diverging, dark in the middle so "no change" recedes into the panel: blue where the loss fell, red where it
// rose (forgotten), lighter the further from zero. Lightness grows both ways, so it reads in grey too.
const DIVERGING = ['#a5d8ff', '#4dabf7', '#1c6fb8', '#2b3036', '#c92a2a', '#fa5252', '#ffc9c9']
  .map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
export const OVER = '#ffd43b';  // the outline of a cell over its limit

// t in [-1, 1] -> a colour (clamped).
export function diverging(t) {
  const x = (Math.max(-1, Math.min(1, t)) + 1) / 2 * (DIVERGING.length - 1);
  const i = Math.min(DIVERGING.length - 2, Math.floor(x)), f = x - i;
  const c = DIVERGING[i].map((a, k) => Math.round(a + (DIVERGING[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export const divergingCss = () => `linear-gradient(to right, ${DIVERGING.map((c) => `rgb(${c.join(',')})`).join(', ')})`;

// Rows × columns of signed values: cell(i, j) -> {value, over, text} | 'self' (the row's own column, a dot) |
// undefined (not scored: left empty). `span`: the |value| drawn at full colour. `lines`: row indices under which
// a dashed rule is drawn, its label right of the grid (consolidations, rollbacks). Returns how many cells got a colour.
export function drawSigned(canvas, g, { colLabels, rowLabels, cell, span, hover, lines }) {
  const ctx = context(canvas, g);
  const gap = g.w >= 6 ? 1 : 0;
  const showText = g.w >= 52 && g.h >= 18;
  let n = 0;
  for (let j = 0; j < g.rows; j++) {
    for (let i = 0; i < g.cols; i++) {
      const c = cell(i, j), x = g.x0 + i * g.w, y = g.y0 + j * g.h, w = g.w - gap, h = g.h - gap;
      if (c === 'self') {
        ctx.fillStyle = EMPTY; ctx.fillRect(x, y, w, h);
        ctx.fillStyle = TEXT; ctx.beginPath(); ctx.arc(x + w / 2, y + h / 2, 2.5, 0, 2 * Math.PI); ctx.fill();
        continue;
      }
      if (!c || c.value == null) { ctx.fillStyle = c ? HATCH : EMPTY; ctx.fillRect(x, y, w, h); continue; }
      const t = span > 0 ? c.value / span : 0;
      ctx.fillStyle = diverging(t); ctx.fillRect(x, y, w, h); n++;
      if (c.over) { ctx.strokeStyle = OVER; ctx.lineWidth = 2; ctx.strokeRect(x + 1.5, y + 1.5, w - 3, h - 3); }
      if (showText) {
        ctx.fillStyle = Math.abs(t) > 0.75 ? '#11161c' : '#e6edf3'; ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
        ctx.fillText(c.text, x + w / 2, y + h / 2);
      }
    }
  }
  ctx.fillStyle = TEXT; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  rowLabels.forEach((s, j) => ctx.fillText(s, g.x0 - 8, g.y0 + (j + 0.5) * g.h));
  ctx.textAlign = 'center'; ctx.textBaseline = 'top';
  let right = -Infinity;  // a label only where it does not overlap the one before (many narrow columns)
  colLabels.forEach((s, i) => {
    const x = g.x0 + (i + 0.5) * g.w, half = ctx.measureText(s).width / 2;
    if (x - half < right + 4) return;
    ctx.fillText(s, x, g.y0 + g.rows * g.h + 4); right = x + half;
  });
  for (const { row, label } of lines || []) {
    const y = g.y0 + (row + 1) * g.h - 0.5;
    ctx.strokeStyle = '#b197fc'; ctx.lineWidth = 1.5; ctx.setLineDash([6, 4]);
    const right = g.x0 + g.cols * g.w;  // the label goes right of the grid: the caller leaves room (g.width)
    ctx.beginPath(); ctx.moveTo(g.x0, y); ctx.lineTo(right, y); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = '#b197fc'; ctx.textAlign = 'left'; ctx.textBaseline = 'middle'; ctx.fillText(label, right + 6, y);
  }
  if (hover) {
    ctx.strokeStyle = '#ffffff'; ctx.lineWidth = 2;
    ctx.strokeRect(g.x0 + hover.i * g.w + 1, g.y0 + hover.j * g.h + 1, g.w - gap - 2, g.h - gap - 2);
  }
  return n;
}
