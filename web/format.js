// How numbers, sizes, durations and times are shown; '—' for what is unknown.

export const fmt = {
  num(v, d) { return v == null || !isFinite(v) ? '—' : Number(v).toFixed(d == null ? 2 : d); },
  loss(v) { return v == null ? '—' : Number(v).toFixed(4); },
  sig(v, d) { return v == null || !isFinite(v) ? '—' : String(Number(Number(v).toPrecision(d || 3))); },  // 0.0123, 1.23e-7
  sci(v) { return v == null ? '—' : Number(v).toExponential(2); },
  int(v) { return v == null ? '—' : Math.round(v).toLocaleString('en-US'); },
  bytes(v) {
    if (v == null) return '—';
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let i = 0; let x = v;
    while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
    return (i ? x.toFixed(1) : x) + ' ' + u[i];
  },
  dur(s) {
    if (s == null || !isFinite(s)) return '—';
    s = Math.max(0, Math.round(s));
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  },
  when(t) { return t == null ? '—' : new Date(t * 1000).toLocaleString(); },
};
