/**
 * An analysis JSON (`analyze --out`, rca.pipeline.Analysis.to_json()) read defensively into the
 * parts the RCA view shows, in the order the pipeline ranked them. Every part is optional: an analysis without a fix set, or an older
 * file without side effects, still renders what it has.
 */
import type { AnalysisJson } from "./api";

export interface AnomalyRow {
  site: string;
  score: number;
  flagged: boolean;
}

export interface RankRow {
  unit: string;
  level: string;
  score: number;
}

export interface FixMember {
  unit: string;
  level: string;
  intervention: string;
  necessity: number | null;
  sufficiency: number | null;
  attribution: number | null;
  benignKl: number | null;
}

export interface SideEffects {
  nBenign: number | null;
  meanKl: number | null;
  maxKl: number | null;
  bound: number | null;
  withinBound: boolean | null;
  accuracyClean: number | null;
  accuracyFixed: number | null;
  predicateChanged: number | null;
}

export interface FixSetView {
  members: FixMember[];
  flipRate: number | null;
  variants: number | null;
  reachedThreshold: boolean | null;
  strategy: string | null;
  sideEffects: SideEffects | null;
}

export interface AnalysisView {
  bundle: string | null;
  forwardPasses: number | null;
  seconds: number | null;
  threshold: number | null;
  anomalies: AnomalyRow[];
  ranking: RankRow[];
  fixSet: FixSetView | null;
  notes: string[];
}

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);
const num = (v: unknown): number | null => (typeof v === "number" && Number.isFinite(v) ? v : null);
const str = (v: unknown): string | null => (typeof v === "string" ? v : null);
const bool = (v: unknown): boolean | null => (typeof v === "boolean" ? v : null);
const arr = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);

/** "site:kind" plus what narrows it (heads, neurons, positions, direction, gate). */
export function describeIntervention(iv: unknown): string {
  if (!isObj(iv)) return "?";
  let text = `${str(iv.site) ?? "?"}:${str(iv.kind) ?? "?"}`;
  for (const key of ["heads", "neurons", "positions"]) {
    const v = iv[key];
    if (Array.isArray(v) && v.length) text += ` ${key}=${v.join(",")}`;
  }
  if (iv.direction) text += " along its failure direction";
  if (isObj(iv.gate)) text += `, gated at ${str(iv.gate.site) ?? "?"}`;
  return text;
}

function readSideEffects(se: unknown): SideEffects | null {
  if (!isObj(se)) return null;
  return {
    nBenign: num(se.n_benign),
    meanKl: num(se.mean_kl),
    maxKl: num(se.max_kl),
    bound: num(se.bound),
    withinBound: bool(se.within_bound),
    accuracyClean: num(se.accuracy_clean),
    accuracyFixed: num(se.accuracy_fixed),
    predicateChanged: num(se.predicate_changed),
  };
}

function readFixSet(fix: unknown): FixSetView | null {
  if (!isObj(fix)) return null;
  const members = arr(fix.members)
    .filter(isObj)
    .map((m) => ({
      unit: str(m.unit) ?? describeIntervention(m.intervention),
      level: str(m.level) ?? "",
      intervention: describeIntervention(m.intervention),
      necessity: num(m.necessity),
      sufficiency: num(m.sufficiency),
      attribution: num(m.attribution),
      benignKl: num(m.benign_kl),
    }));
  return {
    members,
    flipRate: num(fix.total_flip_rate),
    variants: Array.isArray(fix.flips) ? fix.flips.length : null,
    reachedThreshold: bool(fix.reached_threshold),
    strategy: str(fix.strategy),
    sideEffects: readSideEffects(fix.side_effects),
  };
}

export function readAnalysis(json: AnalysisJson): AnalysisView {
  const anomalies = isObj(json.anomalies) ? json.anomalies : {};
  const ranking = isObj(json.ranking) ? json.ranking : {};
  const fix = readFixSet(json.fix_set);
  const notes = [...arr(anomalies.notes), ...(isObj(json.fix_set) ? arr(json.fix_set.notes) : [])]
    .map((n) => (typeof n === "string" ? n : isObj(n) ? (str(n.text) ?? str(n.message) ?? JSON.stringify(n)) : ""))
    .filter(Boolean);
  return {
    bundle: str(json.bundle),
    forwardPasses: num(json.forward_passes),
    seconds: num(json.seconds),
    threshold: num(anomalies.threshold),
    anomalies: arr(anomalies.anomalies)
      .filter(isObj)
      .map((a) => ({ site: str(a.site) ?? "?", score: num(a.score) ?? NaN, flagged: a.flagged === true })),
    ranking: arr(ranking.units)
      .filter(isObj)
      .map((u) => ({ unit: str(u.unit) ?? "?", level: str(u.level) ?? "", score: num(u.score) ?? NaN })),
    fixSet: fix,
    notes,
  };
}

export function pct(v: number | null): string {
  return v === null ? "–" : `${Math.round(v * 100)}%`;
}
