// The queue table with its per-file actions (remove, retry), and the upload form.
import { state, setStatus } from '../state.js';
import { api, headers, tokenRefused } from '../api.js';
import { $, el, confirmDialog, showError } from '../dom.js';
import { fmt } from '../format.js';

const PRIORITIES = ['high', 'normal', 'low'];
const PAGE_SIZES = [10, 50, 200];
// The done files are paged through the API (most recent first): months of them never load at once.
const done = { offset: 0, size: PAGE_SIZES[0] };

export function init() {
  $('upload-form').addEventListener('submit', upload);
}

// Fetched when the status says the queue changed: no polling.
export function update(s) {
  const qkey = JSON.stringify([s.queue, s.pending_requests, s.job_id, s.status]);
  if (qkey !== state.queueKey) { state.queueKey = qkey; load(); }
}

export async function load() {
  let q;
  try { q = await api(`/api/queue?done_limit=${done.size}&done_offset=${done.offset}`); } catch (e) { return; }
  if (done.offset && done.offset >= q.counts.done) {  // the page emptied (files removed): back to the last one
    done.offset = Math.max(0, Math.floor((q.counts.done - 1) / done.size) * done.size);
    return load();
  }
  const s = state.status || {};
  const pend = new Map(((s.pending_requests) || []).filter((r) => r.job_id).map((r) => [r.job_id, r.action]));
  const c = q.counts;
  $('queue-counts').textContent = `${c.pending} pending (${c.pending_high} high, ${c.pending_normal} normal, ${c.pending_low} low) · ${c.processing} processing · ${c.done} done · ${c.failed} failed`;
  const rows = [];
  for (const it of q.processing) rows.push(queueRow(it, 'processing', pend));
  for (const p of PRIORITIES) for (const it of q.pending[p]) rows.push(queueRow(it, 'pending', pend));
  for (const it of q.failed) rows.push(queueRow(it, 'failed', pend));
  for (const it of q.done) rows.push(queueRow(it, 'done', pend));
  if (c.done) rows.push(donePager(q.done.length, c.done));
  const body = $('queue-body');
  body.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'The queue is empty. Upload a JSONL file or drop one into inbox/.' }))]));
}

function queueRow(it, kind, pend) {
  const requested = pend.get(it.job_id);
  let action = null;
  if (requested) action = el('span', { class: 'muted small', text: requested + ' requested…' });
  else if (kind === 'pending') action = el('button', { class: 'small-btn', onclick: () => queueAction(it, 'remove'), text: 'Remove' });
  else if (kind === 'failed') {
    const was = PRIORITIES.includes(it.priority) ? it.priority : 'normal';  // retry keeps the priority it had
    const sel = el('select', { class: 'small-sel', 'aria-label': 'priority' },
      ...PRIORITIES.map((p) => el('option', p === was ? { value: p, text: p, selected: '' } : { value: p, text: p })));
    action = el('span', { class: 'nowrap' }, sel, ' ', el('button', { class: 'small-btn', onclick: () => queueAction(it, 'retry', sel.value), text: 'Retry' }));
  }
  let reason = '';
  if (kind === 'failed') {
    // a line error the message already quotes word for word is not repeated under it
    const errs = (it.errors || []).filter((e) => !(it.message && it.message.includes(e.reason)));
    const lines = badLines(errs, Math.max(it.n_bad || 0, errs.length));
    reason = el('div', {}, el('strong', { text: it.reason || 'unknown' }), it.message ? el('div', { class: 'small', text: it.message }) : null,
      lines ? el('div', { class: 'small muted', text: lines }) : null);
  } else if (kind === 'done' && it.duplicate_of) {
    const d = it.duplicate_of;
    reason = el('div', {}, el('strong', { text: 'duplicate' }),
      el('div', { class: 'small', text: `same content as ${d.original_name || d.job_id}${d.version ? ' (adapter v' + d.version + ')' : ''}; not trained again` }));
  } else if (it.n_bad) {
    // trained without its bad lines (data.bad_line_policy = skip): say which, or nobody will know
    const lines = badLines(it.bad_lines || [], it.n_bad);
    reason = el('div', {}, el('span', { class: 'warn-text', text: `${fmt.int(it.n_bad)} bad line${it.n_bad === 1 ? '' : 's'} skipped` }),
      it.n_records != null ? el('span', { class: 'small muted', text: ` · ${fmt.int(it.n_records)} records trained` }) : null,
      lines ? el('div', { class: 'small muted', text: lines }) : null);
  }
  if (kind === 'done' && !it.duplicate_of && it.steps != null) {  // what training it took, from its job record
    const note = el('div', { class: 'small muted trained', text: trained(it) });
    reason = reason ? el('div', {}, reason, note) : note;
  }
  if (kind === 'done' && it.eval_set_after != null) {  // eval.file before -> after this file
    const d = it.eval_set_before != null ? it.eval_set_after - it.eval_set_before : null;
    const note = el('div', { class: 'small muted', text: `eval set ${it.eval_set_before != null ? fmt.loss(it.eval_set_before) + ' → ' : ''}${fmt.loss(it.eval_set_after)}${d != null ? ` (${d <= 0 ? '' : '+'}${d.toFixed(3)})` : ''}` });
    reason = reason ? el('div', {}, reason, note) : note;
  }
  if (kind === 'done' && it.changed) {  // written to in place while or after it trained: say so where it is seen
    const note = el('div', { class: 'small warn-text', text: it.changed });
    reason = reason ? el('div', {}, reason, note) : note;
  }
  const when = kind === 'failed' && it.failed_at ? new Date(it.failed_at).toLocaleString()
    : kind === 'done' && it.finished_at ? fmt.when(it.finished_at) : fmt.when(it.mtime);
  return el('tr', { class: 'row-' + kind, 'data-job': it.job_id },
    el('td', {}, el('span', { class: 'pill pill-' + kind, text: kind })),
    el('td', { text: it.priority || '' }),
    el('td', { title: it.job_id }, it.original_name),
    el('td', { class: 'num', text: fmt.bytes(it.size) }),
    el('td', { class: 'small', text: when }),
    el('td', {}, reason),
    el('td', {}, action));
}

