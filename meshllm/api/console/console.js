// meshllm console: renders /api/events (a snapshot of /api/status, then changes) and chats through
// /api/chat/completions. No framework; see meshllm/api/console/__init__.py for the token handling.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "meshllm.console.token";
const view = { status: null, lastId: "", events: [] };

// -- the admin token: from the #token= fragment once, then sessionStorage ------------------------
(function takeTokenFromFragment() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
})();

function authHeaders(extra) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return Object.assign(token ? { Authorization: "Bearer " + token } : {}, extra || {});
}

function askToken(why) {
  $("token-form").hidden = false;
  $("token-why").textContent = why || "";
  $("token-input").focus();
}

$("token-button").addEventListener("click", () => askToken(""));
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = $("token-input").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  $("token-input").value = "";
  $("token-form").hidden = true;
  reconnect();
  loadBoard();
});

// -- the event stream, read with fetch so that it can carry the token ----------------------------
let streamAbort = null;

function reconnect() {
  if (streamAbort) streamAbort.abort();
  streamAbort = new AbortController();
  readEvents(streamAbort.signal).catch(() => {}).finally(() => setLink(false));
}

async function readEvents(signal) {
  for (;;) {
    try {
      const headers = authHeaders(view.lastId ? { "Last-Event-ID": view.lastId } : {});
      const response = await fetch("/api/events", { headers, signal, cache: "no-store" });
      if (response.status === 401) {
        askToken("This console needs the admin token to show the mesh.");
        return;
      }
      if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
      setLink(true);
      await readStream(response.body.getReader());
    } catch (err) {
      if (signal.aborted) return;
    }
    setLink(false);
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function readStream(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: "", name: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("id: ")) event.id = line.slice(4);
        else if (line.startsWith("event: ")) event.name = line.slice(7);
        else if (line.startsWith("data: ")) event.data += line.slice(6);
      }
      if (event.data) onEvent(event);
    }
  }
}

function setLink(live) {
  $("link").textContent = live ? "live" : "reconnecting…";
  $("link").classList.toggle("live", live);
}

function onEvent(event) {
  const data = JSON.parse(event.data);
  if (event.id) view.lastId = event.id;
  const before = view.status && summary(view.status); // changes are applied in place: keep what was
  if (event.name === "snapshot") view.status = data;
  else if (event.name === "change" && view.status) applyChange(view.status, data);
  if (view.status) noteEvents(before, summary(view.status));
  render();
}

function applyChange(status, change) {
  Object.assign(status, change.set || {});
  const keys = { nodes: "id", models: "name" };
  for (const [table, key] of Object.entries(keys)) {
    const removed = new Set((change.removed || {})[table] || []);
    const put = (change.put || {})[table] || [];
    const byKey = new Map(status[table].filter((e) => !removed.has(e[key])).map((e) => [e[key], e]));
    for (const entry of put) byKey.set(entry[key], entry);
    status[table] = [...byKey.values()].sort((a, b) => (a[key] < b[key] ? -1 : 1));
  }
}

// -- recent events, told from the difference of two states --------------------------------------
function summary(s) {
  return { me: nodeName(s, s.node.id), names: new Map(s.nodes.map((n) => [n.id, nodeName(s, n.id)])),
    alive: new Set(s.nodes.filter((n) => n.state === "alive").map((n) => n.id)),
    models: new Map(s.models.map((m) => [m.name, condition(m)])) };
}

function noteEvents(before, after) {
  if (!before) { log("connected to node " + after.me); return; }
  for (const id of after.alive) if (!before.alive.has(id)) log("node " + after.names.get(id) + " joined");
  for (const id of before.alive) if (!after.alive.has(id)) log("node " + before.names.get(id) + " left");
  for (const [name, cond] of after.models) {
    if (!before.models.has(name)) log("model " + name + " added: " + cond);
    else if (before.models.get(name) !== cond) log("model " + name + ": " + cond);
  }
  for (const name of before.models.keys()) if (!after.models.has(name)) log("model " + name + " removed");
}

function log(text) {
  view.events.unshift(new Date().toLocaleTimeString() + "  " + text);
  view.events.length = Math.min(view.events.length, 50);
}

// -- rendering -----------------------------------------------------------------------------------
const gib = (bytes) => (bytes >= 2 ** 30 ? (bytes / 2 ** 30).toFixed(bytes >= 10 * 2 ** 30 ? 0 : 1) + " GiB"
  : (bytes / 2 ** 20).toFixed(bytes >= 10 * 2 ** 20 ? 0 : 1) + " MiB");
