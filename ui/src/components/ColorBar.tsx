/** The colour bar beside a heatmap: the scale's range, its midpoint, and the units. */
import { fmt4 } from "../transforms";
import type { Scale } from "../transforms";

export function ColorBar({ scale, units }: { scale: Scale; units: string }) {
  const stops = Array.from({ length: 11 }, (_, i) =>
    scale.mode === "log" && scale.min > 0
      ? scale.min * Math.pow(scale.max / scale.min, i / 10)
      : scale.min + ((scale.max - scale.min) * i) / 10,
  );
  const gradient = stops.map((v, i) => `${scale.color(v)} ${i * 10}%`).join(", ");
  return (
    <div className="colorbar" data-testid="colorbar">
      <span>{scale.clipped && scale.kind === "sequential" ? "≤ " : ""}{fmt4(scale.min)}</span>
      <span className="colorbar-ramp" style={{ background: `linear-gradient(to right, ${gradient})` }} />
      <span>{scale.clipped ? "≥ " : ""}{fmt4(scale.max)}</span>
      <span className="muted">
        {units}
        {scale.kind === "diverging" ? " (diverging around 0)" : ""}
        {scale.mode === "log" ? " (log scale)" : ""}
        {scale.clipped ? " (1st–99th percentile; values beyond take the end colours)" : ""}
      </span>
    </div>
  );
}
