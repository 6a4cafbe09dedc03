// Conformance checks for stt1.js, runnable in Node 20 and in a browser (no Node APIs).
//
//   const { passed, failed, lines } = await runVectorTests(pasetoV3Json, stt1Json);
//
// pasetoV3Json is tests/vectors/paseto/v3.json (3-E-* must encrypt byte for byte and decrypt,
// 3-F-* must be refused, 3-S-* are public-key vectors and ignored); stt1Json is
// tests/vectors/stt1.json (the project's fixed-nonce vectors). Then negative checks, and a
// Client round trip against an in-memory gateway built from the same module.

import * as stt1 from "./stt1.js";

const { InvalidToken } = stt1;
const UTF8 = new TextEncoder();
const text = (s) => UTF8.encode(s);
const hex = (h) => new Uint8Array((h.match(/../g) || []).map((b) => parseInt(b, 16)));
const toHex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const json = (v) => JSON.stringify(v);

export async function runVectorTests(vectorsPaseto, vectorsStt1) {
  const lines = [];
  let passed = 0;
  let failed = 0;
  const check = async (name, fn) => {
    try {
      const detail = await fn();
      if (detail !== true && detail !== undefined) throw new Error(String(detail));
      passed++;
      lines.push(`ok   ${name}`);
    } catch (err) {
      failed++;
      lines.push(`FAIL ${name}: ${err && err.stack ? err.stack.split("\n").slice(0, 2).join(" | ") : err}`);
    }
  };
  const expect = (cond, what) => {
    if (!cond) throw new Error(what);
  };
  const refused = async (promiseOrFn) => {
    try {
      await (typeof promiseOrFn === "function" ? promiseOrFn() : promiseOrFn);
    } catch (err) {
      if (err instanceof InvalidToken) return true;
      throw new Error(`refused with ${err && err.name} instead of InvalidToken`);
    }
    throw new Error("accepted");
  };

  const paseto = Array.isArray(vectorsPaseto) ? vectorsPaseto : vectorsPaseto.tests;
  const stt = Array.isArray(vectorsStt1) ? vectorsStt1 : vectorsStt1.vectors;
  const eVectors = paseto.filter((v) => v.name.startsWith("3-E-"));
  const fVectors = paseto.filter((v) => v.name.startsWith("3-F-"));
  expect(eVectors.length && fVectors.length && stt.length, "no vectors");

  // -- WebCrypto's empty HKDF salt is RFC 5869's HashLen zero bytes --------------------------
  await check("HKDF-SHA384: WebCrypto empty salt equals 48 zero bytes (RFC 5869 2.2)", async () => {
    const s = globalThis.crypto.subtle;
    const ikm = await s.importKey("raw", hex(eVectors[0].key), "HKDF", false, ["deriveBits"]);
    const derive = (salt) => s.deriveBits({ name: "HKDF", hash: "SHA-384", salt, info: text("x") }, ikm, 384);
    expect(same(new Uint8Array(await derive(new Uint8Array(0))), new Uint8Array(await derive(new Uint8Array(48)))), "differ");
  });

  // -- PASETO v3.local ----------------------------------------------------------------------
  for (const v of eVectors) {
    const [key, nonce, payload, footer, implicit] =
      [hex(v.key), hex(v.nonce), text(v.payload), text(v.footer), text(v["implicit-assertion"])];
    await check(`${v.name} encrypts byte for byte (raw key and non-extractable key)`, async () => {
      expect((await stt1.encrypt(key, payload, footer, implicit, nonce)) === v.token, "raw-key token differs");
      const cryptoKey = await stt1.importSecret(key);
      expect(cryptoKey.extractable === false, "extractable");
      expect((await stt1.encrypt(cryptoKey, payload, footer, implicit, nonce)) === v.token, "CryptoKey token differs");
    });
    await check(`${v.name} decrypts`, async () => {
      const out = await stt1.decrypt(key, v.token, implicit);
      expect(same(out.payload, payload), "payload differs");
      expect(same(out.footer, footer), "footer differs");
    });
  }
  const localKey = hex(eVectors[0].key);
  for (const v of fVectors) {
    await check(`${v.name} refused with every key on offer`, async () => {
      const keys = ["key", "secret-key", "public-key"].filter((k) => k in v).map((k) => hex(v[k]));
      keys.push(localKey);
      for (const key of keys) await refused(stt1.decrypt(key, v.token, text(v["implicit-assertion"])));
    });
  }

  // -- STT1 fixed-nonce vectors -------------------------------------------------------------
  const dirKeys = new Map(); // "dir tid kid" -> DirectionKey (non-extractable)
  const dirKey = async (v, direction = v.dir) => {
    const id = `${direction} ${v.tid} ${v.kid} ${v.K}`;
    if (!dirKeys.has(id)) dirKeys.set(id, await stt1.DirectionKey.derive(await stt1.importSecret(hex(v.K)), direction, v.tid, v.kid));
    return dirKeys.get(id);
  };
  const assertionOf = (v) => {
    const a = v.assertion;
    return v.dir === "c2s"
      ? stt1.requestAssertion(a.aud, a.method, hex(a.target.hex), hex(a.content_type.hex), hex(a.body.hex))
      : stt1.responseAssertion(a.aud, a.request_jti, a.status, hex(a.content_type.hex), hex(a.body.hex));
  };
  for (const v of stt) {
    const a = v.assertion;
    await check(`${v.name}: step, direction key and step key`, async () => {
      expect(stt1.timeStep(v.iat) === v.step, "step");
      const kDir = await stt1.directionKeyBytes(hex(v.K), v.dir, v.tid, v.kid);
      expect(toHex(kDir) === v.dir_key, "dir_key differs");
      expect(toHex(await stt1.stepKeyBytes(kDir, v.step)) === v.step_key, "step_key differs");
    });
    await check(`${v.name}: implicit assertion and footer`, async () => {
      for (const piece of [a.target, a.content_type, a.body].filter(Boolean)) expect(toHex(text(piece.text)) === piece.hex, "text/hex");
      const sha = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", hex(a.body.hex)));
      expect(toHex(sha) === a.body_sha256, "body_sha256");
      expect(toHex(await assertionOf(v)) === v.implicit, "implicit differs");
      expect(new TextDecoder().decode(stt1.buildFooter(v.dir, v.tid, v.kid, v.iat)) === v.footer, "footer differs");
      expect(json(stt1.parseFooter(text(v.footer))) === json({ direction: v.dir, tid: v.tid, kid: v.kid, iat: v.iat }), "parsed");
    });
    await check(`${v.name}: token byte for byte (raw step key, and non-extractable DirectionKey)`, async () => {
      const raw = await stt1.encrypt(hex(v.step_key), text(v.payload), text(v.footer), hex(v.implicit), hex(v.nonce));
      expect(raw === v.token, "raw step-key token differs");
      const key = await dirKey(v);
      const claims = JSON.parse(v.payload);
      expect((await stt1.mint(key, v.iat, claims, hex(v.implicit), hex(v.nonce))) === v.token, "mint differs");
      if (v.dir === "c2s") {
        const { token } = await stt1.mintRequest(key, {
          aud: a.aud, method: a.method, target: hex(a.target.hex), contentType: hex(a.content_type.hex),
          body: hex(a.body.hex), iat: v.iat, jti: claims.jti, otp: claims.otp, nonce: hex(v.nonce),
        });
        expect(token === v.token, "mintRequest differs");
      }
    });
    await check(`${v.name}: opens with its key; refused with the other direction's`, async () => {
      const opened = await stt1.openToken(await dirKey(v), v.token, hex(v.implicit));
      expect(json(opened.claims) === v.payload, "claims differ");
      expect(opened.footer.iat === v.iat && opened.footer.kid === v.kid, "footer");
      if (v.dir === "s2c") {
        const resp = await stt1.openResponse(await dirKey(v), v.token, {
          aud: a.aud, requestJti: a.request_jti, status: a.status, contentType: hex(a.content_type.hex), body: hex(a.body.hex),
        });
        expect(json(resp.claims) === v.payload, "openResponse claims differ");
      }
      await refused(stt1.openToken(await dirKey(v, v.dir === "c2s" ? "s2c" : "c2s"), v.token, hex(v.implicit)));
    });
  }

  // -- Negative checks ------------------------------------------------------------------------
  const c2sV = stt.find((v) => v.dir === "c2s");
  const s2cV = stt.find((v) => v.dir === "s2c" && v.assertion.request_jti === JSON.parse(c2sV.payload).jti) || stt.find((v) => v.dir === "s2c");
  const c2s = await dirKey(c2sV);
  const s2c = await dirKey(s2cV);
  const c2sImplicit = hex(c2sV.implicit);
  const sa = s2cV.assertion;
  const response = (over = {}) => ({
    aud: sa.aud, requestJti: sa.request_jti, status: sa.status, contentType: hex(sa.content_type.hex), body: hex(sa.body.hex), ...over,
  });
  const forge = async (direction, payload, footer = null, iat = c2sV.iat, implicit = c2sImplicit) => {
    // The right step key with arbitrary payload or footer bytes: past the MAC, so only the
    // later checks can refuse it.
    const kDir = await stt1.directionKeyBytes(hex(c2sV.K), direction, c2sV.tid, c2sV.kid);
    const kT = await stt1.stepKeyBytes(kDir, stt1.timeStep(iat));
    return stt1.encrypt(kT, text(payload), footer || stt1.buildFooter(direction, c2sV.tid, c2sV.kid, iat), implicit);
  };

  await check("every single-character change of a token is refused", async () => {
    const t = c2sV.token;
    for (let i = 0; i < t.length; i++) {
      const swapped = t[i] === "A" ? "B" : "A";
      await refused(stt1.openToken(c2s, t.slice(0, i) + swapped + t.slice(i + 1), c2sImplicit));
    }
    return true;
  });
  await check("every truncation of a token is refused", async () => {
    for (let n = 0; n < c2sV.token.length; n++) await refused(stt1.openToken(c2s, c2sV.token.slice(0, n), c2sImplicit));
  });
  await check("padding, non-zero trailing bits, bad length and bad characters refused by b64decode", async () => {
    for (const bad of ["QQ==", "QQ=", "QR", "Q", "QUJD=", "QU+D", "QU/D", "QU D", "QUJ\u00e9", "QUJDQ"]) await refused(() => stt1.b64decode(bad));
    expect(same(stt1.b64decode("QQ"), text("A")) && same(stt1.b64decode("QUI"), text("AB")), "valid spellings");
    expect(stt1.b64encode(text("AB")) === "QUI" && stt1.b64encode(new Uint8Array([0xfb, 0xff])) === "-_8", "encode");
  });
  await check("padded, extra-part, other-version and oversized tokens refused", async () => {
    const t = c2sV.token;
    const [head, body, foot] = [t.slice(0, 9), t.slice(9).split(".")[0], t.slice(9).split(".")[1]];
    const variants = [t + "=", `${head}${body}=.${foot}`, t + ".", t + ".QQ", `v4.local.${body}.${foot}`, `v3.public.${body}.${foot}`,
      `V3.local.${body}.${foot}`, `STT2.${body}.${foot}`, `${head}${body}`, ` ${t}`, `${t}\n`, t + "A".repeat(stt1.MAX_TOKEN_CHARS)];
    for (const bad of variants) await refused(stt1.openToken(c2s, bad, c2sImplicit));
  });
  await check("footer tid, kid or iat rewritten: refused", async () => {
    const body = c2sV.token.split(".")[2];
    const f = (s) => `v3.local.${body}.${stt1.b64encode(text(s))}`;
    const kid2 = "AAAAAAAAAAAAAAAAAAAAAA";
    for (const footer of [`c2s.acmf.${c2sV.kid}.${c2sV.iat}`, `c2s.acme.${kid2}.${c2sV.iat}`, `c2s.acme.${c2sV.kid}.${c2sV.iat + 1}`,
      `c2s.acme.${c2sV.kid}.0${c2sV.iat}`, `c2s.acme.${c2sV.kid}.${c2sV.iat} `]) await refused(stt1.openToken(c2s, f(footer), c2sImplicit));
  });
  await check("an s2c token sent as a request, and a c2s token offered as a response: refused", async () => {
    await refused(stt1.openToken(c2s, s2cV.token, hex(s2cV.implicit)));
    await refused(stt1.openResponse(s2c, c2sV.token, response()));
    await refused(stt1.openToken(s2c, await forge("c2s", c2sV.payload, stt1.buildFooter("s2c", c2sV.tid, c2sV.kid, c2sV.iat)), c2sImplicit));
  });
  await check("response with a wrong request jti, status, content type, body or audience: refused", async () => {
    await stt1.openResponse(s2c, s2cV.token, response()); // the untouched one opens
    for (const over of [{ requestJti: JSON.parse(c2sV.payload).jti.replace(/^./, "B") }, { status: 201 }, { contentType: "" },
      { body: text("{}") }, { aud: "https://api.example.org" }, { status: 0 }]) await refused(stt1.openResponse(s2c, s2cV.token, response(over)));
  });
  await check("request bound to audience, method, target, content type and body", async () => {
    const ca = c2sV.assertion;
    const args = [ca.aud, ca.method, hex(ca.target.hex), hex(ca.content_type.hex), hex(ca.body.hex)];
    for (let i = 0; i < args.length; i++) {
      const changed = [...args];
      changed[i] = typeof changed[i] === "string" ? changed[i] + "x" : stt1.pae(changed[i]);
      await refused(stt1.openToken(c2s, c2sV.token, await stt1.requestAssertion(...changed)));
    }
  });
  await check("another tenant's key, or the same K under another tid: refused", async () => {
    const other = await stt1.DirectionKey.derive(new Uint8Array(32).fill(7), "c2s", c2sV.tid, c2sV.kid);
    await refused(stt1.openToken(other, c2sV.token, c2sImplicit));
    const otherTid = await stt1.DirectionKey.derive(hex(c2sV.K), "c2s", "acme2", c2sV.kid);
    await refused(stt1.openToken(otherTid, c2sV.token, c2sImplicit));
  });
  await check("strict payloads: unknown fields, rk in a request, wrong types, null, oversize refused", async () => {
    const jti = JSON.parse(c2sV.payload).jti;
    expect((await stt1.openToken(c2s, await forge("c2s", `{"jti":"${jti}"}`), c2sImplicit)).claims.jti === jti, "control");
    for (const p of [`{"jti":"${jti}","x":1}`, `{"jti":"${jti}","rk":{"kid":"${c2sV.kid}","k":"${"A".repeat(43)}"}}`,
      `{"jti":1}`, `{"jti":"${jti}","otp":123456}`, `{"jti":"${jti}","otp":null}`, `{"jti":"${jti}","otp":"12345"}`, `["${jti}"]`,
      `{"jti":"${jti.slice(0, 21)}B"}`, `{"jti":"${jti}","otp":"123456"${" ".repeat(500)}}`, `\ufeff{"jti":"${jti}"}`, `{"jti":"${jti}",}`])
      await refused(stt1.openToken(c2s, await forge("c2s", p), c2sImplicit));
    const s2cForged = await forge("s2c", `{"jti":"${jti}","rk":{"kid":"${c2sV.kid}","k":"${"A".repeat(43)}","x":1}}`, null, c2sV.iat, c2sImplicit);
    await refused(stt1.openToken(s2c, s2cForged, c2sImplicit));
    await refused(() => stt1.mint(c2s, c2sV.iat, { jti, rk: { kid: c2sV.kid, k: "A".repeat(43) } }, c2sImplicit).catch(() => { throw new InvalidToken(); }));
  });

  // -- Client round trip against an in-memory gateway -----------------------------------------
  await clientChecks(check, expect, stt1, c2sV);

  lines.push(`${passed} passed, ${failed} failed`);
  return { passed, failed, lines };
}

