// The gateway's page: one WebSocket to /ws on this page's own host, speaking the JSON
// envelope of docs/protocol.md. Everything received is rendered as text (textContent), never
// as HTML.
"use strict";

const MAX_RESULTS = 20;
const MAX_MESSAGES = 50;
const MAX_LOG = 200;
// The subprotocol the gateway selects when a browser offers a token (docs/identity.md).
const PROTOCOL = "ipc-gateway.v1";
const REFUSED = "connection refused: a token may be required or invalid";

const $ = (id) => document.getElementById(id);

let ws = null;
let nextId = 1;
let nextSub = 1;
// JSON text of an id → the commands waiting for an answer with that id, oldest first.
const pending = new Map();
// sid → subscription state (its card, counters, credit).
const subs = new Map();

// ---- rendering helpers -------------------------------------------------------------------

// Builds an element; string children become text nodes, so nothing is parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function clip(text, max) {
  return text.length > max ? text.slice(0, max) + "…" : text;
}

function clock() {
  return new Date().toLocaleTimeString([], { hour12: false });
}

// The payload of an answer or message as text, and whether it came as base64.
function payload(message) {
  if (typeof message.data_b64 === "string") return "(base64) " + message.data_b64;
  if (message.data === undefined || message.data === null) return "";
  return typeof message.data === "string" ? message.data : JSON.stringify(message.data);
}

function headersText(message) {
  if (!message.headers || typeof message.headers !== "object") return null;
  const parts = Object.entries(message.headers).map(([k, v]) =>
    k + ": " + (Array.isArray(v) ? v.join(", ") : String(v)));
  return parts.length ? parts.join("; ") : null;
}

function trim(list, max) {
  while (list.children.length > max) list.lastElementChild.remove();
}

function log(text, kind) {
  const list = $("log");
  list.prepend(el("li", { class: kind || "" }, el("time", {}, clock()), " ", clip(text, 300)));
  trim(list, MAX_LOG);
}

function outcome(id, text, ok) {
  const node = $(id);
  node.textContent = text;
  node.className = "outcome " + (ok ? "ok" : "err");
}

// ---- connection --------------------------------------------------------------------------

function gatewayUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function setState(state, detail, problem) {
  const node = $("state");
  node.textContent = state;
  node.dataset.state = state;
  $("state-detail").textContent = detail || "";
  $("state-detail").className = problem ? "err" : "muted";
  const open = state === "connected";
  $("connect").disabled = state === "connecting" || open;
  $("connect").textContent = state === "disconnected" && ws !== null ? "Reconnect" : "Connect";
  $("disconnect").disabled = !open && state !== "connecting";
  $("ping").disabled = !open;
  for (const id of ["req-send", "pub-send", "sub-send"]) $(id).disabled = !open;
}

// The token typed into the page, if any. It is read when connecting and lives only in the
// field: never stored, never logged. A pasted "Bearer " prefix is dropped.
function token() {
  return $("token").value.trim().replace(/^bearer\s+/i, "");
}

// A browser cannot set headers on a WebSocket, so a token goes in the subprotocol list as
// "bearer.<jwt>"; the gateway selects ipc-gateway.v1 and never echoes the token back.
// Without a token the socket is opened exactly as before, with no subprotocol.
function openSocket(url, bearer) {
  return bearer ? new WebSocket(url, [PROTOCOL, "bearer." + bearer]) : new WebSocket(url);
}

function connect(event) {
  if (event) event.preventDefault();
  if (ws && ws.readyState <= WebSocket.OPEN) return;
  const url = gatewayUrl();
  const bearer = token();
  const withToken = bearer ? " with a token" : "";
  $("url").textContent = url;
  let socket;
  try {
    socket = openSocket(url, bearer);
  } catch {
    // A subprotocol name is a restricted set of characters (a JWT is base64url and dots).
    setState("disconnected", "the token cannot be sent: it is not a JWT", true);
    log("the token has characters a JWT cannot have: not connected", "err");
    return;
  }
  ws = socket;
  let opened = false;
  setState("connecting");
  log("connecting to " + url + withToken);
  socket.onopen = () => {
    if (ws !== socket) return;
    opened = true;
    setState("connected", withToken.trim());
    log("connected" + withToken, "ok");
  };
  socket.onmessage = (event) => {
    if (ws !== socket) return;
    if (typeof event.data !== "string") {
      log("ignored a binary message", "err");
      return;
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      log("not JSON: " + event.data, "err");
      return;
    }
    receive(message, event.data);
  };
  socket.onclose = (event) => {
    if (ws !== socket) return;
    if (!opened) {
      // The browser does not say why an upgrade failed (a 401 looks like any other
      // failure), so the page names the likely cause.
      setState("disconnected", REFUSED, true);
      log(REFUSED, "err");
      connectionLost();
      return;
    }
    const why = "closed" + (event.code ? " with " + event.code : "") +
      (event.reason ? ": " + event.reason : "");
    setState("disconnected", why, event.code !== 1000);
    log(why, event.code === 1000 ? "" : "err");
    connectionLost();
  };
  socket.onerror = () => {
    if (ws === socket) log("WebSocket error (see the browser console)", "err");
  };
}

