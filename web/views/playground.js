// The playground: one prompt, two versions' answers side by side, streamed from
// `traind serve` through the monitor (/api/serve/*: the page reaches nothing
// else). "This one is better" saves the pair as a preference record (the other
// answer is the rejected one) in a day file of paths.preferences, which one
// click copies into the inbox.
import { state } from '../state.js';
import { api, headers, tokenRefused } from '../api.js';
import { parseBlock } from '../live.js';
import { $, el, showError } from '../dom.js';

const SERVE_EVERY_MS = 15000;  // serve may be started (or stop) at any time; one cheap GET
const SIDES = ['left', 'right'];
const DEFAULTS = { left: 'traind:base', right: 'traind' };

const pg = {
  serve: null, models: null, modelsKey: null, prefs: null, busy: false, ctrl: null,
  answers: { left: null, right: null }, prompt: null, saved: false,
};

export function init() {
  const root = $('playground-panel');
  const side = (s) => el('div', { class: 'pg-side', id: `pg-${s}` },
    el('label', { class: 'small' }, s === 'left' ? 'Left ' : 'Right ', el('select', { id: `pg-model-${s}`, class: 'small-sel', 'aria-label': `${s} model` },
      el('option', { value: DEFAULTS[s], text: DEFAULTS[s] }))),  // until serve lists what is kept
    el('div', { class: 'pg-label small', id: `pg-label-${s}` }),
    el('div', { class: 'pg-answer', id: `pg-answer-${s}`, 'data-state': 'empty', 'data-chunks': '0', 'data-model': '', text: 'The answer appears here.' }),
    el('div', { class: 'pg-foot' },
      el('button', { id: `pg-better-${s}`, class: 'small-btn', disabled: '', onclick: () => better(s), text: 'This one is better' }),
      el('span', { class: 'small muted', id: `pg-note-${s}` })));
  root.append(
    el('div', { class: 'panel-head' }, el('h2', { text: 'Playground' }),
      el('span', { id: 'pg-serve', class: 'muted small', 'data-state': 'unknown', text: 'looking for traind serve…' })),
    el('form', { id: 'pg-form', class: 'pg-form', onsubmit: (e) => { e.preventDefault(); ask(); } },
      el('textarea', { id: 'pg-prompt', rows: '3', placeholder: 'Ask both versions the same question…', 'aria-label': 'prompt' }),
      el('div', { class: 'pg-settings' },
        el('label', { class: 'small' }, 'Max tokens ', el('input', { id: 'pg-max-tokens', type: 'number', min: '1', max: '4096', value: '128' })),
        el('label', { class: 'small' }, 'Temperature ', el('input', { id: 'pg-temperature', type: 'number', min: '0', max: '2', step: '0.1', value: '0.7' })),
        el('button', { id: 'pg-ask', type: 'submit', disabled: '', text: 'Ask both' }),
        el('span', { id: 'pg-hint', class: 'hint small' }))),
    el('div', { class: 'pg-sides' }, side('left'), side('right')),
    el('div', { class: 'pg-prefs small' },
      el('span', { id: 'pg-saved', 'data-count': '0', text: 'No preference pairs saved yet.' }), ' ',
      el('span', { id: 'pg-files' }),
      el('p', { class: 'muted', text: 'A pair is saved as a preference record (the prompt, the chosen answer, the rejected one) in '
        + 'paths.preferences, one file a day. "Queue for training" copies a file into the inbox, where it trains as a '
        + 'preference file (DPO) on the current adapter.' })));
  for (const s of SIDES) $(`pg-model-${s}`).addEventListener('change', render);
  checkServe();
  loadPrefs();
  setInterval(() => { if (!document.hidden) checkServe(); }, SERVE_EVERY_MS);
}

// A new version published, or one rolled back: the pickers list what is kept now.
export function update(s, prev) {
  if (!prev || prev.adapter_version !== s.adapter_version) loadModels();
}

export function load() { checkServe(); loadPrefs(); }
export function auth() {
  if (!$('pg-ask')) return;  // a page without a token hears 'auth' before the views are built
  render();
  if (state.tokenOk) load();
}

async function checkServe() {
  try { pg.serve = await api('/api/serve'); } catch (e) { pg.serve = { running: false, state: 'unknown', message: `cannot ask the monitor about traind serve: ${e.message}` }; }
  if (pg.serve.running && pg.serve.state === 'ready' && !pg.models) await loadModels();
  render();
}

