/**
 * The one typed API client. Types come from the server's OpenAPI schema
 * (src/model_forensics/server/openapi.json → `npm run gen:api` → api-schema.ts).
 *
 * Two sources behind one interface: `HttpSource` talks to `model-forensics serve`;
 * `EmbeddedSource` reads the data an offline report embeds as `window.__MF_DATA__` and
 * answers "needs `model-forensics serve`" for what only a server can do (jobs, replay).
 */
import type { components } from "./api-schema";

type S = components["schemas"];
export type BundleSummary = S["BundleSummary"];
export type BundleDetail = S["BundleDetail"];
export type CubeSlice = S["CubeSlice"];
export type Attention = S["Attention"];
export type Influence = S["Influence"];
export type Compare = S["Compare"];
export type InspectionSummary = S["InspectionSummary"];
export type InspectionDetail = S["InspectionDetail"];
export type Job = S["Job"];
export type ReplayRequest = S["ReplayRequest"];
export type ReplayResult = S["ReplayResult"];

/** An analysis JSON as `analyze --out` writes it (rca.pipeline.Analysis.to_json()). */
export type AnalysisJson = Record<string, unknown>;

export const INFLUENCE_METHODS = ["occlusion", "grad_x_input", "integrated_gradients", "attention_rollout"] as const;

/** A request the server answered with an error status; `detail` is its one-line message. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly detail: string,
  ) {
    super(detail);
  }
}

/** What an offline report cannot do without a server. */
export class NeedsServer extends Error {
  constructor(what: string) {
    super(`${what} needs \`model-forensics serve\` (this is an offline report)`);
  }
}

/** Data an offline report embeds (written by src/model_forensics/report/html.py). */
export interface EmbeddedData {
  version: number;
  generated?: string;
  /** The route the report opens on, e.g. "/bundle/incident-0". */
  start?: string;
  /** What the report left out or downsampled, shown at the top of the page. */
  notes?: string[];
  bundles: BundleSummary[];
  details: Record<string, BundleDetail>;
  /** bundle id → metric → slice */
  cubes: Record<string, Record<string, CubeSlice>>;
  /** bundle id → "layer:head" → pattern; the report stores `matrix` as `matrix_u8` (base64 of
   * uint8 weights × 255, row-major, `shape` [queries, keys]) */
  attention: Record<string, Record<string, Attention | QuantizedAttention>>;
  /** bundle id → "method:target" → scores ("method:default" for the recorded output) */
  influence: Record<string, Record<string, Influence>>;
  /** bundle id → analysis name → analysis JSON */
  analyses: Record<string, Record<string, AnalysisJson>>;
  inspections: InspectionSummary[];
  inspection: Record<string, InspectionDetail>;
}

export type QuantizedAttention = Omit<Attention, "matrix"> & { shape: [number, number]; matrix_u8: string };

/** An attention entry as the page uses it: 8-bit report patterns decoded to probabilities. */
export function decodeAttention(entry: Attention | QuantizedAttention): Attention {
  if (!("matrix_u8" in entry)) return entry;
  const { matrix_u8, shape, ...rest } = entry;
  const bytes = atob(matrix_u8);
  const [rows, cols] = shape;
  const matrix = Array.from({ length: rows }, (_, r) =>
    Array.from({ length: cols }, (_, c) => bytes.charCodeAt(r * cols + c) / 255),
  );
  return { ...rest, matrix };
}

export interface JobWatch {
  close(): void;
}

