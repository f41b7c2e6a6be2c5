"""The one-file offline report, opened from file:// in Chromium: no network, no console
errors, and the heatmap shows the bundle's ActivityCube."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import ConsoleMessage, Page, Request, expect

from model_forensics import Bundle
from model_forensics.recorder.cube import ActivityCube

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def test_offline_report_makes_no_requests_and_logs_no_errors(
    page: Page, bundles: dict[str, Path], tmp_path: Path, shots: Path
) -> None:
    report = tmp_path / "report.html"
    cli = Path(sys.executable).with_name("model-forensics")
    done = subprocess.run(
        [str(cli), "report", str(bundles["incident"]), "-o", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    network: list[str] = []
    errors: list[str] = []

    def on_request(request: Request) -> None:
        if not request.url.startswith(LOCAL_SCHEMES):
            network.append(request.url)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(report.as_uri())

    cube = ActivityCube.from_json(Bundle.open(bundles["incident"]).cube())
    energy = cube.metric("energy")
    layer_pos, token = len(cube.layers) - 1, len(cube.tokens) - 1
    layer = cube.layers[layer_pos].layer_index
    cell = page.locator(f'[data-testid="heatmap-cell"][data-token="{token}"][data-layer="{layer}"]')
    expect(cell).to_be_visible(timeout=20_000)
    cell.hover()
    tooltip = page.get_by_test_id("tooltip")
    expect(tooltip).to_contain_text(f"layer {layer}")
    assert abs(float(cell.get_attribute("data-value") or "nan") - float(energy[layer_pos, token])) <= 1e-6 * float(
        energy[layer_pos, token]
    )
    # attention is embedded 8-bit quantized (the page says so): each cell within one step
    pattern = Bundle.open(bundles["incident"]).activation("blocks.0.attn.pattern")[0, 1]  # (T_q, T_k)
    page.get_by_test_id("layer-select").select_option("0")
    page.get_by_test_id("head-select").select_option("1")
    last = page.locator(f'[data-testid="attention-cell"][data-q="{pattern.shape[0] - 1}"][data-k="0"]')
    expect(last).to_have_attribute("data-value", re.compile(r"."))
    page.wait_for_function(
        """([q, want]) => {
            const c = document.querySelector(`[data-testid="attention-cell"][data-q="${q}"][data-k="0"]`);
            return c && Math.abs(Number(c.dataset.value) - want) <= 1 / 255 + 1e-6;
        }""",
        arg=[pattern.shape[0] - 1, float(pattern[-1, 0])],
        timeout=20_000,
    )
    cells = page.get_by_test_id("attention-cell").evaluate_all(
        "els => els.map(e => [Number(e.dataset.q), Number(e.dataset.k), Number(e.dataset.value)])"
    )
    shown = {(int(q), int(k)): v for q, k, v in cells}
    for q in range(pattern.shape[0]):
        for k in range(q + 1):
            assert abs(shown[(q, k)] - float(pattern[q, k])) <= 1 / 255 + 1e-6, (q, k)
    page.wait_for_timeout(300)  # late requests (lazy chunks, fonts) would land here
    page.screenshot(path=shots / "report.png", full_page=False)
    assert network == [], f"the offline report made network requests: {network}"
    assert errors == [], f"the offline report logged console errors: {errors}"


def test_committed_screenshots_are_small() -> None:
    """The screenshots kept as documentation stay small (regenerate: see conftest.py)."""
    big = {p.name: p.stat().st_size for p in (Path(__file__).parent / "screenshots").glob("*.png")}
    assert all(size < 200_000 for size in big.values()), big
