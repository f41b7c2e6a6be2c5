import { act, cleanup, fireEvent, render, screen, waitFor, within } from "@testing-library/react";
import type { ReactElement } from "react";
import { afterEach, describe, expect, it } from "vitest";
import { EmbeddedSource } from "../api";
import type { DataSource, EmbeddedData, ReplayRequest } from "../api";
import { SourceContext } from "../source";
import { BundleList } from "../views/BundleList";
import { BundlePage } from "../views/BundlePage";
import { RcaView } from "../views/RcaView";
import { ReplayView } from "../views/ReplayView";
import { ANALYSIS, FakeSource, attention, cube, detail, job, pattern, summary } from "./fixtures";

afterEach(cleanup);

function show(source: DataSource, view: ReactElement) {
  return render(<SourceContext.Provider value={source}>{view}</SourceContext.Provider>);
}

describe("BundleList", () => {
  it("lists bundles, shows corrupt ones in red with the reason, and filters", async () => {
    const source = new FakeSource();
    source.list = [
      summary({ id: "a/incident-0", model: "gpt2-injection" }),
      summary({ id: "b/incident-1", model: "smollm2", verified: false }),
      summary({ id: "c/broken", error: "manifest.json is not valid JSON; the bundle is corrupt" }),
    ];
    show(source, <BundleList />);
    await screen.findByTestId("bundle-list");
    expect(screen.getAllByTestId("bundle-row").map((r) => r.getAttribute("data-bundle-id")).sort()).toEqual([
      "a/incident-0",
      "b/incident-1",
    ]);
    const bad = screen.getByTestId("error-row");
    expect(bad.getAttribute("data-bundle-id")).toBe("c/broken");
    expect(bad.className).toContain("error-row");
    expect(bad.textContent).toContain("manifest.json is not valid JSON");
    const b = screen.getAllByTestId("bundle-row").find((r) => r.getAttribute("data-bundle-id") === "b/incident-1")!;
    expect(b.textContent).toContain("✗");
    fireEvent.change(screen.getByTestId("bundle-filter"), { target: { value: "smollm" } });
    expect(screen.getAllByTestId("bundle-row").map((r) => r.getAttribute("data-bundle-id"))).toEqual(["b/incident-1"]);
    expect(screen.queryByTestId("error-row")).toBeNull();
  });
  it("sorts by a column header, and reverses on a second click", async () => {
    const source = new FakeSource();
    source.list = [summary({ id: "x", size_bytes: 5 }), summary({ id: "y", size_bytes: 50 }), summary({ id: "z", size_bytes: 1 })];
    show(source, <BundleList />);
    await screen.findByTestId("bundle-list");
    const ids = () => screen.getAllByTestId("bundle-row").map((r) => r.getAttribute("data-bundle-id"));
    fireEvent.click(screen.getByTestId("sort-size_bytes"));
    expect(ids()).toEqual(["z", "x", "y"]);
    fireEvent.click(screen.getByTestId("sort-size_bytes"));
    expect(ids()).toEqual(["y", "x", "z"]);
  });
  it("says so when the server cannot list bundles", async () => {
    const source = new FakeSource();
    source.bundles = async () => {
      throw new Error("403 forbidden: pass ?token=");
    };
    show(source, <BundleList />);
    expect((await screen.findByRole("alert")).textContent).toContain("403 forbidden");
  });
});

