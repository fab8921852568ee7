// The Spur console: one page, no framework, no dependency. Every value shown comes from
// the control API with the token from sessionStorage, and is put into the page as text
// (el() below): nothing from a config, a proxy or a request is ever parsed as HTML.
'use strict';

const TOKEN_KEY = 'spur.token';
const REFRESH_MS = 2000;
const COLORS = ['#0f766e', '#7c3aed', '#d97706', '#2563eb', '#db2777', '#65a30d', '#dc2626', '#0891b2'];
let timer = null;
let tapAbort = null;

// ---- DOM helpers: text only ----------------------------------------------------------

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}

function show(...nodes) {
  const main = document.getElementById('main');
  main.replaceChildren(...nodes);
}

function setStatus(text) {
  document.getElementById('status').textContent = text;
}

// ---- The API ---------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(method, path, body, contentType) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = contentType || 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body: payload, cache: 'no-store', credentials: 'omit' });
  if (r.status === 401) {
    signOut(token ? 'The control plane refused the token: nothing is shown without the right one.' : null);
    throw new Unauthorized();
  }
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  return { status: r.status, data };
}

function errorsOf(data) {
  return (data && Array.isArray(data.errors)) ? data.errors : [{ path: '', message: 'unexpected answer' }];
}

function errorList(errors) {
  return el('ul', { class: 'errors', id: 'errors' },
    errors.map(e => el('li', {}, e.path ? el('code', {}, e.path) : null, e.path ? ': ' : '', e.message)));
}

// ---- Formatting ------------------------------------------------------------------------

function ago(secs) {
  if (secs === null || secs === undefined) return '—';
  const d = Math.max(0, Math.round(Date.now() / 1000 - secs));
  if (d < 60) return d + 's ago';
  if (d < 3600) return Math.round(d / 60) + 'm ago';
  if (d < 86400) return Math.round(d / 3600) + 'h ago';
  return Math.round(d / 86400) + 'd ago';
}

function until(secs) {
  if (secs === null || secs === undefined) return '—';
  const d = Math.round(secs - Date.now() / 1000);
  if (d <= 0) return 'expired';
  if (d < 3600) return 'in ' + Math.round(d / 60) + 'm';
  if (d < 86400) return 'in ' + Math.round(d / 3600) + 'h';
  return 'in ' + Math.round(d / 86400) + 'd';
}

function when(secs) {
  return secs ? new Date(secs * 1000).toLocaleString() : '—';
}

function num(x, digits) {
  if (x === null || x === undefined) return '—';
  return Number(x).toFixed(digits === undefined ? 1 : digits);
}

function pct(x) {
  return (x === null || x === undefined) ? '—' : (x * 100).toFixed(2) + '%';
}

// ---- Navigation ------------------------------------------------------------------------

function stopPage() {
  setStatus('');
  if (timer) { clearInterval(timer); timer = null; }
  if (tapAbort) { tapAbort.abort(); tapAbort = null; }
}

function every(fn) {
  const run = () => fn().catch(e => {
    if (!(e instanceof Unauthorized)) setStatus('error: ' + e.message);
  });
  run();
  timer = setInterval(run, REFRESH_MS);
}

function nav(group, here) {
  const links = [el('a', { href: '#/mesh', class: here === 'mesh' ? 'here' : null }, 'Mesh')];
  const n = document.getElementById('nav');
  n.replaceChildren(...links);
  if (!group) return null;
  const g = encodeURIComponent(group);
  return el('div', { class: 'tabs' },
    el('a', { href: '#/group/' + g, class: here === 'group' ? 'here' : null }, 'Group'),
    el('a', { href: '#/traffic/' + g, class: here === 'traffic' ? 'here' : null }, 'Traffic'),
    el('a', { href: '#/tap/' + g, class: here === 'tap' ? 'here' : null }, 'Tap'));
}

