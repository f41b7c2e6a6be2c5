// @vitest-environment node
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { decodeAttention } from "../api";
import { attention } from "./fixtures";

describe("the typed API client", () => {
  it("uses the types generated from the server's committed OpenAPI schema", () => {
    // scripts/check-api.mjs regenerates api-schema.ts from server/openapi.json and compares.
    const script = join(process.cwd(), "scripts", "check-api.mjs"); // vitest runs in ui/
    expect(() => execFileSync("node", [script], { stdio: "pipe" })).not.toThrow();
  }, 30_000);
  it("decodes a report's 8-bit attention patterns to probabilities", () => {
    const { matrix: _dropped, ...rest } = attention(0, 1);
    const bytes = String.fromCharCode(255, 0, 128, 127);
    const decoded = decodeAttention({ ...rest, shape: [2, 2], matrix_u8: btoa(bytes) });
    expect(decoded.matrix).toEqual([
      [1, 0],
      [128 / 255, 127 / 255],
    ]);
    expect(decoded.layer).toBe(0);
    expect("matrix_u8" in decoded).toBe(false);
  });
});
