// node static/test_vectors.mjs: the browser client's conformance checks, in Node 20.
// The checks live in vector_tests.js (browser-compatible); this only loads the vectors.
import { readFile } from "node:fs/promises";
import { runVectorTests } from "./vector_tests.js";

const vectors = new URL("../tests/vectors/", import.meta.url);
const load = async (path) => JSON.parse(await readFile(new URL(path, vectors), "utf8"));

const { failed, lines } = await runVectorTests(await load("paseto/v3.json"), await load("stt1.json"));
for (const line of lines) console.log(line);
process.exitCode = failed ? 1 : 0;