async function route() {
  stopPage();
  const [page, arg] = location.hash.replace(/^#\/?/, '').split('/');
  const group = arg ? decodeURIComponent(arg) : null;
  try {
    if (page === 'signin') return signInPage();
    document.getElementById('signout').hidden = !sessionStorage.getItem(TOKEN_KEY);
    if (page === 'group' && group) return groupPage(group);
    if (page === 'traffic' && group) return trafficPage(group);
    if (page === 'tap' && group) return tapPage(group);
    return meshPage();
  } catch (e) {
    if (!(e instanceof Unauthorized)) show(el('p', { class: 'err' }, 'Error: ' + e.message));
  }
}

// ---- Sign-in ---------------------------------------------------------------------------

function signOut(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPage();
  signInPage(why);
}

function signInPage(why) {
  nav(null, null);
  document.getElementById('signout').hidden = true;
  setStatus('');
  const input = el('input', { type: 'password', id: 'token', autocomplete: 'off', placeholder: 'API token' });
  const form = el('form', { id: 'signin-form' },
    el('label', { for: 'token' }, 'API token (the control plane’s --token-file)'), input,
    el('button', { type: 'submit', id: 'signin' }, 'Sign in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      const r = await api('GET', '/v1/groups');
      if (r.status !== 200) return;
      if (location.hash === '#/mesh') route();
      else location.hash = '#/mesh';
    } catch (_) { /* signOut already showed why */ }
  });
  show(el('section', { class: 'card signin' }, el('h1', {}, 'Sign in'),
    why ? el('p', { class: 'err', id: 'signin-error' }, why) : null, form));
  input.focus();
}

// ---- Mesh ------------------------------------------------------------------------------

async function meshPage() {
  nav(null, 'mesh');
  const groupsBody = el('tbody');
  const proxiesBody = el('tbody');
  show(el('h1', {}, 'Mesh'),
    el('section', { class: 'card' }, el('h2', {}, 'Groups'),
      el('table', { id: 'groups' }, el('thead', {}, el('tr', {},
        el('th', {}, 'Group'), el('th', { class: 'num' }, 'Version'), el('th', {}, 'Last change'),
        el('th', {}, 'When'), el('th', { class: 'num' }, 'Proxies'), el('th', {}, ''))), groupsBody)),
    el('section', { class: 'card' }, el('h2', {}, 'Proxies'),
      el('table', { id: 'proxies' }, el('thead', {}, el('tr', {},
        el('th', {}, 'Node'), el('th', {}, 'Group'), el('th', { class: 'num' }, 'Applied'),
        el('th', {}, 'State'), el('th', {}, 'Last error'), el('th', {}, 'Last seen'),
        el('th', {}, 'Certificate'))), proxiesBody)));
  every(async () => {
    const [g, p] = await Promise.all([api('GET', '/v1/groups'), api('GET', '/v1/proxies')]);
    const groups = (g.data && g.data.groups) || [];
    const current = Object.fromEntries(groups.map(x => [x.group, x.version]));
    groupsBody.replaceChildren(...groups.map(x => {
      const link = '#/group/' + encodeURIComponent(x.group);
      return el('tr', { 'data-group': x.group },
        el('td', {}, el('a', { href: link }, x.group)), el('td', { class: 'num' }, x.version),
        el('td', {}, x.action), el('td', {}, ago(x.created_at)), el('td', { class: 'num' }, x.proxies),
        el('td', {}, el('a', { href: '#/traffic/' + encodeURIComponent(x.group) }, 'traffic'), ' · ',
          el('a', { href: '#/tap/' + encodeURIComponent(x.group) }, 'tap')));
    }));
    if (!groups.length) groupsBody.append(el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'No group has a config yet.')));
    const proxies = Array.isArray(p.data) ? p.data : [];
    proxiesBody.replaceChildren(...proxies.map(x => {
      const behind = current[x.group] !== undefined && x.applied_version !== current[x.group];
      const expiring = x.certificate_expires_at && x.certificate_expires_at - Date.now() / 1000 < 3600;
      const state = x.stale ? ['bad', 'stale'] : x.last_error ? ['bad', 'failing']
        : behind ? ['warn', 'behind'] : expiring ? ['warn', 'cert expiring'] : ['ok', 'ok'];
      return el('tr', { class: state[0] === 'ok' ? null : state[0], 'data-node': x.node, 'data-state': state[1] },
        el('td', {}, x.node), el('td', {}, el('a', { href: '#/group/' + encodeURIComponent(x.group) }, x.group)),
        el('td', { class: 'num' }, x.applied_version === null ? '—' : x.applied_version),
        el('td', {}, el('span', { class: 'badge ' + state[0] }, state[1])),
        el('td', { class: 'err' }, x.last_error || ''), el('td', {}, ago(x.last_seen)),
        el('td', {}, until(x.certificate_expires_at)));
    }));
    if (!proxies.length) proxiesBody.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'No proxy has reported.')));
    setStatus('updated ' + new Date().toLocaleTimeString());
  });
}

