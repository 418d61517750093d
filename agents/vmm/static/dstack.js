// Copyright: dstack.tee contributors
// GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
//
// The formats the VMM web UI needs, without the DOM. Each function mirrors its Python twin in
// plugins/module_utils (app_compose.py, env_crypt.py, kdf.py), so that the browser makes the
// same app-compose.json bytes (and so the same compose_hash and app_id), checks the KMS
// signature the same way, and encrypts env values in the same layout. Errors name the field and
// the reason, never a value.

import { keccak_256 } from "@noble/hashes/sha3.js";
import { secp256k1 } from "./vendor/noble-curves/secp256k1.js";

export class DstackError extends Error {
  constructor(field, reason) {
    super(`${field}: ${reason}`);
    this.name = "DstackError";
    this.field = field;
    this.reason = reason;
  }
}

// ---- hex and bytes ----------------------------------------------------------------------------

const HEX_RE = /^(?:[0-9a-fA-F]{2})*$/;

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Bytes of a hex string (an optional 0x prefix), as errors.parse_hex does. */
export function parseHex(value, field, { length = null, allowEmpty = false } = {}) {
  if (typeof value !== "string") throw new DstackError(field, `must be a hex string, not ${typeof value}`);
  let text = value.trim();
  if (text.slice(0, 2) === "0x" || text.slice(0, 2) === "0X") text = text.slice(2);
  if (!HEX_RE.test(text)) {
    if (text.length % 2) throw new DstackError(field, `is not hex: odd number of digits (${text.length})`);
    throw new DstackError(field, "is not hex: it has characters outside 0-9 and a-f");
  }
  const data = new Uint8Array(text.length / 2);
  for (let i = 0; i < data.length; i++) data[i] = parseInt(text.slice(2 * i, 2 * i + 2), 16);
  if (!data.length && !allowEmpty && length !== 0) throw new DstackError(field, "must not be empty");
  if (length !== null) {
    const allowed = Array.isArray(length) ? length : [length];
    if (!allowed.includes(data.length)) {
      throw new DstackError(field, `must be ${allowed.join(" or ")} bytes (${2 * allowed[0]} hex digits), got ${data.length} bytes`);
    }
  }
  return data;
}

function concatBytes(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const part of parts) {
    out.set(part, pos);
    pos += part.length;
  }
  return out;
}

const utf8 = (text) => new TextEncoder().encode(text);

// ---- app-compose.json (app_compose.py) ---------------------------------------------------------

export const KEY_PROVIDERS = ["none", "kms", "local", "tpm"];
export const RUNNERS = ["docker-compose", "bash", "nerdctl-compose"];
const STORAGE_FS = ["zfs", "ext4"];
export const ENV_KEY_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
export const NAME_RE = /^[A-Za-z0-9\-_. @~!$^()]+$/;
const HUMAN_SIZE_RE = /^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$/;

export const DEFAULTS = Object.freeze({
  manifest_version: 2,
  runner: "docker-compose",
  kms_enabled: true,
  gateway_enabled: true,
  local_key_provider_enabled: false,
  key_provider: "kms",
  key_provider_id: "",
  public_logs: false,
  public_sysinfo: false,
  public_tcbinfo: true,
  allowed_envs: Object.freeze([]),
  no_instance_id: false,
  secure_time: true,
});
const OPTIONAL_FIELDS = [
  "bash_script", "pre_launch_script", "init_script", "features", "storage_fs", "swap_size",
  "docker_config", "port_policy", "requirements", "verity_volumes", "event_log_version",
  "custom_domains",
];
const BOOL_FIELDS = [
  "kms_enabled", "gateway_enabled", "local_key_provider_enabled", "public_logs",
  "public_sysinfo", "public_tcbinfo", "no_instance_id", "secure_time",
];
export const FIELDS = ["name", "docker_compose_file", ...Object.keys(DEFAULTS), ...OPTIONAL_FIELDS];