/** A fake gateway behind a fake fetch: it verifies request tokens and signs its answers. */
async function clientChecks(check, expect, s, v) {
  const aud = "https://api.example.com";
  const tid = v.tid;
  const k1 = new Uint8Array(32).fill(1);
  const k2 = new Uint8Array(32).fill(2);
  const kid1 = s.b64encode(new Uint8Array(16).fill(3));
  const kid2 = s.b64encode(new Uint8Array(16).fill(4));
  const secrets = { [kid1]: k1, [kid2]: k2 };
  const serverNow = 1_760_000_000;
  let clientNow = serverNow - 1000; // the client's clock is 1000 s slow
  const gw = { mode: "ok", seenKids: [], rotate: true };

  const fetch = async (url, init) => {
    const target = url.slice(aud.length);
    const token = init.headers.Authorization.replace(/^STT1 /, "");
    const body = init.body || new Uint8Array(0);
    const ct = init.headers["Content-Type"] || "";
    const footer = s.parse(token).footer;
    if (Math.abs(footer.iat - serverNow) > 45 || !secrets[footer.kid]) return new Response("{}", { status: 401 });
    const c2s = await s.DirectionKey.derive(secrets[footer.kid], "c2s", tid, footer.kid);
    let opened;
    try {
      opened = await s.openToken(c2s, token, await s.requestAssertion(aud, init.method, target, ct, body));
    } catch {
      return new Response("{}", { status: 401 });
    }
    gw.seenKids.push(footer.kid);
    if (gw.mode === "unsigned500") return new Response('{"valid":true,"results":1}', { status: 500 });
    if (gw.mode === "unsigned429") return new Response("", { status: 429 });
    if (gw.mode === "echo") { // the request's own, genuine token offered as the response's (PROTOCOL.md 8)
      return new Response('{"valid":true,"results":1}', { status: 200, headers: { "content-type": "application/json", "STT1-Response": token } });
    }
    const status = gw.mode === "404" || gw.mode === "rk404" ? 404 : 200;
    let out = status === 200 ? { valid: true, results: { target, args: body.length ? JSON.parse(new TextDecoder().decode(body)) : null } }
      : { valid: false, error: { code: "not_found", message: "no such function" } };
    const outBody = new TextEncoder().encode(JSON.stringify(out));
    const claims = { jti: s.newJti() };
    if (gw.rotate && footer.kid === kid1 && status === 200) claims.rk = { kid: kid2, k: s.b64encode(k2) };
    if (gw.mode === "rk404") claims.rk = { kid: kid2, k: s.b64encode(k2) }; // signed, but rk on a 4xx (PROTOCOL.md 8)
    const s2c = await s.DirectionKey.derive(secrets[footer.kid], "s2c", tid, footer.kid);
    const implicit = await s.responseAssertion(aud, opened.claims.jti, status, "application/json", gw.mode === "tamper" ? new Uint8Array(1) : outBody);
    const respToken = await s.mint(s2c, serverNow, claims, implicit);
    return new Response(outBody, { status, headers: { "content-type": "application/json", "STT1-Response": respToken } });
  };

  const keys = await s.importCredential(JSON.stringify({ stt: 1, url: aud, tid, kid: kid1, k: s.b64encode(k1) }));
  const rotated = [];
  const promoted = [];
  const client = new s.Client(keys, {
    fetch, clock: () => clientNow, onRotate: async (rk, updated) => rotated.push([rk, updated]), onPromote: async (u) => promoted.push(u),
  });
  const rejects = async (p, Cls) => {
    try {
      await p;
    } catch (err) {
      expect(err instanceof Cls, `expected ${Cls.name}, got ${err && err.name}`);
      return;
    }
    throw new Error(`expected ${Cls.name}, resolved`);
  };

  await check("importCredential: non-extractable HKDF key, strict fields", async () => {
    expect(keys.key.extractable === false && keys.key.algorithm.name === "HKDF" && !("k" in keys), "key");
    for (const bad of [{ stt: 2 }, { extra: 1 }, { k: "short" }, { tid: "Acme" }, { next: null }]) {
      await rejects(s.importCredential({ stt: 1, url: aud, tid, kid: kid1, k: s.b64encode(k1), ...bad }), TypeError);
    }
    await rejects((async () => new s.Client({ ...keys, url: aud + "/" }))(), TypeError);
  });
  await check("Client: a clock 1000 s slow gets an unsigned 401 (a hint, Unauthorized)", async () => {
    await rejects(client.call("add", null, { a: 1 }), s.Unauthorized);
  });
  await check("Client: clock offset learned only from a verified answer; rk stored, then signed with", async () => {
    clientNow = serverNow - 40; // within the 45 s window: accepted, and the offset is learned
    const out = await client.call("power", "a b/c!", { x: 1 });
    expect(out.target === "/rest/power/a%20b%2Fc%21" && out.args.x === 1, `results ${JSON.stringify(out)}`);
    clientNow = serverNow - 80; // outside the window without the learned offset
    expect(rotated.length === 1 && rotated[0][0].kid === kid2 && rotated[0][0].key.extractable === false, "onRotate");
    expect(client.kid === kid2 && client.credential.kid === kid1, "signs with next, keeps old");
    const catalog = await client.catalog();
    expect(catalog.target === "/rest/" && catalog.args === null, "catalog");
    expect(gw.seenKids.at(-1) === kid2 && promoted.length === 1 && client.credential.kid === kid2 && !client.credential.next, "promoted");
  });
  await check("Client: signed 404 is NotFound; unsigned 429 is RateLimited; unsigned 500, a tampered body, rk on a 404 and the request's own token are ResponseForged", async () => {
    gw.mode = "404";
    await rejects(client.call("nope"), s.NotFound);
    gw.mode = "unsigned429";
    await rejects(client.call("x"), s.RateLimited);
    gw.mode = "unsigned500";
    await rejects(client.call("x"), s.ResponseForged);
    gw.mode = "tamper";
    await rejects(client.call("x"), s.ResponseForged);
    const adopted = rotated.length;
    gw.mode = "rk404";
    await rejects(client.call("x"), s.ResponseForged);
    expect(rotated.length === adopted, "an rk on a 4xx was not adopted");
    gw.mode = "echo";
    await rejects(client.call("x"), s.ResponseForged);
    gw.mode = "ok";
    expect((await client.call("x", 5)).target === "/rest/x/5", "recovers");
  });
  await check("Client: bad function names and var1 refused before sending", async () => {
    await rejects(client.call("a/b"), TypeError);
    await rejects(client.call("add", { a: 1, b: 2 }), TypeError); // args passed as var1
    await rejects(client.call("f", ".."), TypeError);
    await rejects(client.request("f", {}, { otp: "12345" }), TypeError);
  });
  await check("Client: no answer is Unreachable", async () => {
    const down = new s.Client(keys, { fetch: async () => { throw new TypeError("fetch failed"); }, clock: () => serverNow });
    await rejects(down.call("x"), s.Unreachable);
  });
}