async function loadModels() {
  if (!pg.serve || !pg.serve.running || !state.token || state.tokenOk === false) return;
  try {
    pg.models = (await api('/api/serve/models')).data;
  } catch (e) {
    pg.models = null;
    return;
  }
  fillPickers();
  render();
}

function modelText(m) {
  const t = m.traind || {};
  if (m.id === 'traind') return t.version != null ? `traind (current: v${t.version})` : 'traind (current: the base)';
  if (m.id === 'traind:base') return 'traind:base';
  return m.id + (t.file ? ` · ${t.file}` : '') + (t.held ? ' (held)' : '');
}

function fillPickers() {
  const key = JSON.stringify(pg.models.map((m) => [m.id, modelText(m)]));
  if (key === pg.modelsKey) return;
  pg.modelsKey = key;
  for (const s of SIDES) {
    const sel = $(`pg-model-${s}`);
    const was = sel.value || DEFAULTS[s];
    const ids = pg.models.map((m) => m.id);
    sel.replaceChildren(...pg.models.map((m) => el('option', { value: m.id, text: modelText(m) })));
    sel.value = ids.includes(was) ? was : DEFAULTS[s];
  }
}

function render() {
  const sv = pg.serve;
  const badge = $('pg-serve');
  badge.dataset.state = sv ? sv.state : 'unknown';
  badge.className = 'small ' + (sv && sv.running && sv.state === 'ready' ? 'pg-ok' : 'warn-text');
  badge.textContent = !sv ? 'looking for traind serve…'
    : sv.running ? `${sv.message} · ${sv.serve_url}${sv.following != null ? ' · following v' + sv.following : ''}`
      : sv.message;
  const locked = !state.token || state.tokenOk === false;
  const ready = sv && sv.running && sv.state === 'ready' && pg.models;
  const ask = $('pg-ask');
  ask.textContent = pg.busy ? 'Stop' : 'Ask both';
  ask.disabled = !pg.busy && (locked || !ready);
  $('pg-hint').textContent = locked ? 'The playground needs the token (see Controls).'
    : !sv || !sv.running ? 'traind serve is not running.' : !ready ? 'Waiting for traind serve…' : '';
  const pair = pairReady();
  for (const s of SIDES) $(`pg-better-${s}`).disabled = locked || !pair || pg.saved;
}

// Both answers complete, non-empty and different: a pair worth saving.
function pairReady() {
  const a = pg.answers.left, b = pg.answers.right;
  return !pg.busy && a && b && a.done && b.done && !a.error && !b.error && !a.partial && !b.partial
    && a.text.trim() && b.text.trim() && a.text.trim() !== b.text.trim();
}

async function ask() {
  if (pg.busy) { pg.ctrl.abort(); return; }
  const prompt = $('pg-prompt').value;
  if (!prompt.trim()) { $('pg-hint').textContent = 'Write a prompt first.'; return; }
  const maxTokens = parseInt($('pg-max-tokens').value, 10), temperature = parseFloat($('pg-temperature').value);
  if (!(maxTokens >= 1)) { $('pg-hint').textContent = 'Max tokens must be a whole number, 1 or more.'; return; }
  if (!(temperature >= 0 && temperature <= 2)) { $('pg-hint').textContent = 'Temperature must be between 0 and 2.'; return; }
  pg.busy = true; pg.saved = false; pg.prompt = prompt; pg.ctrl = new AbortController();
  for (const s of SIDES) { $(`pg-note-${s}`).textContent = ''; }
  render();
  await Promise.all(SIDES.map((s) => stream(s, { model: $(`pg-model-${s}`).value, messages: [{ role: 'user', content: prompt }],
    max_tokens: maxTokens, temperature, stream: true }, pg.ctrl.signal)));
  pg.busy = false;
  render();
}

function show(s) {
  const a = pg.answers[s];
  const box = $(`pg-answer-${s}`);
  box.dataset.state = a.error ? 'error' : a.done ? 'done' : 'streaming';
  box.dataset.chunks = String(a.chunks);
  box.dataset.model = a.model || '';
  box.classList.toggle('pg-error', !!a.error);
  box.textContent = a.error ? a.error : a.text || (a.done ? '(an empty answer)' : '…');
  const asked = $(`pg-model-${s}`).value;
  $(`pg-label-${s}`).textContent = a.model ? `answered by ${a.model}${a.model !== asked ? ` (asked: ${asked})` : ''}`
    + (a.finish === 'length' ? ' · stopped at max tokens' : a.finish === 'stopped' ? ' · stopped' : '') : `asking ${asked}…`;
}

