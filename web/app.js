// traind dashboard. No build step, no network beyond this monitor.
// Status arrives by Server-Sent Events (read with fetch so the token can go in a
// header: EventSource cannot send headers). History, queue and resources are
// fetched when the status says they changed; resources every few seconds.
'use strict';

(function () {
  const TOKEN_KEY = 'traind-token';
  const MAX_POINTS = 2000;          // what /api/history may return per request
  const RESOURCE_EVERY_MS = 5000;   // resources are gauges: sampled, not pushed
  const SSE_SILENCE_MS = 45000;     // 3 missed heartbeats (15 s each): the stream is dead
  const SMOOTH_WEIGHT = 0.9;        // EMA weight, as TensorBoard's smoothing slider
  const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7];  // steps are whole

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null, tokenOk: null, status: null, conn: 'connecting',
    overview: null, detail: null, zoomed: false, lastStep: -1, lastJob: null,
    queueKey: null, charts: [], syncing: false, historyBusy: false,
  };
  window.traind = state;  // for people poking at the console, and for the browser test

  // ---------------------------------------------------------------- token
  function initToken() {
    const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      // Drop it from the address bar so it is not copied along with the URL.
      history.replaceState(null, '', location.pathname + location.search);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.token) h['X-Traind-Token'] = state.token;
    return h;
  }

  async function api(path, opts) {
    opts = opts || {};
    const res = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers), cache: 'no-store' }));
    if (res.status === 401) {
      state.tokenOk = false;
      renderControls();
    }
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      const err = new Error(typeof detail === 'string' ? detail : JSON.stringify(detail));
      err.status = res.status;
      throw err;
    }
    return res.json();
  }

  // ---------------------------------------------------------------- formatting
  const fmt = {
    num(v, d) { return v == null || !isFinite(v) ? '—' : Number(v).toFixed(d == null ? 2 : d); },
    loss(v) { return v == null ? '—' : Number(v).toFixed(4); },
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

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (v != null) e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  function showError(msg) {
    const b = $('error-banner');
    b.textContent = msg; b.hidden = !msg;
    if (msg) setTimeout(() => { if (b.textContent === msg) b.hidden = true; }, 8000);
  }

  // ---------------------------------------------------------------- status
  function renderStatus(s) {
    const prev = state.status;
    state.status = s;
    // A daemon that said "stopped" and then exited did what it was asked: that is
    // not the alarm of one that died or hangs (kill -9, a crash, a stuck loop).
    const stoppedClean = !!s.stale && s.status === 'stopped';
    const badge = $('state-badge');
    badge.textContent = s.status == null ? 'no daemon' : (stoppedClean ? 'stopped' : (s.stale ? 'not responding' : s.status));
    badge.dataset.state = stoppedClean ? 'stopped' : (s.stale ? 'stale' : (s.status || 'unknown'));
    badge.className = 'badge state-' + badge.dataset.state;
    $('detail').textContent = s.detail || '';
    $('stale-banner').hidden = !s.stale;
    $('stale-banner').classList.toggle('banner-info', stoppedClean);
    $('stale-title').textContent = stoppedClean ? 'Daemon stopped.' : 'Daemon not responding.';
    const said = stoppedClean ? `It checkpointed and exited${s.updated_at ? ' at ' + new Date(s.updated_at).toLocaleTimeString() : ''}; start it again with bin/start_all.sh`
      : (s.stale_reason || '');
    $('stale-reason').textContent = said + (!stoppedClean && s.age_seconds != null && !said.startsWith('no status update') ? ` — last update ${fmt.dur(s.age_seconds)} ago.` : '.');
    document.body.classList.toggle('is-stale', !!s.stale);

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
    const le = $('last-error');
    le.hidden = !s.last_error; le.textContent = s.last_error ? 'Last error: ' + s.last_error : '';
    renderControls();
    // A daemon that died or came back changes the process table now, not at the next sample.
    if (!prev || prev.stale !== s.stale || prev.pid !== s.pid || prev.trainer_pid !== s.trainer_pid) loadResources();

    // What changed decides what to fetch: no polling of history or queue.
    if (s.global_step < state.lastStep || (prev && prev.job_id !== s.job_id && s.global_step <= state.lastStep)) {
      loadOverview();  // a resume replayed steps: the history rows were replaced
    } else if (s.global_step > state.lastStep) {
      appendHistory();
    }
    const qkey = JSON.stringify([s.queue, s.pending_requests, s.job_id, s.status]);
    if (qkey !== state.queueKey) { state.queueKey = qkey; loadQueue(); }
  }

  // ---------------------------------------------------------------- controls
  // The buttons say what the daemon is doing (from its status), never what we hope it does.
  function controlView(s) {
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
    if (state.conn === 'down') {
      for (const a of ['pause', 'resume', 'skip', 'stop']) v[a].on = false;
      v.hint = 'The monitor is unreachable; controls are back when it is.';
    }
    return v;
  }

  function renderControls() {
    const v = controlView(state.status);
    const locked = !state.token || state.tokenOk === false;
    for (const a of ['pause', 'resume', 'skip', 'stop']) {
      const b = $('btn-' + a);
      b.textContent = v[a].label;
      b.disabled = locked || !v[a].on;
    }
    $('upload-btn').disabled = locked;
    $('token-form').hidden = !locked;
    $('control-hint').textContent = locked
      ? (state.tokenOk === false ? 'The token was refused. ' : '') + 'Controls need the token: open the URL bin/start_all.sh printed, or paste status/monitor_token below.'
      : v.hint;
  }

  function confirmDialog(text) {
    return new Promise((resolve) => {
      const d = $('confirm-dialog');
      $('confirm-text').textContent = text;
      d.returnValue = '';
      d.addEventListener('close', () => resolve(d.returnValue === 'ok'), { once: true });
      d.showModal();
    });
  }

  async function onControl(action) {
    const s = state.status || {};
    if (action === 'skip' && !(await confirmDialog(`Skip "${s.current_file}"? Its training so far is discarded and it goes to failed/ (retry puts it back).`))) return;
    if (action === 'stop' && !(await confirmDialog('Stop the daemon? It checkpoints the file in progress and exits; start it again with bin/start_all.sh.'))) return;
    const body = action === 'skip' ? JSON.stringify({ job_id: s.job_id }) : undefined;
    try {
      await api('/api/control/' + action, { method: 'POST', body, headers: body ? { 'Content-Type': 'application/json' } : {} });
      state.tokenOk = true;
      renderStatus(await api('/api/status'));  // the files as they are now, not a guess
    } catch (e) {
      showError(`${action} failed: ${e.message}`);
    }
  }

  // ---------------------------------------------------------------- events (SSE over fetch)
  function setConn(c, text) {
    const was = state.conn;
    state.conn = c;
    const e = $('conn');
    e.className = 'conn conn-' + c;
    e.textContent = text || c;
    if (c === 'down') {
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
      renderControls();
    } else if (was === 'down' && c === 'live') {
      renderControls();  // the stream's first status redraws the rest
    }
  }

  async function streamEvents() {
    let retryMs = 3000, failures = 0;
    for (;;) {
      const ctrl = new AbortController();
      let watchdog = null;
      const arm = () => { clearTimeout(watchdog); watchdog = setTimeout(() => ctrl.abort(), SSE_SILENCE_MS); };
      try {
        arm();
        const res = await fetch('/api/events', { headers: headers({ Accept: 'text/event-stream' }), signal: ctrl.signal, cache: 'no-store' });
        if (res.status === 401) { state.tokenOk = false; renderControls(); throw new Error('token refused'); }
        if (!res.ok) throw new Error('HTTP ' + res.status);
        failures = 0;
        setConn('live', 'live');
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          arm();
          buf += value.replace(/\r\n?/g, '\n');
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, i); buf = buf.slice(i + 2);
            const ev = parseBlock(block);
            if (ev.retry) retryMs = ev.retry;
            if (ev.event === 'status' && ev.data) renderStatus(JSON.parse(ev.data));
          }
        }
      } catch (e) {
        failures++;
      } finally {
        clearTimeout(watchdog);
      }
      setConn(failures > 1 ? 'down' : 'reconnecting', failures > 1 ? 'monitor unreachable — retrying' : 'reconnecting…');
      await new Promise((r) => setTimeout(r, retryMs));
    }
  }

  function parseBlock(block) {
    const ev = { event: 'message', data: '' };
    for (const line of block.split('\n')) {
      if (!line || line[0] === ':') continue;  // comment: heartbeat
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      const val = c < 0 ? '' : line.slice(c + 1).replace(/^ /, '');
      if (field === 'event') ev.event = val;
      else if (field === 'data') ev.data += (ev.data ? '\n' : '') + val;
      else if (field === 'retry' && /^\d+$/.test(val)) ev.retry = parseInt(val, 10);
    }
    return ev;
  }

  // ---------------------------------------------------------------- history and charts
  function ema(values) {
    const out = new Array(values.length); let acc = 0, n = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (v == null || !isFinite(v)) { out[i] = null; continue; }
      acc = SMOOTH_WEIGHT * acc + (1 - SMOOTH_WEIGHT) * v; n++;
      out[i] = acc / (1 - Math.pow(SMOOTH_WEIGHT, n));  // debiased, so the line starts at the data
    }
    return out;
  }

  // The points to draw: the overview, with the detail of a zoomed range spliced in.
  function composed() {
    const o = state.overview; if (!o) return { points: [], evals: [] };
    const d = state.detail;
    if (!d) return o;
    const outside = (p) => p.global_step < d.min || p.global_step > d.max;
    const merge = (a, b) => a.filter(outside).concat(b).sort((x, y) => x.global_step - y.global_step);
    return { points: merge(o.points, d.points), evals: merge(o.evals, d.evals) };
  }

  function chartData() {
    const { points, evals } = composed();
    const xs = points.map((p) => p.global_step);
    const evalAt = new Map(evals.map((e) => [e.global_step, e.eval_loss]));
    // uPlot wants one x array: put eval steps that have no metric row in too.
    const extra = evals.map((e) => e.global_step).filter((g) => !xs.length || !xs.includes(g));
    let rows = points.map((p) => [p.global_step, p.loss, p.lr, p.tokens_per_sec]);
    if (extra.length) rows = rows.concat(extra.map((g) => [g, null, null, null])).sort((a, b) => a[0] - b[0]);
    const x = rows.map((r) => r[0]);
    const loss = rows.map((r) => r[1]);
    return {
      loss: [x, loss, ema(loss), x.map((g) => (evalAt.has(g) ? evalAt.get(g) : null))],
      lr: [x, rows.map((r) => r[2])],
      tps: [x, rows.map((r) => r[3])],
      n: points.length,
    };
  }

  // Axis labels with as many digits as it takes for neighbouring ticks to differ
  // (zoomed in, "1.9e-3" on every tick says nothing).
  function distinctLabels(vals, fmtAt, from) {
    const shown = vals.filter((v) => v != null);
    for (let d = from; d < from + 6; d++) {
      const labels = vals.map((v) => (v == null ? '' : fmtAt(v, d)));
      if (new Set(labels.filter(Boolean)).size === shown.length) return labels;
    }
    return vals.map((v) => (v == null ? '' : fmtAt(v, from + 6)));
  }

  function makeChart(id, series, yFmt) {
    const host = $(id);
    const opts = {
      width: Math.max(300, host.clientWidth), height: id === 'chart-loss' ? 260 : 170,
      cursor: { sync: { key: 'traind' }, drag: { x: true, y: false } },
      scales: { x: { time: false } },
      legend: { live: true },
      axes: [
        { label: 'global step', incrs: STEP_INCRS, stroke: '#9aa5b1', grid: { stroke: '#2a3440' }, ticks: { stroke: '#2a3440' } },
        { stroke: '#9aa5b1', grid: { stroke: '#2a3440' }, ticks: { stroke: '#2a3440' }, size: 64, values: (u, vals) => yFmt(vals) },
      ],
      series: [{ label: 'step' }].concat(series),
      hooks: { setScale: [(u, key) => { if (key === 'x') onZoom(u); }] },
    };
    const empty = [[]].concat(series.map(() => []));
    const chart = new uPlot(opts, empty, host);
    state.charts.push(chart);
    return chart;
  }

  let lossChart, lrChart, tpsChart;
  function initCharts() {
    lossChart = makeChart('chart-loss', [
      { label: 'loss', stroke: 'rgba(100,160,230,0.45)', width: 1, spanGaps: true, value: (u, v) => fmt.loss(v) },
      { label: 'smoothed', stroke: '#4ea1ff', width: 2, spanGaps: true, value: (u, v) => fmt.loss(v) },
      { label: 'eval', stroke: '#ffa94d', width: 0, paths: () => null, points: { show: true, size: 8, fill: '#ffa94d' }, value: (u, v) => fmt.loss(v) },
    ], (vals) => distinctLabels(vals, (v, d) => v.toFixed(d), 2));
    lrChart = makeChart('chart-lr', [{ label: 'lr', stroke: '#b197fc', width: 1.5, spanGaps: true, value: (u, v) => fmt.sci(v) }],
      (vals) => distinctLabels(vals, (v, d) => v.toExponential(d), 1));
    tpsChart = makeChart('chart-tps', [{ label: 'tokens/s', stroke: '#63e6be', width: 1.5, spanGaps: true, value: (u, v) => fmt.int(v) }],
      (vals) => vals.map((v) => (v == null ? '' : fmt.int(v))));
    window.addEventListener('resize', () => {
      for (const c of state.charts) c.setSize({ width: Math.max(300, c.root.parentElement.clientWidth), height: c.height });
    });
  }

  function draw() {
    const d = chartData();
    const keep = state.zoomed;  // a zoomed view stays where the person put it
    state.syncing = true;
    try {
      lossChart.setData(d.loss, !keep);
      lrChart.setData(d.lr, !keep);
      tpsChart.setData(d.tps, !keep);
    } finally { state.syncing = false; }
    $('chart-loss').dataset.points = String(d.n);
    const o = state.overview;
    $('chart-info').textContent = o
      ? `${fmt.int(o.total_rows)} steps${o.downsampled ? `, drawn as ${fmt.int(d.n)} points (min/max kept per ${o.bucket_width}-step bucket)` : ''}${state.detail ? ' · zoomed detail' : ''}`
      : '';
  }

  async function loadOverview() {
    try {
      const h = await api(`/api/history?max_points=${MAX_POINTS}`);
      state.overview = { points: h.points, evals: h.evals, total_rows: h.total_rows, downsampled: h.downsampled, bucket_width: h.bucket_width };
      state.detail = null;
      state.lastStep = h.last_global_step == null ? -1 : h.last_global_step;
      draw();
    } catch (e) { /* shown by the connection state; retried on the next status */ }
  }

  async function appendHistory() {
    if (!state.overview) return loadOverview();
    if (state.historyBusy) return;
    state.historyBusy = true;
    try {
      const h = await api(`/api/history?since=${state.lastStep}&max_points=${MAX_POINTS}`);
      if (h.downsampled || state.overview.points.length + h.points.length > 2 * MAX_POINTS) return await loadOverview();
      const o = state.overview;
      o.points = o.points.concat(h.points); o.evals = o.evals.concat(h.evals); o.total_rows += h.total_rows;
      if (h.last_global_step != null) state.lastStep = h.last_global_step;
      draw();
    } catch (e) { /* next status event retries */ } finally { state.historyBusy = false; }
  }

  // Zoom: sync the x range across charts, then fetch full detail for the range
  // when the overview was downsampled (a month of steps zooms down to single steps).
  let zoomTimer = null;
  function onZoom(u) {
    if (state.syncing) return;
    const { min, max } = u.scales.x;
    state.syncing = true;
    try { for (const c of state.charts) if (c !== u) c.setScale('x', { min, max }); } finally { state.syncing = false; }
    const o = state.overview;
    const pts = o ? o.points : [];
    const full = !pts.length || (min <= pts[0].global_step && max >= pts[pts.length - 1].global_step);
    state.zoomed = !full;
    clearTimeout(zoomTimer);
    if (full) {
      if (state.detail) { state.detail = null; draw(); }
      return;
    }
    if (!o.downsampled) return;
    zoomTimer = setTimeout(async () => {
      try {
        const lo = Math.floor(min), hi = Math.ceil(max);
        const h = await api(`/api/history?since=${lo - 1}&until=${hi}&max_points=${MAX_POINTS}`);
        state.detail = { min: lo, max: hi, points: h.points, evals: h.evals };
        draw();
      } catch (e) { /* keep the overview */ }
    }, 250);
  }

  function resetZoom() {
    state.zoomed = false; state.detail = null;
    draw();
  }

  // ---------------------------------------------------------------- queue
  async function loadQueue() {
    let q;
    try { q = await api('/api/queue'); } catch (e) { return; }
    const s = state.status || {};
    const pend = new Map(((s.pending_requests) || []).filter((r) => r.job_id).map((r) => [r.job_id, r.action]));
    const c = q.counts;
    $('queue-counts').textContent = `${c.pending} pending (${c.pending_high} high, ${c.pending_normal} normal, ${c.pending_low} low) · ${c.processing} processing · ${c.done} done · ${c.failed} failed`;
    const rows = [];
    for (const it of q.processing) rows.push(queueRow(it, 'processing', pend));
    for (const p of ['high', 'normal', 'low']) for (const it of q.pending[p]) rows.push(queueRow(it, 'pending', pend));
    for (const it of q.failed) rows.push(queueRow(it, 'failed', pend));
    for (const it of q.done.slice(0, 10)) rows.push(queueRow(it, 'done', pend));
    const body = $('queue-body');
    body.replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colspan: 7, class: 'muted', text: 'The queue is empty. Upload a JSONL file or drop one into inbox/.' }))]));
  }

  function queueRow(it, kind, pend) {
    const requested = pend.get(it.job_id);
    let action = null;
    if (requested) action = el('span', { class: 'muted small', text: requested + ' requested…' });
    else if (kind === 'pending') action = el('button', { class: 'small-btn', onclick: () => queueAction(it, 'remove') , text: 'Remove' });
    else if (kind === 'failed') {
      const was = ['high', 'normal', 'low'].includes(it.priority) ? it.priority : 'normal';  // retry keeps the priority it had
      const sel = el('select', { class: 'small-sel', 'aria-label': 'priority' },
        ...['high', 'normal', 'low'].map((p) => el('option', p === was ? { value: p, text: p, selected: '' } : { value: p, text: p })));
      action = el('span', { class: 'nowrap' }, sel, ' ', el('button', { class: 'small-btn', onclick: () => queueAction(it, 'retry', sel.value), text: 'Retry' }));
    }
    let reason = '';
    if (kind === 'failed') {
      // a line error the message already quotes word for word is not repeated under it
      const errs = (it.errors || []).filter((e) => !(it.message && it.message.includes(e.reason)));
      const lines = badLines(errs, Math.max(it.n_bad || 0, errs.length));
      reason = el('div', {}, el('strong', { text: it.reason || 'unknown' }), it.message ? el('div', { class: 'small', text: it.message }) : null,
        lines ? el('div', { class: 'small muted', text: lines }) : null);
    } else if (it.n_bad) {
      // trained without its bad lines (data.bad_line_policy = skip): say which, or nobody will know
      const lines = badLines(it.bad_lines || [], it.n_bad);
      reason = el('div', {}, el('span', { class: 'warn-text', text: `${fmt.int(it.n_bad)} bad line${it.n_bad === 1 ? '' : 's'} skipped` }),
        it.n_records != null ? el('span', { class: 'small muted', text: ` · ${fmt.int(it.n_records)} records trained` }) : null,
        lines ? el('div', { class: 'small muted', text: lines }) : null);
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
      renderStatus(await api('/api/status'));
      loadQueue();
    } catch (e) { showError(`${what} failed: ${e.message}`); }
  }

  // ---------------------------------------------------------------- upload
  function upload(ev) {
    ev.preventDefault();
    const file = $('upload-file').files[0];
    if (!file) { $('upload-result').textContent = 'Choose a .jsonl file first.'; return; }
    const prio = $('upload-priority').value;
    const xhr = new XMLHttpRequest();  // XHR, not fetch: it reports upload progress
    xhr.open('POST', `/api/queue?name=${encodeURIComponent(file.name)}&priority=${prio}`);
    if (state.token) xhr.setRequestHeader('X-Traind-Token', state.token);
    xhr.setRequestHeader('Content-Type', 'application/x-ndjson');
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
        if (xhr.status === 401) { state.tokenOk = false; renderControls(); }
        $('upload-result').textContent = `Upload refused (${xhr.status}): ${body.detail || xhr.statusText}`;
      }
    };
    xhr.onerror = () => { bar.hidden = true; $('upload-result').textContent = 'Upload failed: the monitor is unreachable.'; };
    xhr.send(file);
  }

  // ---------------------------------------------------------------- resources
  function meter(label, frac, text, cls) {
    const f = frac == null || !isFinite(frac) ? 0 : Math.max(0, Math.min(1, frac));
    return el('div', { class: 'meter ' + (cls || '') },
      el('div', { class: 'meter-label' }, el('span', { text: label }), el('span', { class: 'meter-text', text })),
      el('div', { class: 'meter-track' }, el('div', { class: 'meter-fill' + (f > 0.9 ? ' hot' : ''), style: `width:${(f * 100).toFixed(1)}%` })));
  }

  function card(title, ...body) { return el('div', { class: 'card' }, el('h3', { text: title }), ...body); }

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
      el('tr', {}, el('td', { text: p.role }), el('td', { class: 'num', text: p.pid ?? '—' }),
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

  async function loadResources() {
    if (document.hidden) return;  // a background tab costs nothing
    const [g, m] = await Promise.allSettled([api('/api/gpu'), api('/api/memory')]);
    if (g.status === 'fulfilled') renderGpu(g.value);
    if (m.status === 'fulfilled') renderMemory(m.value);
  }

  async function checkToken() {
    if (!state.token) { state.tokenOk = null; renderControls(); return; }
    try { await api('/api/auth/check'); state.tokenOk = true; } catch (e) { if (e.status !== 401) state.tokenOk = null; }
    renderControls();
  }

  // ---------------------------------------------------------------- start
  function start() {
    initToken();
    checkToken();
    for (const a of ['pause', 'resume', 'skip', 'stop']) $('btn-' + a).addEventListener('click', () => onControl(a));
    $('token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const t = $('token-input').value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t); state.token = t; state.tokenOk = null; $('token-input').value = '';
      checkToken(); loadOverview(); loadQueue(); loadResources();
    });
    $('upload-form').addEventListener('submit', upload);
    $('btn-reset-zoom').addEventListener('click', resetZoom);
    initCharts();
    loadOverview();
    loadResources();
    setInterval(loadResources, RESOURCE_EVERY_MS);
    document.addEventListener('visibilitychange', loadResources);
    streamEvents();
  }

  start();
})();
