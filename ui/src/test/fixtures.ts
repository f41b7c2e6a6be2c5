/** Test data in the API's shapes, and a fake DataSource the views render against. */
import type {
  AnalysisJson,
  Attention,
  BundleDetail,
  BundleSummary,
  CubeSlice,
  DataSource,
  Influence,
  Job,
  JobWatch,
  ReplayRequest,
  ReplayResult,
} from "../api";
import { ApiError } from "../api";

export const summary = (over: Partial<BundleSummary> = {}): BundleSummary => ({
  id: "runs/incident-0",
  name: "incident-0",
  model: "gpt2-injection",
  created: "2026-11-30T10:00:00+00:00",
  mode: "generate",
  prompt: "hi",
  predicate: 'contains("HACKED")',
  predicate_result: true,
  output: "HACKED",
  size_bytes: 2048,
  verified: true,
  partial: false,
  error: null,
  ...over,
});

export const TOKENS = ["The", " cat", " sat", " down"];

export const cube = (metric = "energy"): CubeSlice => ({
  metric,
  tokens: TOKENS,
  positions: [0, 1, 2, 3],
  layers: [0, 1, 2],
  layer_names: ["transformer.h.0", "transformer.h.1", "transformer.h.2"],
  site_kind: "resid",
  values: [
    [1.23456, 2, 3, 4],
    [5, 6.5, 7, 8],
    [9, 10, 11.111111, 12],
  ].map((r) => r.map((v) => (metric === "energy" ? v : -v))),
  total_tokens: 4,
  total_layers: 3,
  downsampled: false,
  note: "",
});

export const detail = (over: Partial<BundleDetail> = {}): BundleDetail => ({
  summary: summary(),
  manifest: {},
  tokens: TOKENS,
  sites: [
    { name: "blocks.0.attn", shape: [1, 4, 8], dtype: "float32", sketch: "full" },
    { name: "blocks.0.attn.pattern", shape: [1, 4, 4, 4], dtype: "float32", sketch: "full" },
    { name: "blocks.1.mlp", shape: [1, 4, 8], dtype: "float32", sketch: "full" },
  ],
  layers: 3,
  heads: 4,
  kv_heads: 2,
  metrics: ["energy", "mean_activation"],
  has_attention: true,
  attention_layers: [0, 1, 2],
  attention_source: "recorded",
  analyses: ["incident-0.analysis"],
  ...over,
});

/** A causal pattern that differs per layer and head (row-stochastic). */
export function pattern(layer: number, head: number, n = 4): number[][] {
  return Array.from({ length: n }, (_, q) => {
    const raw = Array.from({ length: n }, (_, k) => (k <= q ? 1 + ((k + layer + head) % 3) : 0));
    const sum = raw.reduce((a, b) => a + b, 0);
    return raw.map((v) => v / sum);
  });
}

export const attention = (layer: number, head: number): Attention => ({
  layer,
  head,
  heads: 4,
  kv_heads: 2,
  kv_group: Math.floor(head / 2),
  tokens: TOKENS,
  positions: [0, 1, 2, 3],
  matrix: pattern(layer, head),
  source: "recorded",
  total_tokens: 4,
  downsampled: false,
  note: "",
});

export const influence = (method: string): Influence => ({
  tokens: TOKENS,
  scores: [0.5, -1, 0.25, 2],
  method,
  target: 42,
  target_label: " HACKED",
  position: 3,
  evidence: "gradient",
  causal: true,
  value: 1,
  forward_passes: 2,
  notes: [],
});

