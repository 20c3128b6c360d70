// The aioqueue dashboard: one page, its views chosen by the URL's #hash, live over SSE.
"use strict";

const page = document.getElementById("page");
const STATES = ["queued", "running", "retrying", "succeeded", "failed", "dead-lettered", "cancelled"];
let view = null;          // the current view: {name, arg, onLive(message)}
let overviewTimer = null;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : ""; }
function secs(d) { return d == null ? "" : d < 1 ? (d * 1000).toFixed(1) + " ms" : d.toFixed(2) + " s"; }
function state(s) { return `<span class="state s-${esc(s)}">${esc(s)}</span>`; }

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}
async function act(path, body) {
  return api(path, { method: "POST", body: JSON.stringify(body || {}),
    headers: { "Content-Type": "application/json", "X-Aioqueue-Dashboard": "1" } });
}
// the last message of the current view: kept across its live redraws, cleared by a new view
let said = "";
function say(text) { said = text; const m = document.getElementById("message"); if (m) m.textContent = text; }

// -- overview ----------------------------------------------------------------------------
function chart(title, el, series, data, width) {
  // the last hour at least, so that a few points do not stretch the axis over years
  const now = Date.now() / 1000;
  // (from the data itself: uPlot widens a single point's range by 1000 days on a seconds axis)
  const range = (u) => {
    const xs = u.data[0];
    const first = xs.length ? xs[0] : now, last = xs.length ? xs[xs.length - 1] : now;
    return [Math.min(first, now - 3600), Math.max(last, now) + 60];
  };
  return new uPlot({ title, width, height: 220, series: [{}, ...series],
    axes: [{}, { size: 60 }], scales: { x: { time: true, range } } }, data, el);
}
async function overview() {
  page.innerHTML = `<div class="cards" id="cards"></div><div class="charts">
    <div class="chart" id="c-throughput"></div><div class="chart" id="c-failures"></div>
    <div class="chart" id="c-runtime"></div></div>`;
  const draw = async () => {
    const o = await api("/api/overview");
    document.getElementById("cards").innerHTML =
      `<div class="card">workers online<b id="workers-online">${o.workers_online}</b></div>` +
      STATES.map((s) => `<div class="card">${s}<b id="count-${s}">${o.states[s] || 0}</b></div>`).join("") +
      `<div class="card">events read<b>${o.events_seen}</b></div>`;
    const x = o.series.map((m) => m.t);
    const col = (k) => o.series.map((m) => m[k]);
    const width = Math.max(320, Math.min(600, page.clientWidth / 3 - 30));
    for (const id of ["c-throughput", "c-failures", "c-runtime"]) document.getElementById(id).innerHTML = "";
    chart("Tasks per minute", document.getElementById("c-throughput"),
      [{ label: "succeeded", stroke: "#217a3c" }, { label: "failed", stroke: "#b3261e" },
       { label: "retried", stroke: "#8a6d00" }], [x, col("succeeded"), col("failed"), col("retried")], width);
    chart("Failure rate", document.getElementById("c-failures"),
      [{ label: "failed / finished", stroke: "#b3261e" }], [x, col("failure_rate")], width);
    chart("Run time (s)", document.getElementById("c-runtime"),
      [{ label: "p50", stroke: "#1f5fbf" }, { label: "p90", stroke: "#7a3fbf" },
       { label: "p99", stroke: "#b3261e" }], [x, col("p50"), col("p90"), col("p99")], width);
  };
  await draw();
  let pending = false;
  return { onLive() {
    if (pending) return;
    pending = true;
    overviewTimer = setTimeout(() => { pending = false; draw().catch(() => {}); }, 2000);
  } };
}

