// The monitor's API: the token (from the URL hash, kept in sessionStorage),
// request headers, and `api(path, opts)`, which reports a refused token.
import { state, emit } from './state.js';

const TOKEN_KEY = 'traind-token';

export function initToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    // Drop it from the address bar so it is not copied along with the URL.
    history.replaceState(null, '', location.pathname + location.search);
  }
  state.token = sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(t) {
  sessionStorage.setItem(TOKEN_KEY, t);
  state.token = t;
  state.tokenOk = null;
}

export function tokenRefused() {
  state.tokenOk = false;
  emit('auth');
}

export function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h['X-Traind-Token'] = state.token;
  return h;
}

export async function api(path, opts) {
  opts = opts || {};
  const res = await fetch(path, Object.assign({}, opts, { headers: headers(opts.headers), cache: 'no-store' }));
  if (res.status === 401) tokenRefused();
  if (!res.ok) {
    let detail = res.statusText;
    try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(typeof detail === 'string' ? detail : JSON.stringify(detail));
    err.status = res.status;
    throw err;
  }
  return res.json();
}

export async function checkToken() {
  if (!state.token) { state.tokenOk = null; emit('auth'); return; }
  try { await api('/api/auth/check'); state.tokenOk = true; } catch (e) { if (e.status !== 401) state.tokenOk = null; }
  emit('auth');
}