// ---- Group: flags, history and diff, rollback, config editor -------------------------

async function groupPage(group) {
  const tabs = nav(group, 'group');
  const flags = el('div', { id: 'flags' });
  const rollouts = el('div', { id: 'rollouts' });
  const history = el('tbody');
  const from = el('select', { id: 'diff-from' });
  const to = el('select', { id: 'diff-to' });
  const diffOut = el('pre', { class: 'diff', id: 'diff', hidden: true });
  const editor = el('textarea', { id: 'editor', spellcheck: 'false' });
  // What the user typed is never replaced by a refresh; Save (or a clean editor) reloads it.
  editor.addEventListener('input', () => { editor.dataset.dirty = '1'; });
  const editorMsg = el('div', { id: 'editor-result' });
  const showDiff = async () => {
    const r = await api('GET', `/v1/groups/${encodeURIComponent(group)}/diff?from=${from.value}&to=${to.value}`);
    diffOut.hidden = false;
    if (r.status !== 200) { diffOut.replaceChildren(errorsOf(r.data).map(e => e.message).join('\n')); return; }
    const lines = r.data.diff ? r.data.diff.split('\n') : ['(no difference)'];
    diffOut.replaceChildren(...lines.map(l => el('span', {
      class: l.startsWith('@@') ? 'hunk' : (l.startsWith('+') ? 'add' : (l.startsWith('-') ? 'del' : null)),
    }, l + '\n')));
  };
  const submit = async (dryRun) => {
    const r = await api('PUT', `/v1/groups/${encodeURIComponent(group)}/config${dryRun ? '?dry_run=true' : ''}`,
      editor.value, 'application/yaml');
    if (r.status === 200) {
      editorMsg.replaceChildren(el('p', { class: 'badge ok', id: 'editor-ok' },
        dryRun ? 'Valid: ' + r.data.summary : 'Stored as version ' + r.data.version));
      if (!dryRun) { delete editor.dataset.dirty; load(true); }
    } else {
      editorMsg.replaceChildren(el('p', { class: 'err' }, 'Not stored: fix these first.'), errorList(errorsOf(r.data)));
    }
  };
  show(el('h1', {}, 'Group ', group), tabs,
    el('section', { class: 'card' }, el('h2', {}, 'Flags'), flags),
    el('section', { class: 'card' }, el('h2', {}, 'Rollouts'), rollouts),
    el('section', { class: 'card' }, el('h2', {}, 'History'),
      el('div', { class: 'row' }, 'Diff from', from, 'to', to,
        el('button', { id: 'diff-show', class: 'secondary', onclick: showDiff }, 'Show diff')),
      diffOut,
      el('table', { id: 'history' }, el('thead', {}, el('tr', {}, el('th', { class: 'num' }, 'Version'),
        el('th', {}, 'When'), el('th', {}, 'What'), el('th', {}, ''))), history)),
    el('section', { class: 'card' }, el('h2', {}, 'Config'),
      el('p', { class: 'muted' }, 'Edit the YAML: Validate checks it as the control plane would (errors at their field paths); Save stores it as a new version, pushed to the proxies.'),
      editor, el('div', { class: 'row' },
        el('button', { id: 'validate', class: 'secondary', onclick: () => submit(true) }, 'Validate'),
        el('button', { id: 'save', onclick: () => submit(false) }, 'Save')), editorMsg));

  let shownVersion = null;
  async function load(force) {
    const g = encodeURIComponent(group);
    const [cfg, hist, ro] = await Promise.all([api('GET', `/v1/groups/${g}/config`), api('GET', `/v1/groups/${g}/history`),
      api('GET', `/v1/groups/${g}/rollouts`)]);
    // A rollout's verdicts come between versions: drawn at every refresh.
    renderRollouts(rollouts, (ro.status === 200 && ro.data.rollouts) || []);
    if (cfg.status !== 200) { flags.replaceChildren(el('p', { class: 'muted' }, 'This group has no config yet.')); }
    const version = cfg.data && cfg.data.version;
    if (version === shownVersion && !force) return;
    shownVersion = version;
    renderFlags(group, flags, (cfg.data && cfg.data.config && cfg.data.config.flags) || {}, load);
    const versions = (hist.data && hist.data.versions) || [];
    history.replaceChildren(...versions.map(v => el('tr', { 'data-version': v.version },
      el('td', { class: 'num' }, v.version), el('td', {}, when(v.created_at)), el('td', {}, v.action),
      el('td', {}, v.version === version ? el('span', { class: 'badge ok' }, 'current')
        : rollbackButton(group, v.version, () => load(true))))));
    const keepFrom = from.value, keepTo = to.value;
    const options = () => versions.map(v => el('option', { value: v.version }, 'v' + v.version + ' — ' + v.action));
    from.replaceChildren(...options());
    to.replaceChildren(...options());
    if (versions.length) {
      to.value = keepTo || String(versions[0].version);
      from.value = keepFrom || String(versions[Math.min(1, versions.length - 1)].version);
    }
    if (!editor.dataset.dirty && (force || !editor.dataset.loaded || String(version) !== editor.dataset.version)) {
      const y = await api('GET', `/v1/groups/${g}/config?format=yaml`);
      if (y.status === 200) {
        editor.value = y.data.yaml;
        editor.dataset.loaded = '1';
        editor.dataset.version = y.data.version;
      }
    }
    setStatus('version ' + (version === undefined || version === null ? '—' : version));
  }
  every(() => load(false));
}

