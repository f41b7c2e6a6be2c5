/**
 * Token-to-token arcs (CircuitsVis style): tokens in a row, an arc from each query to the keys it
 * attends to most, opacity and width by weight. Clicking a token shows only that query's arcs.
 */
import { useMemo } from "react";
import { attentionArcs, fmt4, showToken } from "../transforms";

export interface AttentionArcsProps {
  matrix: number[][];
  tokens: string[];
  selected: number | null;
  onSelect: (query: number | null) => void;
}

export function AttentionArcs({ matrix, tokens, selected, onSelect }: AttentionArcsProps) {
  const n = matrix.length;
  const step = Math.max(14, Math.min(56, Math.floor(1100 / Math.max(1, n))));
  const arcs = useMemo(() => {
    if (selected !== null && matrix[selected]) {
      return matrix[selected]
        .map((weight, k) => ({ q: selected, k, weight }))
        .filter((a) => a.k !== a.q && a.weight >= 0.02);
    }
    return attentionArcs(matrix, 1, 0.15);
  }, [matrix, selected]);
  const height = 150;
  const base = height - 10;
  const x = (i: number) => i * step + step / 2;
  const rotate = step < 80; // upright labels of up to 12 characters need ~80 px each, or they run together
  return (
    <div className="arcs-wrap">
      <svg data-testid="attention-arcs" width={n * step + 10} height={height + (rotate ? 70 : 24)}>
        {arcs.map((a) => {
          const x1 = x(a.k);
          const x2 = x(a.q);
          const lift = Math.min(base - 6, 12 + Math.abs(x2 - x1) * 0.35);
          return (
            <path
              key={`${a.q}:${a.k}`}
              data-testid="attention-arc"
              data-q={a.q}
              data-k={a.k}
              d={`M${x1},${base} Q${(x1 + x2) / 2},${base - 2 * lift} ${x2},${base}`}
              fill="none"
              stroke="#d62728"
              strokeOpacity={Math.min(1, 0.15 + a.weight)}
              strokeWidth={0.5 + 3 * a.weight}
            >
              <title>{`${showToken(tokens[a.q] ?? "")} → ${showToken(tokens[a.k] ?? "")}: ${fmt4(a.weight)}`}</title>
            </path>
          );
        })}
        {tokens.slice(0, n).map((t, i) => (
          <text
            key={i}
            className={`arc-token${i === selected ? " selected" : ""}`}
            transform={rotate ? `translate(${x(i)},${base + 8}) rotate(60)` : undefined}
            x={rotate ? 0 : x(i)}
            y={rotate ? 0 : base + 16}
            textAnchor={rotate ? "start" : "middle"}
            onClick={() => onSelect(i === selected ? null : i)}
          >
            {showToken(t).slice(0, 12)}
          </text>
        ))}
      </svg>
      <p className="muted small">
        {selected === null
          ? "Each query's strongest key (weight ≥ 0.15). Click a token to see all it attends to."
          : `Query #${selected} attends to (weight ≥ 0.02). Click it again for all queries.`}
      </p>
    </div>
  );
}
