/** View 3: root-cause analysis of a bundle. The analyses found next to it (ranked CF anomalies,
 * attribution ranking, the fix set with each member's necessity and sufficiency, flip rate, side
 * effects, notes) and a "Run analysis" button that starts `analyze` as a background job. */
import { useEffect, useRef, useState } from "react";
import type { Job, JobWatch } from "../api";
import { JOB_ENDED, messageOf } from "../api";
import { pct, readAnalysis } from "../analysis";
import type { AnalysisView, FixSetView } from "../analysis";
import { Message } from "../components/Message";
import { useData } from "../components/useData";
import { useSource } from "../source";
import { fmt4 } from "../transforms";
import { BundleHeader } from "./BundlePage";

export function RcaView({ id }: { id: string }) {
  const source = useSource();
  const [reload, setReload] = useState(0);
  const detail = useData(() => source.bundle(id), [source, id, reload], { keepWhileReloading: true });
  const [chosen, setChosen] = useState<string | null>(null);
  const analyses = detail.state === "ok" ? detail.value.analyses : [];
  const name = chosen !== null && analyses.includes(chosen) ? chosen : (analyses[0] ?? null);
  const analysis = useData(() => (name ? source.analysis(id, name) : null), [source, id, name]);
  const onDone = (result: string | null) => {
    if (result) setChosen(result);
    setReload((n) => n + 1);
  };
  if (detail.state === "loading" || detail.state === "idle") return <Message>Loading bundle {id}…</Message>;
  if (detail.state === "error") return <Message kind="error">Could not open bundle {id}: {detail.error}</Message>;
  return (
    <section>
      <BundleHeader detail={detail.value} />
      <JobPanel id={id} onDone={onDone} />
      {analyses.length === 0 && (
        <Message>No analysis of this bundle yet: run one above, or `model-forensics analyze {id} --out …`.</Message>
      )}
      {analyses.length > 1 && (
        <label>
          analysis{" "}
          <select data-testid="analysis-select" value={name ?? ""} onChange={(e) => setChosen(e.target.value)}>
            {analyses.map((a) => (
              <option key={a}>{a}</option>
            ))}
          </select>
        </label>
      )}
      {analysis.state === "loading" && <Message>Loading analysis {name}…</Message>}
      {analysis.state === "error" && <Message kind="error">{analysis.error}</Message>}
      {analysis.state === "ok" && <AnalysisPanels view={readAnalysis(analysis.value)} />}
    </section>
  );
}

function JobPanel({ id, onDone }: { id: string; onDone: (result: string | null) => void }) {
  const source = useSource();
  const [job, setJob] = useState<Job | null>(null);
  const [error, setError] = useState<string | null>(null);
  const watch = useRef<JobWatch | null>(null);
  const reported = useRef<string | null>(null);
  useEffect(() => () => watch.current?.close(), []);
  useEffect(() => {
    if (job && job.state === "done" && reported.current !== job.id) {
      reported.current = job.id;
      onDone(job.result ?? null);
    }
  }, [job, onDone]);
  if (source.embedded)
    return <Message>Running an analysis needs `model-forensics serve` (this is an offline report).</Message>;
  const running = job !== null && !JOB_ENDED.has(job.state);
  const start = async () => {
    setError(null);
    watch.current?.close();
    try {
      const started = await source.startJob(id);
      setJob(started);
      watch.current = source.watchJob(started.id, setJob);
    } catch (e) {
      setError(messageOf(e));
    }
  };
  const cancel = async () => {
    if (!job) return;
    try {
      setJob(await source.cancelJob(job.id));
    } catch (e) {
      setError(messageOf(e));
    }
  };
  return (
    <div className="panel job">
      <button data-testid="run-analysis" onClick={start} disabled={running}>
        Run analysis
      </button>{" "}
      {running && (
        <button data-testid="cancel-analysis" onClick={cancel}>
          Cancel
        </button>
      )}
      {job && <JobProgress job={job} />}
      {job?.state === "failed" && (
        <p className="message error" data-testid="job-error" role="alert">
          Analysis failed: {job.error ?? "no reason given"}
        </p>
      )}
      {error && (
        <p className="message error" data-testid="job-error" role="alert">
          {error}
        </p>
      )}
    </div>
  );
}

function JobProgress({ job }: { job: Job }) {
  const { phase, done, total, line } = job.progress;
  const fraction = total ? Math.min(1, done / total) : null;
  return (
    <div className="job-progress" data-testid="job-progress" data-state={job.state}>
      <span className={`state ${job.state}`}>{job.state}</span>{" "}
      {line || `${phase ?? ""}${total ? ` ${done}/${total}` : ""}`}
      <progress max={1} value={job.state === "done" ? 1 : (fraction ?? undefined)} />
    </div>
  );
}

