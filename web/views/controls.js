// The control buttons (pause, resume, skip, stop), their hint, the token form,
// and whether uploads are allowed. The buttons say what the daemon is doing
// (from its status), never what we hope it does.
import { state, emit, setStatus } from '../state.js';
import { api, checkToken, setToken } from '../api.js';
import { $, confirmDialog, showError } from '../dom.js';

const ACTIONS = ['pause', 'resume', 'skip', 'stop'];

export function init() {
  for (const a of ACTIONS) $('btn-' + a).addEventListener('click', () => onControl(a));
  $('btn-consolidate').addEventListener('click', onConsolidate);
  $('btn-accept').addEventListener('click', () => onHeld('accept'));
  $('btn-reject').addEventListener('click', () => onHeld('reject'));
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('token-input').value.trim();
    if (!t) return;
    setToken(t); $('token-input').value = '';
    checkToken();
    emit('token');
  });
}

export function update() { render(); }
export function auth() { render(); }

export function connection(c, was) {
  if (c === 'down' || (was === 'down' && c === 'live')) render();
}

export function controlView(s, conn) {
  const st = s ? s.status : null;
  const req = s ? s.requested_state : 'running';
  const pend = new Set(((s && s.pending_requests) || []).map((r) => r.action));
  const v = {
    pause: { label: 'Pause', on: true }, resume: { label: 'Resume', on: false },
    skip: { label: 'Skip file', on: false }, stop: { label: 'Stop daemon', on: true }, hint: '',
  };
  if (st === 'paused') {
    v.pause = { label: 'Paused', on: false };
    v.resume = req === 'running' ? { label: 'Resuming…', on: false } : { label: 'Resume', on: true };
    if (req === 'running') v.hint = 'Resume requested; waiting for the daemon.';
  } else if (req === 'paused') {
    v.pause = { label: 'Pausing…', on: false };
    v.resume = { label: 'Resume', on: true };
    v.hint = 'Pause requested; the daemon pauses at the next step boundary.';
  }
  if ((st === 'training' || st === 'paused') && s.job_id) v.skip.on = true;
  if (pend.has('skip')) { v.skip = { label: 'Skipping…', on: false }; v.hint = 'Skip requested; waiting for the daemon.'; }
  if (pend.has('stop') || st === 'stopping') { v.stop = { label: 'Stopping…', on: false }; v.hint = 'Stop requested; the daemon checkpoints and exits.'; }
  if (st === 'stopped') { v.stop = { label: 'Stopped', on: false }; v.pause.on = false; v.resume.on = false; v.skip.on = false; }
  if (s && s.stale && st !== 'stopped') {
    if (s.daemon_alive) {
      v.hint = 'Daemon not responding: requests wait in status/control/ until it is back.';
    } else {  // nobody would act on a skip or stop; the next start must not inherit one
      v.skip.on = false; v.stop.on = false;
      v.hint = 'The daemon is not running: start it with bin/start_all.sh. Pause and resume are kept for its next start.';
    }
  }
  // consolidation: a running daemon with an adapter to merge, and none already on its way
  v.consolidate = { label: pend.has('consolidate') ? 'Consolidating…' : 'Consolidate…',
    on: !!(s && !s.stale && s.adapter_version != null && st !== 'stopped' && st !== 'stopping' && !pend.has('consolidate')) };
  if (pend.has('consolidate')) v.hint = v.hint || 'Consolidation requested; it runs at the next boundary between files.';
  if (conn === 'down') {
    for (const a of ACTIONS) v[a].on = false;
    v.consolidate.on = false;
    v.hint = 'The monitor is unreachable; controls are back when it is.';
  }
  return v;
}

function render() {
  const v = controlView(state.status, state.conn);
  const locked = !state.token || state.tokenOk === false;
  for (const a of ACTIONS) {
    const b = $('btn-' + a);
    b.textContent = v[a].label;
    b.disabled = locked || !v[a].on;
  }
  $('btn-consolidate').textContent = v.consolidate.label;
  $('btn-consolidate').disabled = locked || !v.consolidate.on;
  // a version the forgetting gate holds: what it forgot, and the two decisions
  const held = state.status && state.status.held;
  $('held-box').hidden = !held;
  if (held) {
    $('held-message').textContent = held.message || `adapter v${held.version} is held by the forgetting gate`;
    $('btn-accept').textContent = `Accept v${held.version}`;
    $('btn-reject').textContent = `Reject v${held.version}`;
    $('btn-accept').disabled = $('btn-reject').disabled = locked || state.conn === 'down';
  }
  $('upload-btn').disabled = locked;
  $('token-form').hidden = !locked;
  $('control-hint').textContent = locked
    ? (state.tokenOk === false ? 'The token was refused. ' : '') + 'Controls need the token: open the URL bin/start_all.sh printed, or paste status/monitor_token below.'
    : v.hint;
}

async function onControl(action) {
  const s = state.status || {};
  if (action === 'skip' && !(await confirmDialog(`Skip "${s.current_file}"? Its training so far is discarded and it goes to failed/ (retry puts it back).`))) return;
  if (action === 'stop' && !(await confirmDialog('Stop the daemon? It checkpoints the file in progress and exits; start it again with bin/start_all.sh.'))) return;
  const body = action === 'skip' ? JSON.stringify({ job_id: s.job_id }) : undefined;
  try {
    await api('/api/control/' + action, { method: 'POST', body, headers: body ? { 'Content-Type': 'application/json' } : {} });
    state.tokenOk = true;
    setStatus(await api('/api/status'));  // the files as they are now, not a guess
  } catch (e) {
    showError(`${action} failed: ${e.message}`);
  }
}

async function onHeld(action) {
  const held = (state.status || {}).held;
  if (!held) return;
  if (action === 'reject' && !(await confirmDialog(`Reject adapter v${held.version}? It is dropped and "${held.file}" goes to failed/ (reason forgetting).`))) return;
  try {
    await api('/api/control/' + action, { method: 'POST', body: JSON.stringify({ version: held.version }),
      headers: { 'Content-Type': 'application/json' } });
    setStatus(await api('/api/status'));
  } catch (e) {
    showError(`${action} failed: ${e.message}`);
  }
}

async function onConsolidate() {
  const d = $('consolidate-dialog');
  const text = $('consolidate-description');
  d.returnValue = '';
  const answer = await new Promise((resolve) => {
    d.addEventListener('close', () => resolve(d.returnValue), { once: true });
    d.showModal();
  });
  const description = text.value.trim();
  if (answer !== 'ok' || !description) return;
  try {
    await api('/api/control/consolidate', { method: 'POST', body: JSON.stringify({ description }),
      headers: { 'Content-Type': 'application/json' } });
    text.value = '';
    setStatus(await api('/api/status'));
  } catch (e) {
    showError(`consolidate failed: ${e.message}`);
  }
}
