"""Browser tests: zoo bundles recorded once, `model-forensics serve` on a free loopback port,
Debian's Chromium (``apt-get install -y chromium``; never a Playwright browser download).

Screenshots go to ``$MF_E2E_SCREENSHOTS`` when set (``tests/e2e/screenshots`` keeps the
committed ones: ``MF_E2E_SCREENSHOTS=tests/e2e/screenshots pytest tests/e2e``), else to a
temporary directory, so a test run leaves the checkout unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_served import CHROMIUM, Server, start_server
from playwright.sync_api import Browser, BrowserType, Playwright, sync_playwright


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not Path(CHROMIUM).exists():
        skip = pytest.mark.skip(
            reason=f"no Chromium at {CHROMIUM}: `make test` installs it (apt-get install -y chromium)"
        )
        for item in items:
            if "tests/e2e/" in str(item.path).replace(os.sep, "/"):
                item.add_marker(skip)


# pytest-playwright keeps one Playwright (and its event loop, running in a greenlet) for the
# whole session, and while it lives `asyncio.run` fails in that worker for every later test
# file. Package scope ends it with the browser tests.
@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    pw = sync_playwright().start()
    yield pw
    pw.stop()


@pytest.fixture(scope="package")
def browser_type(playwright: Playwright) -> BrowserType:
    return playwright.chromium


@pytest.fixture(scope="package")
def launch_browser(browser_type_launch_args: dict[str, Any], browser_type: BrowserType) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="package")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    browser = launch_browser()
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright launches Debian's Chromium, headless."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True}


@pytest.fixture(scope="package")
def browser_context_args() -> dict[str, Any]:
    """Every page: a fixed viewport, so screenshots are comparable."""
    return {"viewport": {"width": 1280, "height": 860}}


@pytest.fixture(scope="package")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The served directory: a gpt2-injection incident and its baseline (head granularity,
    so attention patterns exist), a bundle whose model is gone (its analysis fails) and a
    corrupt bundle (manifest cut short)."""
    from model_forensics.scenarios import get

    root = tmp_path_factory.mktemp("served")
    scenario = dataclasses.replace(get("gpt2-injection"), granularity="head")
    run = scenario.record(root, limit=1)
    out = {"incident": run.incidents[0], "baseline": run.baselines[0]}
    out["orphan"] = _orphan_bundle(root, tmp_path_factory.mktemp("gone"))
    corrupt = root / "corrupt"
    shutil.copytree(out["baseline"], corrupt)
    manifest = corrupt / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    out["corrupt"] = corrupt
    out["root"] = root
    return out


def _orphan_bundle(root: Path, model_dir: Path) -> Path:
    """A bundle recorded on a tiny model that is then deleted: analysing it must fail."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from model_forensics import RecorderHooks, token_is
    from model_forensics.models.loading import load

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=32)).save_pretrained(
        model_dir
    )
    loaded = load(str(model_dir))
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        pred = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
    with RecorderHooks(granularity="layer").install_hooks(loaded.model) as rec, torch.no_grad():
        loaded.model(input_ids=ids)
        path = rec.create_bundle(root / "orphan", predicate=token_is(pred))
    shutil.rmtree(model_dir)
    return path


@pytest.fixture(scope="package")
def server(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`model-forensics serve ROOT --port P` on a free 127.0.0.1 port, stopped after."""
    with start_server(bundles["root"], tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        yield srv


@pytest.fixture(scope="package")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are written (see the module docstring)."""
    target = os.environ.get("MF_E2E_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
