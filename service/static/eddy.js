// Eddy browser client: a plain ES module, no build step, no dependencies.
//
//   import { Eddy } from "/static/eddy.js";
//   const eddy = new Eddy({ url: "/ws", tokenProvider: async () => fetchMyToken() });
//   eddy.on("event", (frame) => console.log(frame.channel, frame.event, frame.data));
//   eddy.on("state", ({ state, delay }) => console.log(state, delay));
//   eddy.connect();
//   await eddy.join("orders");
//   const { id } = await eddy.publish("orders", "order.created", { total: 12 });
//
// The wire protocol is docs/PROTOCOL.md. What this client adds on top of it:
// reconnection with exponential backoff and jitter, a bounded offline queue,
// resume of every joined room with `since` (and de-duplication by id), token
// refresh through a provider, and a send throttle under the server's frame rate.

/** Connection states, in the order a connection usually goes through them. */
export const STATES = Object.freeze(["disconnected", "connecting", "connected", "reconnecting", "error"]);

export const DEFAULTS = Object.freeze({
  maxAttempts: 10,
  baseDelay: 1000,
  maxDelay: 32000,
  jitter: "equal",
  queueLimit: 100,
  // The server allows 50 frames/s with bursts of 100 (EDDY_FRAME_RATE / EDDY_FRAME_BURST);
  // the client stays below so a flush after a reconnect is never refused with RATE_LIMITED.
  sendRate: 40,
  sendBurst: 80,
  // The server sends a keepalive frame every 30 s; silence for longer than this means a dead link.
  idleTimeout: 75000,
});

// Close codes of docs/PROTOCOL.md.
const CLOSE_NORMAL = 1000;
const CLOSE_GOING_AWAY = 1001;
const CLOSE_TOKEN_EXPIRED = 4003;
const CLOSE_TOO_MANY_CONNECTIONS = 4029;
// Not a server code: what the client reports when it drops a silent socket itself.
const CLOSE_IDLE = 4900;

// ---------------------------------------------------------------------------
// Pure helpers (exported so they can be tested without a socket)
// ---------------------------------------------------------------------------

/**
 * The upper bound of the delay before reconnection attempt `attempt` (1-based):
 * baseDelay, doubling each attempt, capped at maxDelay. 1 s, 2 s, 4 s … 32 s by default.
 */
export function backoffCeiling(attempt, { baseDelay = DEFAULTS.baseDelay, maxDelay = DEFAULTS.maxDelay } = {}) {
  if (!(attempt >= 1)) return 0;
  return Math.min(maxDelay, baseDelay * 2 ** Math.min(attempt - 1, 40));
}

/** [lowest, highest] delay `backoffDelay` can return for `attempt` with the given jitter. */
export function backoffBounds(attempt, { baseDelay, maxDelay, jitter = DEFAULTS.jitter } = {}) {
  const ceiling = backoffCeiling(attempt, { baseDelay, maxDelay });
  if (jitter === "none") return [ceiling, ceiling];
  if (jitter === "full") return [0, ceiling];
  return [ceiling / 2, ceiling];
}

/**
 * The delay in ms before reconnection attempt `attempt` (1-based).
 * jitter "full": uniform in [0, ceiling]; "equal" (default): ceiling/2 + uniform in [0, ceiling/2];
 * "none": the ceiling itself. `random` returns a number in [0, 1) like Math.random.
 */
export function backoffDelay(attempt, { baseDelay, maxDelay, jitter = DEFAULTS.jitter, random = Math.random } = {}) {
  const [low, high] = backoffBounds(attempt, { baseDelay, maxDelay, jitter });
  return Math.round(low + random() * (high - low));
}

/** The delays of attempts 1..maxAttempts; after the last one the client gives up (state "error"). */
export function backoffSchedule(maxAttempts = DEFAULTS.maxAttempts, options = {}) {
  const delays = [];
  for (let attempt = 1; attempt <= maxAttempts; attempt += 1) delays.push(backoffDelay(attempt, options));
  return delays;
}

/**
 * What to do after a socket closed with `code`:
 * "stop" (do not reconnect), "refresh" (get a new token, then reconnect), "now" (reconnect at once,
 * the server is going away) or "retry" (reconnect with backoff).
 */