const condition = (m) => (m.condition ? m.condition.phase : m.phase[0].toUpperCase() + m.phase.slice(1));
const nodeName = (s, id) => { const n = s.nodes.find((x) => x.id === id); return n && n.name ? n.name : id.slice(0, 8); };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function bar(pct) {
  const span = el("span", {});
  span.style.width = pct.toFixed(1) + "%"; // a CSSOM write: the page's CSP allows no inline style attribute
  return span;
}

function roleOf(s, node) {
  if (node.role === "client") return "client";
  if (node.role === "viewer") return "no node";
  if (s.models.some((m) => m.servers.some((x) => x.node === node.id))) return "serving";
  if (s.models.some((m) => m.workers.some((w) => w.node === node.id))) return "split worker";
  return "standby";
}

function render() {
  const s = view.status;
  if (!s) return;
  const readonly = Boolean(s.readonly);
  $("mesh").textContent = readonly ? "read-only console · no node runs on this machine"
    : "mesh " + (s.mesh_id || "?") + " · via node " + nodeName(s, s.node.id);
  for (const id of ["lobby", "meshes-section"]) $(id).hidden = !readonly;
  for (const id of ["models-section", "chat-section", "token-button"]) $(id).hidden = readonly;
  if (readonly) renderLobby(s);
  renderNodes(s);
  renderModels(s);
  $("events").replaceChildren(...view.events.map((t) => el("li", {}, t)));
}

function renderNodes(s) {
  const items = s.nodes.filter((n) => n.state === "alive").map((n) => {
    const used = s.models.reduce((sum, m) => sum + (m.servers.some((x) => x.node === n.id && x.phase !== "failed")
      ? m.size_bytes || 0 : 0), 0);
    const alive = new Set(s.nodes.filter((x) => x.state === "alive").map((x) => x.id));
    const rtts = Object.entries(n.rtt_ms || {}).filter(([peer]) => alive.has(peer)).map(([peer, ms]) => nodeName(s, peer) + " " + ms.toFixed(1) + " ms");
    const role = roleOf(s, n);
    const li = el("li", { "data-node": n.id, "data-role": role },
      el("span", { class: "badge role" }, role), el("strong", {}, n.name || n.id.slice(0, 8)),
      el("div", { class: "muted" }, n.id.slice(0, 12) + (n.id === s.node.id ? " (this node)" : "")));
    if (role !== "client") li.append(...memoryBars(n, used));
    if (rtts.length) li.append(el("div", { class: "muted" }, "links: " + rtts.join(", ")));
    return li;
  });
  $("nodes").replaceChildren(...items);
}

function renderLobby(s) {
  $("lobby-hint").textContent = s.hint || "";
  const rows = (s.meshes || []).map((m) => el("tr", { "data-mesh": m.mesh_id },
    el("th", { scope: "row" }, m.name || m.mesh_id.slice(0, 12)), el("td", {}, m.models.join(", ") || "—"),
    el("td", {}, String(m.nodes)), el("td", {}, String(m.clients)), el("td", {}, m.region || "—"),
    el("td", {}, m.age_s + " s"), el("td", {}, el("code", {}, m.join))));
  $("meshes").tBodies[0].replaceChildren(...rows);
  $("meshes-none").hidden = rows.length > 0;
}

// One bar per GPU where a node has several (llama-server spreads layers over them by memory, so each
// GPU's share of what the node holds is estimated in that proportion: "≈"), else one for the node.
function memoryBars(n, used) {
  const gpus = n.gpus || [];
  const parts = gpus.length > 1 ? gpus.map((g, i) => ({ label: "GPU " + i + " " + g.name, size: g.bytes,
    used: n.capacity_bytes ? Math.round((used * g.bytes) / n.capacity_bytes) : 0, approx: "≈ " }))
    : [{ label: gpus.length ? gpus[0].name : "memory", size: n.capacity_bytes, used, approx: "" }];
  return parts.flatMap((p) => [
    el("div", { class: "bar", role: "meter", "aria-label": p.label + " used on " + (n.name || n.id),
      "aria-valuemin": "0", "aria-valuemax": String(p.size), "aria-valuenow": String(p.used) },
    bar(p.size ? Math.min(100, (100 * p.used) / p.size) : 0)),
    el("div", { class: "muted" }, (gpus.length > 1 ? p.label + ": " : "") + p.approx + gib(p.used) + " of " +
      gib(p.size) + " used")]);
}

