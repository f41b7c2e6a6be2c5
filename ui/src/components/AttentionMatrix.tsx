/**
 * One head's attention pattern as a queries × keys matrix (rows: query tokens, columns: key
 * tokens), one <rect> per cell with `data-q`, `data-k`, `data-value`; hover shows the pair.
 */
import { memo, useCallback, useMemo, useState } from "react";
import type { MouseEvent } from "react";
import { extent, fmt4, scaleFor, showToken } from "../transforms";
import type { Scale } from "../transforms";
import { ColorBar } from "./ColorBar";

export interface AttentionMatrixProps {
  matrix: number[][];
  tokens: string[];
  /** Highlighted query row (from the arcs view), if any. */
  selected?: number | null;
  onSelect?: (query: number | null) => void;
}

const LEFT = 70;
const TOP = 70;

export function AttentionMatrix({ matrix, tokens, selected, onSelect }: AttentionMatrixProps) {
  const n = matrix.length;
  const m = matrix[0]?.length ?? 0;
  const cell = Math.max(3, Math.min(24, Math.floor(560 / Math.max(1, n, m))));
  // Probabilities: the scale runs from 0 to the pattern's largest weight.
  const scale = useMemo(() => scaleFor([[0, extent(matrix)[1] || 1]], false), [matrix]);
  const [hover, setHover] = useState<{ q: number; k: number; x: number; y: number } | null>(null);
  const labelEvery = Math.max(1, Math.ceil(11 / cell));
  const onMove = useCallback((e: MouseEvent<SVGGElement>) => {
    const t = e.target as SVGElement;
    const q = t.getAttribute("data-q");
    const k = t.getAttribute("data-k");
    if (q === null || k === null) return;
    const box = (e.currentTarget.ownerSVGElement ?? e.currentTarget).getBoundingClientRect();
    setHover({ q: Number(q), k: Number(k), x: e.clientX - box.left, y: e.clientY - box.top });
  }, []);
  const width = LEFT + m * cell + 8;
  const height = TOP + n * cell + 8;
  return (
    <div className="attention-matrix-wrap">
      <div style={{ position: "relative" }}>
        <svg
          data-testid="attention-matrix"
          width={width}
          height={height}
          role="img"
          aria-label="attention pattern, queries × keys"
          onMouseLeave={() => setHover(null)}
        >
          <text className="axis-title" x={LEFT} y={12}>
            keys →
          </text>
          <text className="axis-title" x={4} y={TOP - 4}>
            queries ↓
          </text>
          <g
            transform={`translate(${LEFT},${TOP})`}
            onMouseMove={onMove}
            onMouseOver={onMove}
            onClick={(e) => {
              const q = (e.target as SVGElement).getAttribute("data-q");
              if (q !== null && onSelect) onSelect(Number(q) === selected ? null : Number(q));
            }}
          >
            <MatrixCells matrix={matrix} scale={scale} cell={cell} />
          </g>
          <g className="axis" transform={`translate(${LEFT - 4},${TOP})`}>
            {tokens.slice(0, n).map((t, q) =>
              q % labelEvery === 0 ? (
                <text key={q} x={0} y={q * cell + cell / 2 + 4} textAnchor="end">
                  {showToken(t).slice(0, 9)}
                </text>
              ) : null,
            )}
          </g>
          <g className="axis" transform={`translate(${LEFT},${TOP - 4})`}>
            {tokens.slice(0, m).map((t, k) =>
              k % labelEvery === 0 ? (
                <text key={k} transform={`translate(${k * cell + cell / 2},0) rotate(-60)`}>
                  {showToken(t).slice(0, 9)}
                </text>
              ) : null,
            )}
          </g>
          {selected !== null && selected !== undefined && selected < n && (
            <rect
              className="cell-outline"
              x={LEFT}
              y={TOP + selected * cell}
              width={m * cell}
              height={cell}
              pointerEvents="none"
            />
          )}
        </svg>
        {hover && matrix[hover.q]?.[hover.k] !== undefined && (
          <div className="tooltip" data-testid="attention-tooltip" style={{ left: hover.x + 14, top: hover.y + 14 }}>
            <div className="tooltip-value">{fmt4(matrix[hover.q][hover.k])}</div>
            <div>
              query <q>{tokens[hover.q]}</q> (#{hover.q}) → key <q>{tokens[hover.k]}</q> (#{hover.k})
            </div>
          </div>
        )}
      </div>
      <ColorBar scale={scale} units="attention probability" />
    </div>
  );
}

/** Queries × keys cells as one SVG markup string (16 384 cells at 128 tokens; see Heatmap). */
const MatrixCells = memo(function MatrixCells({ matrix, scale, cell }: { matrix: number[][]; scale: Scale; cell: number }) {
  const out: string[] = [];
  matrix.forEach((row, q) =>
    row.forEach((v, k) =>
      out.push(
        `<rect data-testid="attention-cell" data-q="${q}" data-k="${k}" data-value="${v}" x="${k * cell}" ` +
          `y="${q * cell}" width="${cell}" height="${cell}" fill="${scale.color(v)}"/>`,
      ),
    ),
  );
  return <g dangerouslySetInnerHTML={{ __html: out.join("") }} />;
});
