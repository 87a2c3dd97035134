// Drives real socket.io-client sockets for tests/socketio_clients.py.
// stdin: one JSON command per line; stdout: one JSON line per thing that happened.
//   {"op":"connect","id":"a","url":"http://127.0.0.1:8888/atendimento","options":{...}}
//   {"op":"emit","id":"a","event":"ticket:entrar","args":[{...}],"ack":true,"seq":7}
//   {"op":"drop","id":"a"}       close the transport under the socket (it reconnects and may recover)
//   {"op":"disconnect","id":"a"} socket.disconnect()
//   {"op":"reconnect","id":"a"}  socket.connect() again
// Output: {"id":"a","kind":"connect","recovered":false,"transport":"polling"},
//         {"id":"a","kind":"event","event":"connected","args":[...]}, {"id":"a","kind":"ack","seq":7,"args":[...]},
//         {"id":"a","kind":"connect_error","message":"..."}, {"id":"a","kind":"disconnect","reason":"..."},
//         {"id":"a","kind":"open","transport":"polling"}, {"id":"a","kind":"upgrade","transport":"websocket"}
"use strict";
const { io } = require("socket.io-client");
const readline = require("readline");

const sockets = new Map();
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");

function connect({ id, url, options }) {
  const socket = io(url, { forceNew: true, reconnectionDelay: 100, reconnectionDelayMax: 200, ...options });
  sockets.set(id, socket);
  socket.io.on("open", () => {
    const engine = socket.io.engine;
    out({ id, kind: "open", transport: engine.transport.name });
    engine.once("upgrade", (transport) => out({ id, kind: "upgrade", transport: transport.name }));
  });
  socket.on("connect", () => {
    out({ id, kind: "connect", recovered: socket.recovered, transport: socket.io.engine.transport.name });
  });
  socket.on("connect_error", (error) => out({ id, kind: "connect_error", message: error.message, data: error.data || null }));
  socket.on("disconnect", (reason) => out({ id, kind: "disconnect", reason }));
  socket.onAny((event, ...args) => out({ id, kind: "event", event, args }));
}

function emit({ id, event, args, ack, seq }) {
  const socket = sockets.get(id);
  if (ack) socket.emit(event, ...(args || []), (...answer) => out({ id, kind: "ack", seq, args: answer }));
  else socket.emit(event, ...(args || []));
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const command = JSON.parse(line);
  const socket = sockets.get(command.id);
  switch (command.op) {
    case "connect": return connect(command);
    case "emit": return emit(command);
    case "drop": return socket.io.engine.close();
    case "disconnect": return socket.disconnect();
    case "reconnect": return socket.connect();
    default: out({ kind: "error", message: `unknown op ${command.op}` });
  }
});
rl.on("close", () => { for (const socket of sockets.values()) socket.disconnect(); process.exit(0); });
