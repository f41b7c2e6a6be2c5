"""Dashboard speed in headless Chromium (Debian's /usr/bin/chromium), via Playwright.

One SmolLM2-135M bundle (128 tokens × 30 layers, head granularity so attention exists),
served by `model-forensics serve` on a free loopback port. Measured:

* first meaningful render of the bundle page: from navigation start to the frame after
  the last heatmap cell is in the DOM (`performance.now()` in the page, cold context each
  round; the Python-side wall time beside it). Target ≤ 2 s.
* hover-to-tooltip: from the `mouseover` event on a heatmap cell to the frame after the
  tooltip shows that cell's layer (in the page). Target ≤ 50 ms.
* cube endpoint latency under 50 concurrent loopback clients (httpx, asyncio): every
  client sends a fixed number of requests, so the loop stops by itself; p50 / p95 / p99.
* the offline report (`model-forensics report -o report.html`): size, write time, and
  open time from file:// to the heatmap drawn.

Dashboard renders and report opens alternate within each round (interleaved), medians
over rounds; the server's CPU time is read beside wall time (psutil) and the load average
is reported, because on a shared 2-core machine wall time alone says little.

Run: .venv/bin/python benchmarks/dashboard.py [--rounds 7] [--hovers 20] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil
import torch

from _common import commit, machine, markdown_table, median, smollm2_prompt, write_results
from model_forensics import RecorderHooks

CHROMIUM = "/usr/bin/chromium"
TOKENS = 128
RENDER_TARGET_S = 2.0
HOVER_TARGET_MS = 50.0

# Records, in the page, when the heatmap's last cell lands (then the next frame) and, per
# hover, the mouseover time and the frame after the tooltip shows that cell's layer.
INSTRUMENT = """
(() => {
  const want = Number("__CELLS__");
  const visible = (el) => !!el && el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden";
  window.__mf = {rendered: null, hovers: [], pending: null};
  const check = () => {
    const m = window.__mf;
    const n = m.rendered === null ? document.querySelectorAll('[data-testid="heatmap-cell"]').length : 0;
    if (m.rendered === null && (want > 0 ? n >= want : n > 0)) {  // React commits all cells at once
      m.rendered = -1;
      requestAnimationFrame(() => { m.rendered = performance.now(); });
    }
    if (m.pending) {
      const tip = document.querySelector('[data-testid="tooltip"]');
      const p = m.pending;
      const shown = tip ? tip.textContent.match(/layer ([0-9]+)/) : null;
      if (visible(tip) && shown && shown[1] === p.layer
          && (!p.wasVisible || tip.textContent !== p.prev)) {
        m.pending = null;
        requestAnimationFrame(() => { m.hovers.push(performance.now() - p.t); });
      }
    }
  };
  new MutationObserver(check).observe(document, {subtree: true, childList: true, characterData: true,
                                                   attributes: true});
  document.addEventListener("mouseover", (e) => {
    const c = e.target instanceof Element ? e.target.closest('[data-testid="heatmap-cell"]') : null;
    if (!c) return;
    const tip = document.querySelector('[data-testid="tooltip"]');
    window.__mf.pending = {t: e.timeStamp, layer: c.dataset.layer, prev: tip ? tip.textContent : "",
                           wasVisible: visible(tip)};
    check();
  }, true);
})();
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hovers", type=int, default=20)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests-per-client", type=int, default=10)
    args = parser.parse_args()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="mf-dashboard-"))
    try:
        bundle = record_smollm2(tmp / "served" / "smollm2-128")
        report, report_write_s = write_report(bundle, tmp / "report.html")
        with serve(tmp / "served", tmp / "serve.log") as (url, process):
            load_result = cube_load(url, "smollm2-128", process, args.clients, args.requests_per_client)
            browser_result = browser_rounds(url, "smollm2-128", report, args.rounds, args.hovers, process)
        data = {
            "machine": machine(),
            "load_average_1_5_15_start": load_start,
            "load_average_1_5_15": os.getloadavg(),
            "cpus": os.cpu_count(),
            "commit": commit(),
            "bundle": {"tokens": TOKENS, "layers": 30, "granularity": "head"},
            "render": browser_result["render"],
            "hover": browser_result["hover"],
            "report": report_result(report, report_write_s, browser_result["report"]),
            "cube_load": load_result,
            "rounds": args.rounds,
        }
        table = render_table(data)
        print(table)
        write_results("dashboard", data, table)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- setup -----------------------------------------------------------------------------------
def record_smollm2(out: Path) -> Path:
    """A 128-token SmolLM2 bundle, one forward pass, head granularity (fp16 sketch)."""
    loaded, ids = smollm2_prompt(TOKENS)
    rec = RecorderHooks(granularity="head", sketch="fp16", max_bundle_size_mb=1e4)
    with rec.install_hooks(loaded.model, loaded.tokenizer), torch.no_grad():
        loaded.model(input_ids=ids)
        return Path(rec.create_bundle(out))