export interface DataSource {
  readonly embedded: boolean;
  bundles(): Promise<BundleSummary[]>;
  bundle(id: string): Promise<BundleDetail>;
  cube(id: string, metric: string): Promise<CubeSlice>;
  attention(id: string, layer: number, head: number): Promise<Attention>;
  /** Token influence on one output (`target`: a token id or token text; null: the top prediction). */
  influence(id: string, target: string | null, method: string): Promise<Influence>;
  compare(a: string, b: string, metric: string): Promise<Compare>;
  analysis(id: string, name: string): Promise<AnalysisJson>;
  inspections(): Promise<InspectionSummary[]>;
  inspection(id: string): Promise<InspectionDetail>;
  startJob(bundle: string, options?: Record<string, unknown>): Promise<Job>;
  job(id: string): Promise<Job>;
  cancelJob(id: string): Promise<Job>;
  /** Calls `onJob` with each state until the job ends (SSE, polling when SSE fails). */
  watchJob(id: string, onJob: (job: Job) => void): JobWatch;
  replay(id: string, request: ReplayRequest): Promise<ReplayResult>;
  /** A plot's URL as the page can load it (the server's file URL with the token, or a data: URL). */
  fileUrl(url: string): string;
}

export const JOB_ENDED: ReadonlySet<Job["state"]> = new Set(["done", "failed", "cancelled"]);

const enc = encodeURIComponent;

/** Bundle ids are paths relative to the served root; keep their slashes readable in URLs. */
export function encodeId(id: string): string {
  return id.split("/").map(enc).join("/");
}

/** An id in a page route: like `encodeId`, but the served directory itself (".") is "~",
 * since browsers drop "." path segments. */
export function routeId(id: string): string {
  return id === "." ? "~" : encodeId(id);
}

export class HttpSource implements DataSource {
  readonly embedded = false;

  constructor(
    private readonly base = "",
    private readonly token: string | null = null,
    private readonly pollMs = 500,
  ) {}

  private url(path: string, query: Record<string, string | number> = {}, withToken = false): string {
    const params = new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)]));
    if (withToken && this.token) params.set("token", this.token);
    const qs = params.toString();
    return `${this.base}/api${path}${qs ? `?${qs}` : ""}`;
  }

  private async call<T>(method: string, path: string, query = {}, body?: unknown): Promise<T> {
    const headers: Record<string, string> = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(this.url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!response.ok) throw new ApiError(response.status, await errorDetail(response));
    return (await response.json()) as T;
  }

  bundles = () => this.call<BundleSummary[]>("GET", "/bundles");
  bundle = (id: string) => this.call<BundleDetail>("GET", `/bundles/${encodeId(id)}`);
  cube = (id: string, metric: string) =>
    this.call<CubeSlice>("GET", `/bundles/${encodeId(id)}/cube`, { metric, max_tokens: 128 });
  attention = (id: string, layer: number, head: number) =>
    this.call<Attention>("GET", `/bundles/${encodeId(id)}/attention`, { layer, head, max_tokens: 128 });
  influence = (id: string, target: string | null, method: string) =>
    this.call<Influence>("GET", `/bundles/${encodeId(id)}/influence`, target === null ? { method } : { target, method });
  compare = (a: string, b: string, metric: string) => this.call<Compare>("GET", "/compare", { a, b, metric });
  analysis = (id: string, name: string) =>
    this.call<AnalysisJson>("GET", `/bundles/${encodeId(id)}/analyses/${enc(name)}`);
  inspections = () => this.call<InspectionSummary[]>("GET", "/inspections");
  inspection = (id: string) => this.call<InspectionDetail>("GET", `/inspections/${encodeId(id)}`);
  startJob = (bundle: string, options: Record<string, unknown> = {}) =>
    this.call<Job>("POST", "/jobs", {}, { bundle, kind: "analyze", options });
  job = (id: string) => this.call<Job>("GET", `/jobs/${enc(id)}`);
  cancelJob = (id: string) => this.call<Job>("DELETE", `/jobs/${enc(id)}`);
  replay = (id: string, request: ReplayRequest) =>
    this.call<ReplayResult>("POST", `/bundles/${encodeId(id)}/replay`, {}, request);

  /** The file URL the server gives a plot, with the token when the server needs one. */
  fileUrl(url: string): string {
    if (!this.token || url.startsWith("data:")) return url;
    return `${url}${url.includes("?") ? "&" : "?"}token=${enc(this.token)}`;
  }

  watchJob(id: string, onJob: (job: Job) => void): JobWatch {
    let closed = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let source: EventSource | undefined;
    const poll = async () => {
      if (closed) return;
      try {
        const job = await this.job(id);
        if (closed) return;
        onJob(job);
        if (JOB_ENDED.has(job.state)) return;
      } catch {
        // a dropped request: try again on the next tick
      }
      timer = setTimeout(poll, this.pollMs);
    };
    if (typeof EventSource === "undefined") {
      void poll();
    } else {
      source = new EventSource(this.url(`/jobs/${enc(id)}/events`, {}, true));
      source.onmessage = (event: MessageEvent<string>) => {
        const job = JSON.parse(event.data) as Job;
        onJob(job);
        if (JOB_ENDED.has(job.state)) source?.close();
      };
      source.onerror = () => {
        // SSE refused or dropped before the end: fall back to polling.
        source?.close();
        if (!closed) void poll();
      };
    }
    return {
      close() {
        closed = true;
        source?.close();
        if (timer) clearTimeout(timer);
      },
    };
  }
}

