/** View 2: one bundle. Token × layer heatmap of a cube metric, attention per layer and head,
 * token influence on a chosen target, and a layer comparison with a second bundle. */
import { useCallback, useEffect, useMemo, useState } from "react";
import type { BundleDetail, CubeSlice } from "../api";
import { INFLUENCE_METHODS } from "../api";
import { AttentionArcs } from "../components/AttentionArcs";
import { AttentionMatrix } from "../components/AttentionMatrix";
import { Heatmap, cellDescription } from "../components/Heatmap";
import { Link } from "../components/Link";
import { Message } from "../components/Message";
import { useData } from "../components/useData";
import { useSource } from "../source";
import { fmt4, fmtBytes, fmtDate, kvGroup, shadeColor, shading, showToken } from "../transforms";
import type { ScaleMode } from "../transforms";

export function BundlePage({ id }: { id: string }) {
  const source = useSource();
  const detail = useData(() => source.bundle(id), [source, id]);
  if (detail.state === "loading" || detail.state === "idle") return <Message>Loading bundle {id}…</Message>;
  if (detail.state === "error") return <Message kind="error">Could not open bundle {id}: {detail.error}</Message>;
  return <BundleSections detail={detail.value} />;
}

/** The heatmap first; the heavier sections (16k attention cells, influence on the replayed
 * model) start once it has been painted, so they never delay the first meaningful render. */
function BundleSections({ detail: d }: { detail: BundleDetail }) {
  const [rest, setRest] = useState(false);
  const shown = useCallback(() => {
    requestAnimationFrame(() => setTimeout(() => setRest(true), 0));
  }, []);
  return (
    <section>
      <BundleHeader detail={d} />
      <CubeSection detail={d} onShown={shown} />
      {rest ? (
        <>
          <AttentionSection detail={d} />
          <InfluenceSection detail={d} />
          <CompareSection detail={d} />
        </>
      ) : (
        <Message>Loading attention, influence and comparison…</Message>
      )}
    </section>
  );
}

export function BundleHeader({ detail: d }: { detail: BundleDetail }) {
  const s = d.summary;
  return (
    <header className="bundle-header">
      <h1>{s.id}</h1>
      <nav className="tabs">
        <Link to={{ view: "bundle", id: s.id }}>activity</Link>
        <Link to={{ view: "rca", id: s.id }}>root-cause analysis</Link>
        <Link to={{ view: "replay", id: s.id }}>replay playground</Link>
      </nav>
      <dl className="facts">
        <dt>model</dt>
        <dd>{s.model ?? "–"}</dd>
        <dt>recorded</dt>
        <dd>{fmtDate(s.created)}</dd>
        <dt>predicate</dt>
        <dd>
          {s.predicate ?? "–"}
          {s.predicate_result === null ? "" : s.predicate_result ? " (fails)" : " (passes)"}
        </dd>
        <dt>size</dt>
        <dd>{fmtBytes(s.size_bytes)}</dd>
        <dt>shape</dt>
        <dd>
          {d.tokens.length} tokens · {d.layers} layers
          {d.heads ? ` · ${d.heads} heads` : ""}
          {d.kv_heads && d.heads && d.kv_heads < d.heads ? ` (${d.kv_heads} KV groups)` : ""}
        </dd>
        {s.output && (
          <>
            <dt>output</dt>
            <dd className="output">{s.output}</dd>
          </>
        )}
      </dl>
    </header>
  );
}

/** The site a heatmap row reads: the block output for canonical models, else the module. */
function siteName(slice: CubeSlice, row: number): string {
  return slice.site_kind === "resid" ? `blocks.${slice.layers[row]}.resid_post` : (slice.layer_names[row] ?? "?");
}