const isMapping = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const given = (v) => v !== null && v !== undefined;
/** Python's repr() of a str (for messages that read as the Python ones do). */
export function pyRepr(text) {
  const quote = text.includes("'") && !text.includes("\"") ? "\"" : "'";
  const named = { "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t" };
  return quote + Array.from(text, (c) => {
    if (c in named) return named[c];
    if (c === quote) return `\\${c}`;
    const code = c.codePointAt(0);
    if (code < 0x20 || code === 0x7f) return `\\x${code.toString(16).padStart(2, "0")}`;
    return c;
  }).join("") + quote;
}

const short = (v, n = 40) => pyRepr(Array.from(String(v)).slice(0, n).join(""));
const unknown = (value, allowed) => `unknown value ${short(value)} (expected one of ${allowed.join(", ")})`;

/** The effective key provider: key_provider wins, then kms_enabled, then the local provider. */
export function keyProviderOf(app) {
  const kp = app.key_provider;
  if (kp) {
    if (!KEY_PROVIDERS.includes(kp)) throw new DstackError("key_provider", unknown(kp, KEY_PROVIDERS));
    return kp;
  }
  if (app.kms_enabled) return "kms";
  if (app.local_key_provider_enabled) return "local";
  return "none";
}

function checkComposeText(text, field) {
  // The VMM parses the YAML (and names the line) on CreateVm; the page only refuses the obvious.
  if (typeof text !== "string" || !text.trim()) throw new DstackError(field, "is empty");
}

function parseSize(value, field) {
  if (typeof value === "boolean") throw new DstackError(field, "must be a size in bytes or like '2G'");
  if (typeof value === "number" && Number.isInteger(value)) {
    if (value < 0) throw new DstackError(field, "must not be negative");
    return value;
  }
  if (!HUMAN_SIZE_RE.test(String(value))) throw new DstackError(field, "must be a size in bytes or like '2G', '512M', '1GiB'");
  return value;
}

/** Check an app-compose object field by field (app_compose.validate); throws naming the first bad field. */
export function validateAppCompose(app) {
  if (!isMapping(app)) throw new DstackError("app_compose", "must be a mapping");
  const name = app.name;
  if (typeof name !== "string" || !name) throw new DstackError("name", "is required (a non-empty string)");
  if (!NAME_RE.test(name)) throw new DstackError("name", "may hold only letters, digits, spaces and -_.@~!$^()");
  const mv = app.manifest_version;
  if (!((Number.isInteger(mv) && (mv === 1 || mv === 2)) || (typeof mv === "string" && /^[0-9]+$/.test(mv)))) {
    throw new DstackError("manifest_version", "must be 1 or 2, or a numeric string such as \"3\"");
  }
  if (!RUNNERS.includes(app.runner)) throw new DstackError("runner", unknown(app.runner, RUNNERS));
  if (app.runner === "docker-compose" || app.runner === "nerdctl-compose") {
    checkComposeText(app.docker_compose_file, "docker_compose_file");
  } else if (!app.bash_script) {
    throw new DstackError("bash_script", "is required when runner is bash");
  }
  for (const field of BOOL_FIELDS) {
    if (given(app[field]) && typeof app[field] !== "boolean") throw new DstackError(field, "must be true or false");
  }
  const kp = app.key_provider;
  if (given(kp)) {
    if (!KEY_PROVIDERS.includes(kp)) throw new DstackError("key_provider", unknown(kp, KEY_PROVIDERS));
    if (app.kms_enabled && kp !== "kms") throw new DstackError("kms_enabled", `is true but key_provider is ${short(kp)}`);
    if (app.local_key_provider_enabled && kp !== "local") {
      throw new DstackError("local_key_provider_enabled", `is true but key_provider is ${short(kp)}`);
    }
  }
  if (app.key_provider_id) parseHex(app.key_provider_id, "key_provider_id");
  const allowed = app.allowed_envs || [];
  if (!Array.isArray(allowed)) throw new DstackError("allowed_envs", "must be a list of variable names");
  for (const key of allowed) {
    if (typeof key !== "string" || !ENV_KEY_RE.test(key) || utf8(key).length > 255) {
      throw new DstackError("allowed_envs", `${short(key, 64)} is not a valid variable name `
        + "(letters, digits and _, not starting with a digit, at most 255 bytes)");
    }
  }
  if (new Set(allowed).size !== allowed.length) throw new DstackError("allowed_envs", "lists a name twice");
  if (given(app.storage_fs) && !STORAGE_FS.includes(app.storage_fs)) {
    throw new DstackError("storage_fs", unknown(app.storage_fs, STORAGE_FS));
  }
  if (given(app.swap_size)) parseSize(app.swap_size, "swap_size");
  for (const field of ["docker_config", "port_policy", "requirements"]) {
    if (given(app[field]) && !isMapping(app[field])) throw new DstackError(field, "must be a mapping");
  }
  const init = app.init_script;
  if (given(init) && !(typeof init === "string"
      || (Array.isArray(init) && init.length <= 5 && init.every((s) => typeof s === "string")))) {
    throw new DstackError("init_script", "must be a script or a list of at most 5 scripts");
  }
  return app;
}