export function closePolicy(code) {
  switch (code) {
    case CLOSE_TOO_MANY_CONNECTIONS:
      return "stop";
    case CLOSE_TOKEN_EXPIRED:
      return "refresh";
    case CLOSE_GOING_AWAY:
      return "now";
    default:
      return "retry";
  }
}

/** Compare two event ids (decimal strings of store positions): negative, 0 or positive. */
export function compareIds(a, b) {
  const x = String(a).replace(/^0+(?=\d)/, "");
  const y = String(b).replace(/^0+(?=\d)/, "");
  if (x.length !== y.length) return x.length - y.length;
  return x < y ? -1 : x > y ? 1 : 0;
}

/** The socket URL with the token in `access_token` (browsers cannot set an Authorization header). */
export function socketUrl(url, token, base = globalThis.location?.href) {
  const absolute = new URL(url, base);
  if (absolute.protocol === "http:") absolute.protocol = "ws:";
  if (absolute.protocol === "https:") absolute.protocol = "wss:";
  if (token) absolute.searchParams.set("access_token", token);
  return absolute.toString();
}

/** The HTTP URL used to tell an auth failure from a network failure: `/api/stats` of the same server. */
export function probeUrl(url, base = globalThis.location?.href) {
  const absolute = new URL(url, base);
  absolute.protocol = absolute.protocol === "wss:" || absolute.protocol === "https:" ? "https:" : "http:";
  const prefix = absolute.pathname.replace(/\/ws(\/.*)?$/, "");
  absolute.pathname = `${prefix}/api/stats`;
  absolute.search = "";
  absolute.hash = "";
  return absolute.toString();
}

/** An Error carrying the protocol's `code` (and the error frame, when there was one). */
export class EddyError extends Error {
  constructor(code, message, frame = null) {
    super(message || code);
    this.name = "EddyError";
    this.code = code;
    this.frame = frame;
  }
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

export class Eddy {
  constructor(options = {}) {
    const o = { ...DEFAULTS, ...options };
    this.url = o.url || "/ws";
    this.token = o.token ?? null;
    this.tokenProvider = o.tokenProvider ?? null;
    this.maxAttempts = o.maxAttempts;
    this.baseDelay = o.baseDelay;
    this.maxDelay = o.maxDelay;
    this.jitter = o.jitter;
    this.queueLimit = o.queueLimit;
    this.sendRate = o.sendRate;
    this.sendBurst = o.sendBurst;
    this.idleTimeout = o.idleTimeout;
    this.random = o.random || Math.random;
    this.WebSocket = o.WebSocket || globalThis.WebSocket;
    // Set to null to skip the auth probe; `fetch` is injectable for tests.
    this.authProbeUrl = o.authProbeUrl;
    if (this.authProbeUrl === undefined) {
      try {
        this.authProbeUrl = probeUrl(this.url);
      } catch (_) {
        this.authProbeUrl = null; // a relative URL outside a page: no probe
      }
    }
    this.fetch = o.fetch || (globalThis.fetch ? globalThis.fetch.bind(globalThis) : null);

    this.state = "disconnected";
    this.attempt = 0; // failed attempts since the last successful connection
    this.retryAt = null;
    this.user = null; // the last `connected` frame
    this.status = "online"; // this client's presence status, restored on every reconnect

    this._listeners = new Map();
    this._rooms = new Map(); // channel -> {name, lastId, floor, joinedAt, joined, joining, waiters}
    this._lastSeen = new Map(); // channel -> last event id, for every channel (automatic rooms too)
    this._highWater = null; // highest event id seen on any channel
    this._serverTime = null; // newest server timestamp seen
    this._autoRooms = new Set(); // channels the server subscribed the last connection to (connected.channels)
    this._catchingUp = new Map(); // automatic room -> live events held while its missed events are fetched
    this._queue = []; // outgoing frames not sent yet: {frame, waiter, retry}
    this._priority = []; // the client's own frames for this connection, sent before the queue
    this._holding = false;
    this._pending = new Map(); // ref -> {kind, frame, waiter, retry, room}
    this._nextRef = 1;
    this._ws = null;
    this._wanted = false; // connect() called and close() not since
    this._generation = 0;
    this._timer = null;
    this._pumpTimer = null;
    this._idleTimer = null;
    this._lastFrameAt = 0;
    this._pinging = false;
    this._tokens = this.sendBurst;
    this._tokensAt = Date.now();
    this._currentToken = null;
    this._serverAsked = false;
    this._tokenExpired = false;
    this._connectWaiters = [];
  }