function CubeSection({ detail: d, onShown }: { detail: BundleDetail; onShown: () => void }) {
  const source = useSource();
  const id = d.summary.id;
  const [metric, setMetric] = useState(d.metrics.includes("energy") ? "energy" : (d.metrics[0] ?? ""));
  const cube = useData(() => (metric ? source.cube(id, metric) : null), [source, id, metric]);
  const [mode, setMode] = useState<ScaleMode>("robust");
  const settled = cube.state === "ok" || cube.state === "error" || cube.state === "idle";
  useEffect(() => {
    if (settled) onShown();
  }, [settled, onShown]);
  return (
    <div className="panel">
      <h2>Activity: token × layer</h2>
      {d.metrics.length === 0 ? (
        <Message>This bundle has no activity cube (record it with the cube enabled).</Message>
      ) : (
        <>
          <label>
            metric{" "}
            <select data-testid="metric-select" value={metric} onChange={(e) => setMetric(e.target.value)}>
              {d.metrics.map((m) => (
                <option key={m} value={m}>
                  {m}
                </option>
              ))}
            </select>
          </label>{" "}
          <label>
            colour scale{" "}
            <select data-testid="scale-select" value={mode} onChange={(e) => setMode(e.target.value as ScaleMode)}>
              <option value="robust">robust (1st–99th percentile)</option>
              <option value="linear">linear (full range)</option>
              <option value="log">log</option>
            </select>
          </label>
          {cube.state === "loading" && <Message>Loading {metric}…</Message>}
          {cube.state === "error" && <Message kind="error">{cube.error}</Message>}
          {cube.state === "ok" && (
            <>
              {cube.value.downsampled && <Message>{cube.value.note || "Downsampled for display."}</Message>}
              <Heatmap
                values={cube.value.values}
                rowLabels={cube.value.layers}
                colLabels={cube.value.tokens}
                colPositions={cube.value.positions}
                mode={mode}
                units={`${cube.value.metric} at ${cube.value.site_kind}`}
                describe={(r, c, v) => {
                  const slice = cube.value;
                  return cellDescription(v, slice.tokens[c], slice.positions[c] ?? c, slice.layers[r], siteName(slice, r));
                }}
              />
            </>
          )}
        </>
      )}
    </div>
  );
}

function AttentionSection({ detail: d }: { detail: BundleDetail }) {
  const source = useSource();
  const id = d.summary.id;
  const [head, setHead] = useState(0);
  const [query, setQuery] = useState<number | null>(null);
  const heads = d.heads ?? 0;
  const layerChoices: number[] = d.attention_layers?.length ? d.attention_layers : Array.from({ length: d.layers }, (_, l) => l);
  const [layer, setLayer] = useState(layerChoices[0] ?? 0);
  const attention = useData(
    () => (d.has_attention && heads > 0 ? source.attention(id, layer, head) : null),
    [source, id, layer, head, d.has_attention, heads],
  );
  useEffect(() => setQuery(null), [layer, head]);
  if (!d.has_attention || heads === 0)
    return (
      <div className="panel">
        <h2>Attention</h2>
        <Message>
          No attention patterns in this bundle: record it with head granularity (attention patterns or q/k) to see
          them.
        </Message>
      </div>
    );
  return (
    <div className="panel">
      <h2>Attention</h2>
      <label>
        layer{" "}
        <select data-testid="layer-select" value={layer} onChange={(e) => setLayer(Number(e.target.value))}>
          {layerChoices.map((l) => (
            <option key={l} value={l}>
              {l}
            </option>
          ))}
        </select>
      </label>{" "}
      <label>
        head{" "}
        <select data-testid="head-select" value={head} onChange={(e) => setHead(Number(e.target.value))}>
          {Array.from({ length: heads }, (_, h) => {
            const g = kvGroup(h, d.heads ?? null, d.kv_heads ?? null);
            return (
              <option key={h} value={h}>
                {h}
                {g === null ? "" : ` (KV group ${g})`}
              </option>
            );
          })}
        </select>
      </label>
      {attention.state === "loading" && <Message>Loading layer {layer} head {head}…</Message>}
      {attention.state === "error" && <Message kind="error">{attention.error}</Message>}
      {attention.state === "ok" && (
        <>
          <p className="muted small">
            Layer {attention.value.layer}, head {attention.value.head}
            {kvGroup(attention.value.head, attention.value.heads, attention.value.kv_heads ?? null) !== null
              ? `, KV group ${attention.value.kv_group} (grouped-query attention: the heads of a group share keys and values)`
              : ""}
            {attention.value.source === "recomputed" ? " · recomputed from the recorded q and k" : ""}
            {attention.value.downsampled ? ` · ${attention.value.note || "downsampled for display"}` : ""}
          </p>
          <div className="attention">
            <AttentionMatrix
              matrix={attention.value.matrix}
              tokens={attention.value.tokens}
              selected={query}
              onSelect={setQuery}
            />
            <AttentionArcs
              matrix={attention.value.matrix}
              tokens={attention.value.tokens}
              selected={query}
              onSelect={setQuery}
            />
          </div>
        </>
      )}
    </div>
  );
}

