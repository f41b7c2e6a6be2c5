/** The dashboard shell: a header, and the view the route names. */
import type { DataSource } from "./api";
import { Link } from "./components/Link";
import { Message } from "./components/Message";
import { useRoute } from "./router";
import { SourceContext } from "./source";
import { BundleList } from "./views/BundleList";
import { BundlePage } from "./views/BundlePage";
import { InspectorView } from "./views/InspectorView";
import { RcaView } from "./views/RcaView";
import { ReplayView } from "./views/ReplayView";

export function App({ source }: { source: DataSource }) {
  const route = useRoute();
  return (
    <SourceContext.Provider value={source}>
      <header className="top">
        <Link to={{ view: "list" }}>
          <strong>model-forensics</strong>
        </Link>
        {source.embedded && <span className="badge">offline report</span>}
      </header>
      {source.embedded && window.__MF_DATA__?.notes?.length ? (
        <div className="report-notes" data-testid="report-notes">
          {window.__MF_DATA__.notes.map((n, i) => (
            <p key={i}>{n}</p>
          ))}
        </div>
      ) : null}
      <main>
        {route.view === "list" && <BundleList />}
        {route.view === "bundle" && <BundlePage key={route.id} id={route.id} />}
        {route.view === "rca" && <RcaView key={route.id} id={route.id} />}
        {route.view === "replay" && <ReplayView key={route.id} id={route.id} />}
        {route.view === "inspect" && <InspectorView key={route.id} id={route.id} />}
        {route.view === "missing" && (
          <Message kind="error">
            No page at {route.path}. <Link to={{ view: "list" }}>Back to the bundle list</Link>.
          </Message>
        )}
      </main>
    </SourceContext.Provider>
  );
}
