// @vitest-environment node
import { describe, expect, it } from "vitest";
import type { BundleSummary } from "../api";
import {
  attentionArcs,
  difference,
  extent,
  filterBundles,
  fmt4,
  fmtBytes,
  kvGroup,
  nextSort,
  quantile,
  scaleFor,
  showToken,
  shading,
  sortBundles,
} from "../transforms";

const bundle = (over: Partial<BundleSummary>): BundleSummary => ({
  id: "b",
  name: null,
  model: null,
  created: null,
  mode: null,
  prompt: null,
  predicate: null,
  predicate_result: null,
  output: null,
  size_bytes: 0,
  verified: null,
  partial: false,
  error: null,
  ...over,
});

describe("fmt4", () => {
  it("matches Python's '{:.4g}'", () => {
    // [value, format(value, '.4g')] computed with CPython 3.11
    const pairs: [number, string][] = [
      [3.14159265, "3.142"],
      [-0.0123456, "-0.01235"],
      [0.1, "0.1"],
      [100.0, "100"],
      [5.5e-3, "0.0055"],
      [12.345678, "12.35"],
      [0.98765, "0.9877"],
      [9999.6, "1e+04"],
      [1234.56, "1235"],
      [12345.6, "1.235e+04"],
      [123456789, "1.235e+08"],
      [0.0000123456, "1.235e-05"],
      [0.0001, "0.0001"],
      [-2.5e-7, "-2.5e-07"],
      [0, "0"],
      [NaN, "nan"],
    ];
    for (const [v, s] of pairs) expect(fmt4(v)).toBe(s);
  });
});

describe("bundle list transforms", () => {
  const list = [
    bundle({ id: "a", model: "gpt2", size_bytes: 30, created: "2026-01-02T00:00:00Z", verified: true }),
    bundle({ id: "b", model: "smollm2", size_bytes: 10, created: "2026-01-03T00:00:00Z", verified: false }),
    bundle({ id: "c", model: null, size_bytes: 20, created: null, error: "manifest.json is not JSON" }),
  ];
  it("filters on every word, case-insensitive, across fields", () => {
    expect(filterBundles(list, "SMOL").map((b) => b.id)).toEqual(["b"]);
    expect(filterBundles(list, "manifest json").map((b) => b.id)).toEqual(["c"]);
    expect(filterBundles(list, "gpt2 smollm2")).toEqual([]);
    expect(filterBundles(list, "  ")).toBe(list);
  });
  it("sorts by a column, missing values first, and flips on a second click", () => {
    expect(sortBundles(list, { key: "size_bytes", descending: false }).map((b) => b.id)).toEqual(["b", "c", "a"]);
    expect(sortBundles(list, { key: "created", descending: false }).map((b) => b.id)).toEqual(["c", "a", "b"]);
    expect(sortBundles(list, { key: "created", descending: true }).map((b) => b.id)).toEqual(["b", "a", "c"]);
    expect(sortBundles(list, { key: "verified", descending: true }).map((b) => b.id)).toEqual(["a", "b", "c"]);
    const s = nextSort({ key: "id", descending: false }, "size_bytes");
    expect(s).toEqual({ key: "size_bytes", descending: false });
    expect(nextSort(s, "size_bytes")).toEqual({ key: "size_bytes", descending: true });
  });
  it("formats sizes", () => {
    expect(fmtBytes(512)).toBe("512 B");
    expect(fmtBytes(2048)).toBe("2.0 KiB");
    expect(fmtBytes(3 * 1024 * 1024)).toBe("3.0 MiB");
  });
});

describe("colour scales", () => {
  it("is sequential for one-signed data and spans its extent", () => {
    const s = scaleFor([
      [1, 2],
      [3, 5],
    ]);
    expect(s.kind).toBe("sequential");
    expect([s.min, s.max]).toEqual([1, 5]);
    expect(s.color(1)).toBe("rgb(68,1,84)"); // viridis start
    expect(s.color(5)).toBe("rgb(253,231,37)"); // viridis end
  });
  it("is diverging and symmetric around zero for signed data", () => {
    const s = scaleFor([[-1, 4]]);
    expect(s.kind).toBe("diverging");
    expect([s.min, s.max]).toEqual([-4, 4]);
    expect(s.color(0)).toBe("rgb(247,247,247)");
  });
  it("robust mode spans the 1st–99th percentile so one outlier does not flatten the rest", () => {
    const values = [Array.from({ length: 100 }, (_, i) => i + 1).concat([100000])];
    const linear = scaleFor(values);
    const robust = scaleFor(values, undefined, "robust");
    expect(linear.max).toBe(100000);
    expect(robust.clipped).toBe(true);
    expect(robust.max).toBeCloseTo(quantile(values, 0.99));
    expect(robust.max).toBeLessThan(102);
    expect(robust.color(100000)).toBe(robust.color(robust.max)); // clipped to the end colour
    expect(linear.color(50)).toBe(linear.color(1)); // nearly: both at the dark end under the outlier
  });
  it("log mode is viridis over log10 for positive data, linear otherwise", () => {
    const log = scaleFor([[1, 10, 100]], undefined, "log");
    expect(log.mode).toBe("log");
    expect(log.color(10)).toBe(scaleFor([[0, 2]]).color(1)); // the middle colour
    expect(scaleFor([[0, 10]], undefined, "log").mode).toBe("linear");
  });
  it("quantiles interpolate between order statistics", () => {
    expect(quantile([[4, 1], [3, 2]], 0.5)).toBe(2.5);
    expect(quantile([[4, 1, NaN]], 1)).toBe(4);
    expect(quantile([], 0.5)).toBe(0);
  });
  it("ignores non-finite values in the extent", () => {
    expect(extent([[NaN, 2, Infinity, -3]])).toEqual([-3, 2]);
    expect(extent([])).toEqual([0, 0]);
  });
});

describe("matrices", () => {
  it("differences over the common block", () => {
    expect(
      difference(
        [
          [5, 6, 7],
          [1, 1, 1],
        ],
        [[1, 2]],
      ),
    ).toEqual([[4, 4]]);
  });
  it("arcs take each query's strongest non-self keys above the threshold", () => {
    const m = [
      [1, 0, 0],
      [0.7, 0.3, 0],
      [0.05, 0.55, 0.4],
    ];
    expect(attentionArcs(m, 1, 0.1)).toEqual([
      { q: 1, k: 0, weight: 0.7 },
      { q: 2, k: 1, weight: 0.55 },
    ]);
  });
  it("labels GQA query heads with their KV group", () => {
    expect([0, 1, 2, 3, 4, 5].map((h) => kvGroup(h, 6, 3))).toEqual([0, 0, 1, 1, 2, 2]);
    expect(kvGroup(2, 4, 4)).toBeNull(); // plain multi-head attention: no groups
    expect(kvGroup(2, 4, null)).toBeNull();
  });
  it("shows byte-level BPE spaces and newlines", () => {
    expect(showToken("Ġjumps")).toBe("␣jumps");
    expect(showToken(" cat\n")).toBe("␣cat⏎");
    expect(showToken("")).toBe("∅");
  });
  it("shades influence by the largest magnitude", () => {
    expect(shading([2, -4, 1])).toEqual([0.5, -1, 0.25]);
    expect(shading([0, 0])).toEqual([0, 0]);
  });
});
