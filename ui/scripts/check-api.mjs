// Fails when src/api-schema.ts is not what openapi-typescript generates from the server's
// exported schema (src/model_forensics/server/openapi.json): run `npm run gen:api`.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const ui = fileURLToPath(new URL("..", import.meta.url));
const schema = join(ui, "..", "src", "model_forensics", "server", "openapi.json");
if (!existsSync(schema)) {
  console.error(`no ${schema}: the server exports it with scripts/export_openapi.py`);
  process.exit(1);
}
const out = join(mkdtempSync(join(tmpdir(), "mf-api-")), "api-schema.ts");
execFileSync(join(ui, "node_modules", ".bin", "openapi-typescript"), [schema, "-o", out], { stdio: "pipe" });
const fresh = readFileSync(out, "utf8");
const committed = readFileSync(join(ui, "src", "api-schema.ts"), "utf8");
if (fresh !== committed) {
  console.error("ui/src/api-schema.ts does not match server/openapi.json: run `npm run gen:api` (then `make ui`)");
  process.exit(1);
}
console.log("ui/src/api-schema.ts matches server/openapi.json");
