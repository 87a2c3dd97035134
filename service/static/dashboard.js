// The live dashboard served at "/": sign in, join channels, watch events, presence and typing,
// publish over POST /api/events. Plain DOM code on top of eddy.js.

import { Eddy } from "/static/eddy.js";
import { LiveCharts, formatBytes, formatRate } from "/static/live.js";

const TOKEN_KEY = "eddy.dashboard.token";
const CHANNELS_KEY = "eddy.dashboard.channels";
const FEED_LIMIT = 200; // events kept in the feed (newest first)
const LOG_LIMIT = 40; // connection log entries
const ERROR_LIMIT = 20;
const RATE_WINDOW_S = 10; // events/s is measured over this window
const STATS_EVERY_MS = 1000; // how often the live charts ask the server for its figures
const TYPING_SHOWN_MS = 6000; // the server clears a typing indicator after 6 s without refresh
const TYPING_SEND_EVERY_MS = 3000;

const $ = (id) => document.getElementById(id);

let client = null;
let selected = null; // channel whose presence is shown
let feedTotal = 0;
let lastTypingSent = 0;
/** channel -> {count, arrivals: [ms], typing: Map(user -> until ms), row} */
const channels = new Map();
/** user id -> {status, connections} for the selected channel */
const presence = new Map();

// Helpers ---------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (name === "className") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function clock(date = new Date()) {
  return date.toLocaleTimeString([], { hour12: false });
}

function bounded(list, limit) {
  while (list.children.length > limit) list.lastElementChild.remove();
}

function say(target, text, kind = "info") {
  const node = $(target);
  node.textContent = text;
  node.dataset.kind = kind;
}

function savedChannels() {
  try {
    return JSON.parse(sessionStorage.getItem(CHANNELS_KEY) || "[]");
  } catch (_) {
    return [];
  }
}

function saveChannels() {
  sessionStorage.setItem(CHANNELS_KEY, JSON.stringify([...channels.keys()]));
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// Sign in -------------------------------------------------------------------------

function showSignin(message, kind = "info") {
  $("signin").hidden = false;
  if (message) say("signin-message", message, kind);
}

function signIn(value) {
  const trimmed = (value || "").trim().replace(/^Bearer\s+/i, "");
  if (trimmed.split(".").length !== 3) {
    say("signin-message", "That does not look like a JWT (three dot-separated parts).", "error");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, trimmed);
  $("token-input").value = "";
  start();
}

async function devToken() {
  const roles = $("dev-roles").value.split(",").map((r) => r.trim()).filter(Boolean);
  const body = { sub: $("dev-sub").value.trim() || "dashboard", tenant: $("dev-tenant").value.trim() || "parking", roles };
  say("signin-message", "Asking the server for a development token…");
  let response;
  try {
    response = await fetch("/api/dev-token", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
  } catch (error) {
    say("signin-message", `The server cannot be reached: ${error.message}`, "error");
    return;
  }
  if (response.status === 404) {
    say("signin-message",
      "No development token here: the server only offers one when it runs with its auto-generated development " +
      "secret (no EDDY_JWT_SECRET) and you open the dashboard from the same machine. Paste a token instead, " +
      "e.g. from `eddy token --sub alice --tenant acme`.", "error");
    return;
  }
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    say("signin-message", `Development token refused: ${problem.detail || response.status}`, "error");
    return;
  }
  const answer = await response.json();
  say("signin-message", `Signed in with a development token for ${answer.sub} (tenant ${answer.tenant}).`, "ok");
  signIn(answer.token);
}

function signOut() {
  if (client) client.close();
  client = null;
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(CHANNELS_KEY);
  channels.clear();
  presence.clear();
  selected = null;
  $("channel-list").replaceChildren();
  $("presence-list").replaceChildren();
  $("feed").replaceChildren();
  feedTotal = 0;
  live.reset();
  $("app").hidden = true;
  $("signout").hidden = true;
  $("identity").textContent = "";
  renderState({ state: "disconnected" });
  showSignin("Signed out.");
}

// Connection ---------------------------------------------------------------------------

function start() {
  if (!token()) {
    showSignin();
    return;
  }
  if (client) client.close();
  $("errors").replaceChildren(); // a new sign-in starts a clean slate
  // A fixed token: the dashboard cannot mint a new one, so a refused or expired token ends in state "error"
  // at once (and the sign-in form comes back) instead of being retried.
  client = new Eddy({ url: "/ws", token: token() });
  client.on("state", onState);
  client.on("connected", (frame) => {
    $("identity").textContent = `${frame.user_id} @ ${frame.tenant}`;
    refreshStats();
    const rooms = frame.channels.filter((c) => !channels.has(c));
    $("rooms").textContent = rooms.length ? `Automatic rooms: ${rooms.join(", ")}` : "";
    if (selected) queryPresence(selected);
  });
  client.on("event", onEvent);
  client.on("typing", onTyping);
  client.on("presence", onPresence);
  client.on("read", (frame) => logError(`read: ${frame.user_id} read ${frame.message_id} on ${frame.channel}`, "info"));
  client.on("error", (error) => logError(`${error.code}: ${error.message}`));
  client.on("reconnect", (frame) => logState("reconnect", `server asked to reconnect (${frame.reason || ""})`));
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  for (const name of savedChannels()) joinChannel(name);
  client.connect();
}

function onState(change) {
  renderState(change);
  let detail = change.reason || "";
  if (change.state === "reconnecting" && change.delay != null) {
    detail = `retry ${change.attempt}/${change.maxAttempts} in ${(change.delay / 1000).toFixed(1)} s` +
      (change.reason ? ` (${change.reason})` : "");
  } else if (change.state === "reconnecting") {
    detail = `connecting (${change.reason || "attempt"})`;
  }
  logState(change.state, detail);
  if (change.state === "error" && /^TOKEN_/.test(change.error || "")) {
    showSignin(`The server refused the token (${change.error}: ${change.reason}). Sign in again.`, "error");
  }
}

function renderState({ state }) {
  const badge = $("state");
  badge.textContent = state;
  badge.dataset.state = state;
  $("retry-now").hidden = !(state === "error" || state === "reconnecting");
  renderCountdown();
}

function renderCountdown() {
  const node = $("countdown");
  if (!client || client.state !== "reconnecting") {
    node.textContent = client && client.state === "error" ? "gave up; press Retry now" : "";
    return;
  }
  if (client.retryAt == null) {
    node.textContent = `connecting… (attempt ${client.attempt}/${client.maxAttempts})`;
    return;
  }
  const left = Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000));
  node.textContent = `retry in ${left} s (attempt ${client.attempt}/${client.maxAttempts})`;
}