async function errorDetail(response: Response): Promise<string> {
  try {
    const body = (await response.json()) as { detail?: unknown };
    if (typeof body.detail === "string") return body.detail;
    if (body.detail !== undefined) return JSON.stringify(body.detail);
  } catch {
    // not JSON
  }
  return `${response.status} ${response.statusText}`.trim();
}

/** Reads an offline report's embedded data; everything a server computes on demand is absent. */
export class EmbeddedSource implements DataSource {
  readonly embedded = true;

  constructor(private readonly data: EmbeddedData) {}

  private get<T>(value: T | undefined, what: string): Promise<T> {
    if (value === undefined) return Promise.reject(new ApiError(404, `${what} is not in this report`));
    return Promise.resolve(value);
  }

  bundles = () => Promise.resolve(this.data.bundles);
  bundle = (id: string) => this.get(this.data.details[id], `bundle '${id}'`);
  cube = (id: string, metric: string) => this.get(this.data.cubes[id]?.[metric], `metric '${metric}'`);
  attention = (id: string, layer: number, head: number) => {
    const entry = this.data.attention[id]?.[`${layer}:${head}`];
    return this.get(
      entry && decodeAttention(entry),
      `attention of layer ${layer} head ${head} (the report keeps a subset; \`model-forensics serve\` shows all)`,
    );
  };
  influence = (id: string, target: string | null, method: string) =>
    this.get(
      this.data.influence[id]?.[`${method}:${target ?? "default"}`],
      `${method} influence on token ${target} (the report keeps a subset; \`model-forensics serve\` computes any)`,
    );
  compare = () => Promise.reject(new NeedsServer("comparing bundles"));
  analysis = (id: string, name: string) => this.get(this.data.analyses[id]?.[name], `analysis '${name}'`);
  inspections = () => Promise.resolve(this.data.inspections);
  inspection = (id: string) => this.get(this.data.inspection[id], `inspection '${id}'`);
  startJob = () => Promise.reject(new NeedsServer("running an analysis"));
  job = () => Promise.reject(new NeedsServer("analysis jobs"));
  cancelJob = () => Promise.reject(new NeedsServer("analysis jobs"));
  replay = () => Promise.reject(new NeedsServer("the replay playground"));
  watchJob(): JobWatch {
    return { close() {} };
  }
  fileUrl = (url: string) => url;
}

declare global {
  interface Window {
    __MF_DATA__?: EmbeddedData;
  }
}

/** The source for this page: embedded report data when present, else the server. */
export function defaultSource(): DataSource {
  if (window.__MF_DATA__) return new EmbeddedSource(window.__MF_DATA__);
  const params = new URLSearchParams(window.location.search);
  const given = params.get("token");
  if (given) sessionStorage.setItem("mf-token", given);
  return new HttpSource("", given ?? sessionStorage.getItem("mf-token"));
}

/** A message for a failed request, in one line. */
export function messageOf(error: unknown): string {
  if (error instanceof Error) return error.message;
  return String(error);
}