function throughput(s, m) {
  const figures = (s.metrics || {})[m.name];
  if (!figures) return "—";
  return figures.requests + " req, " + figures.tokens_out + " tok out" +
    (figures.ttft_avg_s ? ", TTFT " + (1000 * figures.ttft_avg_s).toFixed(0) + " ms" : "") +
    (figures.decode_avg_tps ? ", " + figures.decode_avg_tps.toFixed(1) + " tok/s" : "") +
    (figures.waiting ? ", " + figures.waiting + " queued" : "");
}

function renderModels(s) {
  const rows = s.models.map((m) => {
    const cond = condition(m);
    const servers = m.servers.map((x) => nodeName(s, x.node) + " (" + x.phase + ")").join(", ") || "—";
    const cost = (m.condition && m.condition.split_cost) || "";  // what the split adds a token (split_cost.py)
    const split = m.workers.length ? "host + " + m.workers.map((w) => nodeName(s, w.node)).join(", ") +
      (cost ? ", " + cost.split(" (")[0] : "") : "—";
    const demand = m.demand ? m.demand.rate.toFixed(1) + "/min (" + m.demand.count + ")" : "—";
    return el("tr", { "data-model": m.name, "data-condition": cond },
      el("th", { scope: "row" }, m.name), el("td", { class: cond }, cond),
      el("td", {}, servers), el("td", cost ? { title: cost } : {}, split), el("td", {}, demand), el("td", {}, throughput(s, m)));
  });
  $("models").tBodies[0].replaceChildren(...rows);
  const select = $("chat-model"), chosen = select.value;
  const ready = s.models.filter((m) => condition(m) === "Ready" || m.phase === "ready").map((m) => m.name);
  if (ready.join() !== [...select.options].map((o) => o.value).join()) {
    select.replaceChildren(...ready.map((name) => el("option", { value: name }, name)));
    if (ready.includes(chosen)) select.value = chosen;
  }
}

// -- chat ----------------------------------------------------------------------------------------
$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("chat-output"), stats = $("chat-stats");
  out.textContent = "";
  stats.textContent = "sending…";
  const key = $("chat-key").value.trim();
  const body = { model: $("chat-model").value, stream: true, max_tokens: Number($("chat-max").value),
    temperature: Number($("chat-temp").value), messages: [{ role: "user", content: $("chat-prompt").value }] };
  const started = performance.now();
  const response = await fetch("/api/chat/completions", { method: "POST", body: JSON.stringify(body),
    headers: authHeaders(Object.assign({ "Content-Type": "application/json" }, key ? { "X-Meshllm-Api-Key": key } : {})) });
  if (response.status === 401) { askToken("Chatting needs the admin token."); stats.textContent = ""; return; }
  if (!response.ok) { stats.textContent = "error: " + (await errorText(response)); return; }
  let first = 0, chunks = 0, usage = null;
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const chunk = JSON.parse(line.slice(6));
      if (chunk.error) { stats.textContent = "error: " + chunk.error.message; return; }
      const text = ((chunk.choices || [])[0] || {}).delta?.content || "";
      if (text) { if (!first) first = performance.now(); chunks += 1; out.textContent += text; }
      if (chunk.usage) usage = chunk.usage;
      if (chunk.timings) usage = { completion_tokens: chunk.timings.predicted_n };
    }
  }
  const end = performance.now(), tokens = usage ? usage.completion_tokens : chunks;
  stats.textContent = "time to first token " + (first ? (first - started).toFixed(0) : "—") + " ms · " + tokens +
    " tokens · " + (first && end > first ? ((1000 * tokens) / (end - first)).toFixed(1) : "—") + " tok/s";
  $("chat-output").dataset.done = "1";
});

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return "HTTP " + response.status; }
}

// -- blackboard (needs the token; shown when we have it) -----------------------------------------
async function loadBoard() {
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  try {
    const response = await fetch("/api/blackboard", { headers: authHeaders() });
    if (!response.ok) return;
    const items = (await response.json()).items || [];
    $("board").replaceChildren(...items.slice(0, 20).map((i) =>
      el("li", {}, (i.author || "?") + " @ " + (i.node_name || i.node) + ": " + i.text)));
    $("board-section").hidden = false;
  } catch { /* the board is optional */ }
}

reconnect();
loadBoard();
setInterval(loadBoard, 15000);