def cli() -> str:
    return str(Path(sys.executable).with_name("model-forensics"))


def write_report(bundle: Path, out: Path) -> tuple[Path | None, float | str]:
    """The report and the seconds `report` took, or None and why it could not be written."""
    start = time.perf_counter()
    done = subprocess.run([cli(), "report", str(bundle), "-o", str(out)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return None, (done.stderr or done.stdout).strip().splitlines()[-1][:200]
    return out, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(root: Path, log: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen([cli(), "serve", str(root), "--port", str(port)], stdout=sink, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`model-forensics serve` did not start: {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/api/health", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# -- cube endpoint under load ----------------------------------------------------------------
def cube_load(url: str, bundle_id: str, server: psutil.Process, clients: int, per_client: int) -> dict[str, Any]:
    """``clients`` concurrent loopback clients, ``per_client`` cube requests each."""
    import httpx

    path = f"{url}/api/bundles/{bundle_id}/cube?metric=energy&max_tokens={TOKENS}"

    async def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        failures = 0
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            warm = await client.get(path)
            warm.raise_for_status()
            size = len(warm.content)

            async def one_client() -> None:
                nonlocal failures
                for _ in range(per_client):
                    start = time.perf_counter()
                    response = await client.get(path)
                    latencies.append(time.perf_counter() - start)
                    failures += response.status_code != 200

            await asyncio.gather(*(one_client() for _ in range(clients)))
        return latencies, failures, size

    cpu0, client0 = tree_cpu(server), time.process_time()
    start = time.perf_counter()
    latencies, failures, size = asyncio.run(run())
    wall = time.perf_counter() - start
    cpu, client_cpu = tree_cpu(server) - cpu0, time.process_time() - client0
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "failures": failures,
        "response_bytes": size,
        "p50_ms": 1000 * quantile(latencies, 0.50),
        "p95_ms": 1000 * quantile(latencies, 0.95),
        "p99_ms": 1000 * quantile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "server_cpu_s": cpu,
        "client_cpu_s": client_cpu,
    }


def tree_cpu(process: psutil.Process) -> float:
    """User + system CPU seconds of the server and its live children (the replay worker)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


def quantile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list."""
    return sorted_xs[min(len(sorted_xs) - 1, max(0, round(q * len(sorted_xs) + 0.5) - 1))]


# -- browser ---------------------------------------------------------------------------------
def browser_rounds(
    url: str, bundle_id: str, report: Path | None, rounds: int, hovers: int, server: psutil.Process
) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    render: list[dict[str, float]] = []
    opened: list[dict[str, float]] = []
    hover_ms: list[float] = []
    hover_roundtrip_ms: list[float] = []
    cube = json.loads(urllib.request.urlopen(f"{url}/api/bundles/{bundle_id}/cube?metric=energy", timeout=60).read())
    cells = len(cube["values"]) * len(cube["values"][0])  # what the page draws: layers × tokens
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            for i in range(rounds + 1):  # round 0 warms the OS file cache and Chromium itself
                cpu0 = tree_cpu(server)
                r = timed_open(browser, f"{url}/bundle/{bundle_id}", cells, hovers if i == rounds else 0)
                r["open"]["server_cpu_s"] = tree_cpu(server) - cpu0
                o = timed_open(browser, report.as_uri(), 0, 0) if report is not None else None
                if i == 0:
                    continue
                render.append(r["open"])
                if o is not None:
                    opened.append(o["open"])
                hover_ms += r["hover_ms"]
                hover_roundtrip_ms += r["hover_roundtrip_ms"]
        finally:
            browser.close()
    return {
        "render": summary(render, RENDER_TARGET_S),
        "hover": {
            "median_ms": median(hover_ms),
            "max_ms": max(hover_ms),
            "roundtrip_median_ms": median(hover_roundtrip_ms),
            "samples": len(hover_ms),
            "target_ms": HOVER_TARGET_MS,
            "meets_target": median(hover_ms) <= HOVER_TARGET_MS,
            "times_ms": hover_ms,
        },
        "report": summary(opened, None) if opened else None,
    }


def report_result(report: Path | None, write: float | str, opened: dict[str, Any] | None) -> dict[str, Any]:
    if report is None or opened is None:
        return {"measured": False, "reason": f"`model-forensics report` failed: {write}"}
    return {"measured": True, **opened, "bytes": report.stat().st_size, "write_s": write}


def summary(runs: list[dict[str, float]], target: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "median_s": median([r["page_s"] for r in runs]),
        "max_s": max(r["page_s"] for r in runs),
        "wall_median_s": median([r["wall_s"] for r in runs]),
        "settled_median_s": median([r["settled_s"] for r in runs]),
        "server_cpu_median_s": median([r.get("server_cpu_s", 0.0) for r in runs]),
        "times_s": [r["page_s"] for r in runs],
    }
    if target is not None:
        out.update(target_s=target, meets_target=out["median_s"] <= target)
    return out


def timed_open(browser: Any, url: str, cells: int, hovers: int) -> dict[str, Any]:
    """Open ``url`` in a fresh context (cold cache); time to the heatmap drawn, then hovers."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        context.add_init_script(INSTRUMENT.replace("__CELLS__", str(cells)))
        page = context.new_page()
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function("window.__mf && window.__mf.rendered > 0", timeout=120_000, polling=20)
        wall = time.perf_counter() - start
        page_s = page.evaluate("window.__mf.rendered") / 1000
        # The page then loads attention and token influence (a replay on the server); wait for
        # them, so the next round starts on an idle server, and say how long the whole page took.
        page.wait_for_load_state("networkidle", timeout=300_000)
        settled_s = page.evaluate("performance.now()") / 1000
        hover_ms, roundtrip_ms = hover_times(page, hovers)
        return {
            "open": {"page_s": page_s, "wall_s": wall, "settled_s": settled_s},
            "hover_ms": hover_ms,
            "hover_roundtrip_ms": roundtrip_ms,
        }
    finally:
        context.close()


def hover_times(page: Any, n: int) -> tuple[list[float], list[float]]:
    cells = page.locator('[data-testid="heatmap-cell"]')
    total = cells.count()
    in_page, roundtrip = [], []
    for i in range(n):
        cell = cells.nth((i * 997) % total)  # spread over the grid
        cell.scroll_into_view_if_needed()
        box = cell.bounding_box()
        page.mouse.move(0, 0)
        before = page.evaluate("window.__mf.hovers.length")
        start = time.perf_counter()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.wait_for_function(f"window.__mf.hovers.length > {before}", timeout=10_000, polling="raf")
        roundtrip.append(1000 * (time.perf_counter() - start))
        in_page.append(page.evaluate("window.__mf.hovers[window.__mf.hovers.length - 1]"))
    return in_page, roundtrip


# -- output ----------------------------------------------------------------------------------
def render_table(data: dict[str, Any]) -> str:
    r, h, rep, load_ = data["render"], data["hover"], data["report"], data["cube_load"]
    la = " → ".join(
        ", ".join(f"{x:.1f}" for x in data[key]) for key in ("load_average_1_5_15_start", "load_average_1_5_15")
    )
    header = (
        f"SmolLM2-135M bundle, {TOKENS} tokens × 30 layers (head granularity), headless Chromium "
        f"({CHROMIUM}), {data['rounds']} interleaved rounds after one warm-up, {data['cpus']} CPUs, "
        f"load average {la} (1/5/15 min, start → end), commit {data['commit']}.\n\n"
    )
    rows = [
        [
            "first meaningful render of /bundle/… (navigation → heatmap drawn)",
            f"{r['median_s']:.2f} s (max {r['max_s']:.2f}; Python wall {r['wall_median_s']:.2f}; whole page with "
            f"attention + influence settled {r['settled_median_s']:.2f}, server + worker CPU per open "
            f"{r['server_cpu_median_s']:.2f} s)",
            f"≤ {RENDER_TARGET_S:.0f} s",
            "yes" if r["meets_target"] else "NO",
        ],
        [
            "hover → tooltip (mouseover → frame after the tooltip shows)",
            f"{h['median_ms']:.1f} ms (max {h['max_ms']:.1f}; with Playwright round trip {h['roundtrip_median_ms']:.1f})",
            f"≤ {HOVER_TARGET_MS:.0f} ms",
            "yes" if h["meets_target"] else "NO",
        ],
        [
            f"cube endpoint, {load_['clients']} concurrent clients, {load_['requests']} requests",
            f"p50 {load_['p50_ms']:.0f} ms, p95 {load_['p95_ms']:.0f} ms, p99 {load_['p99_ms']:.0f} ms; "
            f"{load_['requests_per_s']:.0f} req/s, {load_['failures']} failed; CPU server {load_['server_cpu_s']:.1f} s, "
            f"client {load_['client_cpu_s']:.1f} s "
            f"in {load_['wall_s']:.1f} s wall; {load_['response_bytes'] / 1e3:.0f} kB each",
            "—",
            "—",
        ],
    ]
    if rep["measured"]:
        rows.append(
            [
                "offline report.html: size / write / open from file:// to heatmap drawn",
                f"{rep['bytes'] / 1e6:.2f} MB / {rep['write_s']:.1f} s (CLI, incl. imports) / {rep['median_s']:.2f} s "
                f"(max {rep['max_s']:.2f})",
                "< 3 MB (issue 18: typical)",
                "yes" if rep["bytes"] < 3e6 else "NO",
            ]
        )
    else:
        rows.append(["offline report.html", f"not measured: {rep['reason']}", "< 3 MB", "—"])
    return header + markdown_table(["measure", "median", "target", "met"], rows)


if __name__ == "__main__":
    main()
