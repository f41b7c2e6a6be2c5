/** View 1: every bundle under the served directory, filterable and sortable; corrupt ones in red
 * with the reason. Inspections (`inspect --out` directories) are listed below. */
import { useMemo, useState } from "react";
import type { BundleSummary, InspectionSummary } from "../api";
import { Link } from "../components/Link";
import { Message } from "../components/Message";
import { useData } from "../components/useData";
import type { Loaded } from "../components/useData";
import { useSource } from "../source";
import { filterBundles, fmtBytes, fmtDate, nextSort, sortBundles } from "../transforms";
import type { Sort, SortKey } from "../transforms";

const COLUMNS: [SortKey, string][] = [
  ["id", "bundle"],
  ["model", "model"],
  ["created", "date"],
  ["predicate_result", "predicate"],
  ["size_bytes", "size"],
  ["verified", "verified"],
];

export function BundleList() {
  const source = useSource();
  const bundles = useData(() => source.bundles(), [source]);
  const inspections = useData(() => source.inspections(), [source]);
  const [filter, setFilter] = useState("");
  const [sort, setSort] = useState<Sort>({ key: "created", descending: true });
  const shown = useMemo(
    () => (bundles.state === "ok" ? sortBundles(filterBundles(bundles.value, filter), sort) : []),
    [bundles, filter, sort],
  );
  return (
    <section>
      <h1>Bundles</h1>
      <input
        data-testid="bundle-filter"
        className="filter"
        type="search"
        placeholder="filter by id, model, predicate, output…"
        value={filter}
        onChange={(e) => setFilter(e.target.value)}
      />
      {bundles.state === "loading" && <Message>Loading bundles…</Message>}
      {bundles.state === "error" && <Message kind="error">Could not list bundles: {bundles.error}</Message>}
      {bundles.state === "ok" && bundles.value.length === 0 && (
        <Message>No bundles here. Record one with `model-forensics record` or run `make demo`.</Message>
      )}
      {bundles.state === "ok" && bundles.value.length > 0 && (
        <table data-testid="bundle-list" className="bundles">
          <thead>
            <tr>
              {COLUMNS.map(([key, label]) => (
                <th key={key} aria-sort={sort.key === key ? (sort.descending ? "descending" : "ascending") : "none"}>
                  <button className="sort" data-testid={`sort-${key}`} onClick={() => setSort(nextSort(sort, key))}>
                    {label}
                    {sort.key === key ? (sort.descending ? " ▼" : " ▲") : ""}
                  </button>
                </th>
              ))}
              <th>output</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((b) => (b.error ? <ErrorRow key={b.id} bundle={b} /> : <Row key={b.id} bundle={b} />))}
          </tbody>
        </table>
      )}
      {bundles.state === "ok" && bundles.value.length > 0 && shown.length === 0 && (
        <Message>No bundle matches “{filter}”.</Message>
      )}
      <Inspections loaded={inspections} />
    </section>
  );
}

function Row({ bundle: b }: { bundle: BundleSummary }) {
  return (
    <tr data-testid="bundle-row" data-bundle-id={b.id}>
      <td>
        <Link to={{ view: "bundle", id: b.id }}>{b.id}</Link>
      </td>
      <td>{b.model ?? "–"}</td>
      <td>{fmtDate(b.created)}</td>
      <td>
        {b.predicate ?? "–"}
        {b.predicate_result === null ? "" : b.predicate_result ? <span className="bad"> fails</span> : <span className="ok"> passes</span>}
      </td>
      <td className="num">{fmtBytes(b.size_bytes)}</td>
      <td title={b.verified === null ? "not checked" : b.verified ? "checksums match" : "checksums differ"}>
        {b.verified === null ? "–" : b.verified ? <span className="ok">✓</span> : <span className="bad">✗</span>}
      </td>
      <td className="output">{b.output ?? ""}</td>
    </tr>
  );
}

function ErrorRow({ bundle: b }: { bundle: BundleSummary }) {
  return (
    <tr data-testid="error-row" data-bundle-id={b.id} className="error-row">
      <td>{b.id}</td>
      <td colSpan={6}>
        <span className="bad">corrupt:</span> {b.error}
      </td>
    </tr>
  );
}

function Inspections({ loaded }: { loaded: Loaded<InspectionSummary[]> }) {
  if (loaded.state !== "ok" || loaded.value.length === 0) return null;
  return (
    <>
      <h2>Inspections</h2>
      <ul data-testid="inspection-list">
        {loaded.value.map((i) => (
          <li key={i.id}>
            <Link to={{ view: "inspect", id: i.id }}>{i.path}</Link>{" "}
            <span className="muted">{i.experiments.join(", ")}</span>
          </li>
        ))}
      </ul>
    </>
  );
}
