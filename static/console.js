// The web console at GET /console: load a credential, see what this tenant may call, call it
// with a form built from the function's parameters, and see whether the answer was verified.
// Everything shown comes from the gateway or a file, so it is only ever written as text
// (textContent), never parsed as HTML; the page's CSP runs scripts from this origin only.
// Read top to bottom: keys, catalog, forms, calls, plain words, start-up.
import {
  Client, GatewayError, KeyStore, ResponseForged, Unauthorized, Unreachable, importCredential, restTarget,
} from "./stt1.js";

const SLOT = "console";
const $ = (id) => document.getElementById(id);
let store = null; // KeyStore, or null when this browser cannot keep keys
let client = null;
let unsaved = false; // keys from a file, stored only once the gateway has answered them (verified)
let tabs = null; // BroadcastChannel to the other tabs of this console: "forget" drops their client

function notice(text, bad = false) {
  const p = $("notice");
  p.textContent = text;
  p.classList.toggle("bad", bad);
  p.hidden = !text;
}

// #### Keys ################################################################################

function showKeys(keys) {
  $("load").hidden = !!keys;
  $("loaded").hidden = !keys;
  $("functions").hidden = !keys;
  $("who").textContent = keys ? `Tenant ${keys.tid} at ${keys.url}` : "No credential loaded";
  if (!keys) return;
  $("tenant").textContent = keys.tid;
  $("kid").textContent = keys.next ? `${keys.kid} (rotating to ${keys.next.kid})` : keys.kid;
  $("origin").textContent = keys.url;
}

/**
 * Why this console cannot use a credential's url, or "". Tokens are bound to the url as written,
 * which must be a bare origin, and this page may only talk to its own origin (CSP connect-src
 * 'self'): a credential for another gateway belongs in that gateway's console.
 */
