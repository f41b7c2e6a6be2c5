/** Pure data transforms behind the views: formatting, sorting, colour scales, arcs. */
import type { BundleSummary } from "./api";

/** A number with 4 significant digits, exactly as Python's `f"{v:.4g}"` writes it (every tooltip
 * uses it): 3.14159 → "3.142", 12345.6 → "1.235e+04", 0.0000123 → "1.23e-05". */
export function fmt4(value: number): string {
  if (!Number.isFinite(value)) return Number.isNaN(value) ? "nan" : value > 0 ? "inf" : "-inf";
  if (value === 0) return Object.is(value, -0) ? "-0" : "0";
  const [mantissa, exp] = value.toExponential(3).split("e");
  const e = Number(exp);
  const strip = (t: string) => (t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t);
  if (e < -4 || e >= 4) return `${strip(mantissa)}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  return strip(value.toFixed(3 - e));
}

export function fmtBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KiB", "MiB", "GiB"];
  let v = bytes / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function fmtDate(iso: string | null | undefined): string {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toISOString().slice(0, 16).replace("T", " ");
}

export type SortKey = "id" | "model" | "created" | "predicate_result" | "size_bytes" | "verified";
export interface Sort {
  key: SortKey;
  descending: boolean;
}

/** Bundles whose id, model, predicate or output contains every word of `filter` (case-insensitive). */
export function filterBundles(bundles: BundleSummary[], filter: string): BundleSummary[] {
  const words = filter.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) return bundles;
  return bundles.filter((b) => {
    const text = [b.id, b.model, b.predicate, b.output, b.error].filter(Boolean).join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  });
}

function sortValue(b: BundleSummary, key: SortKey): string | number {
  const v = b[key];
  if (v === null || v === undefined) return -Infinity;
  if (typeof v === "boolean") return v ? 1 : 0;
  return v;
}

/** A sorted copy; missing values sort first ascending, ties keep id order. */
export function sortBundles(bundles: BundleSummary[], sort: Sort): BundleSummary[] {
  const sign = sort.descending ? -1 : 1;
  return [...bundles].sort((a, b) => {
    const x = sortValue(a, sort.key);
    const y = sortValue(b, sort.key);
    if (x === y) return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    if (x === -Infinity) return -sign;
    if (y === -Infinity) return sign;
    return (x < y ? -1 : 1) * sign;
  });
}

/** Clicking a column sorts by it ascending; clicking it again flips the order. */
export function nextSort(current: Sort, key: SortKey): Sort {
  return current.key === key ? { key, descending: !current.descending } : { key, descending: false };
}

// Viridis, 9 stops (matplotlib's), interpolated linearly in sRGB.
const VIRIDIS = [
  [68, 1, 84],
  [71, 44, 122],
  [59, 81, 139],
  [44, 113, 142],
  [33, 144, 141],
  [39, 173, 129],
  [92, 200, 99],
  [170, 220, 50],
  [253, 231, 37],
];
// Diverging blue–white–red (ColorBrewer RdBu, reversed so positive is red).
const RDBU = [
  [33, 102, 172],
  [103, 169, 207],
  [209, 229, 240],
  [247, 247, 247],
  [253, 219, 199],
  [239, 138, 98],
  [178, 24, 43],
];

function ramp(stops: number[][], t: number): string {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const c = stops[i].map((v, j) => Math.round(v + (stops[i + 1][j] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export type ScaleMode = "linear" | "robust" | "log";

export interface Scale {
  kind: "sequential" | "diverging";
  mode: ScaleMode;
  min: number;
  max: number;
  /** Values beyond [min, max] (robust mode) take the end colours. */
  clipped: boolean;
  color(value: number): string;
}

/** Finite min and max of a matrix (0, 0 when it has none). */
export function extent(values: number[][]): [number, number] {
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of values)
    for (const v of row) {
      if (!Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  return lo <= hi ? [lo, hi] : [0, 0];
}

/** The q-quantile (0–1) of the finite values, linear interpolation between order statistics. */
export function quantile(values: number[][], q: number): number {
  const flat = values.flat().filter(Number.isFinite).sort((a, b) => a - b);
  if (!flat.length) return 0;
  const x = Math.min(1, Math.max(0, q)) * (flat.length - 1);
  const i = Math.floor(x);
  return i + 1 < flat.length ? flat[i] + (flat[i + 1] - flat[i]) * (x - i) : flat[i];
}

/** Whether a log colour scale applies (every finite value positive). */
export function logApplies(values: number[][]): boolean {
  const [lo] = extent(values);
  return values.some((r) => r.some(Number.isFinite)) && lo > 0;
}

/**
 * The colour scale of a heatmap. Sequential (viridis) over the data's range, or diverging
 * (blue–white–red, symmetric around zero) when the data has both signs or `diverging` is forced.
 * `robust` spans the 1st–99th percentile so one outlier (a BOS token's huge norm) does not flatten
 * the rest; `log` is viridis over log10 (positive data only, else linear).
 */
export function scaleFor(values: number[][], diverging?: boolean, mode: ScaleMode = "linear"): Scale {
  let [lo, hi] = extent(values);
  const clipped = mode === "robust" && values.flat().length > 20;
  if (clipped) [lo, hi] = [quantile(values, 0.01), quantile(values, 0.99)];
  if (diverging ?? (lo < 0 && hi > 0)) {
    const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    return { kind: "diverging", mode, min: -m, max: m, clipped, color: (v) => ramp(RDBU, (v + m) / (2 * m)) };
  }
  if (mode === "log" && logApplies(values)) {
    const a = Math.log10(lo);
    const span = Math.log10(hi) - a || 1;
    return { kind: "sequential", mode, min: lo, max: hi, clipped: false, color: (v) => ramp(VIRIDIS, (Math.log10(v) - a) / span) };
  }
  const span = hi - lo || 1;
  return { kind: "sequential", mode: mode === "log" ? "linear" : mode, min: lo, max: hi, clipped, color: (v) => ramp(VIRIDIS, (v - lo) / span) };
}

/** Text colour readable on a cell of this scale's colour at `value`. */
export function inkOn(scale: Scale, value: number): string {
  const t = (value - scale.min) / (scale.max - scale.min || 1);
  return scale.kind === "sequential" ? (t > 0.6 ? "#000" : "#fff") : Math.abs(t - 0.5) > 0.35 ? "#fff" : "#000";
}

/** Element-wise a − b over the common top-left block (rows and columns both bundles have). */
export function difference(a: number[][], b: number[][]): number[][] {
  const rows = Math.min(a.length, b.length);
  const out: number[][] = [];
  for (let i = 0; i < rows; i++) {
    const cols = Math.min(a[i].length, b[i].length);
    out.push(Array.from({ length: cols }, (_, j) => a[i][j] - b[i][j]));
  }
  return out;
}

export interface Arc {
  q: number;
  k: number;
  weight: number;
}

/** Token-to-token arcs of an attention pattern (queries × keys): each query's `perQuery` strongest
 * keys with weight ≥ `minWeight`, strongest first; self-attention (q = k) is left out. */
export function attentionArcs(matrix: number[][], perQuery = 2, minWeight = 0.1): Arc[] {
  const arcs: Arc[] = [];
  matrix.forEach((row, q) => {
    row
      .map((weight, k) => ({ q, k, weight }))
      .filter((a) => a.k !== a.q && a.weight >= minWeight)
      .sort((x, y) => y.weight - x.weight)
      .slice(0, perQuery)
      .forEach((a) => arcs.push(a));
  });
  return arcs.sort((x, y) => y.weight - x.weight);
}

/** The KV group a query head reads under grouped-query attention (heads / kv_heads per group). */
export function kvGroup(head: number, heads: number | null, kvHeads: number | null): number | null {
  if (!heads || !kvHeads || kvHeads >= heads) return null;
  return Math.floor(head / (heads / kvHeads));
}

/** Influence scores as shading strengths in [-1, 1] (divided by the largest |score|). */
export function shading(scores: number[]): number[] {
  const m = Math.max(0, ...scores.map((s) => (Number.isFinite(s) ? Math.abs(s) : 0)));
  return scores.map((s) => (m && Number.isFinite(s) ? s / m : 0));
}

/** Background for an influence strength: red for positive, blue for negative. */
export function shadeColor(strength: number): string {
  const a = Math.min(1, Math.abs(strength)).toFixed(3);
  return strength >= 0 ? `rgba(214,39,40,${a})` : `rgba(31,119,180,${a})`;
}

/** Tokens as shown: whitespace made visible, empty tokens marked. */
export function showToken(token: string): string {
  if (token === "") return "∅";
  // Byte-level BPE (GPT-2, SmolLM2) writes a leading space as "Ġ" and a newline as "Ċ".
  return token.replace(/[ Ġ]/g, "␣").replace(/[\nĊ]/g, "⏎").replace(/\t/g, "⇥");
}
