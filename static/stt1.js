// STT1 in the browser: PASETO v3.local tokens under per-time-step keys, with WebCrypto only.
//
// The protocol is PROTOCOL.md; this module mirrors security.py (sections "Envelope" and
// "Credential files") and client.py, and must agree with them byte for byte: the committed
// vectors (tests/vectors/stt1.json, tests/vectors/paseto/v3.json) are checked by
// vector_tests.js in Node and in Chromium. Read top to bottom, in sections:
//   errors, bytes (base64url, PAE), PASETO v3.local, STT1 keys, footer / assertions /
//   payloads, tokens, credentials, keeping credentials (IndexedDB), the Client.
//
// Keys are non-extractable CryptoKeys wherever WebCrypto allows it: K is an HKDF base key,
// each direction key K_dir an HMAC key derived from it. See DirectionKey for the one place
// raw key bytes (the 30-second step key) briefly exist. WebCrypto exists only in a secure
// context (https, or http://localhost).
//
//   const store = await KeyStore.open();
//   const keys = (await store.load()) ?? (await store.save(await importCredential(jsonText)));
//   const gw = new Client(keys, store.hooks());  // a rotated key is stored before it is used
//   await gw.call("power", 3);                 // POST /rest/power/3
//   await gw.call("add", null, { a: 1, b: 2 }); // POST /rest/add/ with {"a":1,"b":2}

// #### Errors ##############################################################################

/** Any token that cannot be accepted. No message and no cause: which check failed is an oracle. */
export class InvalidToken extends Error {
  constructor() {
    super("invalid token");
    this.name = "InvalidToken";
  }
}

/** A failed call: HTTP status (0 when there was none), a short code and a message (client.py). */
export class GatewayError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.requestId = null; // the X-Request-Id this client sent, to find the server's log line
    this.verified = false; // true when the gateway signed this answer (a signed error is a fact, not a hint)
  }
  toString() {
    return `${this.name}: ${this.status} ${this.code}: ${this.message}`;
  }
}
export class BadRequest extends GatewayError {} // 400, signed
export class Unauthorized extends GatewayError {} // 401, usually unsigned: means only "retry"
export class NotFound extends GatewayError {} // 404, signed
export class MethodNotAllowed extends GatewayError {} // 405, signed
export class TooLarge extends GatewayError {} // 413, unsigned
export class UnsupportedMediaType extends GatewayError {} // 415, signed
export class InvalidArguments extends GatewayError {} // 422, signed
export class RateLimited extends GatewayError {} // 429, usually unsigned
export class ServerError extends GatewayError {} // 500, signed
export class Overloaded extends GatewayError {} // 503, signed (unsigned when the key store is down)
export class Timeout extends GatewayError {} // 504, signed (the function ran too long)
/** The answer is not signed by the gateway for this request: its body was not used. */
export class ResponseForged extends GatewayError {}
/** A verified answer whose body does not follow the gateway's JSON contract. */
export class BadResponse extends GatewayError {}
/** No HTTP answer: network error, or no answer within the timeout. */
export class Unreachable extends GatewayError {}

const SIGNED_ERRORS = {
  400: BadRequest, 401: Unauthorized, 404: NotFound, 405: MethodNotAllowed, 413: TooLarge,
  415: UnsupportedMediaType, 422: InvalidArguments, 429: RateLimited, 500: ServerError,
  503: Overloaded, 504: Timeout,
};
// Unsigned answers that are legitimate before the token is verified (PROTOCOL.md 3), and the
// HTTP layer's own refusals, sent before there is a request to sign for (README: 400, 408, 431):
// a hint, never a fact. Their body is not read.
const UNSIGNED_HINTS = {
  400: [BadRequest, "bad_request", "the gateway could not read the request as HTTP (unsigned answer)"],
  401: [Unauthorized, "unauthorized", "the gateway refused the token (unsigned answer)"],
  408: [GatewayError, "timeout", "the request did not reach the gateway in time (unsigned answer)"],
  413: [TooLarge, "too_large", "the request body is over the gateway's limit (unsigned answer)"],
  429: [RateLimited, "rate_limited", "throttled by the gateway (unsigned answer)"],
  431: [TooLarge, "too_large", "the request's URL and headers are over the gateway's limit (unsigned answer)"],
  // Sent before the token can be verified (the key store is down): the gateway is unavailable.
  503: [Overloaded, "unavailable", "the gateway is unavailable; retry later (unsigned answer)"],
  // Never the gateway's (its 504 is signed): a proxy in front of it that got no answer, or none
  // in time. Called a forgery, they raised a false alarm whenever the gateway was down.
  502: [Unreachable, "unreachable", "no answer from the gateway: a proxy in front of it answered 502 (unsigned); "
    + "the call may have run, so check before retrying"],
  504: [Unreachable, "unreachable", "no answer from the gateway in time: a proxy in front of it answered 504 "
    + "(unsigned); the call may have run, so check before retrying"],
};

// #### Bytes ###############################################################################

const EMPTY = new Uint8Array(0);
const UTF8 = new TextEncoder();
// fatal: invalid UTF-8 is refused, as msgspec does; ignoreBOM keeps a BOM so JSON.parse refuses it.
const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function subtle() {
  const s = globalThis.crypto && globalThis.crypto.subtle;
  if (!s) throw new Error("WebCrypto is unavailable: STT1 needs a secure context (https or localhost)");
  return s;
}

function bytesArg(value, name) {
  if (!(value instanceof Uint8Array)) throw new TypeError(`${name} must be a Uint8Array`);
  return value;
}

/** Header-value bytes: a string is taken as a ByteString (each char one byte, as fetch gives them). */
function rawBytes(value, name) {
  if (value instanceof Uint8Array) return value;
  if (typeof value !== "string") throw new TypeError(`${name} must be a Uint8Array or a string`);
  const out = new Uint8Array(value.length);
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c > 0xff) throw new TypeError(`${name} is not a byte string`);
    out[i] = c;
  }
  return out;
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

async function sha256(data) {
  return new Uint8Array(await subtle().digest("SHA-256", data));
}

function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

// -- Canonical base64url --------------------------------------------------------------------
// RFC 4648 base64url without padding, and exactly one spelling per byte string: no padding,
// no junk, no length of 1 mod 4, no non-zero unused bits in the last character.

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const LOOKUP = new Int8Array(128).fill(-1);
for (let i = 0; i < 64; i++) LOOKUP[ALPHABET.charCodeAt(i)] = i;

