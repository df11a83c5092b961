// The live connection: Server-Sent Events read with fetch (EventSource cannot
// send the token header), a watchdog for a silent stream, reconnects, and the
// connection state ('live', 'reconnecting', 'down') for the views to show.
import { state, emit, setStatus } from './state.js';
import { headers, tokenRefused } from './api.js';

const SSE_SILENCE_MS = 45000;  // 3 missed heartbeats (15 s each): the stream is dead

function setConn(c) {
  const was = state.conn;
  state.conn = c;
  emit('conn', c, was);
}

export async function start() {
  let retryMs = 3000, failures = 0;
  for (;;) {
    const ctrl = new AbortController();
    let watchdog = null;
    const arm = () => { clearTimeout(watchdog); watchdog = setTimeout(() => ctrl.abort(), SSE_SILENCE_MS); };
    try {
      arm();
      const res = await fetch('/api/events', { headers: headers({ Accept: 'text/event-stream' }), signal: ctrl.signal, cache: 'no-store' });
      if (res.status === 401) { tokenRefused(); throw new Error('token refused'); }
      if (!res.ok) throw new Error('HTTP ' + res.status);
      failures = 0;
      setConn('live');
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
          if (ev.event === 'status' && ev.data) setStatus(JSON.parse(ev.data));
        }
      }
    } catch (e) {
      failures++;
    } finally {
      clearTimeout(watchdog);
    }
    setConn(failures > 1 ? 'down' : 'reconnecting');
    await new Promise((r) => setTimeout(r, retryMs));
  }
}

export function parseBlock(block) {
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
