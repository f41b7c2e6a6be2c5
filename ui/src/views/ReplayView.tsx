/** View 5: the replay playground. Pick a site (and head), an intervention kind and value, run it on
 * the replayed bundle, and see the new output next to the recorded one. */
import { useMemo, useState } from "react";
import type { ReplayRequest, ReplayResult } from "../api";
import { messageOf } from "../api";
import { Message } from "../components/Message";
import { useData } from "../components/useData";
import { useSource } from "../source";
import { kvGroup } from "../transforms";
import { BundleHeader } from "./BundlePage";

export const INTERVENTION_KINDS: ReplayRequest["kind"][] = ["zero", "mean", "scale", "noise", "clamp", "resample", "patch"];
const NEEDS_VALUE = new Set<string>(["scale", "noise", "clamp"]);
const VALUE_MEANS: Record<string, string> = { scale: "factor", noise: "std multiple", clamp: "cap" };

export function ReplayView({ id }: { id: string }) {
  const source = useSource();
  const detail = useData(() => source.bundle(id), [source, id]);
  if (detail.state === "loading" || detail.state === "idle") return <Message>Loading bundle {id}…</Message>;
  if (detail.state === "error") return <Message kind="error">Could not open bundle {id}: {detail.error}</Message>;
  return (
    <section>
      <BundleHeader detail={detail.value} />
      {source.embedded ? (
        <Message>The replay playground needs `model-forensics serve` (this is an offline report).</Message>
      ) : (
        <Playground id={id} sites={detail.value.sites.map((s) => s.name)} heads={detail.value.heads ?? null} kvHeads={detail.value.kv_heads ?? null} />
      )}
    </section>
  );
}

/** Sites an intervention can target: recorded ones, `blocks.L.attn` first for head selection. */
function interventionSites(sites: string[]): string[] {
  const unique = [...new Set(sites.filter((s) => !/\.(pattern|q|k|v)$/.test(s)))];
  return unique.length ? unique : sites;
}

function Playground(props: { id: string; sites: string[]; heads: number | null; kvHeads: number | null }) {
  const source = useSource();
  const sites = useMemo(() => interventionSites(props.sites), [props.sites]);
  const [site, setSite] = useState(sites[0] ?? "");
  const [head, setHead] = useState<string>("");
  const [kind, setKind] = useState<ReplayRequest["kind"]>("zero");
  const [value, setValue] = useState("0.5");
  const [result, setResult] = useState<ReplayResult | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [running, setRunning] = useState(false);
  const headsApply = /\.attn(\.z)?$/.test(site) && (props.heads ?? 0) > 0;
  if (!sites.length) return <Message>This bundle records no sites to intervene on.</Message>;
  const run = async () => {
    setRunning(true);
    setError(null);
    try {
      const parsed = Number(value);
      setResult(
        await source.replay(props.id, {
          site,
          head: headsApply && head !== "" ? Number(head) : null,
          kind,
          value: NEEDS_VALUE.has(kind) && Number.isFinite(parsed) ? parsed : null,
        }),
      );
    } catch (e) {
      setResult(null);
      setError(messageOf(e));
    } finally {
      setRunning(false);
    }
  };
  return (
    <div className="panel">
      <h2>Replay with an intervention</h2>
      <div className="controls">
        <label>
          site{" "}
          <select data-testid="replay-site" value={site} onChange={(e) => setSite(e.target.value)}>
            {sites.map((s) => (
              <option key={s}>{s}</option>
            ))}
          </select>
        </label>{" "}
        <label>
          head{" "}
          <select data-testid="replay-head" value={head} disabled={!headsApply} onChange={(e) => setHead(e.target.value)}>
            <option value="">all</option>
            {Array.from({ length: props.heads ?? 0 }, (_, h) => {
              const g = kvGroup(h, props.heads, props.kvHeads);
              return (
                <option key={h} value={h}>
                  {h}
                  {g === null ? "" : ` (KV group ${g})`}
                </option>
              );
            })}
          </select>
        </label>{" "}
        <label>
          kind{" "}
          <select data-testid="replay-kind" value={kind} onChange={(e) => setKind(e.target.value as ReplayRequest["kind"])}>
            {INTERVENTION_KINDS.map((k) => (
              <option key={k}>{k}</option>
            ))}
          </select>
        </label>{" "}
        {NEEDS_VALUE.has(kind) && (
          <label>
            {VALUE_MEANS[kind] ?? "value"}{" "}
            <input data-testid="replay-value" type="number" step="any" value={value} onChange={(e) => setValue(e.target.value)} />
          </label>
        )}{" "}
        <button data-testid="replay-run" onClick={run} disabled={running}>
          {running ? "Running…" : "Run"}
        </button>
      </div>
      {error && <Message kind="error">{error}</Message>}
      {result && (
        <div className="replay-output" data-testid="replay-output" data-changed={result.changed}>
          <div>
            <h3>recorded output</h3>
            <pre data-testid="replay-recorded">{result.recorded_output ?? "(no recorded text)"}</pre>
          </div>
          <div>
            <h3>
              new output{" "}
              <span className={result.changed ? "bad" : "muted"}>{result.changed ? "(changed)" : "(unchanged)"}</span>
            </h3>
            <pre data-testid="replay-new">{result.new_output ?? "(no text)"}</pre>
          </div>
          <p className="muted">
            predicate{" "}
            {result.predicate_result === null
              ? "not evaluated"
              : result.predicate_result
                ? "holds (the failure remains)"
                : "no longer holds"}
            {result.flipped ? " — flipped: this intervention fixes the incident" : ""} · {result.forward_passes} forward
            pass{result.forward_passes === 1 ? "" : "es"}
          </p>
        </div>
      )}
    </div>
  );
}
