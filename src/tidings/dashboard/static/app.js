// The tidings dashboard: one page, routed by the URL's hash, fed by the JSON API beside it.
// No build step and no dependency: plain DOM, SVG sparklines, polling once a second.
"use strict";

const POLL_MS = 1000;
const page = document.getElementById("page");
let timer = null;
let canAct = false;

// -- helpers ---------------------------------------------------------------------------

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

// A dotted name may wrap after its dots, not inside a word.
function dotted(name) {
  return esc(name).replace(/\./g, ".<wbr>");
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)}m`;
  return `${(seconds / 3600).toFixed(1)}h`;
}

function relative(seconds) {
  const delta = seconds - Date.now() / 1000;
  const text = age(Math.abs(delta));
  return delta >= 0 ? `in ${text}` : `${text} ago`;
}

function num(n, cls = "") {
  return `<td class="num ${n ? cls : "zero"}">${esc(n)}</td>`;
}

// Which figure of a sample each chart draws, all read from the store: "ok" and "fail"
// where it counts deliveries, "pending" and "dead" where it does not.
const COLUMN = { ok: 1, fail: 2, pending: 3, dead: 4 };

function spark(points, kind, big = false) {
  const w = big ? 420 : 90;
  const h = big ? 70 : 26;
  const slots = big ? 60 : 30;
  const shown = points.slice(-slots);
  const top = Math.max(1, ...shown.map((p) => p[COLUMN[kind]]));
  // One slot a sample, the newest on the right: a young chart grows from the right edge.
  const step = w / (slots - 1);
  const first = slots - shown.length;
  const line = shown.map((p, i) => {
    const v = p[COLUMN[kind]];
    return `${((first + i) * step).toFixed(1)},${(h - 2 - (v / top) * (h - 4)).toFixed(1)}`;
  }).join(" ");
  const area = shown.length ? `${(first * step).toFixed(1)},${h} ${line} ${w},${h}` : "";
  return `<svg class="spark ${kind}${big ? " big" : ""}" viewBox="0 0 ${w} ${h}" ` +
    `preserveAspectRatio="none"><polygon points="${area}"/><polyline points="${line}"/></svg>`;
}

function rate(points, kind, big = false, current = null) {
  // A level is shown as read now; the chart's last sample may be a second older.
  const last = points.length ? points[points.length - 1][COLUMN[kind]] : 0;
  const shown = kind === "pending" ? String(current ?? last) : `${last.toFixed(1)}/s`;
  return `<div class="rate"><span data-rate="${kind}">${shown}</span>${spark(points, kind, big)}</div>`;
}

async function api(path, options = {}) {
  const response = await fetch(`api/${path}`, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function act(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "content-type": "application/json", "x-tidings-dashboard": "1" },
    body: JSON.stringify(payload),
  });
}

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
}

function confirmThat(text) {
  const modal = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  modal.hidden = false;
  return new Promise((resolve) => {
    const done = (answer) => {
      modal.hidden = true;
      ok.onclick = cancel.onclick = null;
      resolve(answer);
    };
    const ok = document.getElementById("confirm-ok");
    const cancel = document.getElementById("confirm-cancel");
    ok.onclick = () => done(true);
    cancel.onclick = () => done(false);
  });
}

function setMode(can) {
  canAct = can;
  const mode = document.getElementById("mode");
  mode.textContent = can ? "actions allowed" : "read only";
  mode.className = can ? "badge act" : "badge";
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// -- overview --------------------------------------------------------------------------

async function overview() {
  const data = await api("overview");
  document.getElementById("bus").textContent = `${data.backend} ${data.bus}`;
  setMode(data.can_act);
  const charts = data.counted ? ["ok", "fail"] : ["pending", "dead"];
  const rows = data.listeners.map((l) => `
    <tr data-listener="${esc(l.name)}">
      <td class="name"><a href="#/listener/${encodeURIComponent(l.name)}">${dotted(l.name)}</a></td>
      <td>${esc(l.events.join(", "))}</td>
      ${num(l.pending)}${num(l.in_flight)}${num(l.retrying, "bad")}${num(l.delayed)}
      <td class="num ${l.dead ? "bad" : "zero"}" data-col="dead">${l.dead ? `<a href="#/dead?listener=${encodeURIComponent(l.name)}">${l.dead}</a>` : 0}</td>
      <td class="num">${age(l.oldest_age_s)}</td>
      <td class="num" data-col="last-seen">${l.last_seen ? `${age(Date.now() / 1000 - l.last_seen)} ago` : "-"}</td>
      <td class="num" data-col="delivered">${l.counted ? esc(l.delivered) : "-"}</td>
      <td class="num ${l.failed ? "bad" : "zero"}" data-col="failed">${l.counted ? esc(l.failed) : "-"}</td>
      <td>${rate(l.rates, charts[0], false, l.pending)}</td>
      <td>${rate(l.rates, charts[1])}</td>
    </tr>`).join("");
  page.innerHTML = `
    <h1>Listeners</h1>
    <p class="note">Pending, in flight, retrying, delayed, dead, the oldest age and when a worker
    last claimed are read from the store. ${data.counted ? "So are delivered, failed and their rates, whichever worker ran them." :
      "This store does not count deliveries: the charts show its pending deliveries and the dead letters added each second."}</p>
    <table id="listeners">
      <thead><tr><th>listener</th><th>events</th><th class="num">pending</th><th class="num">in flight</th>
      <th class="num">retrying</th><th class="num">delayed</th><th class="num">dead</th><th class="num">oldest</th>
      <th class="num" title="when a worker last claimed for it">last seen</th><th class="num">delivered</th><th class="num">failed</th><th class="num">${data.counted ? "deliveries/s" : "pending"}</th>
      <th class="num">${data.counted ? "failures/s" : "dead letters/s"}</th></tr></thead>
      <tbody>${rows || `<tr><td colspan="13" class="note">No listener.</td></tr>`}</tbody>
    </table>`;
}

// -- one listener ----------------------------------------------------------------------

function failureBlock(f, kind) {
  return `<tr><td>${when(f.failed_at)}</td><td class="name">${esc(f.event_id)}</td><td>${esc(f.name)}</td>
    <td class="num">${esc(f.attempt ?? f.attempts)}</td><td class="error">${esc(f.error)}</td></tr>
    <tr class="detail"><td colspan="5"><details data-key="${kind} ${esc(f.event_id)} ${esc(f.attempt ?? f.attempts)} ${esc(f.failed_at)}"><summary>traceback</summary><pre>${esc(f.traceback)}</pre></details></td></tr>`;
}

async function listenerPage(name) {
  const l = await api(`listener?name=${encodeURIComponent(name)}`);
  setMode(l.can_act);
  const figure = (label, value) => `<div class="figure"><b>${esc(value)}</b><small>${label}</small></div>`;
  const head = `<thead><tr><th>failed at</th><th>event id</th><th>event</th><th class="num">attempt</th><th>error</th></tr></thead>`;
  page.innerHTML = `
    <h1 class="name">${esc(l.name)}</h1>
    <p class="note">Listens to ${esc(l.events.join(", ") || "(not in this process)")}</p>
    <div class="figures">
      ${figure("pending", l.pending)}${figure("in flight", l.in_flight)}${figure("retrying", l.retrying)}
      ${figure("delayed", l.delayed)}${figure("dead", l.dead)}${figure("oldest", age(l.oldest_age_s))}
      ${figure("last seen", l.last_seen ? `${age(Date.now() / 1000 - l.last_seen)} ago` : "-")}
      ${figure("delivered", l.delivered)}${figure("failed", l.failed)}
    </div>
    <div class="figures">${l.counted
      ? `<div>deliveries/s ${rate(l.rates, "ok", true)}</div><div>failures/s ${rate(l.rates, "fail", true)}</div>`
      : `<div>pending ${rate(l.rates, "pending", true, l.pending)}</div><div>dead letters/s ${rate(l.rates, "dead", true)}</div>`}</div>
    <h2>Recent failures in this process</h2>
    ${l.sees_failures ? (l.failures.length ? `<table id="failures">${head}<tbody>${l.failures.map((f) => failureBlock(f, "failure")).join("")}</tbody></table>` : `<p class="note">None yet.</p>`)
      : `<p class="note">Failures are recorded when the dashboard is made before the bus starts.</p>`}
    <h2>Dead letters <a href="#/dead?listener=${encodeURIComponent(l.name)}">(search all)</a></h2>
    ${l.dead_letters.length ? `<table id="listener-dead">${head}<tbody>${l.dead_letters.map((d) => failureBlock(d, "dead")).join("")}</tbody></table>` : `<p class="note">None.</p>`}`;
}

// -- dead letters ----------------------------------------------------------------------

const FILTERS = ["event_id", "name", "listener", "error", "since", "until"];
let deadState = { filter: {}, letters: [], total: 0, selected: new Set(), open: null };

function key(letter) {
  return `${letter.event_id} ${letter.listener}`;
}

function toEpoch(local) {
  return local ? String(new Date(local).getTime() / 1000) : "";
}

function fromEpoch(seconds) {
  if (!seconds) return "";
  const d = new Date(Number(seconds) * 1000);
  d.setMinutes(d.getMinutes() - d.getTimezoneOffset());
  return d.toISOString().slice(0, 16);
}

async function deadPage(params) {
  const filter = {};
  for (const f of FILTERS) if (params.get(f)) filter[f] = params.get(f);
  deadState = { filter, letters: [], total: 0, selected: new Set(), open: null };
  const input = (f, label, type = "text") => {
    const value = f === "since" || f === "until" ? fromEpoch(filter[f]) : (filter[f] || "");
    return `<label>${label}<input name="${f}" type="${type}" value="${esc(value)}"></label>`;
  };
  page.innerHTML = `
    <h1>Dead letters</h1>
    <form class="filter" id="dead-filter">
      ${input("event_id", "event id")}${input("name", "event name")}${input("listener", "listener")}
      ${input("error", "error text")}${input("since", "failed since", "datetime-local")}${input("until", "failed until", "datetime-local")}
      <button type="submit" class="primary">Search</button>
      <button type="button" id="dead-clear">Clear</button>
    </form>
    <div class="actions" id="dead-actions"></div>
    <div id="dead-results"></div>`;
  document.getElementById("dead-filter").onsubmit = (e) => {
    e.preventDefault();
    const form = new FormData(e.target);
    const query = new URLSearchParams();
    for (const f of FILTERS) {
      let v = String(form.get(f) || "").trim();
      if (f === "since" || f === "until") v = toEpoch(v);
      if (v) query.set(f, v);
    }
    location.hash = `#/dead?${query}`;
  };
  document.getElementById("dead-clear").onclick = () => { location.hash = "#/dead"; };
  await loadDead();
}