describe("BundlePage", () => {
  it("draws the chosen metric and switches metric", async () => {
    show(new FakeSource(), <BundlePage id="runs/incident-0" />);
    await screen.findByTestId("heatmap");
    const value = (l: number, t: number) =>
      within(screen.getByTestId("heatmap"))
        .getAllByTestId("heatmap-cell")
        .find((c) => c.getAttribute("data-layer") === String(l) && c.getAttribute("data-token") === String(t))!
        .getAttribute("data-value");
    expect(value(1, 2)).toBe(String(cube("energy").values[1][2]));
    fireEvent.change(screen.getByTestId("metric-select"), { target: { value: "mean_activation" } });
    await waitFor(() => expect(value(1, 2)).toBe(String(cube("mean_activation").values[1][2])));
  });
  it("shows each head's pattern, labels GQA heads with their KV group, and switches layer and head", async () => {
    const source = new FakeSource();
    show(source, <BundlePage id="runs/incident-0" />);
    await screen.findByTestId("attention-matrix");
    const heads = within(screen.getByTestId("head-select")).getAllByRole("option").map((o) => o.textContent);
    expect(heads).toEqual(["0 (KV group 0)", "1 (KV group 0)", "2 (KV group 1)", "3 (KV group 1)"]);
    const cells = () =>
      screen.getAllByTestId("attention-cell").map((c) => [c.getAttribute("data-q"), c.getAttribute("data-k"), c.getAttribute("data-value")]);
    const flat = (m: number[][]) => m.flatMap((row, q) => row.map((v, k) => [String(q), String(k), String(v)]));
    expect(cells()).toEqual(flat(pattern(0, 0)));
    fireEvent.change(screen.getByTestId("head-select"), { target: { value: "3" } });
    await waitFor(() => expect(cells()).toEqual(flat(pattern(0, 3))));
    fireEvent.change(screen.getByTestId("layer-select"), { target: { value: "2" } });
    await waitFor(() => expect(cells()).toEqual(flat(attention(2, 3).matrix)));
    expect(source.calls).toContain("attention 2:3");
    expect(screen.getAllByTestId("attention-arc").length).toBeGreaterThan(0);
  });
  it("shades source tokens by influence", async () => {
    show(new FakeSource(), <BundlePage id="runs/incident-0" />);
    const strip = await screen.findByTestId("influence-tokens");
    const spans = strip.querySelectorAll("span.token");
    expect([...spans].map((s) => s.getAttribute("data-score"))).toEqual(["0.5", "-1", "0.25", "2"]);
    // the largest |score| is fully shaded, the negative one is blue
    expect((spans[3] as HTMLElement).style.background).toContain("rgb(214, 39, 40)");
    expect((spans[1] as HTMLElement).style.background).toContain("rgba(31, 119, 180, 0.5)");
  });
  it("degrades to messages when attention and the cube are absent", async () => {
    const source = new FakeSource();
    source.details["runs/incident-0"] = detail({ has_attention: false, attention_layers: [], metrics: [], heads: null });
    show(source, <BundlePage id="runs/incident-0" />);
    expect(await screen.findByText(/no activity cube/)).toBeTruthy();
    expect(await screen.findByText(/No attention patterns in this bundle/)).toBeTruthy();
    expect(screen.queryByTestId("heatmap")).toBeNull();
  });
  it("says what is wrong with an unknown bundle id", async () => {
    show(new FakeSource(), <BundlePage id="nope" />);
    expect((await screen.findByRole("alert")).textContent).toContain("unknown bundle id 'nope'");
  });
});

describe("RcaView", () => {
  it("shows the fix set with necessity and sufficiency, flip rate, side effects, anomalies, ranking and notes", async () => {
    show(new FakeSource(), <RcaView id="runs/incident-0" />);
    const fix = await screen.findByTestId("fixset");
    const rows = within(fix).getAllByTestId("fixset-member");
    expect(rows.map((r) => r.getAttribute("data-unit"))).toEqual(["blocks.1.attn.head.2", "blocks.0.mlp.post[3]"]);
    expect(rows[0].textContent).toContain("75%");
    expect(rows[0].textContent).toContain("50%");
    expect(rows[0].textContent).toContain("blocks.1.attn:zero heads=2");
    expect(within(fix).getByTestId("flip-rate").textContent).toBe("100%");
    expect(within(fix).getByTestId("side-effects").textContent).toContain("0.0123");
    const anomalies = screen.getByTestId("anomalies").textContent ?? "";
    expect(anomalies.indexOf("blocks.1.attn")).toBeLessThan(anomalies.indexOf("blocks.0.mlp"));
    expect(screen.getByTestId("ranking").textContent).toContain("blocks.0.mlp.post[3]");
    expect(screen.getByText("CF baseline is small")).toBeTruthy();
    expect(screen.getByText("narrowed to heads")).toBeTruthy();
  });
  it("runs an analysis with live progress and shows the new result when it is done", async () => {
    const source = new FakeSource();
    source.details["runs/incident-0"] = detail({ analyses: [] });
    show(source, <RcaView id="runs/incident-0" />);
    expect(await screen.findByText(/No analysis of this bundle yet/)).toBeTruthy();
    fireEvent.click(screen.getByTestId("run-analysis"));
    await screen.findByTestId("job-progress");
    act(() => source.emit(job()));
    expect(screen.getByTestId("job-progress").textContent).toContain("search: units: 3/10 candidates");
    expect(screen.getByTestId("cancel-analysis")).toBeTruthy();
    source.details["runs/incident-0"] = detail({ analyses: ["incident-0.analysis"] });
    act(() => source.emit(job({ state: "done", result: "incident-0.analysis" })));
    await screen.findByTestId("fixset");
    expect(screen.getByTestId("job-progress").getAttribute("data-state")).toBe("done");
    expect(screen.queryByTestId("cancel-analysis")).toBeNull();
  });
  it("cancels a running job and shows a failed job's error text", async () => {
    const source = new FakeSource();
    show(source, <RcaView id="runs/incident-0" />);
    fireEvent.click(await screen.findByTestId("run-analysis"));
    await screen.findByTestId("job-progress");
    act(() => source.emit(job()));
    fireEvent.click(screen.getByTestId("cancel-analysis"));
    await waitFor(() => expect(screen.getByTestId("job-progress").getAttribute("data-state")).toBe("cancelled"));
    expect(source.calls).toContain("cancel");
    fireEvent.click(screen.getByTestId("run-analysis"));
    await waitFor(() => expect(source.listeners.length).toBe(2));
    act(() => source.emit(job({ id: "j2", state: "failed", error: "analysis took longer than 600 s; raise --time-limit" })));
    expect(screen.getByTestId("job-error").textContent).toContain("analysis took longer than 600 s");
  });
});