function disconnect() {
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "closed by the page");
}

// Every command still waiting will never be answered on this socket.
function connectionLost() {
  for (const waiting of pending.values()) {
    for (const command of waiting) command.settle({ ok: false, lost: true });
  }
  pending.clear();
  for (const sub of subs.values()) {
    if (sub.state === "active" || sub.state === "subscribing") setSubState(sub, "ended");
  }
}

function send(command, onAnswer) {
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    log("not connected: nothing sent", "err");
    return false;
  }
  if (onAnswer) {
    const key = JSON.stringify(command.id);
    if (!pending.has(key)) pending.set(key, []);
    pending.get(key).push({ settle: onAnswer });
  }
  const text = JSON.stringify(command);
  ws.send(text);
  if (command.op !== "credit") log("→ " + text, "out");
  return true;
}

function receive(message, text) {
  if (message.op === "msg") return onMsg(message);
  if (message.op === "dropped") return onDropped(message);
  log("← " + text, message.ok === false ? "err" : "in");
  const key = JSON.stringify(message.id === undefined ? null : message.id);
  const waiting = pending.get(key);
  if (!waiting || waiting.length === 0) return;
  const command = waiting.shift();
  if (waiting.length === 0) pending.delete(key);
  command.settle(message);
}

function errorText(answer) {
  if (answer.lost) return ["LOST", "the connection closed before the answer came"];
  const error = answer.error || {};
  let message = error.message || "";
  if (typeof error.retry_after_ms === "number") {
    message += " (retry after " + error.retry_after_ms + " ms)";
  }
  return [error.code || "ERROR", message];
}

// ---- request -----------------------------------------------------------------------------

function sendRequest(event) {
  event.preventDefault();
  const subject = $("req-subject").value.trim();
  const data = $("req-data").value;
  const timeout = Number($("req-timeout").value);
  const id = nextId++;
  const command = { op: "request", id, subject, data };
  if (Number.isInteger(timeout) && timeout > 0) command.timeout_ms = timeout;

  const badge = el("span", { class: "badge" }, "…");
  const latency = el("span", { class: "latency" }, "waiting");
  const body = el("div", { class: "body" });
  const row = el("li", { class: "result pending", "data-id": String(id) },
    el("div", { class: "line" }, badge, el("code", { class: "subject" }, subject), latency),
    body);
  $("req-results").prepend(row);
  trim($("req-results"), MAX_RESULTS);

  const started = performance.now();
  const sent = send(command, (answer) => {
    const ms = performance.now() - started;
    latency.textContent = answer.lost ? "" : ms.toFixed(1) + " ms";
    if (answer.ok) {
      row.className = "result ok";
      badge.textContent = "OK";
      body.textContent = payload(answer);
      const headers = headersText(answer);
      if (headers) body.append(el("div", { class: "headers" }, headers));
    } else {
      const [code, message] = errorText(answer);
      row.className = "result err";
      badge.textContent = code;
      body.textContent = message;
    }
  });
  if (!sent) {
    row.className = "result err";
    badge.textContent = "NOT SENT";
    latency.textContent = "";
    body.textContent = "not connected";
  }
}

// ---- publish -----------------------------------------------------------------------------

function sendPublish(event) {
  event.preventDefault();
  const subject = $("pub-subject").value.trim();
  const id = nextId++;
  const started = performance.now();
  const sent = send({ op: "publish", id, subject, data: $("pub-data").value }, (answer) => {
    if (answer.ok) {
      const ms = (performance.now() - started).toFixed(1);
      outcome("pub-result", "published on " + subject + " (acknowledged in " + ms + " ms)", true);
    } else {
      const [code, message] = errorText(answer);
      outcome("pub-result", code + ": " + message, false);
    }
  });
  if (sent) outcome("pub-result", "publishing on " + subject + "…", true);
  else outcome("pub-result", "not connected", false);
}

// ---- subscribe ---------------------------------------------------------------------------

function setSubState(sub, state, detail) {
  sub.state = state;
  sub.card.dataset.state = state;
  sub.stateNode.textContent = detail ? state + ": " + detail : state;
  sub.button.textContent = state === "active" || state === "subscribing" ? "Unsubscribe" : "Remove";
}

