// The GPU and host cards (memory, swap, CPU, processes, disks). Resources are
// gauges: sampled every few seconds, and at once when the daemon's processes change.
import { api } from '../api.js';
import { $, el, card, meter } from '../dom.js';
import { fmt } from '../format.js';

const RESOURCE_EVERY_MS = 5000;

export function init() {
  load();
  setInterval(load, RESOURCE_EVERY_MS);
  document.addEventListener('visibilitychange', load);
}

// A daemon that died or came back changes the process table now, not at the next sample.
export function update(s, prev) {
  if (!prev || prev.stale !== s.stale || prev.pid !== s.pid || prev.trainer_pid !== s.trainer_pid) load();
}

export async function load() {
  if (document.hidden) return;  // a background tab costs nothing
  const [g, m] = await Promise.allSettled([api('/api/gpu'), api('/api/memory')]);
  if (g.status === 'fulfilled') renderGpu(g.value);
  if (m.status === 'fulfilled') renderMemory(m.value);
}

function renderGpu(g) {
  const host = $('gpu-cards');
  if (!g.available) {
    host.replaceChildren(card('GPU', el('p', { class: 'muted', text: 'No GPU' }), el('p', { class: 'small muted', text: g.reason || '' })));
    return;
  }
  host.replaceChildren(...g.gpus.map((x) => card(`GPU ${x.index} · ${x.name}`,
    meter('Utilisation', x.utilization_percent / 100, fmt.num(x.utilization_percent, 0) + ' %'),
    meter('Memory', x.memory_total_bytes ? x.memory_used_bytes / x.memory_total_bytes : null, `${fmt.bytes(x.memory_used_bytes)} / ${fmt.bytes(x.memory_total_bytes)}`),
    meter('Temperature', x.temperature_c == null ? null : x.temperature_c / 100, x.temperature_c == null ? '—' : x.temperature_c + ' °C'),
    meter('Power', x.power_limit_watts ? x.power_watts / x.power_limit_watts : null, `${fmt.num(x.power_watts, 0)} / ${fmt.num(x.power_limit_watts, 0)} W`),
    el('p', { class: 'small muted', text: `SM ${x.clock_sm_mhz ?? '—'} MHz · mem ${x.clock_mem_mhz ?? '—'} MHz · ${x.processes.length} process(es)` + (x.processes.length ? ': ' + x.processes.map((p) => `${p.name || p.pid} ${fmt.bytes(p.used_memory_bytes)}`).join(', ') : '') }))));
}

function renderMemory(m) {
  const procs = m.processes.map((p) =>
    el('tr', {}, el('td', { text: p.rank == null ? p.role : `${p.role} ${p.rank}` }), el('td', { class: 'num', text: p.pid ?? '—' }),
      el('td', { class: 'num', text: p.running ? fmt.bytes(p.rss_bytes) : 'not running' }),
      el('td', { class: 'num', text: p.running ? fmt.num(p.cpu_percent, 0) + ' %' : '' })));
  $('host-cards').replaceChildren(
    card('Host',
      meter('Memory', 1 - m.ram_available_bytes / m.ram_total_bytes, `${fmt.bytes(m.ram_total_bytes - m.ram_available_bytes)} / ${fmt.bytes(m.ram_total_bytes)}`),
      meter('Swap', m.swap_total_bytes ? m.swap_used_bytes / m.swap_total_bytes : 0, m.swap_total_bytes ? `${fmt.bytes(m.swap_used_bytes)} / ${fmt.bytes(m.swap_total_bytes)}` : 'none'),
      meter('CPU', m.cpu_percent / 100, `${fmt.num(m.cpu_percent, 0)} % of ${m.cpu_count} cores · load ${m.load_average.map((x) => x.toFixed(2)).join(' ')}`)),
    card('Processes', el('table', { class: 'mini' }, el('thead', {}, el('tr', {}, el('th', { text: 'role' }), el('th', { text: 'pid' }), el('th', { text: 'RSS' }), el('th', { text: 'CPU' }))), el('tbody', {}, ...procs))),
    card('Disk', ...m.disks.map((d) => meter(d.folders.join(', '), d.used_percent / 100, `${fmt.bytes(d.free_bytes)} free of ${fmt.bytes(d.total_bytes)}`))));
}