function InfluenceSection({ detail: d }: { detail: BundleDetail }) {
  const source = useSource();
  const id = d.summary.id;
  const [typed, setTyped] = useState("");
  const [target, setTarget] = useState<string | null>(null);
  const [method, setMethod] = useState<string>("grad_x_input");
  const influence = useData(
    () => (d.tokens.length ? source.influence(id, target, method) : null),
    [source, id, target, method],
  );
  const strengths = useMemo(() => (influence.state === "ok" ? shading(influence.value.scores) : []), [influence]);
  const choose = () => setTarget(typed.trim() === "" ? null : typed);
  return (
    <div className="panel">
      <h2>Token influence</h2>
      <label>
        method{" "}
        <select data-testid="influence-method" value={method} onChange={(e) => setMethod(e.target.value)}>
          {INFLUENCE_METHODS.map((m) => (
            <option key={m} value={m}>
              {m}
            </option>
          ))}
        </select>
      </label>{" "}
      <label>
        target output (token id or text){" "}
        <input
          data-testid="influence-target"
          className="narrow"
          placeholder="top prediction"
          value={typed}
          onChange={(e) => setTyped(e.target.value)}
          onKeyDown={(e) => e.key === "Enter" && choose()}
        />
      </label>{" "}
      <button data-testid="influence-apply" onClick={choose}>
        explain
      </button>
      {influence.state === "loading" && <Message>Computing {method} influence…</Message>}
      {influence.state === "error" && <Message kind="error">{influence.error}</Message>}
      {influence.state === "ok" && (
        <>
          <p className="muted small">
            Influence of each source token on the output <q>{influence.value.target_label}</q> (token id{" "}
            {influence.value.target}) at position {influence.value.position}, by {influence.value.method} (
            {influence.value.evidence} evidence{influence.value.causal ? "; causal model: only earlier tokens count" : ""}
            ). Red raises it, blue lowers it, scaled to the largest |score|.
          </p>
          <div className="influence" data-testid="influence-tokens">
            {influence.value.tokens.map((t, i) => (
              <span
                key={i}
                className={`token${i === influence.value.position ? " target" : ""}`}
                data-index={i}
                data-score={influence.value.scores[i]}
                style={{ background: shadeColor(strengths[i] ?? 0) }}
                title={`#${i} ${showToken(t)}: ${fmt4(influence.value.scores[i] ?? 0)}`}
              >
                {showToken(t)}
              </span>
            ))}
          </div>
          {(influence.value.notes ?? []).map((n, i) => (
            <p key={i} className="muted small">
              {n}
            </p>
          ))}
        </>
      )}
    </div>
  );
}

function CompareSection({ detail: d }: { detail: BundleDetail }) {
  const source = useSource();
  const id = d.summary.id;
  const bundles = useData(() => source.bundles(), [source]);
  const others = bundles.state === "ok" ? bundles.value.filter((b) => b.id !== id && !b.error) : [];
  const [other, setOther] = useState("");
  const [metric, setMetric] = useState(d.metrics.includes("energy") ? "energy" : (d.metrics[0] ?? ""));
  const compare = useData(
    () => (other && metric ? source.compare(id, other, metric) : null),
    [source, id, other, metric],
  );
  if (source.embedded)
    return (
      <div className="panel">
        <h2>Layer comparison</h2>
        <Message>Comparing two bundles needs `model-forensics serve` (this is an offline report).</Message>
      </div>
    );
  return (
    <div className="panel">
      <h2>Layer comparison</h2>
      {others.length === 0 ? (
        <Message>No other bundle to compare with in this directory.</Message>
      ) : (
        <>
          <label>
            compare with{" "}
            <select data-testid="compare-select" value={other} onChange={(e) => setOther(e.target.value)}>
              <option value="">choose a bundle…</option>
              {others.map((b) => (
                <option key={b.id} value={b.id}>
                  {b.id} ({b.model ?? "?"})
                </option>
              ))}
            </select>
          </label>{" "}
          <label>
            metric{" "}
            <select data-testid="compare-metric" value={metric} onChange={(e) => setMetric(e.target.value)}>
              {d.metrics.map((m) => (
                <option key={m} value={m}>
                  {m}
                </option>
              ))}
            </select>
          </label>
          {other && compare.state === "loading" && <Message>Comparing…</Message>}
          {other && compare.state === "error" && <Message kind="error">{compare.error}</Message>}
          {compare.state === "ok" && (
            <>
              <p className="muted small">
                Difference Δ = {metric}({other}) − {metric}(this bundle), layer by layer over the token positions
                both have ({compare.value.note}).
              </p>
              <Heatmap
                values={compare.value.diff}
                rowLabels={compare.value.layers}
                colLabels={compare.value.tokens_a.slice(0, compare.value.diff[0]?.length ?? 0)}
                units={`Δ ${metric}`}
                diverging
                testId="compare-heatmap"
                cellTestId="compare-cell"
                tooltipTestId="compare-tooltip"
                describe={(r, c, v) => (
                  <>
                    <div className="tooltip-value">Δ {fmt4(v)}</div>
                    <div>
                      token <q>{compare.value.tokens_a[c]}</q> / <q>{compare.value.tokens_b[c]}</q> (#{c})
                    </div>
                    <div>layer {compare.value.layers[r]}</div>
                    <div className="muted">
                      this {fmt4(compare.value.a[r]?.[c] ?? NaN)} · other {fmt4(compare.value.b[r]?.[c] ?? NaN)}
                    </div>
                  </>
                )}
              />
            </>
          )}
        </>
      )}
    </div>
  );
}