function logState(state, detail) {
  const list = $("state-log");
  list.prepend(el("li", { "data-state": state }, el("time", {}, clock()), " ", el("b", {}, state), detail ? ` ${detail}` : ""));
  bounded(list, LOG_LIMIT);
}

function logError(text, kind = "error") {
  const list = $("errors");
  list.prepend(el("li", { "data-kind": kind }, el("time", {}, clock()), ` ${text}`));
  bounded(list, ERROR_LIMIT);
}

// Channels ------------------------------------------------------------------------------

function joinChannel(name) {
  if (!channels.has(name)) {
    channels.set(name, { count: 0, arrivals: [], typing: new Map(), row: null, joined: false });
    saveChannels();
  }
  renderChannels();
  client.join(name).then(
    () => {
      const channel = channels.get(name);
      if (!channel) return;
      channel.joined = true;
      renderChannels();
      if (!selected) selectChannel(name);
    },
    (error) => {
      channels.delete(name);
      saveChannels();
      renderChannels();
      logError(`cannot join ${name}: ${error.code} ${error.message}`);
    },
  );
}

function leaveChannel(name) {
  client.leave(name).catch((error) => logError(`leave ${name}: ${error.code}`));
  channels.delete(name);
  saveChannels();
  if (selected === name) {
    selected = null;
    presence.clear();
    renderPresence();
  }
  renderChannels();
}

function selectChannel(name) {
  selected = name;
  $("publish-channel").value = $("publish-channel").value || name;
  presence.clear();
  renderPresence();
  renderChannels();
  queryPresence(name);
}

function queryPresence(name) {
  client.presenceQuery(name).then((frame) => {
    if (frame.channel !== selected) return;
    presence.clear();
    for (const user of frame.users) presence.set(user.user_id, user);
    renderPresence();
  }, (error) => logError(`presence of ${name}: ${error.code}`));
}

function rateOf(channel, now = performance.now()) {
  while (channel.arrivals.length && now - channel.arrivals[0] > RATE_WINDOW_S * 1000) channel.arrivals.shift();
  return channel.arrivals.length / RATE_WINDOW_S;
}

