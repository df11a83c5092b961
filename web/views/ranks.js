// The Ranks block: a trainer of several processes (data-parallel ranks), how they
// train together and each rank's figures in the latest step. Hidden with one process.
import { $, el } from '../dom.js';
import { fmt } from '../format.js';

export function init() {}  // the block is static HTML: nothing to build or bind

export function update(s) {
  const n = s.world_size || 1;  // null: no status, or a daemon from before ranks
  const block = $('ranks-block');
  block.hidden = n <= 1;
  block.dataset.worldSize = n;
  if (n <= 1) return;
  const d = s.distributed || {};
  const nodes = d.nnodes || 1;
  $('ranks-setup').textContent = [`${n} ranks`, d.strategy, d.backend, `${nodes} node${nodes > 1 ? 's' : ''}`].filter(Boolean).join(' · ');
  const live = s.status === 'training' && !s.stale;  // rates are shown only while they are current, as Tokens/s above
  const rows = (s.ranks || []).map((r) => {
    const slow = r.rank === s.slowest_rank;
    return el('tr', { class: slow ? 'slowest' : '', 'data-rank': r.rank },
      el('td', { text: r.rank }), el('td', { text: r.host || '—' }), el('td', { text: r.device || '—' }),
      el('td', { class: 'num', text: live ? fmt.int(r.tokens_per_sec) : '—' }),
      el('td', { class: 'num', text: fmt.bytes(r.rss_bytes) }),
      el('td', { class: 'num', text: fmt.bytes(r.gpu_memory_bytes) }),
      el('td', { class: 'small', text: slow ? 'slowest' : '' }));
  });
  $('ranks-body').replaceChildren(...(rows.length ? rows
    : [el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'no step reported yet' }))]));
}
