// The page's shared state, and the few events views follow.
// Topics: 'status' (s, prev) a new daemon status; 'conn' (conn, was) the live
// connection changed; 'auth' the token or its verdict changed; 'token' a new
// token was entered, so views fetch again what a missing one could not.

export const state = {
  token: null, tokenOk: null, status: null, conn: 'connecting',
  overview: null, detail: null, zoomed: false, lastStep: -1, lastJob: null, series: null,
  queueKey: null, charts: [], syncing: false, historyBusy: false,
};

const listeners = { status: [], conn: [], auth: [], token: [] };

export function on(topic, fn) { listeners[topic].push(fn); }

export function emit(topic, ...args) {
  for (const fn of listeners[topic]) fn(...args);
}

// Every status, from the stream or fetched after a request, goes through here.
export function setStatus(s) {
  const prev = state.status;
  state.status = s;
  emit('status', s, prev);
}