function typingUsers(channel, now = Date.now()) {
  for (const [user, until] of channel.typing) if (until < now) channel.typing.delete(user);
  return [...channel.typing.keys()];
}

function renderChannels() {
  const list = $("channel-list");
  const options = $("joined-channels");
  list.replaceChildren();
  options.replaceChildren();
  for (const [name, channel] of channels) {
    const typing = typingUsers(channel);
    const row = el("li", {
      "data-channel": name, "data-joined": String(channel.joined), className: name === selected ? "selected" : null,
    },
    el("button", { type: "button", className: "link", title: "Show presence", onclick: () => selectChannel(name) }, name),
    el("span", { className: "count", "data-testid": "channel-count" }, String(channel.count)),
    el("span", { className: "rate", "data-testid": "channel-rate" }, `${rateOf(channel).toFixed(1)}/s`),
    el("button", {
      type: "button", className: "small secondary", "data-testid": "leave-button",
      "aria-label": `Leave ${name}`, onclick: () => leaveChannel(name),
    }, "Leave"),
    el("span", { className: "typing-mini" }, typing.length ? `${typing.join(", ")} typing…` : ""));
    if (!channel.joined) row.classList.add("pending");
    channel.row = row;
    list.append(row);
    options.append(el("option", { value: name }));
  }
  renderTyping();
}

function renderPresence() {
  $("presence-channel").textContent = selected ? `in ${selected}` : "(select a channel)";
  const list = $("presence-list");
  list.replaceChildren();
  for (const [user, entry] of [...presence].sort((a, b) => a[0].localeCompare(b[0]))) {
    list.append(el("li", { "data-user": user, "data-status": entry.status },
      el("span", { className: `dot ${entry.status}` }), ` ${user} `,
      el("span", { className: "muted" }, `${entry.status}${entry.connections > 1 ? ` · ${entry.connections} devices` : ""}`)));
  }
  if (!presence.size && selected) list.append(el("li", { className: "muted" }, "nobody here yet"));
}

function renderTyping() {
  const channel = selected && channels.get(selected);
  const users = channel ? typingUsers(channel) : [];
  $("typing").textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…` : "";
}

// Frames -----------------------------------------------------------------------------

function onEvent(frame) {
  const channel = channels.get(frame.channel);
  if (channel) {
    channel.count += 1;
    channel.arrivals.push(performance.now());
    const count = channel.row?.querySelector(".count");
    if (count) count.textContent = String(channel.count);
  }
  feedTotal += 1;
  $("feed-total").textContent = `(${feedTotal})`;
  let data = "";
  try {
    data = JSON.stringify(frame.data);
  } catch (_) {
    data = String(frame.data);
  }
  if (data.length > 500) data = `${data.slice(0, 500)}…`;
  const late = frame.meta && frame.meta.late ? el("span", { className: "tag" }, "late") : null;
  const item = el("li", { "data-id": frame.id, "data-channel": frame.channel, "data-event": frame.event },
    el("div", { className: "meta" },
      el("span", { className: "channel" }, frame.channel),
      el("b", {}, frame.event),
      late,
      el("span", { className: "muted" }, `#${frame.id} · ${frame.timestamp ? clock(new Date(frame.timestamp)) : ""}`)),
    el("code", {}, data));
  $("feed").prepend(item);
  bounded($("feed"), FEED_LIMIT);
}

function onTyping(frame) {
  const channel = channels.get(frame.channel);
  if (!channel) return;
  if (frame.is_typing) channel.typing.set(frame.user_id, Date.now() + TYPING_SHOWN_MS);
  else channel.typing.delete(frame.user_id);
  renderChannels();
}

function onPresence(frame) {
  if (frame.channel !== selected) return;
  if (frame.status === "offline") presence.delete(frame.user_id);
  else presence.set(frame.user_id, { ...(presence.get(frame.user_id) || { connections: 1 }), status: frame.status });
  renderPresence();
}

// Publishing -------------------------------------------------------------------------

async function publish(event) {
  event.preventDefault();
  const channel = $("publish-channel").value.trim();
  const name = $("publish-event").value.trim();
  let data = null;
  const text = $("publish-data").value.trim();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch (error) {
      say("publish-result", `Data is not valid JSON: ${error.message}`, "error");
      return;
    }
  }
  say("publish-result", "Publishing…");
  try {
    const response = await fetch("/api/events", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token()}` },
      body: JSON.stringify({ channel, event: name, data }),
    });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      say("publish-result", `Stored as #${answer.id} on ${answer.channel}.`, "ok");
      if (channels.get(channel)?.joined && client?.connected) client.typing(channel, false);
    } else {
      say("publish-result", `${response.status} ${answer.code || ""}: ${answer.detail || "refused"}`, "error");
    }
  } catch (error) {
    say("publish-result", `The server cannot be reached: ${error.message}`, "error");
  }
}