async function loadDead() {
  const query = new URLSearchParams(deadState.filter);
  query.set("limit", "500");
  const data = await api(`dead?${query}`);
  setMode(data.can_act);
  deadState.letters = data.letters;
  deadState.total = data.total;
  const keys = new Set(data.letters.map(key));
  deadState.selected = new Set([...deadState.selected].filter((k) => keys.has(k)));
  renderDead();
}

function renderDead() {
  const { letters, total, selected, open } = deadState;
  const disabled = canAct ? "" : "disabled";
  const n = selected.size;
  document.getElementById("dead-actions").innerHTML = `
    <span id="dead-total">${plural(total, "dead letter")} match${total === 1 ? "es" : ""}</span>
    <button id="replay-selected" ${n && canAct ? "" : "disabled"}>Replay selected (${n})</button>
    <button id="purge-selected" ${n && canAct ? "" : "disabled"}>Purge selected (${n})</button>
    <button id="replay-all" ${total && canAct ? "" : "disabled"}>Replay all matching (${total})</button>
    <button id="purge-all" class="danger" ${total && canAct ? "" : "disabled"}>Purge all matching (${total})</button>
    <button id="dead-refresh">Refresh</button>
    ${canAct ? "" : `<span class="note">read only: the dashboard's auth hook allows no actions</span>`}`;
  const rows = letters.map((d, i) => {
    const k = key(d);
    const row = `<tr class="letter${open === k ? " open" : ""}" data-index="${i}" data-event-id="${esc(d.event_id)}">
      <td><input type="checkbox" data-select="${i}" ${selected.has(k) ? "checked" : ""} ${disabled}></td>
      <td class="name">${esc(d.event_id)}</td><td>${esc(d.name)}</td><td class="name">${esc(d.listener)}</td>
      <td class="num">${esc(d.attempts)}</td><td>${when(d.failed_at)}</td><td class="error">${esc(d.error)}</td></tr>`;
    if (open !== k) return row;
    return row + `<tr class="detail" data-detail="${esc(d.event_id)}"><td></td><td colspan="6">
      <dl><dt>event id</dt><dd class="name">${esc(d.event_id)}</dd>
      <dt>emitted at</dt><dd>${when(d.emitted_at)}</dd>
      <dt>attempts</dt><dd>${esc(d.attempts)}</dd>
      <dt>payload</dt><dd><pre class="json">${esc(JSON.stringify(d.payload, null, 2))}</pre></dd>
      <dt>headers</dt><dd><pre class="json">${esc(JSON.stringify(d.headers, null, 2))}</pre></dd>
      <dt>traceback</dt><dd><pre>${esc(d.traceback || d.error)}</pre></dd></dl>
      <div class="actions"><button class="primary" data-replay-one="${i}" ${disabled}>Replay this one</button>
      <button class="danger" data-purge-one="${i}" ${disabled}>Purge this one</button></div></td></tr>`;
  }).join("");
  document.getElementById("dead-results").innerHTML = letters.length ? `
    <table id="dead-letters"><thead><tr><th><input type="checkbox" id="select-all" ${disabled}></th><th>event id</th><th>event</th>
    <th>listener</th><th class="num">attempts</th><th>failed at</th><th>error</th></tr></thead><tbody>${rows}</tbody></table>
    ${total > letters.length ? `<p class="note">Showing the newest ${letters.length}; the actions on all matching apply to ${total}.</p>` : ""}`
    : `<p class="note" id="dead-none">No dead letter matches.</p>`;
  bindDead();
}

