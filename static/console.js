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

async function useKeys(keys) {
  // Tokens are bound to the credential's url, and this page may only talk to its own origin
  // (CSP connect-src 'self'): a credential for another gateway belongs in that gateway's console.
  if (keys.url !== location.origin) {
    notice(`This credential is for ${keys.url}, but this console belongs to ${location.origin}. `
      + `Open ${keys.url}/console to use it.`, true);
    return false;
  }
  // Only over what this tab last read or wrote (KeyStore.swap): another tab of this console may
  // have rotated further, and the client then takes the stored keys instead.
  const persist = store && {
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
  };
  client = new Client(keys, persist || {});
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
  // Stored before its first call: the hooks replace only what this tab last stored or read.
  if (store && keys.url === location.origin) await store.save(keys, SLOT);
  if (!(await useKeys(keys))) return;
  if (!store) notice("This browser cannot keep keys (no IndexedDB here): load the file again after a reload.");
}

async function forget() {
  if (store) await store.delete(SLOT);
  client = null;
  $("catalog").replaceChildren();
  showKeys(null);
  notice("The key is gone from this browser. Your credential file still works elsewhere.");
}

// #### Catalog #############################################################################

async function showCatalog() {
  const catalog = $("catalog");
  let entries;
  try {
    entries = await client.catalog();
  } catch (err) {
    catalog.replaceChildren();
    notice(plainWords(err), true);
    return;
  }
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
      const digits = text.trim();
      value = Number(digits);
      if (kind.kind === "integer" && !Number.isSafeInteger(value) && /^-?[0-9]+$/.test(digits)
          && typeof JSON.rawJSON === "function") {
        value = BigInt(digits); // past 2**53 a Number would change the digits sent (stt1.js writes them)
      }
      if (typeof value === "number" && (!Number.isFinite(value) || (kind.kind === "integer" && !Number.isInteger(value)))) {
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
  const button = form.querySelector("button[type=submit]");
  const otpInput = form.querySelector("input[name=otp]");
  const { args, var1, problem } = collect(fields, entry.var1);
  if (problem) {
    show(form, { verdict: "Not sent", tone: "bad", state: "unsent", message: problem });
    return;
  }
  button.disabled = true;
  const started = performance.now();
  try {
    const otp = otpInput && otpInput.value ? otpInput.value.trim() : undefined;
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
      show(form, { verdict: "Verified: signed by the gateway for this call", tone: "ok", state: "verified-error",
        message: plainWords(err, entry), meta });
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
    button.disabled = false;
  }
}

function show(form, { verdict, tone, state, message = "", result = "", meta = "" }) {
  const box = form.querySelector(".outcome");
  box.hidden = false;
  box.dataset.state = state;
  const v = box.querySelector(".verdict");
  v.textContent = verdict;
  v.className = `verdict ${tone}`;
  let m = box.querySelector(".message");
  if (!m) {
    m = document.createElement("p");
    m.className = "message";
    v.after(m);
  }
  m.textContent = message;
  m.hidden = !message;
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
    return entry.otp
      ? "The gateway refused the call: check the authenticator code (a code works once, for 30 seconds)."
      : "The gateway did not accept this credential: the key may be revoked or expired, or this device's clock "
        + "is far off. Ask the operator for a new credential file.";
  }
  const words = {
    BadRequest: `The gateway could not read the request: ${err.message}.`,
    NotFound: "This function is gone, or this tenant may not call it. Reload the catalog.",
    InvalidArguments: `The arguments do not fit this function: ${err.message}.`,
    TooLarge: "The arguments are larger than the gateway accepts.",
    RateLimited: "Too many calls in a short time. Wait a moment and call again.",
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