function rollbackButton(group, version, after) {
  const b = el('button', { class: 'secondary rollback', 'data-version': version }, 'Roll back to v' + version);
  let armed = null;
  b.addEventListener('click', async () => {
    if (!armed) {
      b.textContent = 'Confirm rollback to v' + version;
      b.className = 'danger rollback';
      armed = setTimeout(() => { armed = null; b.textContent = 'Roll back to v' + version; b.className = 'secondary rollback'; }, 5000);
      return;
    }
    clearTimeout(armed);
    armed = null;
    b.disabled = true;
    const r = await api('POST', `/v1/groups/${encodeURIComponent(group)}/rollback`, { version });
    if (r.status !== 200) alertRow(b, errorsOf(r.data));
    after();
  });
  return b;
}

function alertRow(node, errors) {
  node.after(errorList(errors));
}

function renderFlags(group, box, flags, after) {
  const names = Object.keys(flags).sort();
  if (!names.length) { box.replaceChildren(el('p', { class: 'muted' }, 'No flags.')); return; }
  box.replaceChildren(el('table', {}, el('tbody', {}, names.map(name => {
    const f = flags[name];
    const input = el('input', { type: 'checkbox', class: 'flag-switch', 'data-flag': name, role: 'switch' });
    input.checked = !!f.enabled;
    input.addEventListener('change', async () => {
      input.disabled = true;
      const r = await api('PATCH', `/v1/groups/${encodeURIComponent(group)}/flags/${encodeURIComponent(name)}`, { enabled: input.checked });
      if (r.status !== 200) { input.checked = !input.checked; alertRow(input.parentNode, errorsOf(r.data)); }
      input.disabled = false;
      after(true);
    });
    const rules = (f.rules || []).map(r => el('li', {}, ruleText(r)));
    return el('tr', { 'data-flag': name },
      el('td', {}, el('label', { class: 'switch' }, input, el('span', { class: 'knob' }))),
      el('td', {}, el('strong', {}, name), ' ', el('span', { class: 'badge ' + (f.enabled ? 'ok' : 'warn') }, f.enabled ? 'on' : 'off'),
        rules.length ? el('ul', { class: 'rules' }, rules) : el('div', { class: 'muted' }, f.enabled ? 'on for every request' : '')));
  }))));
}

const ROLLOUT_BADGE = { running: 'ok', succeeded: 'ok', paused: 'warn', aborted: 'warn', rolled_back: 'bad' };

