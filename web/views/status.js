// The status panel, the state badge, the stale banner and the connection pill.
import { state } from '../state.js';
import { $ } from '../dom.js';
import { fmt } from '../format.js';

const CONN_TEXT = { live: 'live', reconnecting: 'reconnecting…', down: 'monitor unreachable — retrying' };

export function init() {}  // the panel is static HTML: nothing to build or bind

export function update(s) {
  // A daemon that said "stopped" and then exited did what it was asked: that is
  // not the alarm of one that died or hangs (kill -9, a crash, a stuck loop).
  const stoppedClean = !!s.stale && s.status === 'stopped';
  const badge = $('state-badge');
  const diskFull = (s.pause_reason === 'disk_full' || s.pause_reason === 'unwritable') && !!s.disk_full;
  const held = { full: 'paused · disk full', unwritable: 'paused · cannot write' };
  badge.textContent = s.status == null ? 'no daemon'
    : (stoppedClean ? 'stopped' : (s.stale ? (held[s.stale_cause] || 'not responding')
      : (diskFull ? (s.pause_reason === 'unwritable' ? 'paused · cannot write' : 'paused · disk full') : s.status)));
  badge.dataset.state = stoppedClean ? 'stopped' : (s.stale ? 'stale' : (s.status || 'unknown'));
  badge.className = 'badge state-' + badge.dataset.state;
  $('detail').textContent = s.detail || '';
  $('stale-banner').hidden = !s.stale;
  $('stale-banner').classList.toggle('banner-info', stoppedClean);
  const cannotWrite = { full: 'Daemon cannot write its status: disk full.', unwritable: 'Daemon cannot write its status: folder not writable.' };
  $('stale-title').textContent = stoppedClean ? 'Daemon stopped.' : (cannotWrite[s.stale_cause] || 'Daemon not responding.');
  const said = stoppedClean ? `It checkpointed and exited${s.updated_at ? ' at ' + new Date(s.updated_at).toLocaleTimeString() : ''}; start it again with bin/start_all.sh`
    : (s.stale_reason || '');
  $('stale-reason').textContent = said + (!stoppedClean && s.age_seconds != null && !said.startsWith('no status update') ? ` — last update ${fmt.dur(s.age_seconds)} ago.` : '.');
  document.body.classList.toggle('is-stale', !!s.stale);
  $('disk-banner').hidden = !diskFull;
  if (diskFull) {
    const d = s.disk_full;
    const what = d.site === 'threshold' ? 'free space is below the threshold' : `the ${d.site} write failed (${d.message})`;
    const need = d.min_free_bytes ? ` (needs ${fmt.bytes(d.min_free_bytes)})` : '';
    const where = d.kind === 'unwritable' ? `${d.folder} cannot be written` : `${d.folder} has ${fmt.bytes(d.free_bytes)} free${need}`;
    $('disk-reason').textContent = `${where}: ${what}` + (d.since ? `, since ${new Date(d.since).toLocaleTimeString()}` : '') + '.';
    const unwritable = d.kind === 'unwritable';
    $('disk-title').textContent = unwritable ? 'Paused: a folder cannot be written.' : 'Paused: disk full.';
    $('disk-after').textContent = `Training resumes by itself once ${unwritable ? 'it can be written again' : 'space is back'}; nothing is lost meanwhile.`;
  }

  $('current-file').textContent = s.current_file || (s.status === 'idle' ? 'waiting for files' : '—');
  $('job-id').textContent = s.job_id || '';
  const pct = s.total_steps ? Math.min(100, 100 * s.current_step / s.total_steps) : 0;
  $('progress-bar').style.width = pct.toFixed(1) + '%';
  $('step').textContent = s.total_steps ? `${fmt.int(s.current_step)} / ${fmt.int(s.total_steps)}` : '—';
  $('epoch').textContent = fmt.num(s.epoch, 2);
  $('eta').textContent = s.status === 'training' && !s.stale ? fmt.dur(s.eta_seconds) : '—';
  $('tps').textContent = s.status === 'training' && !s.stale ? fmt.int(s.tokens_per_sec) : '—';
  $('loss').textContent = fmt.loss(s.loss);
  $('eval-loss').textContent = fmt.loss(s.eval_loss);
  $('lr').textContent = fmt.sci(s.lr);
  $('global-step').textContent = fmt.int(s.global_step);
  $('adapter').textContent = s.adapter_version == null ? '—' : 'v' + s.adapter_version;
  $('device').textContent = [s.device, s.compute_dtype, s.quantization].filter(Boolean).join(' · ') || '—';
  $('updated').textContent = s.updated_at ? new Date(s.updated_at).toLocaleTimeString() : '—';
  // The whole name of the base in use: for a consolidated one its generation and stamp (the folder's name)
  const base = s.base_model || '';
  const name = base.split('/').filter(Boolean).pop() || '';
  $('base-model').textContent = !base ? '—' : s.generation ? `generation ${s.generation} · ${name}` : name;
  $('base-model').title = base;
  const g = s.auto_generate;  // the idle-time generator, when enabled
  $('gen-row').hidden = !g;
  if (g) {
    $('generator').textContent = `${g.source}: ${g.state.replace('_', ' ')} · ${fmt.int(g.files_today)} today · ${fmt.int(g.records_total)} records`
      + (g.last_error && g.state === 'backing_off' ? ` · last error: ${g.last_error}` : '');
  }
  $('split-row').hidden = !(s.micro_batch_split > 1);  // after an out-of-memory
  $('split').textContent = s.micro_batch_split > 1 ? `in ${s.micro_batch_split} pieces (out of memory; same effective batch)` : '';
  const p = s.preference;  // a preference file in training: its last step and its held-out pairs
  $('pref-row').hidden = !p;
  if (p) {
    const held = p.before || p.held_out ? ` · held-out acc ${fmt.num(p.before?.accuracy, 2)} → ${fmt.num(p.held_out?.accuracy, 2)}` : '';
    $('pref').textContent = `reward acc ${fmt.num(p.reward_accuracy, 2)} · margin ${fmt.num(p.reward_margin, 3)}${held}`;
  }
  const le = $('last-error');
  le.hidden = !s.last_error; le.textContent = s.last_error ? 'Last error: ' + s.last_error : '';
}

export function connection(c) {
  const e = $('conn');
  e.className = 'conn conn-' + c;
  e.textContent = CONN_TEXT[c] || c;
  if (c !== 'down') return;  // on 'live' the stream's first status redraws the rest
  // What the page shows is as old as the monitor's last word: never let it look live.
  const seen = state.status && state.status.updated_at ? new Date(state.status.updated_at).toLocaleTimeString() : null;
  $('stale-banner').hidden = false;
  $('stale-banner').classList.remove('banner-info');
  $('stale-title').textContent = 'Monitor unreachable.';
  $('stale-reason').textContent = 'This page cannot reach the traind monitor' + (seen ? `; its last status is from ${seen}` : '') + '. Retrying…';
  const badge = $('state-badge');
  badge.textContent = 'unknown'; badge.dataset.state = 'stale'; badge.className = 'badge state-stale';
  $('eta').textContent = '—'; $('tps').textContent = '—';
  document.body.classList.add('is-stale');
}
