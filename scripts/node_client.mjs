// A memnet producer and subscriber in Node.js with no dependencies, written from
// docs/protocol.md alone: RESP over a TCP socket, a minimal msgpack codec, zlib.crc32.
//
// usage: node scripts/node_client.mjs redis://127.0.0.1:6379 PREFIX MEMORY INPUT_DIM
// Sends three writes (two as float32 bin, one as an array) and one query, waits for the
// query's response and prints {"entry": ..., "response": {...}} as JSON.
import net from "node:net";
import zlib from "node:zlib";

const [url, prefix, memory, inputDim] = process.argv.slice(2);
const { hostname, port } = new URL(url);

// ---- msgpack (the subset the protocol uses) ----
function encode(value) {
  const parts = [];
  const put = (v) => {
    if (v === null) parts.push(Buffer.from([0xc0]));
    else if (typeof v === "string") {
      const s = Buffer.from(v, "utf8");
      parts.push(Buffer.from([0xdb]), u32(s.length), s);
    } else if (typeof v === "number") {  // every number as float32
      const b = Buffer.alloc(5); b[0] = 0xca; b.writeFloatBE(v, 1); parts.push(b);
    } else if (Buffer.isBuffer(v)) parts.push(Buffer.from([0xc6]), u32(v.length), v);
    else if (Array.isArray(v)) { parts.push(Buffer.from([0xdd]), u32(v.length)); v.forEach(put); }
    else {
      const keys = Object.keys(v);
      parts.push(Buffer.from([0xdf]), u32(keys.length));
      for (const k of keys) { put(k); put(v[k]); }
    }
  };
  const u32 = (n) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; };
  put(value);
  return Buffer.concat(parts);
}

function decode(buf) {
  let i = 0;
  const str = (n) => { const s = buf.toString("utf8", i, i + n); i += n; return s; };
  const arr = (n) => Array.from({ length: n }, read);
  const map = (n) => { const o = {}; for (let k = 0; k < n; k++) { const key = read(); o[key] = read(); } return o; };
  function read() {
    const t = buf[i++];
    if (t <= 0x7f) return t;
    if (t >= 0xe0) return t - 0x100;
    if ((t & 0xe0) === 0xa0) return str(t & 0x1f);
    if ((t & 0xf0) === 0x90) return arr(t & 0x0f);
    if ((t & 0xf0) === 0x80) return map(t & 0x0f);
    const n8 = () => buf[i++], n16 = () => { i += 2; return buf.readUInt16BE(i - 2); };
    const n32 = () => { i += 4; return buf.readUInt32BE(i - 4); };
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: i += 4; return buf.readFloatBE(i - 4);
      case 0xcb: i += 8; return buf.readDoubleBE(i - 8);
      case 0xcc: return n8();
      case 0xcd: return n16();
      case 0xce: return n32();
      case 0xd0: i += 1; return buf.readInt8(i - 1);
      case 0xd1: i += 2; return buf.readInt16BE(i - 2);
      case 0xd2: i += 4; return buf.readInt32BE(i - 4);
      case 0xd9: return str(n8());
      case 0xda: return str(n16());
      case 0xdb: return str(n32());
      case 0xc4: { const n = n8(); i += n; return buf.subarray(i - n, i); }
      case 0xdc: return arr(n16());
      case 0xdd: return arr(n32());
      case 0xde: return map(n16());
      case 0xdf: return map(n32());
      default: throw new Error(`msgpack type 0x${t.toString(16)} not handled`);
    }
  }
  return read();
}

// ---- RESP over one socket ----
const socket = net.connect(Number(port || 6379), hostname);
let pending = Buffer.alloc(0);
const waiters = [];
socket.on("data", (chunk) => { pending = Buffer.concat([pending, chunk]); drain(); });

function parse(buf, at) {  // returns [value, next] or null if incomplete
  const end = buf.indexOf("\r\n", at);
  if (end < 0) return null;
  const kind = String.fromCharCode(buf[at]), line = buf.toString("utf8", at + 1, end);
  if (kind === "+") return [line, end + 2];
  if (kind === "-") return [new Error(line), end + 2];
  if (kind === ":") return [Number(line), end + 2];
  if (kind === "$") {
    const n = Number(line);
    if (n < 0) return [null, end + 2];
    if (buf.length < end + 2 + n + 2) return null;
    return [buf.subarray(end + 2, end + 2 + n), end + 2 + n + 2];
  }
  if (kind === "*") {
    const n = Number(line);
    if (n < 0) return [null, end + 2];
    const items = []; let next = end + 2;
    for (let k = 0; k < n; k++) { const r = parse(buf, next); if (!r) return null; items.push(r[0]); next = r[1]; }
    return [items, next];
  }
  throw new Error(`unexpected RESP type ${kind}`);
}

function drain() {
  while (waiters.length) {
    const r = parse(pending, 0);
    if (!r) return;
    pending = pending.subarray(r[1]);
    const { resolve, reject } = waiters.shift();
    r[0] instanceof Error ? reject(r[0]) : resolve(r[0]);
  }
}

function command(...args) {
  const parts = [Buffer.from(`*${args.length}\r\n`)];
  for (const a of args) {
    const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a), "utf8");
    parts.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from("\r\n"));
  }
  socket.write(Buffer.concat(parts));
  return new Promise((resolve, reject) => { waiters.push({ resolve, reject }); drain(); });
}

// ---- the protocol ----
const partitions = Number((await command("HGET", `${prefix}:meta`, "partitions")).toString());
const p = zlib.crc32(Buffer.from(memory, "utf8")) % partitions;
const key = (name) => `${prefix}:{${p}}:${name}`;
const vector = (seed) => Array.from({ length: Number(inputDim) }, (_, k) => Math.sin(seed * 7 + k));
const f32bin = (values) => { const b = Buffer.alloc(4 * values.length); values.forEach((v, k) => b.writeFloatLE(v, 4 * k)); return b; };

await command("XADD", key("in"), "*", "msg", encode({ op: "write", memory, x: f32bin(vector(1)) }));
await command("XADD", key("in"), "*", "msg", encode({ op: "write", memory, x: f32bin(vector(2)) }));
await command("XADD", key("in"), "*", "msg", encode({ op: "write", memory, x: vector(3) }));
const entry = (await command("XADD", key("in"), "*", "msg",
  encode({ op: "query", memory, id: "from-node", x: vector(4) }))).toString();

// The response is published in the out stream at the query's own entry id.
const [ms, seq] = entry.split("-").map(BigInt);
let after = seq > 0n ? `${ms}-${seq - 1n}` : `${ms - 1n}-18446744073709551615`;
const deadline = Date.now() + 30000;
while (Date.now() < deadline) {
  const reply = await command("XREAD", "COUNT", 100, "BLOCK", 1000, "STREAMS", key("out"), after);
  for (const [, entries] of reply || []) {
    for (const [id, fields] of entries) {
      after = id.toString();
      if (after === entry) {
        console.log(JSON.stringify({ entry, response: decode(fields[1]) }));
        socket.end();
        process.exit(0);
      }
    }
  }
}
console.error(`no response to ${entry} within 30 s`);
process.exit(1);