// Each rollout: its state, step and weight, why it stopped, and every verdict with its numbers.
function renderRollouts(box, list) {
  if (!list.length) { box.replaceChildren(el('p', { class: 'muted' }, 'No rollouts in this config.')); return; }
  const side = f => [el('td', { class: 'num' }, f.requests), el('td', { class: 'num' }, pct(f.error_rate)),
    el('td', { class: 'num' }, num(f.p99_ms))];
  box.replaceChildren(...list.map(r => {
    const steps = r.steps || [];
    const head = el('p', { class: 'rollout-head' }, el('strong', {}, r.name), ' ',
      el('span', { class: 'badge ' + (ROLLOUT_BADGE[r.state] || ''), 'data-state': r.state }, r.state.replace('_', ' ')), ' ',
      'step ' + r.step + '/' + steps.length + ' (' + r.weight + '% to ' + (r.canary || '?') + ')',
      r.route ? el('span', { class: 'muted' }, ' — route ' + r.route + ', steps ' + steps.map(s => s + '%').join(' ') + ', every ' + r.interval) : null);
    const reason = r.reason ? el('p', { class: r.state === 'rolled_back' ? 'err reason' : 'muted reason' }, r.reason) : null;
    const waiting = r.waiting_for_requests
      ? el('p', { class: 'muted' }, 'Waiting for canary requests: ' + r.waiting_for_requests.canary_requests + ' of ' + r.min_requests) : null;
    const verdicts = (r.verdicts || []).map(v => el('tr', { class: 'verdict', 'data-step': v.step },
      el('td', { class: 'num' }, v.step), el('td', { class: 'num' }, v.weight + '%'),
      el('td', {}, el('span', { class: 'badge ' + (v.result === 'pass' ? 'ok' : 'bad') }, v.result)),
      side(v.canary), side(v.baseline), el('td', {}, v.reason)));
    const table = verdicts.length ? el('table', {}, el('thead', {}, el('tr', {},
      ['Step', 'Weight', 'Verdict', 'Canary req', 'Errors', 'p99 ms', 'Baseline req', 'Errors', 'p99 ms', 'Why']
        .map(t => el('th', {}, t)))), el('tbody', {}, verdicts)) : el('p', { class: 'muted' }, 'No verdicts yet.');
    return el('div', { class: 'rollout', 'data-rollout': r.name }, head, reason, waiting, table);
  }));
}

function ruleText(r) {
  if (r.header) return 'header ' + r.header + ' is one of ' + (r.values || []).join(', ');
  if (r.cookie) return 'cookie ' + r.cookie + ' is one of ' + (r.values || []).join(', ');
  if (r.percent !== undefined) return r.percent + '% of requests' + (r.hash_on ? ', sticky by ' + r.hash_on : '');
  return JSON.stringify(r);
}

// ---- Traffic ---------------------------------------------------------------------------

function label(s) {
  return s.route + ' → ' + s.cluster + (s.side === null || s.side === undefined ? '' : ' (side ' + s.side + ')');
}

function chart(title, series, pick, fmt) {
  const W = 420, H = 170, L = 44, R = 8, T = 10, B = 20;
  let max = 0;
  let first = null, last = null;
  for (const s of series) for (const p of s.series) {
    const v = pick(p);
    if (v !== null && v !== undefined && v > max) max = v;
    if (first === null || p.ts < first) first = p.ts;
    if (last === null || p.ts > last) last = p.ts;
  }
  if (max === 0) max = 1;
  const span = Math.max(1, (last || 1) - (first || 0));
  const x = ts => L + (W - L - R) * ((ts - first) / span);
  const y = v => T + (H - T - B) * (1 - v / max);
  const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img' },
    svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B }),
    svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg('text', { x: 2, y: T + 8 }, fmt(max)), svg('text', { x: 2, y: H - B }, fmt(0)),
    svg('text', { x: L, y: H - 4 }, '−' + Math.round(span / 60) + 'm'), svg('text', { x: W - R - 22, y: H - 4 }, 'now'));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const has = p => p && pick(p) !== null && pick(p) !== undefined;
    let d = '';
    s.series.forEach((p, j) => {
      if (!has(p)) return;
      const [px, py] = [x(p.ts).toFixed(1), y(pick(p)).toFixed(1)];
      // A step after a gap starts a new line; a step alone shows as a dot.
      d += (has(s.series[j - 1]) ? ' L' : ' M') + px + ' ' + py;
      if (!has(s.series[j - 1]) && !has(s.series[j + 1])) g.append(svg('circle', { cx: px, cy: py, r: 2.5, fill: color }));
    });
    if (d) g.append(svg('path', { d: d.trim(), fill: 'none', stroke: color, 'stroke-width': 1.8 }));
  });
  return el('div', { class: 'chart card' }, el('h2', {}, title), g,
    el('div', { class: 'legend' }, series.map((s, i) => el('span', {}, el('i', { class: 'c' + (i % COLORS.length) }), s.name))));
}

