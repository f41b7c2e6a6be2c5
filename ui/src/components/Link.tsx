/** An in-app link: a real href (open in a new tab works), client-side navigation on a plain click. */
import type { MouseEvent, ReactNode } from "react";
import { href, navigate } from "../router";
import type { Route } from "../router";

export function Link({ to, children, testId }: { to: Route; children: ReactNode; testId?: string }) {
  const onClick = (e: MouseEvent<HTMLAnchorElement>) => {
    if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    navigate(to);
  };
  return (
    <a href={href(to)} onClick={onClick} data-testid={testId}>
      {children}
    </a>
  );
}