function urlProblem(url) {
  let origin = null;
  try {
    origin = new URL(url).origin;
  } catch {
    // not a URL at all
  }
  if (!/^https?:\/\/[^/?#@\s\\]+$/.test(url) || !origin || origin === "null") {
    return `This credential's url (${url}) is malformed: it must be an origin like ${location.origin}, `
      + "with no path, not even a trailing slash. Ask the operator for a new credential file.";
  }
  if (origin === location.origin) return "";
  return `This credential is for ${origin}, but this console belongs to ${location.origin}. `
    + `Open ${origin}/console to use it.`;
}

/** Client options that keep rotated keys in IndexedDB, or none when this browser cannot. */
function persistence() {
  // Only over what this tab last read or wrote (KeyStore.swap): another tab of this console may
  // have rotated further, and the client then takes the stored keys instead.
  return store ? {
    onRotate: async (rk, updated, before) => {
      const stored = await store.swap(before, updated, SLOT);
      if (stored.tid === updated.tid) showKeys(stored);
      if (stored === updated) {
        notice("The gateway rotated this tenant's key. The new key is stored in this browser and used from now on.");
      }
      return stored;
    },
    onPromote: async (updated, before) => {
      const stored = await store.swap(before, updated, SLOT);
      if (stored.tid === updated.tid) showKeys(stored);
      return stored;
    },
    onStale: () => store.load(SLOT),
  } : {};
}

async function useKeys(keys, fromFile = false) {
  const problem = urlProblem(keys.url);
  if (problem) {
    notice(problem, true);
    return false;
  }
  // A file's keys get no hooks until showCatalog stores them: the slot does not hold them yet.
  unsaved = fromFile;
  client = new Client(keys, fromFile ? {} : persistence());
  showKeys(keys);
  await showCatalog();
  return true;
}

async function loadFile(event) {
  const input = event.target;
  const file = input.files && input.files[0];
  input.value = ""; // the same file may be chosen again after an error
  if (!file) return;
  notice("");
  let keys;
  try {
    keys = await importCredential(await file.text());
  } catch (err) {
    notice(`${file.name} is not a gateway credential (${err.message.replace(/^not an STT1 credential: /, "")}).`, true);
    return;
  }
  if (!(await useKeys(keys, true))) return;
  if (!store) notice("This browser cannot keep keys (no IndexedDB here): load the file again after a reload.");
}

function drop(text) {
  client = null;
  unsaved = false;
  $("catalog").replaceChildren();
  showKeys(null);
  notice(text);
}

async function forget() {
  if (store) await store.delete(SLOT);
  tabs?.postMessage("forget");
  drop("The key is gone from this browser. Your credential file still works elsewhere.");
}

/** Another tab forgot the stored key: stop using it here too (a file's unsaved keys are not it). */
function forgotElsewhere(event) {
  if (event.data !== "forget" || !client || unsaved) return;
  drop("The key was forgotten in another tab of this console. Choose the credential file to use it again.");
}

// #### Catalog #############################################################################

async function showCatalog() {
  const catalog = $("catalog");
  notice(""); // an earlier failure's notice; one the catalog call brings (a rotation) stays
  const asked = client;
  let entries;
  try {
    entries = await asked.catalog();
  } catch (err) {
    if (client !== asked) return; // forgotten meanwhile
    // An unsigned refusal or no answer says nothing about the catalog: keep what is shown.
    if (err.verified || !(err instanceof GatewayError)) catalog.replaceChildren();
    notice(plainWords(err), true);
    return;
  }
  if (client !== asked) return;
  // The gateway answered these keys (verified): keep a file's keys now, and persist from now on.
  if (unsaved && store) {
    await store.save(client.credential, SLOT);
    client = new Client(client.credential, persistence());
  }
  unsaved = false;
  const names = Object.keys(entries).sort();
  catalog.replaceChildren(...names.map((name) => functionCard(name, entries[name])));
  $("empty").hidden = names.length > 0;
}

/** Follow local "#/a/b" references inside root. */
function resolve(schema, root, depth = 0) {
  if (!schema || typeof schema.$ref !== "string" || depth > 16) return schema || {};
  let node = root;
  for (const part of schema.$ref.replace(/^#\//, "").split("/")) node = node?.[part.replace(/~1/g, "/").replace(/~0/g, "~")];
  return resolve(node, root, depth + 1);
}

// #### Forms ###############################################################################

/** How one parameter is entered: a number, integer, text or yes/no input, a list of choices, or JSON. */
function fieldKind(schema, root) {
  let s = resolve(schema, root);
  let nullable = false;
  const options = s.anyOf || s.oneOf;
  if (Array.isArray(options)) {
    const rest = options.filter((o) => resolve(o, root).type !== "null");
    nullable = rest.length < options.length;
    if (rest.length === 1) s = resolve(rest[0], root);
  }
  if (Array.isArray(s.enum) && s.enum.length) return { kind: "enum", values: s.enum, nullable };
  if (s.type === "integer") return { kind: "integer", nullable, schema: s };
  if (s.type === "number") return { kind: "number", nullable, schema: s };
  if (s.type === "string") return { kind: "string", nullable, schema: s };
  if (s.type === "boolean") return { kind: "boolean", nullable };
  return { kind: "json", nullable, schema: s };
}

const KIND_WORDS = { integer: "whole number", number: "number", string: "text", boolean: "yes or no", enum: "one of", json: "JSON" };

function control(id, kind, required) {
  if (kind.kind === "enum" || kind.kind === "boolean") {
    const select = document.createElement("select");
    const values = kind.kind === "enum" ? kind.values : [true, false];
    const choices = [...(required ? [] : [["", "(not set)"]]), ...values.map((v) => [JSON.stringify(v), String(v)])];
    for (const [value, text] of choices) select.append(new Option(text, value));
    select.id = id;
    return select;
  }
  if (kind.kind === "json") {
    const area = document.createElement("textarea");
    area.id = id;
    area.spellcheck = false;
    area.placeholder = kind.schema.type === "array" ? "[1, 2, 3]" : kind.schema.type === "object" ? '{"key": "value"}' : "JSON";
    return area;
  }
  const input = document.createElement("input");
  input.id = id;
  if (kind.kind === "string") {
    input.type = "text";
    input.autocomplete = "off";
  } else {
    input.type = "text"; // not type=number: it would hide what was typed when it is not a number
    input.inputMode = kind.kind === "integer" ? "numeric" : "decimal";
  }
  return input;
}

/** A call form from the signed catalog's entry (not /openapi.json, which nothing signs). */
function functionCard(name, entry) {
  const form = $("function-card").content.firstElementChild.cloneNode(true);
  form.dataset.function = name;
  form.querySelector(".name").textContent = name;
  form.querySelector("h3").id = `fn-${name}`;
  form.setAttribute("aria-labelledby", `fn-${name}`);
  form.querySelector("button[type=submit]").setAttribute("aria-label", `Call ${name}`);
  form.querySelector(".doc").textContent = entry.doc || "";
  const root = entry.arguments;
  const args = resolve(root, root);
  const required = new Set(args.required || []);
  const names = Object.keys(args.properties || {});
  if (entry.var1 && names.includes(entry.var1)) names.unshift(...names.splice(names.indexOf(entry.var1), 1));
  const fields = [];
  for (const param of names) {
    const kind = fieldKind(args.properties[param], root);
    const id = `f-${name}-${param}`;
    const label = document.createElement("label");
    label.htmlFor = id;
    label.append(param, " ");
    const hint = document.createElement("small");
    const inUrl = param === entry.var1 && kind.kind !== "json";
    hint.textContent = `${KIND_WORDS[kind.kind]}${required.has(param) ? "" : ", optional"}${inUrl ? ", goes in the URL" : ""}`;
    label.append(hint, control(id, kind, required.has(param)));
    form.querySelector(".fields").append(label);
    fields.push({ param, kind, input: label.querySelector("input, select, textarea") });
  }
  if (entry.otp) {
    const label = document.createElement("label");
    label.append("Authenticator code ");
    const hint = document.createElement("small");
    hint.textContent = "6 digits, this function asks for one";
    const input = control(`f-${name}-otp`, { kind: "string" }, true);
    Object.assign(input, { inputMode: "numeric", autocomplete: "one-time-code", maxLength: 6, name: "otp" });
    label.append(hint, input);
    form.querySelector(".fields").append(label);
  }
  const preview = () => {
    const { var1 } = collect(fields, entry.var1, true);
    form.querySelector(".target").textContent = target(name, var1);
  };
  form.addEventListener("input", preview);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    call(form, name, fields, entry);
  });
  preview();
  return form;
}

function target(name, var1) {
  try {
    return restTarget(name, var1);
  } catch {
    return restTarget(name, null);
  }
}

const WHOLE_RE = /^[+-]?[0-9]+$/;
const DECIMAL_RE = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$/; // JSON's number syntax

/**
 * The form's values as { args, var1, problem }. Empty optional fields are left out; var1 goes
 * in the URL when it is a plain value the URL can carry, else in the body.
 */
function collect(fields, var1Name, lenient = false) {
  const args = {};
  let var1 = null;
  for (const { param, kind, input } of fields) {
    const text = input.value;
    if (text.trim() === "" && kind.kind !== "string") continue;
    if (text === "" && kind.kind === "string") continue;
    let value;
    if (kind.kind === "integer" || kind.kind === "number") {
      // Only what reads the same everywhere: Number() also takes "0x10" (16), "1e3" (1000), "0b1".
      const digits = text.trim();
      const plain = kind.kind === "integer" ? WHOLE_RE.test(digits) : DECIMAL_RE.test(digits);
      value = plain ? Number(digits) : NaN;
      if (kind.kind === "integer" && plain && !Number.isSafeInteger(value) && typeof JSON.rawJSON === "function") {
        value = BigInt(digits); // past 2**53 a Number would change the digits sent (stt1.js writes them)
      }
      if (typeof value === "number" && !Number.isFinite(value)) {
        if (lenient) continue;
        return { problem: `${param} must be a ${KIND_WORDS[kind.kind]}; "${text}" is not.` };
      }
    } else if (kind.kind === "string") {
      value = text;
    } else {
      try {
        value = JSON.parse(text);
      } catch {
        if (lenient) continue;
        return { problem: `${param} is not valid JSON.` };
      }
    }
    const scalar = typeof value !== "object" && value !== "" && value !== "." && value !== "..";
    if (param === var1Name && scalar && kind.kind !== "json") var1 = value;
    else args[param] = value;
  }
  return { args, var1 };
}

// #### Calls ###############################################################################

async function call(form, name, fields, entry) {
  // Not button.disabled: that would move the focus to <body>. aria-busy marks the call instead.
  if (form.getAttribute("aria-busy") === "true") return;
  const otpInput = form.querySelector("input[name=otp]");
  const { args, var1, problem } = collect(fields, entry.var1);
  const otp = otpInput ? otpInput.value.trim() : undefined;
  if (problem || (otpInput && !/^[0-9]{6}$/.test(otp))) {
    const message = problem || "Enter the 6-digit code your authenticator app shows: this function asks for one.";
    show(form, { verdict: "Not sent", tone: "bad", state: "unsent", message });
    return;
  }
  form.setAttribute("aria-busy", "true");
  show(form, { verdict: "Calling…", tone: "busy", state: "calling" }); // the last result is not this call's
  const started = performance.now();
  try {
    const value = await client.request(name, args, { var1, otp });
    show(form, {
      verdict: "Verified: signed by the gateway for this call", tone: "ok", state: "verified",
      result: JSON.stringify(value, (k, v) => (typeof v === "bigint" ? JSON.rawJSON(String(v)) : v), 2),
      meta: `${Math.round(performance.now() - started)} ms`,
    });
  } catch (err) {
    if (!(err instanceof GatewayError)) {
      show(form, { verdict: "Not sent", tone: "bad", state: "unsent", message: err.message });
      return;
    }
    const meta = `HTTP ${err.status || "none"} · ${err.code} · request id ${err.requestId}`;
    if (err.verified) {
      show(form, { verdict: "Refused: a verified answer, signed by the gateway for this call", tone: "warn",
        state: "verified-error", message: plainWords(err, entry), meta });
    } else if (err instanceof Unreachable) {
      show(form, { verdict: "Not delivered: no answer from the gateway", tone: "bad", state: "undelivered",
        message: plainWords(err), meta });
    } else if (err instanceof ResponseForged) {
      show(form, { verdict: "Forged: not signed by the gateway for this call", tone: "bad", state: "forged",
        message: plainWords(err), meta });
    } else {
      show(form, { verdict: "Not verified: an unsigned answer", tone: "bad", state: "unverified",
        message: plainWords(err, entry), meta });
    }
  } finally {
    form.removeAttribute("aria-busy");
    if (otpInput) otpInput.value = ""; // a code works once
  }
}

/** Fill the form's outcome region, which stays in the page (empty) so screen readers hear it change. */
function show(form, { verdict, tone, state, message = "", result = "", meta = "" }) {
  const box = form.querySelector(".outcome");
  box.dataset.state = state;
  const v = box.querySelector(".verdict");
  v.textContent = verdict;
  v.className = `verdict ${tone}`;
  box.querySelector(".message").textContent = message;
  box.querySelector(".result").textContent = result;
  box.querySelector(".meta").textContent = meta;
}

// #### Plain words #########################################################################

function plainWords(err, entry = {}) {
  if (err instanceof ResponseForged) {
    return "The answer was thrown away unread: it does not carry the gateway's signature for this call. "
      + "Something between this browser and the gateway may be altering traffic.";
  }
  if (err instanceof Unreachable) return `No answer from the gateway (${err.message}). Is it running and reachable?`;
  if (err instanceof Unauthorized && !err.verified) {
    // Unsigned: anyone on the path could send it, and the gateway sends it in its first second
    // too (PROTOCOL.md 4: it means only "retry"). A wrong authenticator code gets a signed 401.
    return "The gateway refused the request with an unsigned answer: try again. If it keeps failing, the key "
      + "may have been revoked, or this device's clock may be off.";
  }
  if (err instanceof Unauthorized && entry.otp) {
    return "The gateway refused the authenticator code: it is wrong, expired or already used. "
      + "Wait for the next code and call again.";
  }
  const words = {
    BadRequest: `The gateway could not read the request: ${err.message}.`,
    NotFound: "This function is gone, or this tenant may not call it. Reload the catalog.",
    InvalidArguments: `The arguments do not fit this function: ${err.message}.`,
    TooLarge: "The arguments are larger than the gateway accepts.",
    RateLimited: entry.otp && err.verified && err.code === "throttled" // the gateway's own words, signed
      ? `Authenticator codes are locked after too many wrong ones (${err.message}).`
      : "Too many calls in a short time. Wait a moment and call again.",
    ServerError: "The function failed on the server. The gateway's log has the details under this request id.",
    Overloaded: "The gateway is busy. Call again in a moment.",
    // Not "stopped": the gateway cancels an async function, but a sync one's thread runs on.
    Timeout: "The function ran past its time limit. A sync function may still be running on the server.",
    BadResponse: "The gateway signed its answer, but the answer is not in the expected form.",
  };
  return words[err.name] || `The gateway refused the call: ${err.message}.`;
}

// #### Start-up ############################################################################

async function start() {
  $("credential-file").addEventListener("change", loadFile);
  $("forget").addEventListener("click", forget);
  $("refresh").addEventListener("click", () => showCatalog());
  if (typeof BroadcastChannel === "function") {
    tabs = new BroadcastChannel("stt1-console");
    tabs.onmessage = forgotElsewhere;
  }
  try {
    store = await KeyStore.open("stt1-console");
  } catch {
    store = null;
  }
  let keys = null;
  try {
    keys = store && (await store.load(SLOT));
  } catch {
    notice("The key stored in this browser could not be read: load the credential file again.", true);
  }
  if (keys) await useKeys(keys);
  else showKeys(null);
  document.body.dataset.ready = "yes"; // for tests and scripts: the stored key, if any, is in use
}

start();
