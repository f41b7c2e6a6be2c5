import { act, cleanup, fireEvent, render, screen, waitFor, within } from "@testing-library/react";
import { afterEach, describe, expect, it } from "vitest";
import { AttentionMatrix } from "../components/AttentionMatrix";
import { Heatmap, cellDescription } from "../components/Heatmap";
import { fmt4 } from "../transforms";
import { cube, pattern, TOKENS } from "./fixtures";

afterEach(cleanup);

function renderCube() {
  const slice = cube();
  render(
    <Heatmap
      values={slice.values}
      rowLabels={slice.layers}
      colLabels={slice.tokens}
      colPositions={[10, 11, 12, 13]}
      units="energy"
      describe={(r, c, v) => cellDescription(v, slice.tokens[c], c, slice.layers[r], `blocks.${slice.layers[r]}.resid_post`)}
    />,
  );
  return slice;
}

describe("Heatmap", () => {
  it("draws one cell per layer and token with its position, layer and exact value", () => {
    const slice = renderCube();
    const cells = screen.getAllByTestId("heatmap-cell");
    expect(cells).toHaveLength(3 * 4);
    for (const cell of cells) {
      const layer = Number(cell.getAttribute("data-layer"));
      const token = Number(cell.getAttribute("data-token"));
      expect(Number(cell.getAttribute("data-value"))).toBe(slice.values[layer][token - 10]);
    }
  });
  it("shows value (4 significant digits), token and layer on hover, and hides it on leave", () => {
    const slice = renderCube();
    expect(screen.queryByTestId("tooltip")).toBeNull();
    const cell = screen
      .getAllByTestId("heatmap-cell")
      .find((c) => c.getAttribute("data-layer") === "2" && c.getAttribute("data-token") === "12")!;
    fireEvent.mouseOver(cell);
    const tip = screen.getByTestId("tooltip");
    expect(tip.textContent).toContain(fmt4(slice.values[2][2]));
    expect(fmt4(slice.values[2][2])).toBe("11.11");
    expect(tip.textContent).toContain(TOKENS[2]);
    expect(tip.textContent).toContain("layer 2");
    expect(tip.textContent).toContain("blocks.2.resid_post");
    fireEvent.mouseLeave(screen.getByTestId("heatmap"));
    expect(screen.queryByTestId("tooltip")).toBeNull();
  });
  it("colours low and high values at the two ends of the scale and shows the colour bar", () => {
    renderCube();
    const cells = screen.getAllByTestId("heatmap-cell");
    const lo = cells.find((c) => c.getAttribute("data-value") === "1.23456")!;
    const hi = cells.find((c) => c.getAttribute("data-value") === "12")!;
    expect(lo.getAttribute("fill")).toBe("rgb(68,1,84)");
    expect(hi.getAttribute("fill")).toBe("rgb(253,231,37)");
    const bar = screen.getByTestId("colorbar");
    expect(bar.textContent).toContain("1.235");
    expect(bar.textContent).toContain("12");
    expect(bar.textContent).toContain("energy");
  });
});

describe("AttentionMatrix", () => {
  it("draws queries × keys cells with the pattern's values", () => {
    const m = pattern(1, 2);
    render(<AttentionMatrix matrix={m} tokens={TOKENS} />);
    const cells = screen.getAllByTestId("attention-cell");
    expect(cells).toHaveLength(16);
    for (const cell of cells) {
      const q = Number(cell.getAttribute("data-q"));
      const k = Number(cell.getAttribute("data-k"));
      expect(Number(cell.getAttribute("data-value"))).toBe(m[q][k]);
    }
    // causal: keys after the query have zero weight and the lowest colour
    const future = cells.find((c) => c.getAttribute("data-q") === "0" && c.getAttribute("data-k") === "3")!;
    expect(future.getAttribute("data-value")).toBe("0");
    expect(future.getAttribute("fill")).toBe("rgb(68,1,84)");
  });
  it("names the query and key on hover and re-renders when the head changes", () => {
    const { rerender } = render(<AttentionMatrix matrix={pattern(0, 0)} tokens={TOKENS} />);
    const cell = () =>
      screen.getAllByTestId("attention-cell").find((c) => c.getAttribute("data-q") === "3" && c.getAttribute("data-k") === "1")!;
    fireEvent.mouseOver(cell());
    const tip = screen.getByTestId("attention-tooltip");
    expect(tip.textContent).toContain(fmt4(pattern(0, 0)[3][1]));
    expect(tip.textContent).toContain(" cat");
    const before = cell().getAttribute("data-value");
    rerender(<AttentionMatrix matrix={pattern(0, 1)} tokens={TOKENS} />);
    expect(cell().getAttribute("data-value")).toBe(String(pattern(0, 1)[3][1]));
    expect(cell().getAttribute("data-value")).not.toBe(before);
  });
});

export { act, waitFor, within };