function bindDead() {
  const { letters } = deadState;
  document.querySelectorAll("tr.letter").forEach((tr) => {
    tr.onclick = (e) => {
      if (e.target.tagName === "INPUT") return;
      const k = key(letters[Number(tr.dataset.index)]);
      deadState.open = deadState.open === k ? null : k;
      renderDead();
    };
  });
  document.querySelectorAll("[data-select]").forEach((box) => {
    box.onchange = () => {
      const k = key(letters[Number(box.dataset.select)]);
      if (box.checked) deadState.selected.add(k); else deadState.selected.delete(k);
      renderDead();
    };
  });
  const all = document.getElementById("select-all");
  if (all) {
    all.onchange = () => {
      deadState.selected = all.checked ? new Set(letters.map(key)) : new Set();
      renderDead();
    };
  }
  const chosen = () => letters.filter((d) => deadState.selected.has(key(d)));
  const pairs = (list) => list.map((d) => ({ event_id: d.event_id, listener: d.listener }));
  const on = (id, fn) => { const el = document.getElementById(id); if (el) el.onclick = fn; };
  on("dead-refresh", () => loadDead());
  on("replay-selected", () => run("replay", { letters: pairs(chosen()) }, chosen().length));
  on("purge-selected", () => run("purge", { letters: pairs(chosen()) }, chosen().length));
  on("replay-all", () => run("replay", { filter: deadState.filter }, deadState.total, true));
  on("purge-all", () => run("purge", { filter: deadState.filter }, deadState.total, true));
  document.querySelectorAll("[data-replay-one]").forEach((b) => {
    b.onclick = () => run("replay", { letters: pairs([letters[Number(b.dataset.replayOne)]]) }, 1);
  });
  document.querySelectorAll("[data-purge-one]").forEach((b) => {
    b.onclick = () => run("purge", { letters: pairs([letters[Number(b.dataset.purgeOne)]]) }, 1);
  });
}

