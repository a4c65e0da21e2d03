// Runs a wasm32-wasip1 program under Node's V8 with node:wasi (make bench-scan).
// Usage: node --no-warnings bench/scan/run.mjs PROGRAM.wasm ARGS...
// The program links the bbr-wasm library, whose proxy-wasm imports it never calls; they are
// stubbed so the module instantiates.
import { readFile } from "node:fs/promises";
import { argv, exit } from "node:process";
import { WASI } from "node:wasi";

const [program, ...args] = argv.slice(2);
const wasi = new WASI({ version: "preview1", args: [program, ...args], env: {}, preopens: { "/": "/" }, returnOnExit: true });
const module = await WebAssembly.compile(await readFile(program));
const imports = wasi.getImportObject();
for (const { module: name } of WebAssembly.Module.imports(module)) {
  imports[name] ??= new Proxy({}, { get: (_, fn) => () => { throw new Error(`stub import ${name}.${String(fn)} called`); } });
}
const instance = await WebAssembly.instantiate(module, imports);
// The library's proxy-wasm entry point is exported as `_initialize`, which node:wasi refuses
// next to `_start` (command modules have only `_start`); hand it the command's view.
exit(wasi.start({ exports: { memory: instance.exports.memory, _start: instance.exports._start } }));