function sendSubscribe(event) {
  event.preventDefault();
  const subject = $("sub-subject").value.trim();
  const queue = $("sub-queue").value.trim();
  const credit = Number($("sub-credit").value);
  const sid = "s" + nextSub++;
  const command = { op: "subscribe", id: sid, subject };
  if (queue) command.queue = queue;
  if (Number.isInteger(credit) && credit > 0) command.credit = credit;

  const sub = {
    sid, subject, state: "subscribing", count: 0, dropped: 0,
    credit: command.credit || 0, owed: 0, flushQueued: false,
  };
  sub.countNode = el("b", { class: "count" }, "0");
  sub.droppedNode = el("b", { class: "dropped" }, "0");
  sub.stateNode = el("span", { class: "sub-state" });
  sub.button = el("button", { type: "button", class: "unsub" }, "Unsubscribe");
  sub.messages = el("ol", { class: "messages" });
  sub.card = el("article", { class: "sub", "data-sid": sid },
    el("div", { class: "line" },
      el("code", { class: "subject" }, subject),
      queue ? el("span", { class: "tag" }, "queue " + queue) : null,
      sub.credit ? el("span", { class: "tag" }, "credit " + sub.credit) : null,
      el("span", { class: "tag muted" }, sid),
      sub.stateNode),
    el("div", { class: "line stats" },
      el("span", {}, "messages ", sub.countNode),
      el("span", {}, "dropped ", sub.droppedNode),
      sub.button),
    sub.messages);
  sub.button.addEventListener("click", () => unsubscribe(sub));
  setSubState(sub, "subscribing");

  const sent = send(command, (answer) => {
    if (sub.state !== "subscribing") return;
    if (answer.ok) {
      setSubState(sub, "active");
      outcome("sub-result", "subscribed to " + subject + " as " + sid, true);
    } else {
      const [code, message] = errorText(answer);
      setSubState(sub, "failed", code);
      outcome("sub-result", code + ": " + message, false);
    }
  });
  if (!sent) return outcome("sub-result", "not connected", false);
  subs.set(sid, sub);
  $("subs").prepend(sub.card);
}

function unsubscribe(sub) {
  if (sub.state !== "active" && sub.state !== "subscribing") {
    sub.card.remove();
    subs.delete(sub.sid);
    return;
  }
  const sent = send({ op: "unsubscribe", id: sub.sid }, (answer) => {
    if (answer.ok) setSubState(sub, "unsubscribed");
    else setSubState(sub, "failed", errorText(answer)[0]);
  });
  if (sent) setSubState(sub, "unsubscribing");
}

function onMsg(message) {
  const sub = subs.get(message.sid);
  if (!sub) {
    log("message for unknown subscription " + message.sid, "err");
    return;
  }
  sub.count += 1;
  sub.countNode.textContent = String(sub.count);
  const headers = headersText(message);
  sub.messages.prepend(el("li", {},
    el("time", {}, clock()),
    el("code", { class: "subject" }, String(message.subject)),
    el("span", { class: "data" }, payload(message)),
    headers ? el("span", { class: "headers" }, headers) : null));
  trim(sub.messages, MAX_MESSAGES);
  grantCredit(sub);
}

function onDropped(message) {
  const sub = subs.get(message.sid);
  if (!sub) return;
  sub.dropped += Number(message.count) || 0;
  sub.droppedNode.textContent = String(sub.dropped);
  sub.card.classList.add("lossy");
  log("subscription " + message.sid + " lost " + message.count + " messages", "err");
}

// With credit flow control, each rendered message earns the gateway one more; grants are
// batched into one credit command per task.
function grantCredit(sub) {
  if (!sub.credit) return;
  sub.owed += 1;
  if (sub.flushQueued) return;
  sub.flushQueued = true;
  setTimeout(() => {
    sub.flushQueued = false;
    if (sub.owed > 0 && sub.state === "active") {
      send({ op: "credit", sid: sub.sid, n: sub.owed });
    }
    sub.owed = 0;
  }, 0);
}

// ---- wiring ------------------------------------------------------------------------------

function ping() {
  const started = performance.now();
  send({ op: "ping", id: nextId++ }, (answer) => {
    if (!answer.lost) log("pong in " + (performance.now() - started).toFixed(1) + " ms", "ok");
  });
}

window.addEventListener("DOMContentLoaded", () => {
  $("conn-form").addEventListener("submit", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("ping").addEventListener("click", ping);
  $("req-form").addEventListener("submit", sendRequest);
  $("pub-form").addEventListener("submit", sendPublish);
  $("sub-form").addEventListener("submit", sendSubscribe);
  setState("disconnected");
  connect();
});