// -- tasks -------------------------------------------------------------------------------
function taskRow(t) {
  return `<tr data-task-id="${esc(t.id)}"><td><a href="#task/${encodeURIComponent(t.id)}">${esc(t.id)}</a></td>
    <td>${esc(t.name)}</td><td class="state s-${esc(t.state)}">${esc(t.state)}</td><td>${esc(t.queue)}</td>
    <td>${esc(t.attempt)}</td><td>${when(t.received)}</td><td>${secs(t.duration)}</td>
    <td>${esc(t.worker)}</td><td>${esc((t.error || "").slice(0, 120))}</td></tr>`;
}
async function tasks(arg) {
  const q = new URLSearchParams(arg || "");
  page.innerHTML = `<form class="filters" id="filters">
    <input name="id" placeholder="find by task id">
    <input name="name" placeholder="task name" value="${esc(q.get("name"))}">
    <select name="state"><option value="">any state</option>${STATES.map((s) =>
      `<option${q.get("state") === s ? " selected" : ""}>${s}</option>`).join("")}</select>
    <input name="queue" placeholder="queue" value="${esc(q.get("queue"))}">
    <input name="since" placeholder="since (minutes ago)" value="${esc(q.get("since"))}">
    <button>Filter</button></form>
    <table><thead><tr><th>id</th><th>task</th><th>state</th><th>queue</th><th>attempt</th>
    <th>received</th><th>run time</th><th>worker</th><th>error</th></tr></thead>
    <tbody id="task-rows"></tbody></table>`;
  document.getElementById("filters").onsubmit = (e) => {
    e.preventDefault();
    const f = new FormData(e.target);
    if (f.get("id")) { location.hash = "task/" + encodeURIComponent(f.get("id").trim()); return; }
    f.delete("id");
    location.hash = "tasks/" + new URLSearchParams([...f].filter(([, v]) => v)).toString();
  };
  const filters = { name: q.get("name"), state: q.get("state"), queue: q.get("queue") };
  const params = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
  if (q.get("since")) params.set("since", Date.now() / 1000 - 60 * Number(q.get("since")));
  const rows = document.getElementById("task-rows");
  const data = await api("/api/tasks?" + params);
  rows.innerHTML = data.tasks.map(taskRow).join("");
  const matches = (t) => (!filters.name || (t.name || "").includes(filters.name)) &&
    (!filters.state || t.state === filters.state) && (!filters.queue || t.queue === filters.queue);
  return { onLive(message) {
    for (const t of message.tasks || []) {
      const old = rows.querySelector(`tr[data-task-id="${CSS.escape(t.id)}"]`);
      if (!matches(t)) { if (old) old.remove(); continue; }
      const tmp = document.createElement("tbody");
      tmp.innerHTML = taskRow(t);
      if (old) old.replaceWith(tmp.firstElementChild); else rows.prepend(tmp.firstElementChild);
    }
    while (rows.children.length > 500) rows.lastElementChild.remove();
  } };
}

