/**
 * A rows × columns heatmap in SVG (layers × tokens for cube metrics): one <rect> per cell with
 * its coordinates and value as data attributes, a colour bar with the scale and units, and a
 * tooltip on hover. Hover is handled once on the cell group (event delegation) and the cells are
 * memoised, so moving the mouse re-renders only the tooltip.
 */
import { memo, useCallback, useMemo, useState } from "react";
import type { MouseEvent, ReactNode } from "react";
import { fmt4, scaleFor, showToken } from "../transforms";
import type { Scale, ScaleMode } from "../transforms";
import { ColorBar } from "./ColorBar";

export interface HeatmapProps {
  /** values[row][col], e.g. layers × tokens */
  values: number[][];
  rowLabels: number[];
  colLabels: string[];
  /** Token position of each column (`data-token`); the column index when absent. */
  colPositions?: number[];
  /** What the values are, shown on the colour bar (metric name and unit). */
  units: string;
  diverging?: boolean;
  /** Colour scale: linear over the range, robust (1st–99th percentile) or log. */
  mode?: ScaleMode;
  /** Text of the tooltip for a cell (its row and column index). */
  describe: (row: number, col: number, value: number) => ReactNode;
  testId?: string;
  cellTestId?: string;
  tooltipTestId?: string;
  maxWidth?: number;
}

const LEFT = 64;
const TOP = 8;

const TIP_HEIGHT = 84; // four lines of the tooltip, padding included

export function Heatmap(props: HeatmapProps) {
  const { values, rowLabels, colLabels, testId = "heatmap", cellTestId = "heatmap-cell" } = props;
  const scale = useMemo(() => scaleFor(values, props.diverging, props.mode), [values, props.diverging, props.mode]);
  const nCols = colLabels.length;
  const cw = Math.max(4, Math.min(28, Math.floor((props.maxWidth ?? 1100) / Math.max(1, nCols))));
  const ch = Math.max(8, Math.min(22, Math.floor(480 / Math.max(1, rowLabels.length))));
  const labelEvery = Math.max(1, Math.ceil(11 / cw));
  const bottom = 70;
  const width = LEFT + nCols * cw + 8;
  const height = TOP + rowLabels.length * ch + bottom;
  const [hover, setHover] = useState<{ row: number; col: number; x: number; y: number } | null>(null);

  const onMove = useCallback((e: MouseEvent<SVGGElement>) => {
    const target = e.target as SVGElement;
    const row = target.getAttribute("data-row");
    const col = target.getAttribute("data-col");
    if (row === null || col === null) return;
    const box = (e.currentTarget.ownerSVGElement ?? e.currentTarget).getBoundingClientRect();
    setHover({ row: Number(row), col: Number(col), x: e.clientX - box.left, y: e.clientY - box.top });
  }, []);

  return (
    <div className="heatmap-wrap">
      <div className="heatmap-scroll" style={{ position: "relative" }}>
        <svg
          data-testid={testId}
          width={width}
          height={height}
          role="img"
          aria-label={`heatmap of ${props.units}`}
          onMouseLeave={() => setHover(null)}
        >
          <g transform={`translate(${LEFT},${TOP})`} onMouseMove={onMove} onMouseOver={onMove}>
            <Cells
              values={values}
              rowLabels={rowLabels}
              colPositions={props.colPositions}
              scale={scale}
              cw={cw}
              ch={ch}
              cellTestId={cellTestId}
            />
          </g>
          <g className="axis" transform={`translate(${LEFT - 4},${TOP})`}>
            {rowLabels.map((label, r) => (
              <text key={r} x={0} y={r * ch + ch / 2 + 4} textAnchor="end">
                {ch >= 10 || r % 2 === 0 ? `L${label}` : ""}
              </text>
            ))}
          </g>
          <g className="axis" transform={`translate(${LEFT},${TOP + rowLabels.length * ch + 4})`}>
            {colLabels.map((token, c) =>
              c % labelEvery === 0 ? (
                <text key={c} transform={`translate(${c * cw + cw / 2},0) rotate(60)`} x={2} y={0}>
                  {showToken(token).slice(0, 10)}
                </text>
              ) : null,
            )}
          </g>
          {hover && (
            <rect
              className="cell-outline"
              x={LEFT + hover.col * cw}
              y={TOP + hover.row * ch}
              width={cw}
              height={ch}
              pointerEvents="none"
            />
          )}
        </svg>
        {hover && values[hover.row]?.[hover.col] !== undefined && (
          <div
            className="tooltip"
            data-testid={props.tooltipTestId ?? "tooltip"}
            // below the cursor, or above it where a tooltip below would be cut off by the scroll box
            style={{ left: Math.min(hover.x + 14, width - 120), top: hover.y + 14 + TIP_HEIGHT > height ? Math.max(0, hover.y - TIP_HEIGHT - 6) : hover.y + 14 }}
          >
            {props.describe(hover.row, hover.col, values[hover.row][hover.col])}
          </div>
        )}
      </div>
      <ColorBar scale={scale} units={props.units} />
    </div>
  );
}

interface CellsProps {
  values: number[][];
  rowLabels: number[];
  colPositions?: number[];
  scale: Scale;
  cw: number;
  ch: number;
  cellTestId: string;
}

/** The cells as SVG markup set in one go: thousands of <rect>s (128 tokens × 30 layers) parse
 * far faster as markup than as React elements. Only numbers and fixed names go into it. */
export function cellsMarkup({ values, rowLabels, colPositions, scale, cw, ch, cellTestId }: CellsProps): string {
  const out: string[] = [];
  values.forEach((row, r) => {
    row.forEach((v, c) => {
      const fill = Number.isFinite(v) ? scale.color(v) : "#ccc";
      out.push(
        `<rect data-testid="${cellTestId}" data-row="${r}" data-col="${c}" data-token="${colPositions?.[c] ?? c}" ` +
          `data-layer="${rowLabels[r]}" data-value="${v}" x="${c * cw}" y="${r * ch}" width="${cw}" height="${ch}" fill="${fill}"/>`,
      );
    });
  });
  return out.join("");
}

const Cells = memo(function Cells(props: CellsProps) {
  return <g dangerouslySetInnerHTML={{ __html: cellsMarkup(props) }} />;
});

/** The standard tooltip of a cube cell: value (4 significant digits), token, layer, site. */
export function cellDescription(value: number, token: string, tokenIndex: number, layer: number, site: string) {
  return (
    <>
      <div className="tooltip-value">{fmt4(value)}</div>
      <div>
        token <q>{token}</q> (#{tokenIndex})
      </div>
      <div>layer {layer}</div>
      <div className="muted">site {site}</div>
    </>
  );
}
