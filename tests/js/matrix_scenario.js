// The real-client matrix for WebSocket clients that speak the browser's WebSocket API: Chromium's own, and
// Node's `ws` (which implements the same API, plus headers, pings and fragments). Run by
// tests/test_real_clients.py: in a Chromium page, and with `node`. Defines `scenario(env)`, which returns
// {check: ["ok" | "na" | "fail", detail]} for the same checks as the Python clients.
async function scenario(env) {
  const results = {};
  const TIMEOUT = 8000;
  const LIMIT = env.maxFrameBytes;

  function channel(ws) {
    const frames = [];
    const waiters = [];
    const state = { code: null, closed: false };
    ws.onmessage = (message) => {
      if (typeof message.data !== "string") return;
      const frame = JSON.parse(message.data);
      if (frame.type === "keepalive" || frame.type === "presence") return;
      frames.push(frame);
      waiters.splice(0).forEach((wake) => wake());
    };
    ws.onclose = (event) => {
      state.code = event.code;
      state.closed = true;
      waiters.splice(0).forEach((wake) => wake());
    };
    async function until(ready) {
      const deadline = Date.now() + TIMEOUT;
      while (!ready()) {
        if (Date.now() > deadline) throw new Error("timed out");
        await new Promise((wake) => { waiters.push(wake); setTimeout(wake, 100); });
      }
    }
    return {
      ws,
      async next() {
        await until(() => frames.length || state.closed);
        if (!frames.length) throw new Error(`closed (${state.code}) while waiting for a frame`);
        return frames.shift();
      },
      async closed() { await until(() => state.closed); return state.code; },
    };
  }

  async function connect(path, headers) {
    const ws = env.open(env.wsBase + path, headers);
    const conn = channel(ws);
    await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error("error before open")); });
    return conn;
  }

  async function publish(channelName, data) {
    const response = await fetch(env.httpBase + "/api/events", {
      method: "POST",
      headers: { "Authorization": `Bearer ${env.token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ channel: channelName, event: "matrix", data }),
    });
    if (response.status !== 201) throw new Error(`publish: ${response.status}`);
    return (await response.json()).id;
  }

  async function check(name, body) {
    try {
      const outcome = await body();
      results[name] = outcome && outcome.na ? ["na", outcome.na] : ["ok", String(outcome ?? "")];
    } catch (error) {
      results[name] = ["fail", String(error && error.message || error)];
    }
  }

  const query = `?access_token=${env.token}`;
  let main = null;
  let lastId = null;
  const room = env.room;

  await check("header_auth", async () => {
    if (!env.headers) return { na: "cannot set request headers on a WebSocket handshake" };
    const conn = await connect("/ws", { Authorization: `Bearer ${env.token}` });
    const frame = await conn.next();
    conn.ws.close(1000);
    if (frame.type !== "connected") throw new Error(JSON.stringify(frame));
  });
  await check("query_auth", async () => {
    main = await connect("/ws" + query);
    const frame = await main.next();
    if (frame.type !== "connected") throw new Error(JSON.stringify(frame));
    main.connected = frame;
  });
  await check("connected", async () => {
    const frame = main.connected;
    if (!frame || frame.user_id !== env.user || !frame.connection_id) throw new Error(JSON.stringify(frame));
  });
  await check("join_ack", async () => {
    main.ws.send(JSON.stringify({ type: "join", channel: room, ref: 1 }));
    const frame = await main.next();
    if (frame.type !== "ack" || frame.ref !== 1 || frame.channel !== room) throw new Error(JSON.stringify(frame));
  });
  await check("rest_event", async () => {
    const id = await publish(room, { n: 1 });
    const frame = await main.next();
    if (frame.type !== "event" || frame.id !== id) throw new Error(JSON.stringify(frame));
    lastId = id;
  });
  await check("json_ping", async () => {
    main.ws.send(JSON.stringify({ type: "ping", ref: 2, timestamp: "t" }));
    const frame = await main.next();
    if (frame.type !== "pong" || frame.ref !== 2 || frame.timestamp !== "t") throw new Error(JSON.stringify(frame));
  });
  await check("protocol_ping", async () => {
    if (!env.ping) return { na: "a page cannot send a protocol ping (it answers the server's)" };
    const conn = await connect("/ws" + query);  // a connection of its own: before issue 13 a PING dropped it
    await conn.next();
    await env.ping(conn.ws);
    conn.ws.send(JSON.stringify({ type: "ping", ref: "after-ping" }));
    const frame = await conn.next();
    conn.ws.close(1000);
    if (frame.ref !== "after-ping") throw new Error(JSON.stringify(frame));
  });
  await check("compression", async () => {
    const extensions = (env.extensions ? env.extensions(main.ws) : main.ws.extensions) || "";
    if (!/permessage-deflate/.test(extensions) || !/server_no_context_takeover/.test(extensions)) {
      throw new Error(`not negotiated: ${JSON.stringify(extensions)}`);
    }
    const data = { text: "compressible ".repeat(400) };
    const id = await publish(room, data);
    const frame = await main.next();
    if (frame.id !== id || frame.data.text !== data.text) throw new Error("event not decoded");
    lastId = id;
    return extensions;
  });
  await check("fragmented", async () => {
    if (!env.sendFragments) return { na: "the browser API sends every message in one frame" };
    env.sendFragments(main.ws, ['{"type":"pi', 'ng","ref":"frag', 'mented"}']);
    const frame = await main.next();
    if (frame.type !== "pong" || frame.ref !== "fragmented") throw new Error(JSON.stringify(frame));
  });
  await check("message_60k", async () => {
    const stamp = "x".repeat(60000);
    main.ws.send(JSON.stringify({ type: "ping", ref: 60, timestamp: stamp }));
    const frame = await main.next();
    if (frame.type !== "pong" || frame.timestamp !== stamp) throw new Error(frame.type);
  });
  await check("just_over_limit", async () => {
    main.ws.send(JSON.stringify({ type: "ping", ref: "big", timestamp: "x".repeat(LIMIT + 10) }));
    const frame = await main.next();
    if (frame.code !== "FRAME_TOO_LARGE") throw new Error(JSON.stringify(frame));
    main.ws.send(JSON.stringify({ type: "ping", ref: "kept" }));
    if ((await main.next()).ref !== "kept") throw new Error("socket not kept");
  });
  await check("binary_refused", async () => {
    main.ws.send(new Uint8Array([1, 2, 3]));
    const frame = await main.next();
    if (frame.code !== "UNSUPPORTED_BINARY") throw new Error(JSON.stringify(frame));
  });
  await check("close_1000", async () => {
    main.ws.close(1000);
    const code = await main.closed();
    if (code !== 1000) throw new Error(`closed with ${code}`);
  });
  await check("reconnect_since", async () => {
    if (lastId === null) throw new Error("no event id to resume from");
    const missed = await publish(room, { n: "missed" });
    const conn = await connect(`/ws/${room}/stream${query}&since=${lastId}`);
    const connected = await conn.next();
    if (connected.type !== "connected") throw new Error(JSON.stringify(connected));
    const frame = await conn.next();
    conn.ws.close(1000);
    if (frame.id !== missed) throw new Error(JSON.stringify(frame));
  });
  await check("over_4x_1009", async () => {
    const conn = await connect("/ws" + query);
    await conn.next();
    conn.ws.send("x".repeat(4 * LIMIT + 1000));
    const code = await conn.closed();
    if (code !== 1009) throw new Error(`closed with ${code}`);
  });
  return results;
}
