/** A short message where a view's data is absent or failed to load (the view never crashes). */
import type { ReactNode } from "react";

export function Message({ children, kind = "info" }: { children: ReactNode; kind?: "info" | "error" }) {
  return (
    <p className={`message ${kind}`} role={kind === "error" ? "alert" : "status"}>
      {children}
    </p>
  );
}