function typingInPublishForm() {
  const channel = $("publish-channel").value.trim();
  const now = Date.now();
  if (!client?.connected || !channels.get(channel)?.joined || now - lastTypingSent < TYPING_SEND_EVERY_MS) return;
  lastTypingSent = now;
  client.typing(channel, true);
}

// Wiring ------------------------------------------------------------------------------

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("token-input").value);
});
$("dev-token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  devToken();
});
$("signout").addEventListener("click", signOut);
$("retry-now").addEventListener("click", () => {
  if (!client) return;
  if (client.state === "reconnecting") client.close();
  client.connect();
});
$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("join-input").value.trim();
  if (!name || !client) return;
  $("join-input").value = "";
  joinChannel(name);
});
$("my-status").addEventListener("change", (event) => {
  client?.presence(event.target.value).catch((error) => logError(`presence: ${error.code}`));
});
$("publish-form").addEventListener("submit", publish);
$("publish-data").addEventListener("input", typingInPublishForm);
$("clear-feed").addEventListener("click", () => {
  $("feed").replaceChildren();
});

// The server's view: GET /api/stats every second, into the live charts and the tables.
async function refreshStats() {
  if (!token() || $("app").hidden) return;
  let body;
  try {
    const response = await fetch("/api/stats", { headers: { Authorization: `Bearer ${token()}` } });
    if (!response.ok) return;
    body = await response.json();
  } catch (_) {
    return; // the server is away; the connection state says so already
  }
  const process = body.process || {};
  $("stats-process").textContent =
    `pid ${process.pid} · ${process.connections} connections · up ${Math.round(process.uptime_seconds || 0)} s`;
  live.update(body);
  renderWatcher(body.watcher);
  const rows = Object.entries(body.channels || {}).map(([name, channel]) =>
    el("tr", { "data-channel": name }, el("td", {}, name), el("td", { className: "num" }, String(channel.subscribers)),
      el("td", { className: "num" }, String(channel.events)),
      el("td", { className: "num" }, formatRate(live.rates[name]))));
  $("stats-channels").replaceChildren(...rows);
  const slowest = (body.slowest_consumers || []).map((entry) =>
    el("tr", { "data-connection": entry.connection_id },
      el("td", { title: entry.connection_id || "" }, (entry.connection_id || "?").slice(0, 8)),
      el("td", {}, entry.user_id || ""), el("td", { className: "num" }, formatBytes(entry.queued_bytes))));
  $("slowest-rows").replaceChildren(...slowest);
  $("slowest-note").textContent = slowest.length
    ? "This tenant's connections with the most bytes waiting to be sent."
    : "No connection of this tenant on this process reports its send queue.";
}

function renderWatcher(watcher) {
  const node = $("watcher");
  if (!watcher) return;
  const lag = watcher.lag_seconds < 1 ? `${(watcher.lag_seconds * 1000).toFixed(1)} ms` : `${watcher.lag_seconds.toFixed(2)} s`;
  node.dataset.state = watcher.connected ? "following" : "behind";
  node.textContent = `watcher ${watcher.connected ? "following" : "retrying"} · lag ${lag} · position ${watcher.position ?? "–"}` +
    (watcher.failures ? ` · ${watcher.failures} recovered errors` : "");
}

const live = new LiveCharts($("live"));
setInterval(refreshStats, STATS_EVERY_MS);
window.addEventListener("eddy-stats-refresh", refreshStats); // lets a test ask for a refresh now

// Rates, typing expiry and the reconnect countdown move with time.
setInterval(() => {
  const now = performance.now();
  for (const channel of channels.values()) {
    const rate = channel.row?.querySelector(".rate");
    if (rate) rate.textContent = `${rateOf(channel, now).toFixed(1)}/s`;
    const typing = channel.row?.querySelector(".typing-mini");
    if (typing) {
      const users = typingUsers(channel);
      typing.textContent = users.length ? `${users.join(", ")} typing…` : "";
    }
  }
  renderTyping();
  renderCountdown();
}, 1000);

start();
