"""The dashboard in a real browser, against `model-forensics serve` on recorded zoo bundles.

Every value the page shows is checked against the bundle itself (the ActivityCube, the
recorded attention patterns) or against the JSON API the page is built on.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from e2e_served import Server
from playwright.sync_api import Page, expect

from model_forensics import Bundle
from model_forensics.recorder.cube import ActivityCube

UI_TIMEOUT_MS = 20_000  # first paint on a loaded 2-core machine
ANALYSIS_TIMEOUT_MS = 120_000  # a zoo analysis takes ~5 s alone; generous for a busy CI box
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def cube_of(path: Path) -> ActivityCube:
    return ActivityCube.from_json(Bundle.open(path).cube())


def close_to(shown: float, expected: float, rel: float = 1e-3) -> bool:
    """``shown`` (rounded for display, 4 significant digits) is ``expected``."""
    return abs(shown - expected) <= rel * abs(expected) + 1e-9


def numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text)]


def open_bundle(page: Page, server: Server, bundle_id: str) -> None:
    page.goto(f"{server.url}/bundle/{bundle_id}")
    expect(page.get_by_test_id("heatmap-cell").first).to_be_visible(timeout=UI_TIMEOUT_MS)


def test_bundle_list_shows_the_served_bundles(
    page: Page, server: Server, bundles: dict[str, Path], shots: Path
) -> None:
    assert server.url in server.output()  # `serve` prints where it listens
    api = {b["id"]: b for b in server.get("/api/bundles")}
    page.goto(server.url + "/")
    rows = page.get_by_test_id("bundle-row")
    expect(rows.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    shown = set(rows.evaluate_all("els => els.map(e => e.dataset.bundleId)"))
    healthy = {i for i, b in api.items() if not b["error"]}
    assert healthy == {"incident-0", "baseline-0", "orphan"}
    assert healthy <= shown
    incident = page.locator('[data-testid="bundle-row"][data-bundle-id="incident-0"]')
    assert api["incident-0"]["model"] in incident.inner_text()
    page.screenshot(path=shots / "list.png")

    page.get_by_test_id("bundle-filter").fill("baseline")
    expect(page.locator('[data-testid="bundle-row"][data-bundle-id="incident-0"]')).to_have_count(0)
    expect(page.locator('[data-testid="bundle-row"][data-bundle-id="baseline-0"]')).to_be_visible()


def test_corrupt_bundle_is_listed_in_red_with_its_reason(page: Page, server: Server) -> None:
    api = {b["id"]: b for b in server.get("/api/bundles")}
    reason = api["corrupt"]["error"]
    assert reason, "the API lists the corrupt bundle without an error"
    page.goto(server.url + "/")
    row = page.get_by_test_id("error-row").filter(has_text="corrupt")
    expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(row).to_contain_text(reason[:60])
    colours = row.evaluate(
        """el => [el, ...el.querySelectorAll('*')].flatMap(e => {
            const s = getComputedStyle(e);
            return [s.color, s.backgroundColor, s.borderLeftColor];
        })"""
    )
    assert any(is_red(c) for c in colours), colours
    # the other bundles still work
    expect(page.locator('[data-testid="bundle-row"][data-bundle-id="incident-0"]')).to_be_visible()


def is_red(css: str) -> bool:
    parts = [float(x) for x in re.findall(r"[\d.]+", css)]
    if len(parts) < 3 or (len(parts) == 4 and parts[3] < 0.3):
        return False
    r, g, b = parts[:3]
    return r >= 150 and r - g >= 60 and r - b >= 60


def test_open_a_bundle_from_the_list(page: Page, server: Server) -> None:
    page.goto(server.url + "/")
    row = page.locator('[data-testid="bundle-row"][data-bundle-id="incident-0"]')
    expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    link = row.locator("a")
    (link.first if link.count() else row).click()
    expect(page).to_have_url(re.compile(r"/bundle/incident-0$"))
    expect(page.get_by_test_id("heatmap")).to_be_visible(timeout=UI_TIMEOUT_MS)


@pytest.mark.parametrize("metric", ["energy", "std_activation"])
def test_heatmap_tooltip_shows_the_cube_value(
    page: Page, server: Server, bundles: dict[str, Path], shots: Path, metric: str
) -> None:
    cube = cube_of(bundles["incident"])
    values = cube.metric(metric)  # (layers, tokens)
    open_bundle(page, server, "incident-0")
    page.get_by_test_id("metric-select").select_option(metric)
    n_tokens = len(cube.tokens)
    for layer_pos, token in [(0, 0), (len(cube.layers) - 1, n_tokens - 1), (len(cube.layers) - 1, n_tokens // 2)]:
        layer = cube.layers[layer_pos].layer_index
        expected = float(values[layer_pos, token])
        cell = page.locator(f'[data-testid="heatmap-cell"][data-token="{token}"][data-layer="{layer}"]')
        expect(cell).to_have_count(1)
        expect(cell).to_have_attribute("data-value", re.compile(r"."))
        assert close_to(float(cell.get_attribute("data-value") or "nan"), expected, rel=1e-6)
        cell.hover()
        tooltip = page.get_by_test_id("tooltip")
        expect(tooltip).to_be_visible()
        expect(tooltip).to_contain_text(f"layer {layer}")
        text = tooltip.inner_text()
        assert cube.tokens[token] in text, text
        assert any(close_to(x, expected) for x in numbers(text)), (text, expected)
    if metric == "energy":
        page.screenshot(path=shots / "bundle-heatmap.png")


def attention_matrix(page: Page) -> dict[tuple[int, int], float]:
    cells = page.get_by_test_id("attention-cell").evaluate_all(
        "els => els.map(e => [Number(e.dataset.q), Number(e.dataset.k), Number(e.dataset.value)])"
    )
    return {(int(q), int(k)): float(v) for q, k, v in cells}


def assert_pattern(shown: dict[tuple[int, int], float], pattern: Any) -> None:
    """Every lower-triangle entry of the recorded (T, T) pattern is shown with its value."""
    t = pattern.shape[0]
    for q in range(t):
        for k in range(q + 1):
            assert (q, k) in shown, f"attention cell q={q} k={k} missing"
            assert abs(shown[(q, k)] - float(pattern[q, k])) <= 1e-4, (q, k, shown[(q, k)], float(pattern[q, k]))


def test_switching_heads_shows_each_recorded_pattern(
    page: Page, server: Server, bundles: dict[str, Path], shots: Path
) -> None:
    bundle = Bundle.open(bundles["incident"])
    open_bundle(page, server, "incident-0")
    seen = []
    for layer, head in [(0, 0), (0, 1), (1, 2)]:
        pattern = bundle.activation(f"blocks.{layer}.attn.pattern")[0, head]  # (T_q, T_k)
        page.get_by_test_id("layer-select").select_option(str(layer))
        page.get_by_test_id("head-select").select_option(str(head))
        matrix = page.get_by_test_id("attention-matrix")
        expect(matrix).to_be_visible(timeout=UI_TIMEOUT_MS)
        probe = matrix.locator(f'[data-testid="attention-cell"][data-q="{pattern.shape[0] - 1}"][data-k="0"]')
        expect(probe).to_have_attribute("data-value", re.compile(r"."))
        page.wait_for_function(
            """([q, want]) => {
                const c = document.querySelector(`[data-testid="attention-cell"][data-q="${q}"][data-k="0"]`);
                return c && Math.abs(Number(c.dataset.value) - want) <= 1e-4;
            }""",
            arg=[pattern.shape[0] - 1, float(pattern[-1, 0])],
            timeout=UI_TIMEOUT_MS,
        )
        shown = attention_matrix(page)
        assert_pattern(shown, pattern)
        seen.append(shown)
        if (layer, head) == (0, 1):
            matrix.scroll_into_view_if_needed()
            page.screenshot(path=shots / "bundle-attention.png", full_page=True)
    assert seen[0] != seen[1] != seen[2], "switching heads did not change the attention matrix"


def started_job(page: Page, bundle_id: str) -> str:
    """Click "Run analysis" and return the id of the job the page started."""
    with page.expect_response(lambda r: r.url.endswith("/api/jobs") and r.request.method == "POST") as posted:
        page.get_by_test_id("run-analysis").click()
    response = posted.value
    assert response.ok, response.text()
    job = response.json()
    assert job["bundle"] == bundle_id
    return str(job["id"])


def test_analysis_job_shows_the_fix_set(page: Page, server: Server, bundles: dict[str, Path], shots: Path) -> None:
    page.goto(f"{server.url}/bundle/incident-0/rca")
    expect(page.get_by_test_id("run-analysis")).to_be_enabled(timeout=UI_TIMEOUT_MS)
    job_id = started_job(page, "incident-0")
    expect(page.get_by_test_id("job-progress")).to_be_visible(timeout=UI_TIMEOUT_MS)
    members = page.get_by_test_id("fixset-member")
    expect(members.first).to_be_visible(timeout=ANALYSIS_TIMEOUT_MS)
    job = server.wait_job(job_id, timeout_s=30)
    assert job["state"] == "done", job
    analysis = server.get(f"/api/bundles/incident-0/analyses/{job['result']}")
    units = fix_units(analysis)
    assert units, analysis
    expect(members).to_have_count(len(units))
    text = page.get_by_test_id("fixset").inner_text()
    for unit in units:
        assert unit in text, (unit, text)
    truth = Bundle.open(bundles["incident"]).manifest["extras"]["ground_truth"]["units"]
    assert set(units) & set(truth), (units, truth)  # the planted head, found through the UI
    page.screenshot(path=shots / "rca-fixset.png")  # the viewport: the fix set is at the top


def fix_units(analysis: dict[str, Any]) -> list[str]:
    """The fix set's member sites from an analysis JSON (as `analyze --out` writes it)."""
    return [str(m["unit"]) for m in analysis["fix_set"]["members"]]


def test_failed_job_shows_its_error(page: Page, server: Server, shots: Path) -> None:
    page.goto(f"{server.url}/bundle/orphan/rca")
    expect(page.get_by_test_id("run-analysis")).to_be_enabled(timeout=UI_TIMEOUT_MS)
    job_id = started_job(page, "orphan")
    error = page.get_by_test_id("job-error")
    expect(error).to_be_visible(timeout=ANALYSIS_TIMEOUT_MS)
    job = server.wait_job(job_id, timeout_s=30)
    assert job["state"] == "failed", job
    assert job["error"]
    expect(error).to_contain_text(job["error"][:80])
    page.screenshot(path=shots / "rca-failed.png", full_page=True)