// -- task --------------------------------------------------------------------------------
function bindCancel(id) {
  const cancel = document.getElementById("cancel");
  if (cancel) cancel.onclick = async () => {
    if (!confirm("Cancel task " + id + "?")) return;
    try { await act(`/api/tasks/${encodeURIComponent(id)}/cancel`); say("cancel requested"); }
    catch (e) { say("cancel failed: " + e.message); }
  };
}
async function task(id) {
  const draw = async () => {
    let t;
    try { t = await api("/api/tasks/" + encodeURIComponent(id)); } catch (e) {
      // a task still waiting in its queue has no events yet: it can be cancelled all the same
      page.innerHTML = `<p id="not-found">Task ${esc(id)}: ${esc(e.message)} (no worker has taken
        it yet, or it is older than the dashboard's memory)</p><div id="message">${esc(said)}</div>
        <button id="cancel" class="danger">Cancel task ${esc(id)}</button>`;
      bindCancel(id);
      return;
    }
    const dead = t.dead_letter;
    const cancellable = ["queued", "running", "retrying"].includes(t.state);
    page.innerHTML = `<h2>${esc(t.name)} <small>${esc(t.id)}</small></h2><div id="message">${esc(said)}</div>
      <dl><dt>state</dt><dd id="task-state">${state(t.state)}</dd>
      <dt>queue</dt><dd>${esc(t.queue)}</dd><dt>attempt</dt><dd>${esc(t.attempt)} (retries ${esc(t.retries)})</dd>
      <dt>worker</dt><dd>${esc(t.worker)}</dd><dt>run time</dt><dd>${secs(t.duration)}</dd>
      <dt>arguments</dt><dd><code>${esc(t.args)}</code></dd>
      <dt>result</dt><dd><code id="task-result">${esc(t.result)}</code></dd>
      <dt>error</dt><dd id="task-error">${esc(t.error)}</dd></dl>
      ${cancellable ? '<button id="cancel" class="danger">Cancel this task</button>' : ""}
      ${t.traceback ? `<h3>Traceback</h3><pre id="traceback">${esc(t.traceback)}</pre>` : ""}
      <h3>Timeline</h3><table id="timeline"><thead><tr><th>time</th><th>event</th><th>attempt</th>
      <th>worker</th><th>detail</th></tr></thead><tbody>${t.timeline.map((e) =>
        `<tr><td>${when(e.time)}</td><td>${esc(e.type)}</td><td>${esc(e.attempt)}</td><td>${esc(e.worker)}</td>
        <td>${esc(e.error || e.reason || e.progress || (e.retry_in != null ? "retry in " + e.retry_in + " s" : "") ||
          (e.duration != null ? secs(e.duration) : ""))}</td></tr>`).join("")}</tbody></table>
      ${dead ? `<h3>Dead-letter copy</h3><dl id="dead-letter"><dt>reason</dt><dd>${esc(dead.reason)}</dd>
        <dt>when</dt><dd>${esc(dead.at)}</dd><dt>error</dt><dd>${esc(dead.error)}</dd></dl>
        ${dead.replayable ? '<button id="replay">Replay</button>' : ""}` : ""}`;
    bindCancel(id);
    const replay = document.getElementById("replay");
    if (replay) replay.onclick = async () => {
      try { const r = await act(`/api/queues/${encodeURIComponent(t.queue)}/replay`, { ids: [id] });
        say(`replayed ${r.replayed}`); } catch (e) { say("replay failed: " + e.message); }
    };
  };
  await draw();
  return { onLive(message) {
    if ((message.tasks || []).some((t) => t.id === id)) draw().catch(() => {});
  } };
}

// -- workers, queues, schedules ----------------------------------------------------------
async function workers() {
  const draw = async () => {
    const { workers } = await api("/api/workers");
    page.innerHTML = `<table id="workers"><thead><tr><th>worker</th><th>status</th><th>app</th><th>queues</th>
      <th>concurrency</th><th>running</th><th>processed</th><th>last heartbeat</th></tr></thead><tbody>
      ${workers.map((w) => `<tr data-worker="${esc(w.identity)}"><td>${esc(w.identity)}</td>
        <td class="state ${w.online ? "s-succeeded" : "s-cancelled"}">${w.online ? "online" : "offline"}</td>
        <td>${esc(w.app)}</td><td>${esc(w.queues.join(", "))}</td><td>${esc(w.concurrency)}</td>
        <td>${w.running.map((r) => `<a href="#task/${encodeURIComponent(r.id)}">${esc(r.name)}</a>`).join("<br>")}</td>
        <td>${esc(w.processed)}</td><td>${when(w.last_heartbeat)}</td></tr>`).join("")}</tbody></table>`;
  };
  await draw();
  return { onLive(message) { if ((message.workers || []).length) draw().catch(() => {}); } };
}