async function stream(s, body, signal) {
  const a = pg.answers[s] = { model: null, text: '', chunks: 0, done: false, error: null, finish: null, partial: false };
  show(s);
  try {
    const res = await fetch('/api/serve/chat/completions', { method: 'POST', body: JSON.stringify(body), signal, cache: 'no-store',
      headers: headers({ 'Content-Type': 'application/json', Accept: 'text/event-stream' }) });
    if (!res.ok) {
      if (res.status === 401) tokenRefused();
      a.error = `${res.status === 429 ? 'traind serve is busy' : 'refused'} (${res.status}): ${await errorText(res)}`;
      if (res.status === 503) checkServe();
      return;
    }
    a.model = res.headers.get('X-Traind-Model');
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, '\n');
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const ev = parseBlock(buf.slice(0, i)); buf = buf.slice(i + 2);
        if (!ev.data) continue;
        if (ev.data === '[DONE]') { a.done = true; continue; }
        const chunk = JSON.parse(ev.data);
        if (chunk.error) { a.error = `traind serve: ${chunk.error.message}`; continue; }
        a.model = chunk.model || a.model;
        const c = chunk.choices && chunk.choices[0];
        if (c && c.delta && c.delta.content) { a.text += c.delta.content; a.chunks++; }
        if (c && c.finish_reason) a.finish = c.finish_reason;
        show(s);
      }
    }
    if (!a.done && !a.error) a.error = 'the answer was cut off (traind serve stopped?)';
  } catch (e) {
    if (e.name !== 'AbortError') a.error = `the monitor is unreachable: ${e.message}`;
    else if (!a.text) a.error = 'stopped';
    else { a.partial = true; a.finish = 'stopped'; }  // shown, but a cut answer is not saved as a preference
  } finally {
    a.done = true;
    show(s);
  }
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (body.error && body.error.message) return body.error.message;
    if (body.detail) return typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
  } catch (e) { /* not JSON */ }
  return res.statusText;
}

async function better(s) {
  const other = s === 'left' ? 'right' : 'left';
  const chosen = pg.answers[s], rejected = pg.answers[other];
  try {
    const r = await api('/api/playground/preference', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: pg.prompt, chosen: { model: chosen.model, content: chosen.text },
        rejected: { model: rejected.model, content: rejected.text } }) });
    pg.saved = true;
    $(`pg-note-${s}`).textContent = `saved as chosen in ${r.file} (${r.records} pair${r.records === 1 ? '' : 's'})`;
    render();
    loadPrefs();
  } catch (e) {
    $(`pg-note-${s}`).textContent = `not saved: ${e.message}`;
  }
}

async function loadPrefs() {
  try { pg.prefs = await api('/api/playground/preferences'); } catch (e) { return; }
  const p = pg.prefs;
  const saved = $('pg-saved');
  saved.dataset.count = String(p.total);
  saved.textContent = p.total ? `${p.total} preference pair${p.total === 1 ? '' : 's'} saved in ${p.files.length} file${p.files.length === 1 ? '' : 's'}:`
    : 'No preference pairs saved yet.';
  const locked = !state.token || state.tokenOk === false;
  $('pg-files').replaceChildren(...p.files.slice(0, 5).map((f) => el('span', { class: 'pg-file', 'data-file': f.name },
    el('a', { href: '#', onclick: (e) => { e.preventDefault(); download(f.name); }, text: f.name }),
    ` (${f.records}) `,
    el('button', { class: 'small-btn pg-queue', ...(locked ? { disabled: '' } : {}), onclick: () => queue(f.name), text: 'Queue for training' }))));
}

// A link cannot carry the token header: fetch the file, then hand it to the browser as a download.
async function download(name) {
  try {
    const res = await fetch('/api/playground/preferences/' + encodeURIComponent(name), { headers: headers(), cache: 'no-store' });
    if (!res.ok) throw new Error(await errorText(res));
    const url = URL.createObjectURL(await res.blob());
    const a = el('a', { href: url, download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { showError(`download of ${name} failed: ${e.message}`); }
}

async function queue(name) {
  try {
    const r = await api('/api/playground/preferences/queue', { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ file: name }) });
    showInfo(`Queued ${name} as ${r.name}; the daemon takes it from the inbox in a few seconds.`);
  } catch (e) { showError(`queueing ${name} failed: ${e.message}`); }
}

function showInfo(text) {
  const span = el('span', { class: 'small pg-queued', text: ' ' + text });
  $('pg-files').append(span);
}
