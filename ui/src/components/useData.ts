/** Load data for a view: `{state: "loading" | "ok" | "error"}`, reloaded when `deps` change;
 * `load` returning null means there is nothing to load yet (`{state: "idle"}`). Switching what is
 * shown (another head, another metric) goes through "loading", so stale data is never on screen. */
import { useEffect, useState } from "react";
import type { DependencyList } from "react";
import { messageOf } from "../api";

export type Loaded<T> =
  | { state: "idle" }
  | { state: "loading" } | { state: "ok"; value: T } | { state: "error"; error: string };

export function useData<T>(
  load: () => Promise<T> | null,
  deps: DependencyList,
  { keepWhileReloading = false } = {},
): Loaded<T> {
  const [result, setResult] = useState<Loaded<T>>({ state: "loading" });
  useEffect(() => {
    let live = true;
    const pending = load();
    if (pending === null) {
      setResult({ state: "idle" });
      return;
    }
    // A reload (say, the detail after a job finished) keeps showing the old value until the new
    // one is there, so the view around it (a running job's panel) is not unmounted.
    setResult((old) => (keepWhileReloading && old.state === "ok" ? old : { state: "loading" }));
    pending.then(
      (value) => live && setResult({ state: "ok", value }),
      (error: unknown) => live && setResult({ state: "error", error: messageOf(error) }),
    );
    return () => {
      live = false;
    };
  }, deps);
  return result;
}