  // Events ----------------------------------------------------------------

  /** Listen to "state", "connected", "event", "event:<name>", "typing", "read", "presence", "error",
   *  "dropped", "reconnect", "frame" (every frame received) or "ack". Returns a function that unsubscribes. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  _emit(name, payload) {
    for (const fn of [...(this._listeners.get(name) || [])]) {
      try {
        fn(payload);
      } catch (error) {
        // A listener's bug must not break the connection.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }

  _setState(state, extra = {}) {
    const previous = this.state;
    this.state = state;
    this.retryAt = extra.delay != null ? Date.now() + extra.delay : null;
    this._emit("state", {
      state,
      previous,
      attempt: this.attempt,
      maxAttempts: this.maxAttempts,
      delay: extra.delay ?? null,
      retryAt: this.retryAt,
      reason: extra.reason ?? null,
      code: extra.code ?? null,
      error: extra.error ?? null,
    });
  }

  // Connection --------------------------------------------------------------

  /** Open the connection (and keep it open). Resolves when connected, rejects when the client gives up. */
  connect() {
    const done = new Promise((resolve, reject) => {
      if (this.state === "connected") resolve();
      else this._connectWaiters.push({ resolve, reject });
    });
    done.catch(() => {}); // giving up is also reported by the "state" and "error" events
    if (this._wanted && this.state !== "error") return done;
    this._wanted = true;
    this.attempt = 0;
    this._open("connecting");
    return done;
  }