function figuresRow(attrs, first, f, extra) {
  return el('tr', attrs, first,
    el('td', { class: 'num rps' }, num(f.rps, 2)), el('td', { class: 'num success' }, pct(f.success_rate)),
    el('td', { class: 'num' }, num(f.p50_ms)), el('td', { class: 'num' }, num(f.p99_ms)),
    el('td', { class: 'num' }, f.retries), extra || null);
}

function figuresHead(first, extra) {
  return el('thead', {}, el('tr', {}, first, el('th', { class: 'num' }, 'Req/s'), el('th', { class: 'num' }, 'Success'),
    el('th', { class: 'num' }, 'p50 ms'), el('th', { class: 'num' }, 'p99 ms'), el('th', { class: 'num' }, 'Retries'), extra || null));
}

async function trafficPage(group) {
  const tabs = nav(group, 'traffic');
  const routes = el('tbody');
  const clusters = el('tbody');
  const charts = el('div', { class: 'charts', id: 'charts' });
  show(el('h1', {}, 'Traffic of ', group), tabs,
    el('p', { class: 'muted' }, 'Live figures cover the last 10 s (refreshed every 2 s); charts the last 15 minutes, all proxies of the group together.'),
    el('section', { class: 'card' }, el('h2', {}, 'Routes'),
      el('table', { id: 'traffic-routes' }, figuresHead([el('th', {}, 'Listener'), el('th', {}, 'Route'), el('th', {}, 'Cluster'), el('th', {}, 'Side')]), routes)),
    el('section', { class: 'card' }, el('h2', {}, 'Clusters'),
      el('table', { id: 'traffic-clusters' }, figuresHead(el('th', {}, 'Cluster'), el('th', { class: 'num' }, 'Ejected')), clusters)),
    charts);
  every(async () => {
    const r = await api('GET', `/v1/groups/${encodeURIComponent(group)}/traffic?window=15m`);
    if (r.status !== 200) { routes.replaceChildren(el('tr', {}, el('td', { class: 'err' }, errorsOf(r.data)[0].message))); return; }
    const d = r.data;
    routes.replaceChildren(...d.routes.map(s => figuresRow({ 'data-route': s.route, 'data-cluster': s.cluster },
      [el('td', {}, s.listener), el('td', {}, s.route), el('td', {}, s.cluster), el('td', {}, s.side === null ? '—' : s.side)], s.now)));
    if (!d.routes.length) routes.append(el('tr', {}, el('td', { colspan: 9, class: 'muted' }, 'No traffic reported in the last 15 minutes.')));
    clusters.replaceChildren(...d.clusters.map(c => figuresRow({ 'data-cluster': c.cluster, class: c.ejected ? 'bad' : null },
      el('td', {}, c.cluster), c.now,
      el('td', { class: 'num' }, c.ejected === undefined ? '—' : c.ejected + ' / ' + c.endpoints))));
    const named = d.routes.map(s => ({ name: label(s), series: s.series }));
    charts.replaceChildren(
      chart('Requests per second', named, p => p.rps, v => v.toFixed(1)),
      chart('Success rate', named, p => p.success_rate, v => (v * 100).toFixed(0) + '%'),
      chart('p99 latency (ms)', named, p => p.p99_ms, v => v.toFixed(0)),
      chart('Retries per step', named, p => p.requests ? p.retries : null, v => v.toFixed(0)));
    setStatus('updated ' + new Date().toLocaleTimeString());
  });
}

// ---- Tap -------------------------------------------------------------------------------

const TAP_MAX_ROWS = 300;

