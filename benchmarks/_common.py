"""Shared helpers for the side-by-side benchmarks: timing, tables, result files."""

from __future__ import annotations

import functools
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


@functools.cache
def commit() -> str:
    """The short commit the run measures, and whether the tree had changes beyond result files:
    read once, when a benchmark imports this module (a commit made while a long benchmark runs
    is not the code it measured)."""
    try:
        here = Path(__file__).parent
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        )
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True, cwd=here)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line for line in status.stdout.splitlines() if "benchmarks/results/" not in line]
    return head.stdout.strip() + (" with uncommitted changes in the tree" if changed else "")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(
    conditions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Run every condition once per round, ``repeats`` rounds, so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in conditions.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(repeats):
        for name, fn in conditions.items():
            times[name].append(timed(fn))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "platform": platform.platform(),
    }


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(table + "\n")


SMOLLM2_TEXT = "The flight recorder captures every layer of the model while it runs. " * 20


def smollm2_prompt(tokens: int) -> tuple[Any, torch.Tensor]:
    """SmolLM2 (the real weights, seeded) and the first ``tokens`` ids of the shared benchmark text."""
    from model_forensics.models.loading import load

    torch.manual_seed(0)
    loaded = load("smollm2", progress=False)
    ids = loaded.tokenizer(SMOLLM2_TEXT, return_tensors="pt")["input_ids"][:, :tokens]
    return loaded, ids


def tl_zero_head(h: int, d_head: int) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A TransformerLens ``hook_z`` hook zeroing query head ``h`` (z as (B, T, heads, d_head)
    or flattened (B, T, heads·d_head), as TransformerBridge gives it)."""

    def zero(z: torch.Tensor, hook: Any) -> torch.Tensor:
        if z.dim() == 4:
            z[:, :, h] = 0
        else:
            z[..., h * d_head : (h + 1) * d_head] = 0
        return z

    return zero


def smollm2_cca_arguments(parser: Any) -> None:
    """The CausalCCA sizes the SmolLM2 analysis benchmarks take from the command line."""
    parser.add_argument("--search-variants", type=int, default=4)
    parser.add_argument("--confirm-variants", type=int, default=4)
    parser.add_argument("--refine-rounds", type=int, default=1)


def smollm2_cca(args: Any) -> Any:
    """CausalCCA as the SmolLM2 analysis benchmarks run it (sizes from
    :func:`smollm2_cca_arguments`, the 16 best candidates confirmed)."""
    from model_forensics import CausalCCA

    return CausalCCA(
        search_variants=args.search_variants,
        confirm_variants=args.confirm_variants,
        refine_rounds=args.refine_rounds,
        confirm_top=16,
    )


SMOLLM2_TARGETS = {"failing flipped": 0.8, "benign kept": 0.9, "near-miss kept": 0.8}
"""Issue 15's held-out targets for the SmolLM2 injection fix."""
SMOLLM2_KINDS = ("variants", "near_miss", "benign")
"""The prompt kinds the SmolLM2 experiments evaluate: failing variants, near misses, benign."""


def meets_targets(entry: dict[str, Any], part: str) -> bool:
    """Whether a configuration's rates on ``part`` (search, held_out) reach every target."""
    return all(entry[part][k] >= v for k, v in SMOLLM2_TARGETS.items())


def smollm2_split_prompts(tmp: Path, kinds: tuple[str, ...]) -> tuple[Any, Any, dict[tuple[str, str], list[Any]]]:
    """The SmolLM2 injection incident recorded into ``tmp`` and replayed, its prompts split
    as ``analyze`` splits them (CausalCCA's ``held_out_fraction`` and ``split_seed``), and
    each part's prompts of ``kinds`` encoded: ``(session, split, {(part, kind): [inputs]})``,
    the incident itself first among the search part's variants."""
    from model_forensics import CausalCCA, SandboxReplayer
    from model_forensics.rca.heldout import split_prompts
    from model_forensics.scenarios import get

    bundle = get("smollm2-injection").record(tmp, limit=1).incidents[0]
    session = SandboxReplayer().load_bundle(bundle)
    config = CausalCCA().config
    split = split_prompts(session.extras, config.held_out_fraction, config.split_seed)
    batches = {
        (part, kind): [session.encode(e) for e in entries.get(kind, [])]
        for part, entries in (("search", split.search), ("held_out", split.held_out))
        for kind in kinds
    }
    batches[("search", "variants")].insert(0, session.inputs)  # the incident is a search variant
    return session, split, batches


def smollm2_grid() -> Any:
    """``scripts/search_smollm2_injection.py`` as a module: the SmolLM2 scenario's prompt grid
    (``TASKS``, ``TEXTS``, ``build_prompt``, ``build_candidates``)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts/search_smollm2_injection.py"
    spec = importlib.util.spec_from_file_location("search_smollm2_injection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_step_logits(result: Any) -> torch.Tensor:
    """A run's scores at its first generation step (its logits for a forward run)."""
    steps = result.outputs.get("logits")
    return steps[0] if steps is not None and steps.dim() == 2 else result.logits


def stage_figures(wall: float, cpu: float, passes: int) -> dict[str, float]:
    """Wall and CPU seconds since ``wall`` / ``cpu`` (perf_counter, process_time), and ``passes``."""
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu, "forward_passes": passes}


commit()  # the code this process imported