/** Encode as unpadded base64url, the only spelling b64decode accepts. */
export function b64encode(bytes) {
  bytesArg(bytes, "bytes");
  let out = "";
  let i = 0;
  for (; i + 2 < bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += ALPHABET[n >> 18] + ALPHABET[(n >> 12) & 63] + ALPHABET[(n >> 6) & 63] + ALPHABET[n & 63];
  }
  if (bytes.length - i === 1) {
    out += ALPHABET[bytes[i] >> 2] + ALPHABET[(bytes[i] & 3) << 4];
  } else if (bytes.length - i === 2) {
    const n = (bytes[i] << 8) | bytes[i + 1];
    out += ALPHABET[n >> 10] + ALPHABET[(n >> 4) & 63] + ALPHABET[(n & 15) << 2];
  }
  return out;
}

/** Decode canonical unpadded base64url; throw InvalidToken for any other spelling. */
export function b64decode(text) {
  if (typeof text !== "string" || text.length % 4 === 1) throw new InvalidToken();
  const out = new Uint8Array(Math.floor((text.length * 3) / 4));
  let acc = 0;
  let bits = 0;
  let j = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const v = c < 128 ? LOOKUP[c] : -1;
    if (v < 0) throw new InvalidToken();
    acc = ((acc << 6) | v) & 0xffff;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[j++] = (acc >> bits) & 0xff;
    }
  }
  if (acc & ((1 << bits) - 1)) throw new InvalidToken(); // unused trailing bits must be zero
  return out;
}

// -- PAE ------------------------------------------------------------------------------------

function le64(view, offset, n) {
  view.setUint32(offset, n >>> 0, true);
  // PASETO clears the top bit (for languages without uint64); JS lengths never reach it.
  view.setUint32(offset + 4, Math.floor(n / 2 ** 32) & 0x7fffffff, true);
}

/** PASETO pre-authentication encoding: LE64 count, then LE64 length || bytes of each piece. */
export function pae(...pieces) {
  let total = 8;
  for (const p of pieces) total += 8 + bytesArg(p, "a PAE piece").length;
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  le64(view, 0, pieces.length);
  let offset = 8;
  for (const p of pieces) {
    le64(view, offset, p.length);
    out.set(p, offset + 8);
    offset += 8 + p.length;
  }
  return out;
}

// #### PASETO v3.local ######################################################################

const HEADER = "v3.local.";
const HEADER_BYTES = UTF8.encode(HEADER);
const KEY_LEN = 32;
const NONCE_LEN = 32;
const TAG_LEN = 48;
const INFO_ENC = UTF8.encode("paseto-encryption-key");
const INFO_AUTH = UTF8.encode("paseto-auth-key-for-aead");

// RFC 5869 2.2: an absent salt is HashLen zero bytes. WebCrypto's empty salt is the same key
// to HMAC (a key shorter than a block is zero-padded to the block), and the vector tests
// check both that equality and the official vectors.
function hkdf(info) {
  return { name: "HKDF", hash: "SHA-384", salt: EMPTY, info };
}

function isHkdfKey(key) {
  return !!key && typeof key === "object" && key.type === "secret" && key.algorithm?.name === "HKDF";
}

/** A raw 32-byte secret as a non-extractable HKDF base key (the bytes are not kept). */
export async function importSecret(bytes) {
  if (!(bytes instanceof Uint8Array) || bytes.length !== KEY_LEN) throw new TypeError("a key is exactly 32 bytes");
  return subtle().importKey("raw", bytes, "HKDF", false, ["deriveBits", "deriveKey"]);
}

/** A v3.local key: a Uint8Array(32), or an HKDF CryptoKey, or { key: HKDF CryptoKey }. */
async function localKey(key) {
  if (key instanceof Uint8Array) return importSecret(key);
  if (isHkdfKey(key)) return key;
  if (key && isHkdfKey(key.key)) return key.key;
  throw new TypeError("a v3.local key is 32 bytes or an HKDF CryptoKey");
}

/** AES-256-CTR under Ek with counter block n2 (Ek || n2 = HKDF(key, enc || n, 48)). */
async function ctr(key, nonce, data) {
  // deriveBits is the only way to split one HKDF output into a key and a counter; Ek is
  // single-use (one nonce), imported at once as non-extractable and the copy wiped.
  const okm = new Uint8Array(await subtle().deriveBits(hkdf(concat(INFO_ENC, nonce)), key, 384));
  const ek = await subtle().importKey("raw", okm.subarray(0, 32), "AES-CTR", false, ["encrypt"]);
  const counter = okm.slice(32);
  okm.fill(0);
  // length 128: the whole block is the counter, as in OpenSSL's CTR. CTR is its own inverse.
  return new Uint8Array(await subtle().encrypt({ name: "AES-CTR", counter, length: 128 }, ek, data));
}

function authKey(key, nonce) {
  // Ak never leaves WebCrypto: derived straight into a non-extractable HMAC key.
  const alg = { name: "HMAC", hash: "SHA-384", length: 384 };
  return subtle().deriveKey(hkdf(concat(INFO_AUTH, nonce)), key, alg, false, ["sign", "verify"]);
}

async function seal(key, payload, footer, implicit, nonce) {
  const c = await ctr(key, nonce, payload);
  const mac = pae(HEADER_BYTES, nonce, c, footer, implicit);
  const tag = new Uint8Array(await subtle().sign("HMAC", await authKey(key, nonce), mac));
  let token = HEADER + b64encode(concat(nonce, c, tag));
  if (footer.length) token += "." + b64encode(footer);
  return token;
}

async function unseal(key, body, footer, implicit) {
  const nonce = body.subarray(0, NONCE_LEN);
  const c = body.subarray(NONCE_LEN, body.length - TAG_LEN);
  const tag = body.subarray(body.length - TAG_LEN);
  const mac = pae(HEADER_BYTES, nonce, c, footer, implicit);
  // subtle.verify compares in constant time; nothing is key-split for decryption, let alone
  // decrypted, until the tag is good.
  if (!(await subtle().verify("HMAC", await authKey(key, nonce), tag, mac))) throw new InvalidToken();
  return ctr(key, nonce, c);
}

/**
 * Check a v3.local token's shape and decode it, before any key is involved. Returns
 * { body: nonce||c||tag, footer } (footer empty when absent; NOT yet authenticated).
 */
export function split(token) {
  if (typeof token !== "string" || !token.startsWith(HEADER)) throw new InvalidToken();
  const parts = token.slice(HEADER.length).split(".");
  let body;
  let footer = EMPTY;
  if (parts.length === 1) {
    body = b64decode(parts[0]);
  } else if (parts.length === 2 && parts[1]) {
    // An empty footer is written without its dot, so "<b64>." would be a second spelling.
    body = b64decode(parts[0]);
    footer = b64decode(parts[1]);
  } else {
    throw new InvalidToken();
  }
  if (body.length < NONCE_LEN + TAG_LEN) throw new InvalidToken();
  return { body, footer };
}

/**
 * PASETO v3.local Encrypt. `nonce` is for test vectors only: reusing one under a key reveals
 * the XOR of two plaintexts. A key or nonce of the wrong length is a TypeError.
 */
