// Runs matrix_scenario.js with Node's `ws` at its default settings (permessage-deflate offered).
// Usage: node node_ws_runner.js '<json env>'; prints the results as JSON.
const fs = require("fs");
const path = require("path");
const WebSocket = require(path.join(__dirname, "..", "node", "ws", "node_modules", "ws"));
eval(fs.readFileSync(path.join(__dirname, "matrix_scenario.js"), "utf8"));

const env = JSON.parse(process.argv[2]);
env.headers = true;
env.open = (url, headers) => {
  const ws = new WebSocket(url, { headers: headers || {} });
  ws.on("upgrade", (response) => { ws.negotiated = response.headers["sec-websocket-extensions"] || ""; });
  return ws;
};
env.extensions = (ws) => ws.negotiated;
env.ping = (ws) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error("no pong")), 5000);
  ws.once("pong", (data) => { clearTimeout(timer); resolve(data); });
  ws.ping("matrix");
});
env.sendFragments = (ws, parts) => parts.forEach((part, i) => ws.send(part, { fin: i === parts.length - 1 }));
scenario(env).then((results) => { console.log(JSON.stringify(results)); process.exit(0); },
                   (error) => { console.error(error); process.exit(1); });
