/**
 * Client-side routes: `/` list, `/bundle/<id>`, `/bundle/<id>/rca`, `/bundle/<id>/replay`,
 * `/inspect/<id>`. Ids are paths (they may hold slashes); each segment is URI-encoded. The server
 * answers every such path with index.html; an offline report (file://) uses `#/bundle/<id>`.
 */
import { useEffect, useState } from "react";
import { routeId } from "./api";

export type Route =
  | { view: "list" }
  | { view: "bundle"; id: string }
  | { view: "rca"; id: string }
  | { view: "replay"; id: string }
  | { view: "inspect"; id: string }
  | { view: "missing"; path: string };

function decodeId(raw: string): string {
  if (raw === "~") return ".";
  return raw
    .split("/")
    .filter(Boolean)
    .map((s) => decodeURIComponent(s))
    .join("/");
}

export function parseRoute(path: string): Route {
  const clean = path.replace(/^#/, "").replace(/\/+$/, "") || "/";
  if (clean === "/" || clean === "/index.html") return { view: "list" };
  try {
    const bundle = /^\/bundle\/(.+?)(\/(rca|replay))?$/.exec(clean);
    if (bundle) {
      const id = decodeId(bundle[1]);
      const view = (bundle[3] as "rca" | "replay" | undefined) ?? "bundle";
      return { view, id };
    }
    const inspect = /^\/inspect\/(.+)$/.exec(clean);
    if (inspect) return { view: "inspect", id: decodeId(inspect[1]) };
  } catch {
    // a malformed %-escape
  }
  return { view: "missing", path: clean };
}

export function routePath(route: Route): string {
  switch (route.view) {
    case "list":
      return "/";
    case "bundle":
      return `/bundle/${routeId(route.id)}`;
    case "rca":
    case "replay":
      return `/bundle/${routeId(route.id)}/${route.view}`;
    case "inspect":
      return `/inspect/${routeId(route.id)}`;
    case "missing":
      return route.path;
  }
}

/** Hash routes in an offline report (no server to answer /bundle/…), history routes otherwise. */
export function hashRoutes(): boolean {
  return Boolean(window.__MF_DATA__) || window.location.protocol === "file:";
}

export function href(route: Route): string {
  return hashRoutes() ? `#${routePath(route)}` : routePath(route);
}

function current(): Route {
  if (!hashRoutes()) return parseRoute(window.location.pathname);
  // A report opens on the page it was written for (its bundle), unless the hash names another.
  return parseRoute(window.location.hash || window.__MF_DATA__?.start || "/");
}

export function navigate(route: Route): void {
  if (hashRoutes()) {
    window.location.hash = routePath(route);
  } else {
    window.history.pushState(null, "", routePath(route) + window.location.search);
    window.dispatchEvent(new PopStateEvent("popstate"));
  }
}

export function useRoute(): Route {
  const [route, setRoute] = useState<Route>(current);
  useEffect(() => {
    const update = () => setRoute(current());
    window.addEventListener("popstate", update);
    window.addEventListener("hashchange", update);
    return () => {
      window.removeEventListener("popstate", update);
      window.removeEventListener("hashchange", update);
    };
  }, []);
  return route;
}