export async function encrypt(key, payload, footer = EMPTY, implicit = EMPTY, nonce = undefined) {
  bytesArg(payload, "payload");
  bytesArg(footer, "footer");
  bytesArg(implicit, "implicit");
  if (nonce === undefined) nonce = randomBytes(NONCE_LEN);
  else if (!(nonce instanceof Uint8Array) || nonce.length !== NONCE_LEN) throw new TypeError("a v3.local nonce is exactly 32 bytes");
  return seal(await localKey(key), payload, footer, implicit, nonce);
}

/** PASETO v3.local Decrypt: tag first, then decrypt. Every failure is InvalidToken. */
export async function decrypt(key, token, implicit = EMPTY) {
  const { body, footer } = split(token);
  try {
    const payload = await unseal(await localKey(key), body, footer, bytesArg(implicit, "implicit"));
    return { payload, footer };
  } catch {
    throw new InvalidToken();
  }
}

// #### STT1 keys ############################################################################

export const DIRECTIONS = Object.freeze(["c2s", "s2c"]);
export const STEP_SECONDS = 30;
export const MAX_PAYLOAD_BYTES = 512;
export const MAX_TOKEN_CHARS = 1024; // the Authorization header bound; a legal token is ~900
const MAX_IAT = 9_999_999_999;
// The same patterns as security.py. 16 bytes in canonical base64url: 22 characters, the last
// one with 4 zero unused bits; 32 bytes: 43 characters, 2 zero unused bits.
const B64_16 = "[A-Za-z0-9_-]{21}[AQgw]";
const TID_RE = /^[a-z0-9][a-z0-9-]{0,31}$/;
const ID16_RE = new RegExp(`^${B64_16}$`);
const KEY32_RE = /^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$/;
const OTP_RE = /^[0-9]{6}$/;
const FOOTER_RE = new RegExp(`^(c2s|s2c)\\.([a-z0-9][a-z0-9-]{0,31})\\.(${B64_16})\\.([0-9]{10})$`);

function checkIds(direction, tid, kid) {
  if (!DIRECTIONS.includes(direction)) throw new TypeError("direction must be 'c2s' or 's2c'");
  if (typeof tid !== "string" || !TID_RE.test(tid)) throw new TypeError("bad tid");
  if (typeof kid !== "string" || !ID16_RE.test(kid)) throw new TypeError("bad kid");
}

function checkIat(iat) {
  if (!Number.isSafeInteger(iat) || iat < 0 || iat > MAX_IAT) {
    throw new TypeError("iat must be Unix seconds that fit in 10 digits (is the clock in ms?)");
  }
}

const dirInfo = (direction, tid, kid) => UTF8.encode(`stt1 dirkey\0${direction}\0${tid}\0${kid}`);

function stepMessage(step) {
  if (!Number.isSafeInteger(step) || step < 0) throw new TypeError("step out of range");
  const out = concat(UTF8.encode("stt1 step\0"), new Uint8Array(8));
  const view = new DataView(out.buffer);
  view.setUint32(out.length - 8, Math.floor(step / 2 ** 32)); // uint64 big-endian
  view.setUint32(out.length - 4, step >>> 0);
  return out;
}

/** The step T a token issued at iat (Unix seconds) is keyed by. */
export function timeStep(iat) {
  checkIat(iat);
  return Math.floor(iat / STEP_SECONDS);
}

/** K_dir as raw bytes, from raw K. For conformance tests and tooling only: clients use DirectionKey. */
export async function directionKeyBytes(k, direction, tid, kid) {
  checkIds(direction, tid, kid);
  return new Uint8Array(await subtle().deriveBits(hkdf(dirInfo(direction, tid, kid)), await importSecret(k), 256));
}

/** K_T = HMAC-SHA384(K_dir, "stt1 step" 0 uint64_be(T))[:32] as raw bytes. Tests/tooling only. */
export async function stepKeyBytes(kDir, step) {
  if (!(kDir instanceof Uint8Array) || kDir.length !== 32) throw new TypeError("K_dir is exactly 32 bytes");
  const mac = await subtle().importKey("raw", kDir, { name: "HMAC", hash: "SHA-384" }, false, ["sign"]);
  return new Uint8Array(await subtle().sign("HMAC", mac, stepMessage(step))).slice(0, 32);
}

const INTERNAL = Symbol("DirectionKey");

/**
 * K_dir for one (direction, tid, kid) as a non-extractable HMAC key, with the step keys it
 * recently used. Binding direction, tenant and kid into the key means a token never works the
 * other way, for another tenant or under another kid. Build with `await DirectionKey.derive()`.
 *
 * Trade-off: the step key K_T must be the input key material of PASETO's HKDF key split, but
 * WebCrypto cannot turn an HMAC output into a key without passing through bytes. So K_T exists
 * as raw bytes for the moment between subtle.sign and importKey (then wiped); what is kept is
 * a non-extractable HKDF key. Exposure is bounded: a K_T only opens its own 30-second step in
 * one direction, and K and K_dir never exist as bytes after import.
 */
export class DirectionKey {
  #hmac;
  #steps = new Map(); // step -> Promise<HKDF CryptoKey>
  static #MAX_STEPS = 8; // a +-45 s window touches at most 4 steps

  constructor(internal, hmacKey, direction, tid, kid) {
    if (internal !== INTERNAL) throw new TypeError("use await DirectionKey.derive(secret, direction, tid, kid)");
    this.#hmac = hmacKey;
    this.direction = direction;
    this.tid = tid;
    this.kid = kid;
    Object.freeze(this); // the ids are what K_dir is bound to: they must not drift from it
  }

  /** From K: a non-extractable HKDF CryptoKey (see importSecret) or raw Uint8Array(32). */
  static async derive(secret, direction, tid, kid) {
    checkIds(direction, tid, kid);
    const base = secret instanceof Uint8Array ? await importSecret(secret) : secret;
    if (!isHkdfKey(base)) throw new TypeError("K must be an HKDF CryptoKey or 32 bytes");
    const alg = { name: "HMAC", hash: "SHA-384", length: 256 }; // = HKDF output L = 32
    const hmacKey = await subtle().deriveKey(hkdf(dirInfo(direction, tid, kid)), base, alg, false, ["sign"]);
    return new DirectionKey(INTERNAL, hmacKey, direction, tid, kid);
  }