function tapPage(group) {
  const tabs = nav(group, 'tap');
  const routeIn = el('input', { type: 'text', id: 'tap-route', placeholder: 'any route' });
  const statusIn = el('select', { id: 'tap-status' }, ['', '2xx', '3xx', '4xx', '5xx'].map(s => el('option', { value: s }, s || 'any status')));
  const body = el('tbody', { id: 'tap-lines' });
  const state = el('span', { class: 'muted', id: 'tap-state' }, 'stopped');
  const start = el('button', { id: 'tap-start' }, 'Start');
  const stop = el('button', { id: 'tap-stop', class: 'secondary', disabled: true }, 'Stop');
  const cols = ['Time', 'Node', 'Method', 'Path', 'Route', 'Cluster', 'Endpoint', 'Status', 'gRPC', 'ms', 'Flags', 'Split', 'Tries', 'Error'];
  show(el('h1', {}, 'Tap ', group), tabs,
    el('p', { class: 'muted' }, 'Sampled requests of every proxy of the group (at most 100 a second each), while this page watches. Header values and bodies are never sent.'),
    el('section', { class: 'card' }, el('div', { class: 'row' }, 'Route', routeIn, 'Status', statusIn, start, stop, state)),
    el('section', { class: 'card' }, el('table', { class: 'tap' }, el('thead', {}, el('tr', {}, cols.map(c => el('th', {}, c)))), body)));
  start.addEventListener('click', () => runTap(group, routeIn.value.trim(), statusIn.value, body, state, start, stop));
  stop.addEventListener('click', () => { if (tapAbort) tapAbort.abort(); });
}

function tapRow(l) {
  const bad = l.status >= 500 || l.status === 0;
  return el('tr', { class: bad ? 'bad' : null, 'data-route': l.route, 'data-status': l.status },
    el('td', {}, new Date(l.ts).toLocaleTimeString()), el('td', {}, l.node), el('td', {}, l.method),
    el('td', { class: 'path mono', title: l.path }, l.path), el('td', {}, l.route), el('td', {}, l.cluster),
    el('td', { class: 'mono' }, l.endpoint), el('td', { class: 'num' }, l.status),
    el('td', { class: 'num' }, l.grpc_status === null || l.grpc_status === undefined ? '' : l.grpc_status),
    el('td', { class: 'num' }, num(l.duration_ms)), el('td', {}, (l.flags || []).join(', ')),
    el('td', { class: 'num' }, l.split === null || l.split === undefined ? '' : l.split),
    el('td', { class: 'num' }, l.attempts), el('td', { class: 'err' }, l.error || ''));
}

async function runTap(group, routeName, status, body, state, start, stop) {
  if (tapAbort) tapAbort.abort();
  const ctl = new AbortController();
  tapAbort = ctl;
  const q = new URLSearchParams();
  if (routeName) q.set('route', routeName);
  if (status) q.set('status', status);
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = 'Bearer ' + token;
  start.disabled = true; stop.disabled = false;
  state.textContent = 'watching…';
  try {
    const r = await fetch(`/v1/groups/${encodeURIComponent(group)}/tap?${q}`, { headers, signal: ctl.signal, cache: 'no-store', credentials: 'omit' });
    if (r.status === 401) { signOut('The control plane refused the token: nothing is shown without the right one.'); return; }
    if (r.status !== 200) { let d = null; try { d = await r.json(); } catch (_) { d = null; } state.textContent = errorsOf(d)[0].message; return; }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    let count = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        let l;
        try { l = JSON.parse(line); } catch (_) { continue; }
        body.prepend(tapRow(l));
        while (body.rows.length > TAP_MAX_ROWS) body.deleteRow(-1);
        count++;
        state.textContent = 'watching: ' + count + ' line(s)';
      }
    }
    state.textContent = 'the stream ended';
  } catch (e) {
    state.textContent = e.name === 'AbortError' ? 'stopped' : 'error: ' + e.message;
  } finally {
    start.disabled = false; stop.disabled = true;
    if (tapAbort === ctl) tapAbort = null;
  }
}

// ---- Start -----------------------------------------------------------------------------

document.getElementById('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.hash = '#/signin';
});
window.addEventListener('hashchange', route);
route();