function trained(it) {
  const parts = [`${fmt.int(it.steps)} step${it.steps === 1 ? '' : 's'}`, `loss ${fmt.loss(it.final_loss)}`];
  if (it.eval_loss != null) parts.push(`eval loss ${fmt.loss(it.eval_loss)}`);
  const pref = it.preference;  // a preference file: its held-out pairs before and after
  if (pref && pref.after) parts.push(`preferred ${fmt.num(pref.before?.accuracy, 2)} → ${fmt.num(pref.after.accuracy, 2)}`);
  if (it.adapter_version != null) parts.push(`adapter v${it.adapter_version}`);
  return parts.join(' · ');
}

// Under the done rows: which of them are shown, and the way to the others.
function donePager(shown, total) {
  const first = shown ? done.offset + 1 : 0, last = done.offset + shown, older = total - last;
  const go = (offset) => { done.offset = Math.max(0, offset); load(); };
  const size = el('select', { class: 'small-sel', 'aria-label': 'done files per page', onchange: (e) => { done.size = Number(e.target.value); go(0); } },
    ...PAGE_SIZES.map((n) => el('option', n === done.size ? { value: n, text: `${n} per page`, selected: '' } : { value: n, text: `${n} per page` })));
  const btn = (text, enabled, offset, id) => el('button', { id, class: 'small-btn', onclick: () => go(offset), text, ...(enabled ? {} : { disabled: '' }) });
  return el('tr', { class: 'done-pager' }, el('td', { colspan: 7 },
    el('span', { id: 'done-range', class: 'small muted', text: `done ${fmt.int(first)}–${fmt.int(last)} of ${fmt.int(total)}${older > 0 ? ` · ${fmt.int(older)} older` : ''}` }),
    ' ', btn('‹ Newer', done.offset > 0, done.offset - done.size, 'done-newer'),
    ' ', btn('Older ›', older > 0, last, 'done-older'), ' ', size));
}

function badLines(errs, total) {
  const shown = errs.slice(0, 5).map((e) => `line ${e.line}${e.field ? ' (' + e.field + ')' : ''}: ${e.reason}`);
  if (!shown.length) return '';
  const more = total - shown.length;
  return shown.join(' · ') + (more > 0 ? ` · and ${fmt.int(more)} more` : '');
}

async function queueAction(it, what, priority) {
  if (what === 'remove' && !(await confirmDialog(`Remove "${it.original_name}" from the queue? It moves to failed/ (reason removed); retry brings it back.`))) return;
  try {
    await api(`/api/queue/${encodeURIComponent(it.job_id)}/${what}`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(what === 'retry' ? { priority } : {}),
    });
    setStatus(await api('/api/status'));
    load();
  } catch (e) { showError(`${what} failed: ${e.message}`); }
}

function upload(ev) {
  ev.preventDefault();
  const file = $('upload-file').files[0];
  if (!file) { $('upload-result').textContent = 'Choose a .jsonl file first.'; return; }
  const prio = $('upload-priority').value;
  const xhr = new XMLHttpRequest();  // XHR, not fetch: it reports upload progress
  xhr.open('POST', `/api/queue?name=${encodeURIComponent(file.name)}&priority=${prio}`);
  for (const [k, v] of Object.entries(headers({ 'Content-Type': 'application/x-ndjson' }))) xhr.setRequestHeader(k, v);
  const bar = $('upload-progress');
  bar.hidden = false; bar.value = 0;
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = e.loaded / e.total; };
  xhr.onload = () => {
    bar.hidden = true;
    let body = {}; try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status === 201) {
      $('upload-result').textContent = `Queued as ${body.name} (${prio}); the daemon takes it from the inbox in a few seconds.`;
      $('upload-form').reset();
    } else {
      if (xhr.status === 401) tokenRefused();
      $('upload-result').textContent = `Upload refused (${xhr.status}): ${body.detail || xhr.statusText}`;
    }
  };
  xhr.onerror = () => { bar.hidden = true; $('upload-result').textContent = 'Upload failed: the monitor is unreachable.'; };
  xhr.send(file);
}