export function AnalysisPanels({ view }: { view: AnalysisView }) {
  return (
    <>
      <p className="muted">
        {view.forwardPasses !== null ? `${view.forwardPasses} forward passes` : ""}
        {view.seconds !== null ? ` · ${view.seconds.toFixed(1)} s` : ""}
      </p>
      <FixSetPanel fix={view.fixSet} />
      <div className="panel">
        <h2>Compression Forensics anomalies (ranked)</h2>
        {view.anomalies.length === 0 ? (
          <Message>No CF anomalies in this analysis.</Message>
        ) : (
          <table data-testid="anomalies">
            <thead>
              <tr>
                <th>#</th>
                <th>site</th>
                <th>score (max |robust z|)</th>
                <th>flagged</th>
              </tr>
            </thead>
            <tbody>
              {view.anomalies.slice(0, 30).map((a, i) => (
                <tr key={a.site} className={a.flagged ? "flagged" : ""}>
                  <td className="num">{i + 1}</td>
                  <td>{a.site}</td>
                  <td className="num">
                    <Bar value={a.score} max={view.anomalies[0]?.score ?? 1} />
                    {fmt4(a.score)}
                  </td>
                  <td>{a.flagged ? "yes" : ""}</td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
        {view.threshold !== null && <p className="muted small">Threshold {view.threshold} robust z.</p>}
      </div>
      <div className="panel">
        <h2>Attribution ranking</h2>
        {view.ranking.length === 0 ? (
          <Message>No attribution ranking in this analysis.</Message>
        ) : (
          <table data-testid="ranking">
            <thead>
              <tr>
                <th>#</th>
                <th>unit</th>
                <th>level</th>
                <th>score</th>
              </tr>
            </thead>
            <tbody>
              {view.ranking.slice(0, 30).map((u, i) => (
                <tr key={`${u.unit}:${i}`}>
                  <td className="num">{i + 1}</td>
                  <td>{u.unit}</td>
                  <td>{u.level}</td>
                  <td className="num">{fmt4(u.score)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
      </div>
      {view.notes.length > 0 && (
        <div className="panel">
          <h2>Notes</h2>
          {view.notes.map((n, i) => (
            <div key={i} className="note">
              {n}
            </div>
          ))}
        </div>
      )}
    </>
  );
}

function Bar({ value, max }: { value: number; max: number }) {
  const w = max > 0 && Number.isFinite(value) ? Math.max(0, Math.min(1, value / max)) : 0;
  return <span className="bar" style={{ width: `${(w * 6).toFixed(2)}em` }} />;
}

function FixSetPanel({ fix }: { fix: FixSetView | null }) {
  if (!fix) return <Message>This analysis found no fix set.</Message>;
  const se = fix.sideEffects;
  return (
    <div className="panel" data-testid="fixset">
      <h2>Minimal fix set</h2>
      <p>
        {fix.members.length} intervention{fix.members.length === 1 ? "" : "s"} flip{" "}
        <strong className={fix.reachedThreshold === false ? "bad" : "ok"} data-testid="flip-rate">
          {pct(fix.flipRate)}
        </strong>
        {fix.variants !== null ? ` of ${fix.variants} failing variants` : ""}
        {fix.strategy ? ` (search: ${fix.strategy})` : ""}.
      </p>
      <table>
        <thead>
          <tr>
            <th>unit</th>
            <th>intervention</th>
            <th>level</th>
            <th>necessity</th>
            <th>sufficiency</th>
            <th>attribution</th>
            <th>solo benign KL</th>
          </tr>
        </thead>
        <tbody>
          {fix.members.map((m, i) => (
            <tr key={`${m.unit}:${i}`} data-testid="fixset-member" data-unit={m.unit}>
              <td>{m.unit}</td>
              <td>
                <code>{m.intervention}</code>
              </td>
              <td>{m.level}</td>
              <td className="num">{pct(m.necessity)}</td>
              <td className="num">{pct(m.sufficiency)}</td>
              <td className="num">{m.attribution === null ? "–" : fmt4(m.attribution)}</td>
              <td className="num">{m.benignKl === null ? "–" : fmt4(m.benignKl)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      <p className="muted small">
        Necessity: flip rate lost when the member alone is removed. Sufficiency: flip rate of the member alone.
      </p>
      {se ? (
        <p data-testid="side-effects">
          Side effects on {se.nBenign ?? "?"} benign prompts: mean KL{" "}
          <span className={se.withinBound === false ? "bad" : "ok"}>{se.meanKl === null ? "–" : fmt4(se.meanKl)}</span>{" "}
          nats (max {se.maxKl === null ? "–" : fmt4(se.maxKl)}, bound {se.bound ?? "–"}); accuracy{" "}
          {pct(se.accuracyClean)} → {pct(se.accuracyFixed)}; predicate changed on {pct(se.predicateChanged)}.
        </p>
      ) : (
        <Message>No side-effect measurement in this analysis.</Message>
      )}
    </div>
  );
}
