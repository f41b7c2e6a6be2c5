// @vitest-environment node
import { describe, expect, it } from "vitest";
import { parseRoute, routePath } from "../router";
import type { Route } from "../router";

describe("routes", () => {
  it("parses every view, with ids holding slashes", () => {
    expect(parseRoute("/")).toEqual({ view: "list" });
    expect(parseRoute("/bundle/runs/inj/incident-0")).toEqual({ view: "bundle", id: "runs/inj/incident-0" });
    expect(parseRoute("/bundle/runs/incident-0/rca")).toEqual({ view: "rca", id: "runs/incident-0" });
    expect(parseRoute("/bundle/x/replay/")).toEqual({ view: "replay", id: "x" });
    expect(parseRoute("/inspect/out/inspect-1")).toEqual({ view: "inspect", id: "out/inspect-1" });
    expect(parseRoute("#/bundle/a%20b")).toEqual({ view: "bundle", id: "a b" });
    expect(parseRoute("/nowhere")).toEqual({ view: "missing", path: "/nowhere" });
    expect(parseRoute("/bundle/%E0%A4%A")).toEqual({ view: "missing", path: "/bundle/%E0%A4%A" });
  });
  it("round-trips through routePath", () => {
    const routes: Route[] = [
      { view: "list" },
      { view: "bundle", id: "a/b c/incident#1" },
      { view: "rca", id: "x.mfb.zip" },
      { view: "replay", id: "d/e" },
      { view: "inspect", id: "." },
    ];
    for (const r of routes) expect(parseRoute(routePath(r))).toEqual(r);
  });
});