async function queues(arg) {
  const draw = async () => {
    const { queues } = await api("/api/queues");
    page.innerHTML = `<div id="message">${esc(said)}</div><table id="queues"><thead><tr><th>queue</th><th>depth</th>
      <th>consumers</th><th>in / min</th><th>out / min</th><th>dead letters</th><th></th></tr></thead><tbody>
      ${queues.map((q) => `<tr data-queue="${esc(q.name)}"><td>${esc(q.name)}</td><td>${q.depth}</td>
        <td>${q.consumers}</td><td>${q.in_per_min}</td><td>${q.out_per_min}</td><td class="dead">${q.dead}</td>
        <td><a href="#queues/${encodeURIComponent(q.name)}">browse dead letters</a></td></tr>`).join("")}
      </tbody></table><div id="dead"></div>`;
    if (arg) await deadLetters(arg);
  };
  await draw();
  return { onLive() {} };
}
async function deadLetters(queue) {
  const { dead_letters: letters } = await api(`/api/queues/${encodeURIComponent(queue)}/dead`);
  const box = document.getElementById("dead");
  box.innerHTML = `<h3>Dead letters of ${esc(queue)}</h3>
    <button id="purge" class="danger">Purge all</button>
    <table id="dead-letters"><thead><tr><th>task id</th><th>task</th><th>reason</th><th>when</th><th>error</th>
    <th></th></tr></thead><tbody>${letters.map((d) => `<tr data-dead-id="${esc(d.id)}">
      <td><a href="#task/${encodeURIComponent(d.id)}">${esc(d.id)}</a></td><td>${esc(d.task)}</td>
      <td>${esc(d.reason)}</td><td>${esc(d.at)}</td><td>${esc(d.error)}</td>
      <td>${d.replayable ? `<button class="replay" data-id="${esc(d.id)}">Replay</button>` : ""}</td></tr>`).join("")}
    </tbody></table>`;
  for (const b of box.querySelectorAll("button.replay")) b.onclick = async () => {
    try { const r = await act(`/api/queues/${encodeURIComponent(queue)}/replay`, { ids: [b.dataset.id] });
      say(`replayed ${r.replayed} dead letter(s)`); await deadLetters(queue); }
    catch (e) { say("replay failed: " + e.message); }
  };
  document.getElementById("purge").onclick = async () => {
    if (!confirm(`Delete every dead letter of ${queue}?`)) return;
    try { const r = await act(`/api/queues/${encodeURIComponent(queue)}/purge`);
      say(`purged ${r.purged} dead letter(s)`); await deadLetters(queue); }
    catch (e) { say("purge failed: " + e.message); }
  };
}

async function schedules() {
  const data = await api("/api/schedules");
  page.innerHTML = `<p>Lease ${data.lease_held ? "held by a scheduler" : "not held: no scheduler is leading"}</p>
    <table id="schedules"><thead><tr><th>schedule</th><th>task</th><th>when</th><th>next slot</th>
    <th>last fired slot</th><th>fired by (leader)</th></tr></thead><tbody>${data.schedules.map((s) =>
      `<tr><td>${esc(s.name)}</td><td>${esc(s.task)}</td><td>${esc(s.when)}</td><td>${esc(s.next)}</td>
      <td>${esc(s.last || "never")}</td><td>${esc(s.leader)}</td></tr>`).join("")}</tbody></table>`;
  return { onLive() {} };
}

// -- routing and the live stream ---------------------------------------------------------
const VIEWS = { overview, tasks, task, workers, queues, schedules };
async function route() {
  clearTimeout(overviewTimer);
  said = "";
  const [name, ...rest] = (location.hash.slice(1) || "overview").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.hash === "#" + name);
  view = null;
  try { view = await (VIEWS[name] || overview)(arg); }
  catch (e) { page.innerHTML = `<p class="s-failed">${esc(e.message)}</p>`; }
  document.body.dataset.view = name;
}
function live() {
  const source = new EventSource("/api/stream");
  const badge = document.getElementById("live");
  source.onopen = () => { badge.textContent = "live"; badge.className = "on"; };
  source.onerror = () => { badge.textContent = "reconnecting"; badge.className = "off"; };
  source.onmessage = (e) => {
    const message = JSON.parse(e.data);
    if (message.resync) { route(); return; }
    if (view) view.onLive(message);
  };
}
window.addEventListener("hashchange", route);
route();
live();