/**
 * An app-compose object from docker-compose text plus options (app_compose.build): options left
 * null or undefined take dstack's defaults; the key-provider booleans follow key_provider.
 */
export function buildAppCompose(composeText, name, options = {}) {
  const bad = Object.keys(options).filter((k) => !FIELDS.includes(k)).sort(compareCodePoints);
  if (bad.length) throw new DstackError(bad[0], "is not an app-compose field");
  const app = { ...DEFAULTS, allowed_envs: [] };
  app.name = name;
  app.docker_compose_file = composeText;
  for (const [field, value] of Object.entries(options)) {
    if (given(value)) app[field] = value;
  }
  if (given(options.key_provider)) {
    const kp = options.key_provider;
    if (!KEY_PROVIDERS.includes(kp)) throw new DstackError("key_provider", unknown(kp, KEY_PROVIDERS));
    if (!given(options.kms_enabled)) app.kms_enabled = kp === "kms";
    if (!given(options.local_key_provider_enabled)) app.local_key_provider_enabled = kp === "local";
  } else if (options.kms_enabled === false || options.local_key_provider_enabled) {
    const rest = { ...app };
    delete rest.key_provider;
    app.key_provider = keyProviderOf(rest);
  }
  if (app.runner === "bash") delete app.docker_compose_file;
  return validateAppCompose(app);
}