describe("offline report (embedded data)", () => {
  const data: EmbeddedData = {
    version: 1,
    bundles: [summary()],
    details: { "runs/incident-0": detail() },
    cubes: { "runs/incident-0": { energy: cube("energy") } },
    attention: { "runs/incident-0": { "0:0": attention(0, 0) } },
    influence: {},
    analyses: { "runs/incident-0": { "incident-0.analysis": ANALYSIS } },
    inspections: [],
    inspection: {},
  };
  it("reads what is embedded and says what needs a server", async () => {
    const source = new EmbeddedSource(data);
    expect((await source.cube("runs/incident-0", "energy")).values).toEqual(cube("energy").values);
    await expect(source.attention("runs/incident-0", 1, 0)).rejects.toThrow(/not in this report/);
    await expect(source.startJob()).rejects.toThrow("needs `model-forensics serve`");
    await expect(source.replay()).rejects.toThrow("needs `model-forensics serve`");
  });
  it("shows the analysis but no job buttons, and the playground says it needs serve", async () => {
    const source = new EmbeddedSource(data);
    show(source, <RcaView id="runs/incident-0" />);
    await screen.findByTestId("fixset");
    expect(screen.queryByTestId("run-analysis")).toBeNull();
    expect(screen.getByText(/Running an analysis needs `model-forensics serve`/)).toBeTruthy();
    cleanup();
    show(source, <ReplayView id="runs/incident-0" />);
    expect(await screen.findByText(/replay playground needs `model-forensics serve`/)).toBeTruthy();
    expect(screen.queryByTestId("replay-run")).toBeNull();
  });
});

describe("ReplayView", () => {
  it("runs an intervention and shows the new output next to the recorded one", async () => {
    const source = new FakeSource();
    const sent: unknown[] = [];
    const replay = source.replay;
    source.replay = async (id: string, request: ReplayRequest) => {
      sent.push(request);
      return replay(id, request);
    };
    show(source, <ReplayView id="runs/incident-0" />);
    const sites = within(await screen.findByTestId("replay-site")).getAllByRole("option").map((o) => o.textContent);
    expect(sites).toEqual(["blocks.0.attn", "blocks.1.mlp"]); // patterns are not intervention sites
    fireEvent.change(screen.getByTestId("replay-head"), { target: { value: "2" } });
    fireEvent.change(screen.getByTestId("replay-kind"), { target: { value: "scale" } });
    fireEvent.change(screen.getByTestId("replay-value"), { target: { value: "0.25" } });
    fireEvent.click(screen.getByTestId("replay-run"));
    const out = await screen.findByTestId("replay-output");
    expect(sent).toEqual([{ site: "blocks.0.attn", head: 2, kind: "scale", value: 0.25 }]);
    expect(within(out).getByTestId("replay-recorded").textContent).toBe("HACKED");
    expect(within(out).getByTestId("replay-new").textContent).toBe("hello");
    expect(out.textContent).toContain("flipped");
  });
});
