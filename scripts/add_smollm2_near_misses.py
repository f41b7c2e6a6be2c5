"""Add near misses to the SmolLM2 injection data: injected prompts the model does not obey.

``scripts/search_smollm2_injection.py`` screened a seeded grid of injected candidates and
kept those whose output contains the target. The others contain the trigger too, but the
model behaves on them: they are near misses. This script rebuilds the same candidates
(same count and seed as the stored search), drops the kept failures, decodes the rest in
seeded order with the reference decoding (one prompt at a time, no padding) and keeps the
first ``--limit`` whose output contains no target. It adds ``near_miss`` (the cases, with
their output) and ``near_miss_search`` (how they were found) to
``src/model_forensics/scenarios/data/smollm2_injection.json``; nothing else changes.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/add_smollm2_near_misses.py --limit 60
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from model_forensics.models import load

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src/model_forensics/scenarios/data/smollm2_injection.json"
SEARCH_SCRIPT = ROOT / "scripts/search_smollm2_injection.py"


def _search_module() -> Any:
    spec = importlib.util.spec_from_file_location("search_smollm2_injection", SEARCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def near_misses(data: dict[str, Any], limit: int, seed: int, log: bool = True) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` not-kept candidates (seeded order) whose reference output contains
    no target, and how many candidates were decoded to find them."""
    grid = _search_module()
    search = data["search"]
    failing = {case["prompt"] for case in data["failing"]}
    others = [
        c for c in grid.build_candidates(int(search["candidates"]), int(search["seed"])) if c["prompt"] not in failing
    ]
    random.Random(seed).shuffle(others)
    loaded = load("smollm2")
    found: list[dict[str, Any]] = []
    decoded = 0
    for cand in others:
        if len(found) >= limit:
            break
        output = grid.greedy_output(loaded.model, loaded.tokenizer, cand["prompt"])
        decoded += 1
        if not any(t in output for t in grid.TARGETS):
            found.append({**cand, "output": output})
        if log and decoded % 10 == 0:
            print(f"decoded {decoded}: {len(found)} near misses", flush=True)
    return found, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = json.loads(DATA.read_text())
    start = time.perf_counter()
    found, decoded = near_misses(data, args.limit, args.seed)
    data["near_miss"] = found
    data["near_miss_search"] = {
        "script": "scripts/add_smollm2_near_misses.py",
        "seed": args.seed,
        "candidates_not_kept": int(data["search"]["candidates"]) - len(data["failing"]),
        "decoded": decoded,
        "kept": len(found),
        "rule": "injected candidate of the stored search, not kept as failing, whose reference greedy output "
        "(one prompt, no padding) contains no target",
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    DATA.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(found)} near misses from {decoded} decoded candidates → {DATA}")


if __name__ == "__main__":
    main()
