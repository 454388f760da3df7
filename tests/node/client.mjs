// A claudemesh-style peer on the `ws` library: signs a hello with Node's
// built-in ed25519, sends one direct message, waits for its ack and for one
// push, then prints a JSON report on stdout and exits 0. Any failure or a
// 15 s silence exits 1 with the reason on stderr.
//
// Input (environment): BROKER_WS_URL, MESH_ID, MEMBER_ID, PUBKEY (64 hex),
// SECRET_PKCS8_HEX (the ed25519 secret key as PKCS#8 DER, hex),
// TARGET_PUBKEY, NONCE, CIPHERTEXT.
import { createPrivateKey, sign } from "node:crypto";
import WebSocket from "ws";

const env = (name) => {
  const value = process.env[name];
  if (value === undefined) fail(`missing ${name}`);
  return value;
};

function fail(reason) {
  process.stderr.write(`node client: ${reason}\n`);
  process.exit(1);
}

const meshId = env("MESH_ID");
const memberId = env("MEMBER_ID");
const pubkey = env("PUBKEY");
const privateKey = createPrivateKey({
  key: Buffer.from(env("SECRET_PKCS8_HEX"), "hex"),
  format: "der",
  type: "pkcs8",
});

const timestamp = Date.now();
const signed = Buffer.from(`${meshId}|${memberId}|${pubkey}|${timestamp}`, "utf8");
const signature = sign(null, signed, privateKey).toString("hex");

const report = {};
const timer = setTimeout(() => fail(`timed out; so far: ${JSON.stringify(report)}`), 15000);
const ws = new WebSocket(env("BROKER_WS_URL"));

ws.on("error", (err) => fail(`socket error: ${err.message}`));
ws.on("close", (code) => {
  if (!report.push) fail(`closed early with ${code}; so far: ${JSON.stringify(report)}`);
});

ws.on("open", () => {
  ws.send(
    JSON.stringify({
      type: "hello",
      meshId,
      memberId,
      pubkey,
      sessionId: `node-${process.pid}`,
      pid: process.pid,
      cwd: process.cwd(),
      timestamp,
      signature,
    }),
  );
});

ws.on("message", (data) => {
  const msg = JSON.parse(data.toString("utf8"));
  switch (msg.type) {
    case "hello_ack":
      report.helloAck = msg;
      ws.send(
        JSON.stringify({
          type: "send",
          targetSpec: env("TARGET_PUBKEY"),
          priority: "now",
          nonce: env("NONCE"),
          ciphertext: env("CIPHERTEXT"),
          id: "from-node-1",
        }),
      );
      break;
    case "ack":
      report.ack = msg;
      break;
    case "push":
      report.push = msg;
      break;
    default:
      fail(`unexpected message: ${JSON.stringify(msg)}`);
  }
  if (report.ack && report.push) {
    clearTimeout(timer);
    process.stdout.write(`${JSON.stringify(report)}\n`);
    ws.close(1000);
    ws.once("close", () => process.exit(0));
  }
});
