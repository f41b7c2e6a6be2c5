/** View 4: the plots and summary of one `inspect --out` directory (ModelInspector experiments). */
import { Message } from "../components/Message";
import { useData } from "../components/useData";
import { useSource } from "../source";

export function InspectorView({ id }: { id: string }) {
  const source = useSource();
  const inspection = useData(() => source.inspection(id), [source, id]);
  return (
    <section>
      <h1>Inspection {id}</h1>
      {inspection.state === "loading" && <Message>Loading inspection…</Message>}
      {inspection.state === "error" && <Message kind="error">Could not open inspection {id}: {inspection.error}</Message>}
      {inspection.state === "ok" && (
        <>
          {inspection.value.plots.length === 0 ? (
            <Message>This inspection has no plots (run `model-forensics inspect … --out DIR` with plots on).</Message>
          ) : (
            <div className="plots" data-testid="inspector-plots">
              {inspection.value.plots.map((p) => (
                <figure key={p.name}>
                  <img src={source.fileUrl(p.url)} alt={p.name} loading="lazy" />
                  <figcaption>{p.name}</figcaption>
                </figure>
              ))}
            </div>
          )}
          {inspection.value.summary_markdown && (
            <div className="panel">
              <h2>Summary</h2>
              <pre className="markdown">{inspection.value.summary_markdown}</pre>
            </div>
          )}
          <Summary summary={inspection.value.summary} />
        </>
      )}
    </section>
  );
}

function Summary({ summary }: { summary: Record<string, unknown> }) {
  const entries = Object.entries(summary ?? {});
  if (!entries.length) return null;
  return (
    <div className="panel">
      <h2>Results</h2>
      <dl className="facts">
        {entries.map(([k, v]) => (
          <div key={k}>
            <dt>{k}</dt>
            <dd>
              <code className="json">{typeof v === "string" ? v : JSON.stringify(v, null, 1)}</code>
            </dd>
          </div>
        ))}
      </dl>
    </div>
  );
}
