// traind dashboard: wires the views to the live status. No build step, no
// network beyond this monitor. Status arrives by Server-Sent Events (live.js);
// history, queue and resources are fetched when the status says they changed,
// resources also every few seconds.
//
// Each view is a module in views/ with the same face:
//   init()               build and bind its DOM once, fetch what it shows at start
//   update(status, prev) follow a new daemon status
//   load()               optional: fetch its data again (after a new token)
//   connection(c, was)   optional: the live connection changed
//   auth()               optional: the token or its verdict changed
// A new view is a new file plus one import and one entry in `views`.
import { state, on } from './state.js';
import { initToken, checkToken } from './api.js';
import { start as startLive } from './live.js';
import * as status from './views/status.js';
import * as controls from './views/controls.js';
import * as charts from './views/charts.js';
import * as activity from './views/activity.js';
import * as forgetting from './views/forgetting.js';
import * as resources from './views/resources.js';
import * as ranks from './views/ranks.js';
import * as queue from './views/queue.js';
import * as playground from './views/playground.js';

const views = [status, controls, charts, activity, forgetting, resources, ranks, queue, playground];  // the order they hear each event in

window.traind = state;  // for people poking at the console, and for the browser test

for (const v of views) {
  on('status', v.update);
  if (v.load) on('token', v.load);
  if (v.connection) on('conn', v.connection);
  if (v.auth) on('auth', v.auth);
}
initToken();
checkToken();  // subscribed first: without a token it answers at once, and the token form must show
for (const v of views) v.init();
startLive();