  /** The v3.local key (non-extractable HKDF CryptoKey) of time step `step`. */
  stepKey(step) {
    let pending = this.#steps.get(step);
    if (pending === undefined) {
      if (this.#steps.size >= DirectionKey.#MAX_STEPS) this.#steps.clear();
      pending = (async () => {
        const full = new Uint8Array(await subtle().sign("HMAC", this.#hmac, stepMessage(step)));
        try {
          return await importSecret(full.subarray(0, 32));
        } finally {
          full.fill(0); // the transient raw K_T (see the class comment)
        }
      })();
      pending.catch(() => this.#steps.delete(step));
      this.#steps.set(step, pending);
    }
    return pending;
  }

  toString() {
    return `DirectionKey(${this.direction}, tid=${this.tid}, kid=${this.kid})`;
  }
}

// #### STT1 footer, assertions, payloads ####################################################

/** The footer bytes "dir.tid.kid.<10-digit iat>"; TypeError for anything parseFooter refuses. */
export function buildFooter(direction, tid, kid, iat) {
  checkIds(direction, tid, kid);
  checkIat(iat);
  return UTF8.encode(`${direction}.${tid}.${kid}.${String(iat).padStart(10, "0")}`);
}

/** Parse "dir.tid.kid.iat" strictly: { direction, tid, kid, iat }, else InvalidToken. */
export function parseFooter(raw) {
  bytesArg(raw, "footer");
  // Latin-1 never fails, and the pattern only matches ASCII anyway.
  const match = FOOTER_RE.exec(String.fromCharCode(...raw));
  if (match === null) throw new InvalidToken();
  return Object.freeze({ direction: match[1], tid: match[2], kid: match[3], iat: Number(match[4]) });
}

/**
 * PAE("stt1", "c2s", AUD, METHOD, TARGET, CONTENT_TYPE, SHA256(body)). aud and method are text;
 * target and contentType the raw header bytes (Uint8Array or byte string); body the raw bytes
 * (a string body is UTF-8). Async: WebCrypto's SHA-256 is.
 */
export async function requestAssertion(aud, method, target, contentType, body) {
  if (typeof aud !== "string" || typeof method !== "string") throw new TypeError("aud and method are strings");
  const bodyBytes = typeof body === "string" ? UTF8.encode(body) : bytesArg(body, "body");
  return pae(UTF8.encode("stt1"), UTF8.encode("c2s"), UTF8.encode(aud), UTF8.encode(method),
    rawBytes(target, "target"), rawBytes(contentType, "contentType"), await sha256(bodyBytes));
}

/** PAE("stt1", "s2c", AUD, REQUEST_JTI, STATUS digits, CONTENT_TYPE, SHA256(body)). */
export async function responseAssertion(aud, requestJti, status, contentType, body) {
  if (typeof aud !== "string" || typeof requestJti !== "string") throw new TypeError("aud and requestJti are strings");
  if (!Number.isInteger(status) || status < 100 || status > 599) throw new TypeError("status must be an HTTP status code");
  const bodyBytes = typeof body === "string" ? UTF8.encode(body) : bytesArg(body, "body");
  return pae(UTF8.encode("stt1"), UTF8.encode("s2c"), UTF8.encode(aud), UTF8.encode(requestJti),
    UTF8.encode(String(status)), rawBytes(contentType, "contentType"), await sha256(bodyBytes));
}

/** A fresh token id: 16 random bytes, 22 base64url characters. */
export function newJti() {
  return b64encode(randomBytes(16));
}

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const CLAIM_FIELDS = { c2s: ["jti", "otp"], s2c: ["jti", "rk"] };

/**
 * Decode a payload as security.py's RequestClaims (c2s) or ResponseClaims (s2c) do: UTF-8 JSON
 * object, unknown fields refused, no coercion, null is not "absent". Returns canonical frozen
 * claims; anything else is InvalidToken. (Duplicate keys: last wins, as in msgspec.)
 */
function decodeClaims(direction, payload) {
  let doc;
  try {
    doc = JSON.parse(STRICT_UTF8.decode(payload));
  } catch {
    throw new InvalidToken();
  }
  const fields = CLAIM_FIELDS[direction];
  if (!isObject(doc) || !Object.keys(doc).every((f) => fields.includes(f))) throw new InvalidToken();
  if (typeof doc.jti !== "string" || !ID16_RE.test(doc.jti)) throw new InvalidToken();
  const claims = { jti: doc.jti };
  if (direction === "c2s" && "otp" in doc) {
    if (typeof doc.otp !== "string" || !OTP_RE.test(doc.otp)) throw new InvalidToken();
    claims.otp = doc.otp;
  }
  if (direction === "s2c" && "rk" in doc) {
    const rk = doc.rk;
    if (!isObject(rk) || Object.keys(rk).some((f) => f !== "kid" && f !== "k")) throw new InvalidToken();
    if (typeof rk.kid !== "string" || !ID16_RE.test(rk.kid)) throw new InvalidToken();
    if (typeof rk.k !== "string" || !KEY32_RE.test(rk.k)) throw new InvalidToken();
    claims.rk = Object.freeze({ kid: rk.kid, k: rk.k });
  }
  return Object.freeze(claims);
}

/** Claims to payload bytes, in security.py's field order; refused unless decodeClaims accepts them. */
function encodeClaims(direction, claims) {
  if (!isObject(claims)) throw new TypeError("claims must be an object");
  const canonical = {};
  for (const f of CLAIM_FIELDS[direction]) if (claims[f] !== undefined) canonical[f] = claims[f];
  if (isObject(canonical.rk)) canonical.rk = { kid: canonical.rk.kid, k: canonical.rk.k, ...canonical.rk };
  for (const f of Object.keys(claims)) if (!(f in canonical) && claims[f] !== undefined) canonical[f] = claims[f];
  const payload = UTF8.encode(JSON.stringify(canonical));
  try {
    decodeClaims(direction, payload); // never mint a token the peer would refuse
  } catch {
    throw new TypeError(`claims refused for a ${direction} token`);
  }
  if (payload.length > MAX_PAYLOAD_BYTES) throw new TypeError("payload over MAX_PAYLOAD_BYTES");
  return payload;
}

// #### STT1 tokens ##########################################################################

/** A token whose shape and footer are valid and whose tag is NOT yet checked (from parse()). */
export class UnverifiedToken {
  constructor(internal, footer, body, rawFooter) {
    if (internal !== INTERNAL) throw new TypeError("use parse(token)");
    Object.assign(this, { footer, body, rawFooter });
    Object.freeze(this);
  }
}

/** Shape and footer without any key: length, v3.local only, canonical base64url, strict footer. */
export function parse(token) {
  if (typeof token !== "string" || token.length > MAX_TOKEN_CHARS) throw new InvalidToken();
  const { body, footer } = split(token);
  return new UnverifiedToken(INTERNAL, parseFooter(footer), body, footer);
}

/** A token in key's direction issued at iat, bound to implicit. `nonce` for test vectors only. */
export async function mint(key, iat, claims, implicit, nonce = undefined) {
  if (!(key instanceof DirectionKey)) throw new TypeError("key must be a DirectionKey");
  const payload = encodeClaims(key.direction, claims);
  const footer = buildFooter(key.direction, key.tid, key.kid, iat);
  return encrypt(await key.stepKey(timeStep(iat)), payload, footer, bytesArg(implicit, "implicit"), nonce);
}

/**
 * Verify and decrypt a token made with key, bound to implicit: { footer, claims }. The footer
 * must name exactly key's direction, tid and kid. Checking iat against a clock is the caller's.
 */
export async function openToken(key, token, implicit) {
  if (!(key instanceof DirectionKey)) throw new TypeError("key must be a DirectionKey");
  try {
    const parsed = token instanceof UnverifiedToken ? token : parse(token);
    const f = parsed.footer;
    if (f.direction !== key.direction || f.tid !== key.tid || f.kid !== key.kid) throw new InvalidToken();
    const stepKey = await key.stepKey(timeStep(f.iat));
    const payload = await unseal(stepKey, parsed.body, parsed.rawFooter, bytesArg(implicit, "implicit"));
    if (payload.length > MAX_PAYLOAD_BYTES) throw new InvalidToken();
    return Object.freeze({ footer: f, claims: decodeClaims(key.direction, payload) });
  } catch {
    throw new InvalidToken();
  }
}

/**
 * A request token: { token, jti }. Fields: aud, method, target, contentType, body, iat, and
 * optionally otp, plus jti and nonce for test vectors only.
 */
export async function mintRequest(c2s, { aud, method, target, contentType = EMPTY, body = EMPTY, iat, otp, jti, nonce }) {
  if (!(c2s instanceof DirectionKey) || c2s.direction !== "c2s") throw new TypeError("a request is minted with a c2s key");
  if (otp !== undefined && (typeof otp !== "string" || !OTP_RE.test(otp))) throw new TypeError("otp is 6 digits");
  if (jti === undefined) jti = newJti();
  const implicit = await requestAssertion(aud, method, target, contentType, body);
  const claims = otp === undefined ? { jti } : { jti, otp };
  return { token: await mint(c2s, iat, claims, implicit, nonce), jti };
}

/**
 * Verify a response token against the request it answers: { footer, claims }, else
 * InvalidToken. Fields: aud, requestJti, status, contentType, body (exactly as received).
 */
export async function openResponse(s2c, token, { aud, requestJti, status, contentType = EMPTY, body = EMPTY }) {
  if (!(s2c instanceof DirectionKey) || s2c.direction !== "s2c") throw new TypeError("a response is opened with an s2c key");
  let implicit;
  try {
    implicit = await responseAssertion(aud, requestJti, status, contentType, body);
  } catch {
    throw new InvalidToken();
  }
  return openToken(s2c, token, implicit);
}

// #### Credentials ##########################################################################

/** Import a base64url K as a non-extractable HKDF key; the decoded copy is wiped. */
async function importSecretB64(k) {
  const raw = b64decode(k);
  try {
    return await importSecret(raw);
  } finally {
    raw.fill(0);
  }
}

/**
 * A credential file's JSON (text or parsed object), validated as strictly as security.py's
 * Credential, to { stt: 1, url, tid, kid, key, next?: { kid, key } } with key a
 * non-extractable HKDF CryptoKey. The result holds no raw key and can be stored as it is in
 * IndexedDB (CryptoKeys are structured-cloneable). JS strings cannot be wiped: drop the JSON
 * text after this call. Throws TypeError naming the bad field (never its value).
 */
export async function importCredential(credentialJson) {
  let doc = credentialJson;
  if (typeof doc === "string") {
    try {
      doc = JSON.parse(doc);
    } catch {
      throw new TypeError("not an STT1 credential: not JSON");
    }
  }
  const bad = (what) => new TypeError(`not an STT1 credential: ${what}`);
  if (!isObject(doc)) throw bad("not an object");
  for (const f of Object.keys(doc)) if (!["stt", "url", "tid", "kid", "k", "next"].includes(f)) throw bad(`unknown field ${f}`);
  if (doc.stt !== 1) throw bad("stt must be 1");
  if (typeof doc.url !== "string") throw bad("url");
  if (typeof doc.tid !== "string" || !TID_RE.test(doc.tid)) throw bad("tid");
  if (typeof doc.kid !== "string" || !ID16_RE.test(doc.kid)) throw bad("kid");
  if (typeof doc.k !== "string" || !KEY32_RE.test(doc.k)) throw bad("k");
  const out = { stt: 1, url: doc.url, tid: doc.tid, kid: doc.kid, key: await importSecretB64(doc.k) };
  if ("next" in doc) {
    const n = doc.next;
    if (!isObject(n) || Object.keys(n).some((f) => f !== "kid" && f !== "k")) throw bad("next");
    if (typeof n.kid !== "string" || !ID16_RE.test(n.kid)) throw bad("next.kid");
    if (typeof n.k !== "string" || !KEY32_RE.test(n.k)) throw bad("next.k");
    out.next = Object.freeze({ kid: n.kid, key: await importSecretB64(n.k) });
  }
  return Object.freeze(out);
}

/** Check imported credential keys (fresh from importCredential or read back from IndexedDB). */
function checkCredentialKeys(c) {
  if (!isObject(c) || c.stt !== 1 || !isHkdfKey(c.key)) throw new TypeError("expected the result of importCredential()");
  checkIds("c2s", c.tid, c.kid);
  if (c.next !== undefined && (!isObject(c.next) || !ID16_RE.test(c.next.kid) || !isHkdfKey(c.next.key))) {
    throw new TypeError("bad next key");
  }
  // The url is the AUD every token is bound to, so it is used as written and must be a bare
  // origin: scheme://host[:port], no path (not even "/"), query, fragment or user info.
  if (typeof c.url !== "string" || !/^https?:\/\/[^/?#@\s\\]+$/.test(c.url)) {
    throw new TypeError("the credential url must be an origin like https://api.example.com");
  }
  new URL(c.url); // a bad port or host throws here
}

// #### Keeping credentials: IndexedDB ######################################################

/** The same credential keys by their ids (a kid names one key; CryptoKeys cannot be compared). */
function sameKeys(a, b) {
  return a.url === b.url && a.tid === b.tid && a.kid === b.kid && a.next?.kid === b.next?.kid;
}

function idbDone(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/**
 * Credential keys kept in this browser's IndexedDB, one record per named slot. A record is
 * what importCredential returns: ids, the url and non-extractable CryptoKeys. IndexedDB stores
 * CryptoKeys by structured clone and hands them back still non-extractable, so a page can sign
 * with a stored key after a reload but no script can read it. (The browser itself keeps the
 * key material in its profile on disk, as it keeps cookies: guarding that is the OS account's
 * job.) Writes use the "strict" durability hint: a rotated key must be on disk before the
 * client signs with it (PROTOCOL.md 5.3).
 */
export class KeyStore {
  static #STORE = "credentials";
  #db;

  constructor(internal, db) {
    if (internal !== INTERNAL) throw new TypeError("use await KeyStore.open(name)");
    this.#db = db;
  }

  /** Open (creating on first use) the database `name` of this origin. */
  static async open(name = "stt1") {
    if (!globalThis.indexedDB) throw new Error("IndexedDB is unavailable in this context");
    const request = indexedDB.open(name, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(KeyStore.#STORE);
    return new KeyStore(INTERNAL, await idbDone(request));
  }

  async #run(mode, action) {
    const tx = this.#db.transaction(KeyStore.#STORE, mode, { durability: "strict" });
    const result = idbDone(action(tx.objectStore(KeyStore.#STORE)));
    await new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
    });
    return result;
  }

  static #keys(record) {
    if (record === undefined) return null;
    checkCredentialKeys(record);
    const next = record.next && Object.freeze({ kid: record.next.kid, key: record.next.key });
    const keys = { stt: 1, url: record.url, tid: record.tid, kid: record.kid, key: record.key };
    return Object.freeze(next ? { ...keys, next } : keys);
  }

  static #record(keys) {
    checkCredentialKeys(keys);
    const record = { stt: 1, url: keys.url, tid: keys.tid, kid: keys.kid, key: keys.key };
    if (keys.next) record.next = { kid: keys.next.kid, key: keys.next.key };
    return record;
  }

  /** The keys in `slot`, checked as a Client checks them, or null when the slot is empty. */
  async load(slot = "default") {
    return KeyStore.#keys(await this.#run("readonly", (s) => s.get(slot)));
  }

  /** Store keys (from importCredential) in `slot`, whatever it held; returns them. */
  async save(keys, slot = "default") {
    const record = KeyStore.#record(keys);
    await this.#run("readwrite", (s) => s.put(record, slot));
    return keys;
  }

  /**
   * Replace `expected` by `keys` in `slot`, in one transaction, only if the slot still holds
   * `expected` (same kids): another tab may have rotated further, and writing this tab's older
   * view over it would leave only a retiring key. Returns what the slot holds afterwards:
   * `keys`, or the other tab's newer keys (a Client adopts those). Throws if the slot was
   * emptied (forgotten in another tab): nothing is stored then.
   */
  async swap(expected, keys, slot = "default") {
    const record = KeyStore.#record(keys);
    let written = false;
    const stored = await this.#run("readwrite", (s) => {
      const get = s.get(slot);
      // The put must be queued within the success event, or the transaction commits without it.
      get.addEventListener("success", () => {
        if (get.result !== undefined && sameKeys(get.result, expected)) {
          s.put(record, slot);
          written = true;
        }
      });
      return get;
    });
    if (stored === undefined) throw new Error(`slot ${slot} is empty`);
    return written ? keys : KeyStore.#keys(stored);
  }

  /** Forget the keys in `slot` (this browser only: revoking is the gateway operator's). */
  async delete(slot = "default") {
    await this.#run("readwrite", (s) => s.delete(slot));
  }

  /** Client options that persist rotation and promotion in `slot`: new Client(keys, store.hooks()). */
  hooks(slot = "default") {
    return {
      onRotate: (rk, updated, before) => this.swap(before, updated, slot),
      onPromote: (updated, before) => this.swap(before, updated, slot),
      onStale: () => this.load(slot),
    };
  }

  close() {
    this.#db.close();
  }
}

// #### Client ###############################################################################

// A verified answer was signed somewhere between the request's signing and the answer's arrival,
// so the offset learned from its iat can be wrong by up to that round trip. The gateway allows
// 45 s either way (PROTOCOL.md 3.3): an answer held back longer (a slow link, or an on-path
// attacker delaying it) would teach an offset that puts every later iat outside the window, and
// the unsigned 401s that follow can correct nothing. Learn only from a short round trip
// (client.py's _OFFSET_MAX_ROUND_TRIP).
const OFFSET_MAX_ROUND_TRIP = 10;

// Python's urllib.parse.quote(text, safe=""): encodeURIComponent also leaves !'()* alone, so
// escape those too; the target then is the same bytes the Python client sends.
const quote = (text) => encodeURIComponent(text).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
const IDENTIFIER_RE = /^[\p{ID_Start}_][\p{ID_Continue}]*$/u; // ~ Python's str.isidentifier

/** "/rest/<func>/" or "/rest/<func>/<var1>", percent-encoded, ASCII only: the target call() signs. */
export function restTarget(func, var1) {
  if (typeof func !== "string" || !IDENTIFIER_RE.test(func)) throw new TypeError("a function name is an identifier");
  const target = `/rest/${quote(func)}/`;
  if (var1 === undefined || var1 === null) return target;
  // String() of an object is "[object Object]": most likely the args were passed as var1.
  if (typeof var1 === "object" || typeof var1 === "function") throw new TypeError("var1 is a scalar; args go third");
  const text = String(var1);
  // The gateway drops an empty last segment and URL parsers resolve dot segments: the call
  // would silently change meaning.
  if (text === "" || text === "." || text === "..") throw new TypeError("var1 cannot be '', '.' or '..'; pass it in args");
  return target + quote(text);
}

function verifiedBadResponse(status, message) {
  const err = new BadResponse(status, "bad_response", message);
  err.verified = true;
  return err;
}

// Integers past 2**53 (a nanosecond timestamp, a 64-bit id) lose digits as JS numbers: read
// them as BigInt where the engine shows the parser the source text (JSON.parse source text
// access: Chromium 114+, Node 21+), and write a BigInt argument as its digits (JSON.rawJSON).
// An engine without them keeps numbers, as before, and refuses a BigInt argument before anything
// is sent: a Number would silently change the digits, and JSON.stringify's own TypeError does
// not say why or where it would work.
const exactIntegers = (key, value, context) =>
  typeof value === "number" && !Number.isSafeInteger(value) && context !== undefined
    && /^-?[0-9]+$/.test(context.source) ? BigInt(context.source) : value;
function bigintDigits(key, value) {
  if (typeof value !== "bigint") return value;
  if (typeof JSON.rawJSON === "function") return JSON.rawJSON(String(value));
  throw new TypeError("cannot send a BigInt argument exactly: this runtime has no JSON.rawJSON (Chrome 114, "
    + "Firefox 135, Safari 18.4, Node 21 have it), and a Number would round it");
}

/** The results of a verified answer, or the error it carries (marked verified). */
function results(status, body) {
  let doc;
  try {
    doc = JSON.parse(STRICT_UTF8.decode(body), exactIntegers);
  } catch {
    doc = undefined;
  }
  if (status >= 200 && status < 300) {
    if (isObject(doc) && doc.valid === true && Object.hasOwn(doc, "results")) return doc.results;
    throw verifiedBadResponse(status, "a success without `results`");
  }
  const e = isObject(doc) && doc.valid === false && isObject(doc.error) ? doc.error : null;
  if (!e || typeof e.code !== "string" || typeof e.message !== "string") {
    throw verifiedBadResponse(status, "an error without a JSON error body");
  }
  const err = new (SIGNED_ERRORS[status] || GatewayError)(status, e.code, e.message);
  err.verified = true;
  throw err;
}

// The gateway lets a call run 30 s (its --timeout) unless the function's entry sets its own. A
// client that gives up first reports a call still running as unreachable, and a retry runs it
// twice: wait longer, with a margin for the network and a queue in front of the gateway.
const GATEWAY_CALL_TIMEOUT = 30;
export const DEFAULT_TIMEOUT = GATEWAY_CALL_TIMEOUT + 10;
// setTimeout fires at once for a delay over 2**31 - 1 ms (about 24.8 days): refused, not obeyed.
const MAX_TIMEOUT = 2147483;
// The largest answer body read, by default: four times the gateway's default --max-result.
// Anyone on the path can send a body of any size; it is never read whole beyond this.
export const DEFAULT_MAX_ANSWER = 64 * 1024 * 1024;

/**
 * A gateway client for one credential: every call signed, every answer verified before use.
 * options: fetch (default globalThis.fetch), clock (() => Unix SECONDS, like Python's
 * time.time; default Date.now() / 1000), timeout (seconds for the whole call, default
 * DEFAULT_TIMEOUT: past the gateway's default call timeout; give more for a function whose
 * entry sets a longer one; at most about 24.8 days), maxAnswer (the largest answer body read,
 * bytes, default DEFAULT_MAX_ANSWER; the body of an unsigned answer is never read),
 * onRotate(rk, updated, before) and onPromote(updated, before) (persistence, see #storeNext /
 * #promote; KeyStore.hooks gives both): each may return the keys storage holds afterwards;
 * onStale() returns the stored keys, read after an unsigned 401 (see #adoptStored).
 * Calls may run concurrently: each keeps the keys it signed with to check its own answer.
 */
export class Client {
  #cred;
  #fetch;
  #clock;
  #timeout;
  #maxAnswer;
  #onRotate;
  #onPromote;
  #onStale;
  #offset = 0; // learned only from the iat of verified responses (PROTOCOL.md 4)
  #keys = new Map(); // kid -> Promise<[c2s, s2c]>
  #storing = null;
  #promoting = false;

  constructor(
    credentialKeys,
    { fetch, clock, timeout = DEFAULT_TIMEOUT, maxAnswer = DEFAULT_MAX_ANSWER, onRotate, onPromote, onStale } = {},
  ) {
    checkCredentialKeys(credentialKeys);
    this.#cred = credentialKeys;
    this.#fetch = fetch || globalThis.fetch.bind(globalThis); // unbound window.fetch throws
    this.#clock = clock || (() => Date.now() / 1000);
    if (!(timeout > 0 && timeout <= MAX_TIMEOUT)) {
      throw new TypeError(`timeout is a positive number of seconds, at most ${MAX_TIMEOUT}`);
    }
    if (!(Number.isSafeInteger(maxAnswer) && maxAnswer > 0)) throw new TypeError("maxAnswer is a positive integer");
    this.#timeout = timeout;
    this.#maxAnswer = maxAnswer;
    this.#onRotate = onRotate;
    this.#onPromote = onPromote;
    this.#onStale = onStale;
  }

  /** Convenience: importCredential(json) then new Client(keys, options). */
  static async fromCredential(credentialJson, options) {
    return new Client(await importCredential(credentialJson), options);
  }

  /** The current credential keys (no raw secret): what to persist. */
  get credential() {
    return this.#cred;
  }

  /** The kid that signs: a stored `next` as soon as it is durable (PROTOCOL.md 5.3). */
  get kid() {
    return (this.#cred.next || this.#cred).kid;
  }

  /** Call func with the URL's var1 (or null) and args as a JSON object; return its results. */
  async call(func, var1 = null, args = {}) {
    return this.request(func, args, { var1 });
  }

  /** The general form of call: otp is the 6-digit code for a function flagged "otp". */
  async request(func, args = {}, { var1 = null, otp } = {}) {
    if (args === null || args === undefined) args = {};
    if (!isObject(args)) throw new TypeError("args must be a plain object");
    // No arguments, no body (the gateway reads it as {}): a function whose entry sets
    // max_body: 0 takes its argument in the URL only, and refuses even "{}".
    const body = Object.keys(args).length ? UTF8.encode(JSON.stringify(args, bigintDigits)) : EMPTY;
    return this.#roundtrip(await this.#prepare("POST", restTarget(func, var1), body, otp));
  }

  /** The functions this tenant may call: doc, var1 and argument schema of each. */
  async catalog() {
    const out = await this.#roundtrip(await this.#prepare("GET", "/rest/", EMPTY));
    if (!isObject(out)) throw new BadResponse(200, "bad_response", "the catalog is not a JSON object");
    return out;
  }

  // -- signing ------------------------------------------------------------------------------

  #directionKeys(kid, key) {
    let keys = this.#keys.get(kid);
    if (keys === undefined) {
      const tid = this.#cred.tid;
      keys = Promise.all([DirectionKey.derive(key, "c2s", tid, kid), DirectionKey.derive(key, "s2c", tid, kid)]);
      keys.catch(() => this.#keys.delete(kid));
      this.#keys.set(kid, keys);
    }
    return keys;
  }

  async #prepare(method, target, body, otp) {
    const { kid, key } = this.#cred.next || this.#cred;
    const [c2s, s2c] = await this.#directionKeys(kid, key);
    const contentType = method === "POST" ? "application/json" : "";
    const signedAt = this.#clock(); // the answer cannot have been signed before this
    const iat = Math.floor(signedAt + this.#offset);
    // The token covers exactly the bytes sent: the target as on the request line (ASCII),
    // the Content-Type as sent ("" when none) and the body.
    const { token, jti } = await mintRequest(c2s, {
      aud: this.#cred.url, method, target, contentType, body, iat, otp,
    });
    const requestId = Array.from(randomBytes(8), (b) => b.toString(16).padStart(2, "0")).join("");
    const headers = { Authorization: `STT1 ${token}`, Accept: "application/json", "X-Request-Id": requestId };
    if (contentType) headers["Content-Type"] = contentType;
    return { method, target, body, headers, jti, kid, s2c, requestId, signedAt };
  }

  // -- transport and verifying -----------------------------------------------------------------

  async #roundtrip(prepared) {
    try {
      const { status, headers, body } = await this.#exchange(prepared);
      return await this.#verify(prepared, status, headers, body);
    } catch (err) {
      if (err instanceof GatewayError) err.requestId = prepared.requestId;
      throw err;
    }
  }

  async #exchange(prepared) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.#timeout * 1000);
    try {
      const response = await this.#fetch(this.#cred.url + prepared.target, {
        method: prepared.method,
        headers: prepared.headers,
        body: prepared.body.length ? prepared.body : undefined,
        // A redirect is not a signed answer: never follow it (it surfaces as ResponseForged).
        redirect: "manual",
        credentials: "omit",
        cache: "no-store",
        signal: abort.signal,
      });
      const body = await this.#readBody(response);
      return { status: response.status, headers: response.headers, body };
    } catch (err) {
      if (err instanceof GatewayError) throw err;
      // The request may be out and the function running, or done: a blind retry could run it twice.
      const reason = abort.signal.aborted
        ? `no answer within ${this.#timeout} s; the call may still have run on the gateway, so check before retrying`
        : `the request failed (${(err && err.message) || err})`; // fetch's own words: "Failed to fetch", ...
      throw new Unreachable(0, "unreachable", `${this.#cred.url}: ${reason}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * The body of a signed answer, up to maxAnswer bytes; nothing of an unsigned one. An
   * unsigned answer's body is never used (PROTOCOL.md 4), so it is not read at all: anyone on
   * the path could make it as large as they like.
   */
  async #readBody(response) {
    if (response.headers.get("stt1-response") === null || !response.body) {
      await response.body?.cancel().catch(() => {});
      return new Uint8Array(0);
    }
    const reader = response.body.getReader();
    const chunks = [];
    let length = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      length += value.length;
      if (length > this.#maxAnswer) {
        await reader.cancel().catch(() => {});
        const message = `an answer over ${this.#maxAnswer} bytes, not read (see the client's maxAnswer)`;
        throw new BadResponse(response.status, "bad_response", message);
      }
      chunks.push(value);
    }
    const body = new Uint8Array(length);
    let at = 0;
    for (const chunk of chunks) {
      body.set(chunk, at);
      at += chunk.length;
    }
    return body;
  }

  /** PROTOCOL.md 4: nothing of the answer (body, iat, rk) is used before its token verifies. */
  async #verify(prepared, status, headers, body) {
    const receivedAt = this.#clock();
    const token = headers.get("stt1-response");
    if (token === null && UNSIGNED_HINTS[status]) {
      if (status === 401) await this.#adoptStored();
      const [Cls, code, message] = UNSIGNED_HINTS[status];
      throw new Cls(status, code, message);
    }
    const forged = new ResponseForged(status, "response_forged", "the answer is not signed by the gateway; body not used");
    // Headers.get joins repeated headers with ", ": two tokens never parse, and two content
    // types are not what the gateway signed, so both end as forged, as in client.py.
    let opened;
    try {
      opened = await openResponse(prepared.s2c, token, {
        aud: this.#cred.url, requestJti: prepared.jti, status, contentType: headers.get("content-type") ?? "", body,
      });
    } catch {
      throw forged;
    }
    const ok = status >= 200 && status < 300;
    // rk only ever comes with a 2xx (PROTOCOL.md 5.5): a signed error carrying one is not
    // something this gateway sends; use nothing of it.
    if (opened.claims.rk && !ok) throw forged;

    // Verified from here on. A slow answer is still a good answer, but its iat says little
    // about the gateway's clock now: keep the offset we had. A clock that went back during the
    // call measures nothing.
    const roundTrip = receivedAt - prepared.signedAt;
    if (roundTrip >= 0 && roundTrip <= OFFSET_MAX_ROUND_TRIP) this.#offset = opened.footer.iat - receivedAt;
    await this.#promote(prepared.kid);
    if (opened.claims.rk) await this.#storeNext(opened.claims.rk);
    return results(status, body);
  }

  // -- rotation (PROTOCOL.md 5) ---------------------------------------------------------------

  /**
   * Keep a rotated key: durably first (onRotate, e.g. into IndexedDB), only then sign with it.
   * onRotate(rk, updated) gets rk = { kid, key: non-extractable CryptoKey } and the updated
   * credential keys to store; if it throws, or there is no onRotate, the key is not used and
   * the gateway keeps offering it on every 2xx. Without durable storage a reload would lose
   * K' after the gateway promoted it, and the old kid stops working after its grace period.
   */
  async #storeNext(rk) {
    const before = this.#cred;
    if (!this.#onRotate || before.next || rk.kid === before.kid || this.#storing) return;
    this.#storing = (async () => {
      const next = Object.freeze({ kid: rk.kid, key: await importSecretB64(rk.k) });
      const updated = Object.freeze({ ...before, next });
      let stored;
      try {
        stored = await this.#onRotate(next, updated, before);
      } catch {
        console.warn("stt1: could not store the rotated key; will retry on the next answer");
        return;
      }
      this.#adopt(before, isObject(stored) ? stored : updated);
    })().finally(() => {
      this.#storing = null;
    });
    await this.#storing;
  }

  /**
   * A verified answer under the next kid: it is now the key, the old one is dropped.
   * onPromote(updated, before), if given, persists that; if it throws we keep both (harmless:
   * we already sign with next, and a reload does too) and try again on the next answer.
   */
  async #promote(kid) {
    const before = this.#cred;
    if (!before.next || before.next.kid !== kid || this.#promoting) return;
    const promoted = Object.freeze({ stt: 1, url: before.url, tid: before.tid, kid, key: before.next.key });
    let stored = promoted;
    if (this.#onPromote) {
      this.#promoting = true;
      try {
        const held = await this.#onPromote(promoted, before);
        if (isObject(held)) stored = held;
      } catch {
        console.warn("stt1: could not store the promoted key; will retry");
        return;
      } finally {
        this.#promoting = false;
      }
    }
    this.#adopt(before, stored);
  }

  /**
   * After an unsigned 401: take the stored keys if another tab moved on (onStale, see
   * KeyStore.hooks). A tab idle past a rotation's grace period signs with a retired key while
   * storage holds the newer one. The refused call is not retried (an unsigned 401 can be
   * forged after the call ran); the next call signs with what is stored.
   */
  async #adoptStored() {
    if (!this.#onStale) return;
    const before = this.#cred;
    let stored;
    try {
      stored = await this.#onStale();
    } catch {
      return;
    }
    if (isObject(stored)) this.#adopt(before, stored);
  }

  /**
   * After a hook ran on `before`: use what storage now holds. That is our own update, or keys
   * another tab stored first (a hook returns those instead of overwriting them: KeyStore.swap),
   * which are newer than ours, so we sign with them too. A hook that returns no object stored
   * what it was given. Another credential is not adopted, nor anything if ours changed meanwhile.
   */
  #adopt(before, stored) {
    if (this.#cred !== before || stored.url !== before.url || stored.tid !== before.tid) return;
    try {
      checkCredentialKeys(stored);
    } catch {
      return; // not keys: nothing we could sign with, so keep ours
    }
    this.#cred = stored;
    for (const kid of this.#keys.keys()) if (kid !== stored.kid && kid !== stored.next?.kid) this.#keys.delete(kid);
  }
}