  /** Close the connection for good (until connect() is called again). Queued frames stay queued. */
  close() {
    this._wanted = false;
    this._generation += 1;
    clearTimeout(this._timer);
    clearTimeout(this._pumpTimer);
    this._stopIdle();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(CLOSE_NORMAL, "client closed");
      } catch (_) {
        /* already closed */
      }
      this._lostSocket();
    }
    for (const room of this._rooms.values()) {
      room.joined = false;
      room.joining = null;
    }
    this._settleConnect(new EddyError("CLOSED", "the client was closed"));
    if (this.state !== "disconnected") this._setState("disconnected", { reason: "closed by the client" });
  }

  get connected() {
    return this.state === "connected";
  }

  async _token() {
    if (this.tokenProvider) {
      const token = await this.tokenProvider();
      if (token) this.token = token;
      return token;
    }
    return this.token;
  }

  async _open(state) {
    const generation = ++this._generation;
    clearTimeout(this._timer);
    if (state) this._setState(state);
    else this._setState("reconnecting", { reason: `attempt ${this.attempt} of ${this.maxAttempts}` });
    let token;
    try {
      token = await this._token();
    } catch (error) {
      if (generation !== this._generation) return;
      this._emit("error", new EddyError("TOKEN_PROVIDER", `the token provider failed: ${error?.message || error}`));
      this._retry({ reason: "token provider failed" });
      return;
    }
    if (generation !== this._generation || !this._wanted) return;
    this._currentToken = token;
    let ws;
    try {
      ws = new this.WebSocket(socketUrl(this.url, token));
    } catch (error) {
      this._emit("error", new EddyError("CONNECT_FAILED", String(error?.message || error)));
      this._retry({ reason: "cannot open a socket" });
      return;
    }
    this._ws = ws;
    ws._eddyOpened = false;
    ws.onopen = () => {
      ws._eddyOpened = true;
      this._armIdle(ws);
    };
    ws.onmessage = (message) => this._onMessage(ws, message);
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (event) => this._onClose(ws, event?.code ?? 1006, event?.reason || "");
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  /**
   * Watch for a dead link: a half-open TCP connection may take minutes to report its close. After half of
   * idleTimeout without a frame the client pings; after idleTimeout it drops the socket and reconnects.
   */
  _armIdle(ws) {
    this._lastFrameAt = Date.now();
    if (!this.idleTimeout || this._idleTimer) return;
    this._idleTimer = setInterval(() => {
      if (ws !== this._ws) return;
      const silent = Date.now() - this._lastFrameAt;
      if (silent >= this.idleTimeout) {
        this._detach(ws);
        try {
          ws.close(CLOSE_NORMAL, "idle");
        } catch (_) {
          /* ignore */
        }
        this._onClose(ws, CLOSE_IDLE, "no frame from the server within idleTimeout", true);
      } else if (silent >= this.idleTimeout / 2 && this.connected && !this._pinging) {
        this._pinging = true;
        this._control({ type: "ping", timestamp: String(Date.now()) });
      }
    }, Math.max(10, Math.floor(this.idleTimeout / 4)));
  }

  _stopIdle() {
    clearInterval(this._idleTimer);
    this._idleTimer = null;
    this._pinging = false;
  }

  async _onClose(ws, code, reason, opened = ws._eddyOpened) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._detach(ws);
    this._stopIdle();
    clearTimeout(this._pumpTimer);
    this._lostSocket();
    for (const room of this._rooms.values()) {
      room.joined = false;
      room.joining = null;
    }
    if (!this._wanted) {
      this._setState("disconnected", { code, reason });
      return;
    }
    const serverAsked = this._serverAsked;
    const tokenExpired = this._tokenExpired;
    this._serverAsked = false;
    this._tokenExpired = false;
    let policy = serverAsked ? "now" : closePolicy(code);
    if (tokenExpired && policy === "retry") policy = "refresh";
    if (policy === "stop") {
      this._fail("TOO_MANY_CONNECTIONS", "this user opened too many connections; not reconnecting", code);
      return;
    }
    if (policy === "refresh" && !this.tokenProvider) {
      this._fail("TOKEN_EXPIRED", "the token expired and there is no tokenProvider to get a new one", code);
      return;
    }
    if (policy === "now") {
      // Another instance takes over: go at once, spread over one base delay so a fleet does not stampede.
      this.attempt = 0;
      this._retry({ code, reason: reason || "server going away", delay: Math.round(this.random() * this.baseDelay) });
      return;
    }
    if (!opened && this.authProbeUrl && this.fetch && this._currentToken) {
      // The browser hides the handshake's HTTP status: ask the HTTP API whether the token is the problem.
      const generation = this._generation;
      const refusal = await this._probe(this._currentToken);
      if (generation !== this._generation || !this._wanted) return;
      if (refusal) {
        const [errorCode, detail] = [refusal.code || "TOKEN_INVALID", refusal.detail || "the token was refused"];
        if (!this.tokenProvider) {
          this._fail(errorCode, detail, code); // the same token would be refused again
          return;
        }
        this._emit("error", new EddyError(errorCode, detail)); // the provider may have a better one next time
      }
    }
    this._retry({ code, reason: reason || (opened ? "connection lost" : "cannot connect") });
  }

  async _probe(token) {
    try {
      const response = await this.fetch(this.authProbeUrl, { headers: { Authorization: `Bearer ${token}` } });
      if (response.status !== 401) return null;
      try {
        return await response.json();
      } catch (_) {
        return { code: "TOKEN_INVALID" };
      }
    } catch (_) {
      return null; // the server is unreachable: a network failure, not an auth failure
    }
  }

  _retry({ code = null, reason = null, delay = null } = {}) {
    if (!this._wanted) return;
    this.attempt += 1;
    if (this.attempt > this.maxAttempts) {
      this.attempt = this.maxAttempts;
      this._fail("MAX_ATTEMPTS", `gave up after ${this.maxAttempts} attempts`, code);
      return;
    }
    const wait = delay ?? backoffDelay(this.attempt, {
      baseDelay: this.baseDelay, maxDelay: this.maxDelay, jitter: this.jitter, random: this.random,
    });
    const generation = ++this._generation;
    this._setState("reconnecting", { delay: wait, reason, code });
    this._timer = setTimeout(() => {
      if (generation === this._generation) this._open();
    }, wait);
  }

  _fail(errorCode, message, closeCode = null) {
    this._wanted = false;
    clearTimeout(this._timer);
    const error = new EddyError(errorCode, message);
    this._emit("error", error);
    this._settleConnect(error);
    this._setState("error", { reason: message, code: closeCode, error: errorCode });
  }

  _settleConnect(error) {
    const waiters = this._connectWaiters;
    this._connectWaiters = [];
    for (const w of waiters) (error ? w.reject(error) : w.resolve());
    // Nobody may be awaiting connect(); a rejection then is not an unhandled error.
  }

  /** The socket is gone: frames sent but not answered go back to the front of the queue (or fail). */
  _lostSocket() {
    this._catchingUp.clear(); // what was held is fetched again on the next connection
    for (const item of this._priority.splice(0)) {
      if (item.kind === "leave") item.waiter?.resolve(null); // the room is forgotten: not re-joined
    }
    const again = [];
    for (const [ref, item] of [...this._pending.entries()].sort((a, b) => a[0] - b[0])) {
      this._pending.delete(ref);
      if (item.kind === "leave") item.waiter?.resolve(null); // the room is forgotten: not re-joined
      if (item.kind === "join" || item.kind === "leave" || item.kind === "control") continue;
      if (item.retry) again.push({ frame: item.frame, waiter: item.waiter, retry: true });
      else item.waiter?.reject(new EddyError("DISCONNECTED", "the connection closed before an answer"));
    }
    this._queue.unshift(...again);
    this._enforceBound();
  }

  // Frames from the server ---------------------------------------------------------

  _onMessage(ws, message) {
    if (ws !== this._ws) return;
    this._armIdle(ws);
    let frame;
    try {
      frame = JSON.parse(message.data);
    } catch (_) {
      this._emit("error", new EddyError("INVALID_JSON", "the server sent a frame that is not JSON"));
      return;
    }
    const stamp = frame.type === "pong" ? null : frame.timestamp;
    if (typeof stamp === "string" && /^\d{4}-/.test(stamp) && !(this._serverTime && stamp <= this._serverTime)) {
      this._serverTime = stamp; // the server's clock (ISO strings sort by time), to date joins
    }
    this._emit("frame", frame);
    switch (frame.type) {
      case "connected":
        this._onConnected(frame);
        break;
      case "event":
        this._onEvent(frame);
        break;
      case "ack":
        this._onAck(frame);
        break;
      case "error":
        this._onError(frame);
        break;
      case "presence_data":
      case "sync_data":
      case "pong":
        this._answer(frame);
        break;
      case "typing":
      case "read":
      case "presence":
        this._emit(frame.type, frame);
        break;
      case "reconnect":
        this._serverAsked = true;
        this._emit("reconnect", frame);
        // Go now instead of waiting for the close: the server is draining.
        this._detach(ws);
        try {
          ws.close(CLOSE_NORMAL, "server asked to reconnect");
        } catch (_) {
          /* ignore */
        }
        this._onClose(ws, CLOSE_GOING_AWAY, frame.reason || "server asked to reconnect", true);
        break;
      default:
        break; // keepalive and frames of newer servers
    }
  }

  _onConnected(frame) {
    this.user = frame;
    this.attempt = 0;
    this._tokens = this.sendBurst;
    this._tokensAt = Date.now();
    this._setState("connected");
    this._emit("connected", frame);
    this._settleConnect(null);
    // Resume every room first (the server handles a socket's frames in order, so typing and
    // read receipts flushed after this find their room joined), then restore presence, then the queue.
    this._holding = true; // line everything up first, so no queued frame overtakes a re-join
    // Automatic rooms (user:, tenant, role:, the /ws/<channel>/stream channel) are subscribed by the server
    // on connect, where a join's `since` replays nothing: fetch what they missed with `sync` instead,
    // holding their live events meanwhile.
    const previous = this._autoRooms;
    this._autoRooms = new Set(frame.channels || []);
    for (const room of this._rooms.values()) this._sendJoin(room, { live: this._autoRooms.has(room.name) });
    for (const channel of this._autoRooms) {
      const room = this._rooms.get(channel);
      let from = null;
      if (room) from = room.lastId ?? room.floor;
      else if (previous.has(channel)) from = this._lastSeen.get(channel) ?? this._highWater;
      if (from == null) continue;
      this._catchingUp.set(channel, []);
      this._control({ type: "sync", channel, last_id: from }, { kind: "catchup", channel });
    }
    if (this.status !== "online") this._control({ type: "presence", status: this.status });
    this._holding = false;
    this._pump();
  }

  _onEvent(frame, caughtUp = false) {
    const channel = frame.channel;
    if (!caughtUp && this._catchingUp.has(channel)) {
      this._catchingUp.get(channel).push(frame); // delivered after the missed ones, in order
      return;
    }
    const last = this._lastSeen.get(channel);
    if (last != null && compareIds(frame.id, last) <= 0) {
      this._emit("duplicate", frame); // overlap of a resume: already delivered
      return;
    }
    const room = this._rooms.get(channel);
    if (room && room.fromStart && room.joinedAt && frame.timestamp && frame.timestamp < room.joinedAt) {
      // A resume from the start of history (the room had no known position): skip what predates the join.
      return;
    }
    this._lastSeen.set(channel, frame.id);
    if (room) room.lastId = frame.id;
    if (this._highWater == null || compareIds(frame.id, this._highWater) > 0) this._highWater = frame.id;
    this._emit("event", frame);
    if (frame.event) this._emit(`event:${frame.event}`, frame);
  }

  _onAck(frame) {
    const item = frame.ref != null ? this._pending.get(frame.ref) : null;
    this._emit("ack", frame);
    if (!item) return;
    this._pending.delete(frame.ref);
    if (item.kind === "join") {
      const room = item.room;
      if (this._rooms.get(room.name) !== room) return; // left meanwhile
      room.joined = true;
      room.joining = null;
      if (!room.joinedAt) room.joinedAt = item.serverTime;
      if (room.lastId == null && room.floor == null && !room.fromStart) {
        if (frame.last_id != null) {
          // A live join, nothing seen on this room yet: the server says from which id on everything
          // reaches us, so that is the exact resume point.
          room.floor = String(frame.last_id);
        } else if (this._highWater != null) {
          // An older server: the newest id seen anywhere by now. Ids grow across the whole store, so that
          // misses nothing (at worst it replays a few events that were stored just before the join was).
          room.floor = this._highWater;
        }
      }
      const waiters = room.waiters;
      room.waiters = [];
      for (const w of waiters) w.resolve({ ...frame, historyLost: Boolean(item.historyLost) });
      return;
    }
    item.waiter?.resolve(frame);
  }

  _onError(frame) {
    const error = new EddyError(frame.code || "ERROR", frame.error || frame.code, frame);
    const item = frame.ref != null ? this._pending.get(frame.ref) : null;
    if (!item) {
      if (frame.code === "TOKEN_EXPIRED") this._refreshToken();
      this._emit("error", error);
      return;
    }
    this._pending.delete(frame.ref);
    if (item.kind === "join") {
      const room = item.room;
      if (this._rooms.get(room.name) !== room) return;
      room.joining = null;
      if (frame.code === "HISTORY_LOST") {
        // Events after our position are gone: join live and tell the application to reload.
        this._emit("error", error);
        room.lastId = null;
        room.floor = null;
        room.fromStart = false;
        room.joinedAt = this._serverTime;
        this._lastSeen.delete(room.name);
        this._sendJoin(room, { live: true, historyLost: true });
        return;
      }
      if (frame.code === "STORAGE_UNAVAILABLE" || frame.code === "AUTHORIZER_UNAVAILABLE" || frame.code === "RATE_LIMITED") {
        // Transient: try again shortly on this socket.
        this._emit("error", error);
        setTimeout(() => {
          if (this._rooms.get(room.name) === room && this.connected && !room.joined && !room.joining) {
            this._sendJoin(room);
          }
        }, this.baseDelay);
        return;
      }
      // Refused for good (FORBIDDEN, INVALID_CHANNEL, TOO_MANY_CHANNELS): forget the room.
      this._rooms.delete(room.name);
      const waiters = room.waiters;
      room.waiters = [];
      for (const w of waiters) w.reject(error);
      this._emit("error", error);
      return;
    }
    if (item.kind === "catchup") this._caughtUp(item.channel); // e.g. HISTORY_LOST: carry on live
    if (item.waiter) item.waiter.reject(error);
    else this._emit("error", error);
  }

  _answer(frame) {
    if (frame.type === "pong") this._pinging = false;
    const item = frame.ref != null ? this._pending.get(frame.ref) : null;
    if (!item) return;
    this._pending.delete(frame.ref);
    if (item.kind === "catchup") {
      for (const event of frame.events || []) this._onEvent(event, true);
      if (frame.has_more && frame.events.length) {
        this._control({ type: "sync", channel: item.channel, last_id: frame.events[frame.events.length - 1].id }, item);
      } else {
        this._caughtUp(item.channel);
      }
      return;
    }
    item.waiter?.resolve(frame);
  }

  _caughtUp(channel) {
    const held = this._catchingUp.get(channel) || [];
    this._catchingUp.delete(channel);
    for (const event of held) this._onEvent(event);
  }

  async _refreshToken() {
    if (!this.tokenProvider) {
      this._tokenExpired = true; // the server closes with 4003 after its grace period
      return;
    }
    const ws = this._ws;
    try {
      const token = await this._token();
      if (ws && ws === this._ws && token) {
        this._currentToken = token;
        this._control({ type: "authenticate", token });
      }
    } catch (error) {
      this._tokenExpired = true;
      this._emit("error", new EddyError("TOKEN_PROVIDER", `the token provider failed: ${error?.message || error}`));
    }
  }

  // Frames to the server ---------------------------------------------------------

  _takeToken() {
    const now = Date.now();
    this._tokens = Math.min(this.sendBurst, this._tokens + ((now - this._tokensAt) / 1000) * this.sendRate);
    this._tokensAt = now;
    if (this._tokens >= 1) {
      this._tokens -= 1;
      return true;
    }
    return false;
  }

  _write(frame) {
    try {
      this._ws.send(JSON.stringify(frame));
      return true;
    } catch (_) {
      return false;
    }
  }

  /**
   * A frame the client itself needs on this connection (resume, presence, leave, token refresh): sent
   * before the queue, never dropped, and forgotten when the socket closes (the next connection redoes it).
   */
  _control(frame, item = { kind: "control" }) {
    if (!this.connected) return;
    this._priority.push({ ...item, frame });
    this._pump();
  }

  _sendJoin(room, { live = false, historyLost = false } = {}) {
    const frame = { type: "join", channel: room.name };
    if (!live) {
      if (room.lastId != null) {
        frame.since = room.lastId;
      } else if (room.floor != null) {
        frame.since = room.floor;
      } else if (room.joinedAt) {
        // Joined on an earlier connection but nothing seen since: replay the history, skip the older part.
        frame.since = "0";
        room.fromStart = true;
      }
    }
    room.joining = true;
    this._control(frame, { kind: "join", room, serverTime: this._serverTime, historyLost });
  }

  /** Queue a frame; it is sent at once when connected and under the send rate. */
  _enqueue(frame, { expectAnswer = true, retry = true } = {}) {
    let promise = Promise.resolve(undefined);
    let waiter = null;
    if (expectAnswer) {
      promise = new Promise((resolve, reject) => {
        waiter = { resolve, reject };
      });
    }
    promise.catch(() => {}); // failures are also reported by the "error" and "dropped" events
    this._queue.push({ frame, waiter, retry });
    this._enforceBound();
    this._pump();
    return promise;
  }

  _enforceBound() {
    while (this._queue.length > this.queueLimit) {
      const dropped = this._queue.shift();
      const error = new EddyError("DROPPED", `offline queue full (${this.queueLimit}): the oldest frame was dropped`);
      error.frame = dropped.frame;
      dropped.waiter?.reject(error);
      this._emit("dropped", { frame: dropped.frame, reason: "queue full", queueLimit: this.queueLimit });
      this._emit("error", error);
    }
  }

  _pump() {
    if (this._holding) return;
    clearTimeout(this._pumpTimer);
    this._pumpTimer = null;
    while (this.connected && (this._priority.length || this._queue.length)) {
      if (!this._takeToken()) {
        // Stay under the server's frame rate: the rest goes out as tokens come back.
        const wait = Math.ceil(((1 - this._tokens) / this.sendRate) * 1000);
        this._pumpTimer = setTimeout(() => this._pump(), Math.max(wait, 5));
        return;
      }
      if (this._priority.length) {
        const item = this._priority.shift();
        const ref = this._nextRef++;
        this._pending.set(ref, item);
        this._write({ ...item.frame, ref });
        continue;
      }
      const item = this._queue.shift();
      const frame = { ...item.frame };
      if (item.waiter) {
        frame.ref = this._nextRef++;
        this._pending.set(frame.ref, { kind: frame.type, frame: item.frame, waiter: item.waiter, retry: item.retry });
      }
      this._write(frame);
    }
  }

  /** Number of frames waiting to be sent. */
  get queued() {
    return this._queue.length;
  }

  // Public API -----------------------------------------------------------------------

  /**
   * Subscribe to `channel`; with `since`, first receive every stored event after that id.
   * The room is re-joined on every reconnect with `since` = the last event id seen on it.
   * Resolves with the ack frame; rejects with an EddyError for an error frame (FORBIDDEN …).
   */
  join(channel, { since = null } = {}) {
    let room = this._rooms.get(channel);
    if (room && room.joined) return Promise.resolve({ type: "ack", channel });
    if (!room) {
      room = {
        name: channel, lastId: since != null ? String(since) : null, floor: null, joinedAt: null,
        fromStart: false, joined: false, joining: null, waiters: [],
      };
      if (room.lastId != null) this._lastSeen.set(channel, room.lastId);
      this._rooms.set(channel, room);
    }
    const promise = new Promise((resolve, reject) => room.waiters.push({ resolve, reject }));
    promise.catch(() => {}); // a refusal is also reported by the "error" event
    if (this.connected && !room.joining) this._sendJoin(room);
    return promise;
  }

  /** Unsubscribe; it is no longer re-joined on reconnect. Resolves with the ack (or at once when offline). */
  leave(channel) {
    const room = this._rooms.get(channel);
    if (!room) return Promise.resolve(null);
    this._rooms.delete(channel);
    for (const w of room.waiters) w.reject(new EddyError("LEFT", `left ${channel} before the join was answered`));
    room.waiters = [];
    if (!this.connected || (!room.joined && !room.joining)) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this._control({ type: "leave", channel }, { kind: "leave", waiter: { resolve, reject } });
    });
  }

  /** Channels joined (or being joined) by this client. */
  get channels() {
    return [...this._rooms.keys()];
  }

  /** The last event id seen on `channel`, or null. */
  lastEventId(channel) {
    return this._lastSeen.get(channel) ?? null;
  }

  /**
   * Store and broadcast an event (the channel's rule must allow socket publishing).
   * Queued while offline; resolves with the ack `{id, timestamp, …}`. An idempotency key is generated
   * when none is given, so a frame re-sent after a reconnect is stored once.
   */
  publish(channel, event, data = null, { idempotencyKey } = {}) {
    const key = idempotencyKey || `eddy-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
    return this._enqueue({ type: "publish", channel, event, data, idempotency_key: key });
  }

  /** Typing indicator (fire and forget; queued while offline). */
  typing(channel, isTyping = true) {
    this._enqueue({ type: "typing", channel, is_typing: Boolean(isTyping) }, { expectAnswer: false });
  }

  /** Read receipt; resolves with the ack. */
  read(channel, messageId) {
    return this._enqueue({ type: "read", channel, message_id: String(messageId) });
  }

  /** Set this connection's presence status (online, away, busy, offline); restored after a reconnect. */
  presence(status) {
    this.status = status;
    return this._enqueue({ type: "presence", status });
  }

  /** Who is online in `channel`: resolves with the presence_data frame ({users: [...]}). */
  presenceQuery(channel) {
    return this._enqueue({ type: "presence_query", channel });
  }

  /** Events of `channel` after `lastId` (at most 1000) without subscribing: resolves with sync_data. */
  sync(channel, lastId = "0") {
    return this._enqueue({ type: "sync", channel, last_id: String(lastId) });
  }

  /** Round trip to the server: resolves with the pong frame. */
  ping() {
    return this._enqueue({ type: "ping", timestamp: String(Date.now()) }, { retry: false });
  }
}

export default Eddy;