export const ANALYSIS: AnalysisJson = {
  bundle: "runs/incident-0",
  forward_passes: 120,
  seconds: 3.5,
  anomalies: {
    threshold: 3,
    baseline_size: 8,
    anomalies: [
      { site: "blocks.1.attn", score: 7.5, flagged: true },
      { site: "blocks.0.mlp", score: 1.2, flagged: false },
    ],
    notes: ["CF baseline is small"],
  },
  ranking: {
    units: [
      { unit: "blocks.1.attn.head.2", level: "head", score: 0.9 },
      { unit: "blocks.0.mlp.post[3]", level: "neuron", score: -0.4 },
    ],
  },
  fix_set: {
    members: [
      {
        unit: "blocks.1.attn.head.2",
        level: "head",
        intervention: { site: "blocks.1.attn", kind: "zero", heads: [2] },
        necessity: 0.75,
        sufficiency: 0.5,
        attribution: 0.9,
        benign_kl: 0.01,
      },
      {
        unit: "blocks.0.mlp.post[3]",
        level: "neuron",
        intervention: { site: "blocks.0.mlp.post", kind: "mean", neurons: [3] },
        necessity: 0.25,
        sufficiency: 0.125,
        attribution: -0.4,
        benign_kl: null,
      },
    ],
    total_flip_rate: 1,
    flips: [true, true, true, true],
    reached_threshold: true,
    strategy: "greedy",
    side_effects: {
      n_benign: 8,
      mean_kl: 0.0123,
      max_kl: 0.05,
      bound: 0.1,
      within_bound: true,
      accuracy_clean: 1,
      accuracy_fixed: 0.875,
      predicate_changed: 0,
    },
    notes: ["narrowed to heads"],
  },
};

export const job = (over: Partial<Job> = {}): Job => ({
  id: "j1",
  bundle: "runs/incident-0",
  kind: "analyze",
  state: "running",
  progress: { phase: "search", done: 3, total: 10, line: "search: units: 3/10 candidates" },
  error: null,
  result: null,
  created: "2026-11-30T10:00:00+00:00",
  started: "2026-11-30T10:00:00+00:00",
  finished: null,
  time_limit_s: 600,
  ...over,
});

/** A DataSource over the fixtures; `jobs` is the sequence of states `watchJob` reports. */
export class FakeSource implements DataSource {
  readonly embedded: boolean = false;
  calls: string[] = [];
  jobStates: Job[] = [];
  listeners: ((job: Job) => void)[] = [];
  details: Record<string, BundleDetail> = { "runs/incident-0": detail() };
  list: BundleSummary[] = [summary(), summary({ id: "runs/broken", error: "manifest.json is not JSON; re-record it" })];

  bundles = async () => this.list;
  bundle = async (id: string) => {
    this.calls.push(`bundle ${id}`);
    const d = this.details[id];
    if (!d) throw new ApiError(404, `unknown bundle id '${id}'`);
    return d;
  };
  cube = async (_id: string, metric: string) => cube(metric);
  attention = async (_id: string, layer: number, head: number) => {
    this.calls.push(`attention ${layer}:${head}`);
    return attention(layer, head);
  };
  influence = async (_id: string, _target: string | null, method: string) => influence(method);
  compare = async () => {
    throw new ApiError(400, "no");
  };
  analysis = async () => ANALYSIS;
  inspections = async () => [];
  inspection = async () => ({ id: "i", summary: {}, summary_markdown: null, plots: [] });
  startJob = async () => {
    this.calls.push("start");
    return job({ state: "queued", progress: { phase: null, done: 0, total: 0, line: "" } });
  };
  job = async () => job();
  cancelJob = async () => {
    this.calls.push("cancel");
    return job({ state: "cancelled" });
  };
  watchJob(_id: string, onJob: (job: Job) => void): JobWatch {
    this.listeners.push(onJob);
    return { close() {} };
  }
  emit(state: Job) {
    this.listeners.forEach((l) => l(state));
  }
  replay = async (_id: string, _request: ReplayRequest): Promise<ReplayResult> => ({
    intervention: {},
    recorded_output: "HACKED",
    new_output: "hello",
    changed: true,
    predicate_result: false,
    recorded_predicate_result: true,
    flipped: true,
    prediction: 1,
    forward_passes: 1,
  });
  fileUrl = (url: string) => url;
}
