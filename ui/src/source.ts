/** The data source of the page, given to every view through context (tests pass their own). */
import { createContext, useContext } from "react";
import type { DataSource } from "./api";

export const SourceContext = createContext<DataSource | null>(null);

export function useSource(): DataSource {
  const source = useContext(SourceContext);
  if (!source) throw new Error("no data source: wrap the view in <SourceContext.Provider>");
  return source;
}
