// Writes static/build-info.json: a sha256 over the UI's sources (ui/src, ui/index.html,
// ui/package-lock.json, ui/vite.config.ts). tests/ui/test_build_current.py recomputes it the
// same way and fails when the committed build is older than the sources.
//
// Digest: for each file in sorted order of its path relative to ui/ (posix separators), the
// line "<path>\n<sha256 hex of its bytes>\n"; the sha256 of all those lines.
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { fileURLToPath } from "node:url";

const ui = fileURLToPath(new URL("..", import.meta.url));
export const INPUTS = ["src", "index.html", "package-lock.json", "vite.config.ts"];

function files(path) {
  if (statSync(path).isDirectory()) return readdirSync(path).flatMap((name) => files(join(path, name)));
  return [path];
}

export function sourceDigest() {
  const paths = INPUTS.flatMap((p) => files(join(ui, p)))
    .map((p) => relative(ui, p).split(sep).join("/"))
    .sort();
  const outer = createHash("sha256");
  for (const p of paths) {
    const inner = createHash("sha256").update(readFileSync(join(ui, p))).digest("hex");
    outer.update(`${p}\n${inner}\n`);
  }
  return { sha256: outer.digest("hex"), files: paths.length };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { sha256, files: n } = sourceDigest();
  const out = join(ui, "..", "src", "model_forensics", "server", "static", "build-info.json");
  const info = { sha256, files: n, inputs: INPUTS, note: "written by `make ui` (ui/scripts/build-info.mjs)" };
  writeFileSync(out, JSON.stringify(info, null, 2) + "\n");
  console.log(`build-info.json: sha256 ${sha256.slice(0, 12)}… over ${n} files`);
}