/** Python's sort order for str keys: by code point (JS compares UTF-16 code units). */
export function compareCodePoints(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

function canonical(value) {
  // Python's _canonical: NaN and infinities become null (and so drop out at the top level).
  if (typeof value === "number" && !Number.isFinite(value)) return null;
  return value === undefined ? null : value;
}

function dumpJson(value, path) {
  value = canonical(value);
  if (value === null) return "null";
  if (value === true) return "true";
  if (value === false) return "false";
  if (typeof value === "number") {
    // JSON numbers cannot tell 2.0 from 2, so a float could not be rendered as Python does.
    if (!Number.isSafeInteger(value)) throw new DstackError(path, "only whole numbers (up to 2^53) are supported here");
    return String(value);
  }
  if (typeof value === "string") {
    if (!value.isWellFormed()) throw new DstackError(path, "holds a lone UTF-16 surrogate, which UTF-8 cannot encode");
    // JSON.stringify escapes exactly what json.dumps(ensure_ascii=False) escapes: " \ and
    // U+0000..U+001F (\b \t \n \f \r short, the rest as lowercase \u00xx).
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((v, i) => dumpJson(v, `${path}[${i}]`)).join(",")}]`;
  if (typeof value === "object") {
    const keys = Object.keys(value).sort(compareCodePoints);
    return `{${keys.map((k) => `${dumpJson(k, path)}:${dumpJson(value[k], `${path}.${k}`)}`).join(",")}}`;
  }
  throw new DstackError(path, `cannot hold a ${typeof value}`);
}

/** The exact bytes of app-compose.json (app_compose.render): keys sorted, compact, UTF-8, top-level nulls dropped. */
export function renderAppCompose(app) {
  if (!isMapping(app)) throw new DstackError("app_compose", "must be a mapping");
  const top = {};
  for (const [key, value] of Object.entries(app)) {
    if (canonical(value) !== null) top[key] = value;
  }
  return utf8(dumpJson(top, "app_compose"));
}

export async function sha256Hex(bytes) {
  return toHex(new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)));
}

/** app_id: the given one (20 bytes hex, e.g. a DstackApp contract address) or compose_hash[0:20]. */
export function appIdFor(composeHashHex, appId = "") {
  if (appId) return toHex(parseHex(appId, "app_id", { length: 20 }));
  return toHex(parseHex(composeHashHex, "compose_hash", { length: 32 }).slice(0, 20));
}

// ---- env values (env_crypt.py) ----------------------------------------------------------------

const MAX_KEY_BYTES = 255;
const MAX_VALUE_BYTES = 128 * 1024;
const MAX_ITEMS = 1024;
const MAX_TOTAL_BYTES = 1024 * 1024;
const DOTENV_LINE = /^\s*(?:export\s+)?([^=\s]+)\s*=\s*([\s\S]*?)\s*$/;
const DQ_ESCAPES = { n: "\n", r: "\r", t: "\t", "\"": "\"", "\\": "\\", $: "$" };

/** Python's str.splitlines(). */
function splitLines(text) {
  if (!text) return [];
  const lines = text.split(/\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]/);
  if (lines[lines.length - 1] === "") lines.pop();
  return lines;
}

function closingQuote(body, quote) {
  let escaped = false;
  for (let pos = 0; pos < body.length; pos++) {
    const char = body[pos];
    if (quote === "\"" && char === "\\" && !escaped) {
      escaped = true;
      continue;
    }
    if (char === quote && !escaped) return pos;
    escaped = false;
  }
  return -1;
}

const unescapeDq = (body) => body.replace(/\\(.)/g, (all, c) => (c in DQ_ESCAPES ? DQ_ESCAPES[c] : all));

/**
 * [[key, value]] from .env text (env_crypt.parse_dotenv): KEY=value, export KEY=value, # comments,
 * quoted values (double quotes may span lines and know \n \r \t \" \\ \$; single quotes are literal).
 */
export function parseDotenv(text, field = "env") {
  const items = [];
  const lines = splitLines(text);
  let i = 0;
  while (i < lines.length) {
    const lineno = i + 1;
    const line = lines[i];
    i += 1;
    const stripped = line.trim();
    if (!stripped || stripped.startsWith("#")) continue;
    const match = DOTENV_LINE.exec(line);
    if (!match) throw new DstackError(`${field} line ${lineno}`, "is not KEY=value");
    const [, key, raw] = match;
    let value;
    if (raw[0] === "\"" || raw[0] === "'") {
      const quote = raw[0];
      let body = raw.slice(1);
      while (closingQuote(body, quote) < 0 && i < lines.length) {
        body += `\n${lines[i]}`;
        i += 1;
      }
      const end = closingQuote(body, quote);
      if (end < 0) throw new DstackError(`${field} line ${lineno}`, `the value of ${key} has no closing ${quote}`);
      const rest = body.slice(end + 1).trim();
      if (rest && !rest.startsWith("#")) {
        throw new DstackError(`${field} line ${lineno}`, `unexpected text after the quoted value of ${key}`);
      }
      body = body.slice(0, end);
      value = quote === "\"" ? unescapeDq(body) : body;
    } else {
      value = raw.split(/\s+#/)[0].trim();
    }
    items.push([key, value]);
  }
  return checkEnv(items, field);
}

/** The JSON plaintext dstack encrypts: {"env":[{"key":K,"value":V},...]}. */
export function envPlaintext(items) {
  return utf8(JSON.stringify({ env: items.map(([key, value]) => ({ key, value })) }));
}

/** dstack's limits: key pattern and length, value and total sizes, item count, no repeats. */
export function checkEnv(items, field = "env") {
  if (items.length > MAX_ITEMS) throw new DstackError(field, `has ${items.length} variables; at most ${MAX_ITEMS} are allowed`);
  const seen = new Set();
  for (const [key, value] of items) {
    if (typeof key !== "string" || !ENV_KEY_RE.test(key)) {
      throw new DstackError(`${field}.${String(key).slice(0, 64)}`, "is not a valid variable name: it must match ^[a-zA-Z_][a-zA-Z0-9_]*$");
    }
    if (utf8(key).length > MAX_KEY_BYTES) throw new DstackError(`${field}.${key.slice(0, 32)}...`, `the name is longer than ${MAX_KEY_BYTES} bytes`);
    if (seen.has(key)) throw new DstackError(`${field}.${key}`, "is given twice");
    seen.add(key);
    if (typeof value !== "string") throw new DstackError(`${field}.${key}`, "the value must be a string");
    if (!value.isWellFormed()) throw new DstackError(`${field}.${key}`, "the value holds a lone UTF-16 surrogate");
    const size = utf8(value).length;
    if (size > MAX_VALUE_BYTES) throw new DstackError(`${field}.${key}`, `the value is ${size} bytes; at most ${MAX_VALUE_BYTES} are allowed`);
  }
  const total = envPlaintext(items).length;
  if (total > MAX_TOTAL_BYTES) throw new DstackError(field, `is ${total} bytes in all; at most ${MAX_TOTAL_BYTES} are allowed`);
  return items;
}

/** [kept items, dropped names]: variables not in allowed_envs are not encrypted at all. */
export function filterAllowed(items, allowedEnvs) {
  const allowed = new Set(allowedEnvs);
  return [items.filter(([k]) => allowed.has(k)), items.filter(([k]) => !allowed.has(k)).map(([k]) => k)];
}

/** Encrypt checked env items to an app's X25519 public key: eph_pub(32) || iv(12) || ciphertext || tag(16). */
export async function encryptEnv(items, publicKey) {
  const pub = publicKey instanceof Uint8Array ? publicKey : parseHex(publicKey, "public_key", { length: 32 });
  const subtle = crypto.subtle;
  const peer = await subtle.importKey("raw", pub, { name: "X25519" }, false, []);
  const eph = await subtle.generateKey({ name: "X25519" }, true, ["deriveBits"]);
  let shared;
  try {
    shared = new Uint8Array(await subtle.deriveBits({ name: "X25519", public: peer }, eph.privateKey, 256));
  } catch {
    throw new DstackError("public_key", "is not a usable X25519 public key");
  }
  const key = await subtle.importKey("raw", shared, { name: "AES-GCM" }, false, ["encrypt"]);
  shared.fill(0);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const plain = envPlaintext(items);
  const sealed = new Uint8Array(await subtle.encrypt({ name: "AES-GCM", iv }, key, plain));
  plain.fill(0);
  const ephPub = new Uint8Array(await subtle.exportKey("raw", eph.publicKey));
  return concatBytes(ephPub, iv, sealed);
}

// ---- the KMS signature over an app's env public key (kdf.py) -------------------------------------

export const ENV_PUBKEY_MAX_AGE = 300;
export const ENV_PUBKEY_FUTURE_SKEW = 60;
const ENV_PUBKEY_PREFIX = utf8("dstack-env-encrypt-pubkey:");

function u64be(value) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value));
  return out;
}

/** keccak256("dstack-env-encrypt-pubkey:" || app_id || u64_be(timestamp) || public_key). */
export function envPubkeyHash(appId, publicKey, timestamp) {
  return keccak_256(concatBytes(ENV_PUBKEY_PREFIX, appId, u64be(timestamp), publicKey));
}

/** The compressed form (33 bytes) of a SEC1 secp256k1 public key given as hex (33 or 65 bytes). */
export function compressK256(hex, field = "kms_k256_pubkey") {
  const raw = parseHex(hex, field, { length: [33, 65] });
  try {
    return secp256k1.Point.fromBytes(raw).toBytes(true);
  } catch {
    throw new DstackError(field, "is not a secp256k1 public key");
  }
}

/**
 * Check that the KMS whose k256 key is `kmsK256Pubkey` signed this env public key for this app:
 * signature_v1 (65 bytes r||s||v) over envPubkeyHash, no older than 300 s and at most 60 s in the
 * future. Returns {publicKey, timestamp, age, signer}; throws a DstackError saying why otherwise.
 */
export function verifyEnvPubkey(answer, appIdHex, kmsK256Pubkey, now = Math.floor(Date.now() / 1000)) {
  const trusted = compressK256(kmsK256Pubkey);
  const app = parseHex(appIdHex, "app_id", { length: 20 });
  const pub = parseHex(answer.public_key ?? "", "public_key", { length: 32 });
  if (!answer.signature_v1) {
    throw new DstackError("signature_v1", "is missing: the env public key cannot be trusted without the KMS's timestamped signature");
  }
  const timestamp = answer.timestamp;
  if (!Number.isSafeInteger(timestamp) || timestamp < 0) throw new DstackError("timestamp", "is required with signature_v1 (whole seconds)");
  const age = now - timestamp;
  if (age > ENV_PUBKEY_MAX_AGE) {
    throw new DstackError("timestamp", `is stale: the signature is ${age} s old (at most ${ENV_PUBKEY_MAX_AGE} s allowed)`);
  }
  if (age < -ENV_PUBKEY_FUTURE_SKEW) throw new DstackError("timestamp", `is ${-age} s in the future`);
  const sig = parseHex(answer.signature_v1, "signature_v1", { length: 65 });
  let recid = sig[64];
  if (recid >= 27) recid -= 27;
  let signer;
  try {
    signer = secp256k1.Signature.fromBytes(sig.slice(0, 64), "compact").addRecoveryBit(recid)
      .recoverPublicKey(envPubkeyHash(app, pub, timestamp)).toBytes(true);
  } catch {
    throw new DstackError("signature_v1", "is not a valid secp256k1 signature");
  }
  if (toHex(signer) !== toHex(trusted)) {
    throw new DstackError("signature_v1", "was not made by the pinned KMS key (kms_k256_pubkey) for this app_id and public key");
  }
  return { publicKey: pub, timestamp, age, signer: toHex(signer) };
}

// ---- VM configuration ---------------------------------------------------------------------------

const PORT_RE = /^(?:(\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(\d{1,5}):(\d{1,5})(?:\/(tcp|udp))?$/;

/** Port mappings from "[host_address:]host_port:vm_port[/tcp|udp]" entries (lines or commas). */
export function parsePorts(text) {
  const ports = [];
  for (const entry of String(text).split(/[\s,]+/).filter(Boolean)) {
    const m = PORT_RE.exec(entry);
    if (!m) throw new DstackError("ports", `${short(entry)} is not [host_address:]host_port:vm_port[/tcp|udp]`);
    const [hostPort, vmPort] = [Number(m[2]), Number(m[3])];
    for (const [label, port] of [["host port", hostPort], ["VM port", vmPort]]) {
      if (port < 1 || port > 65535) throw new DstackError("ports", `${short(entry)}: the ${label} must be 1 to 65535`);
    }
    ports.push({
      protocol: m[4] || "tcp", host_port: hostPort, vm_port: vmPort,
      host_address: m[1] ? m[1].replace(/^\[|\]$/g, "") : "127.0.0.1",
    });
  }
  return ports;
}

/** Variable names from "A, B C" (commas or spaces), in the order given. */
export function parseNames(text) {
  return String(text).split(/[\s,]+/).filter(Boolean);
}