async function run(verb, payload, count, matching = false) {
  const what = plural(count, "dead letter");
  const text = verb === "purge"
    ? `Purge ${what}${matching ? " matching this search" : ""}? They are deleted for good.`
    : `Replay ${what}${matching ? " matching this search" : ""}? Each is delivered again with fresh attempts.`;
  if (!(await confirmThat(text))) return;
  try {
    const result = await act(`dead/${verb}`, payload);
    toast(`${verb === "purge" ? "Purged" : "Replayed"} ${plural(result.count, "dead letter")}`);
  } catch (err) {
    toast(`Failed: ${err.message}`);
  }
  deadState.selected = new Set();
  deadState.open = null;
  await loadDead();
}

// -- schedules and delayed -------------------------------------------------------------

async function schedulesPage() {
  const data = await api("schedules");
  const rows = data.schedules.map((s) => `<tr><td class="name">${esc(s.cron)}</td><td>${esc(s.event)}</td>
    <td>${when(s.last)} <span class="note">(${relative(s.last)})</span></td>
    <td>${when(s.next)} <span class="note">(${relative(s.next)})</span></td>
    <td class="name">${esc(JSON.stringify(s.payload.kwargs))}</td></tr>`).join("");
  page.innerHTML = `<h1>Schedules</h1>
    <table id="schedules"><thead><tr><th>cron (UTC)</th><th>event</th><th>last tick</th><th>next tick</th><th>payload</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="5" class="note">No schedule on this bus.</td></tr>`}</tbody></table>`;
}

async function delayedPage() {
  const data = await api("delayed?within_s=3600");
  const rows = Object.entries(data.listeners).map(([name, f]) =>
    `<tr><td class="name">${esc(name)}</td>${num(f.delayed)}${num(f.retrying)}</tr>`).join("");
  const events = data.events === null ? `<p class="note">This backend counts delayed deliveries but does not list them one by one.</p>`
    : data.events.length ? `<table id="delayed-events"><thead><tr><th>due</th><th>event</th><th>event id</th><th>emitted at</th></tr></thead><tbody>
      ${data.events.map((e) => `<tr><td>${when(e.due)} <span class="note">(${relative(e.due)})</span></td><td>${esc(e.name)}</td>
      <td class="name">${esc(e.event_id)}</td><td>${when(e.created)}</td></tr>`).join("")}</tbody></table>`
    : `<p class="note">Nothing due within the hour.</p>`;
  page.innerHTML = `<h1>Delayed deliveries</h1>
    <table id="delayed"><thead><tr><th>listener</th><th class="num">delayed</th><th class="num">retrying later</th></tr></thead>
    <tbody>${rows || `<tr><td colspan="3" class="note">Nothing waits.</td></tr>`}</tbody></table>
    <h2>Events due within the hour</h2>${events}`;
}

// -- routing ---------------------------------------------------------------------------

function route() {
  clearInterval(timer);
  timer = null;
  const hash = location.hash.slice(1) || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  let view;
  let poll = false;
  let nav = "overview";
  if (path.startsWith("/listener/")) {
    const name = decodeURIComponent(path.slice("/listener/".length));
    view = () => listenerPage(name);
    poll = true;
  } else if (path === "/dead") {
    view = () => deadPage(params);
    nav = "dead";
  } else if (path === "/schedules") {
    view = schedulesPage;
    poll = true;
    nav = "schedules";
  } else if (path === "/delayed") {
    view = delayedPage;
    poll = true;
    nav = "delayed";
  } else {
    view = overview;
    poll = true;
  }
  document.querySelectorAll("[data-nav]").forEach((a) => {
    a.classList.toggle("active", a.dataset.nav === nav);
  });
  const show = async () => {
    // A refresh redraws the page: tracebacks someone opened stay open.
    const open = new Set([...page.querySelectorAll("details[open]")].map((d) => d.dataset.key));
    try {
      await view();
      page.querySelectorAll("details[data-key]").forEach((d) => {
        if (open.has(d.dataset.key)) d.open = true;
      });
    } catch (err) {
      page.innerHTML = `<p class="error">Could not load: ${esc(err.message)}</p>`;
    }
  };
  show();
  if (poll) timer = setInterval(show, POLL_MS);
}

window.addEventListener("hashchange", route);
route();
