"""Compression forensics on real SmolLM2-135M: the seed's features (full SVDs, per-unit
leave-one-out loops) against the current ones (smaller-side Gram spectra, heads batched,
vectorised leave-one-out), side by side on the same captured activations.

The incident of ``smollm2-injection`` and its benign reference runs are captured once per
run (every layer site and every head's slice of ``attn.z``, as CF reads them); on each run
both feature implementations are timed in alternating order (CPU time), then both scoring
implementations on all runs' features. Exactness: the largest difference of any feature
and of any unit's score, and whether the flagged units are the same. The relative ranker's
whole analysis is timed once beside the features ranker's.

Run: .venv/bin/python benchmarks/cf_features.py   → benchmarks/results/cf_features.{json,md}
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import commit, machine, markdown_table, write_results
from model_forensics import CompressionForensics, SandboxReplayer
from model_forensics.rca import compression
from model_forensics.rca.features import compressed_ratio, topk_energy
from model_forensics.rca.runs import baseline_inputs, capture


def seed_spectral_entropy(x: torch.Tensor) -> float:
    """The seed's spectral entropy: a full SVD of the centred tensor."""
    x = x.float()
    if min(x.shape) < 2:
        return 0.0
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    energy = s.square()
    total = float(energy.sum())
    if total <= 0:
        return 0.0
    p = energy / total
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(min(x.shape))


def seed_features(x: torch.Tensor) -> dict[str, float]:
    x = x.reshape(x.shape[0], -1)
    return {
        "compressed_ratio": compressed_ratio(x),
        "spectral_entropy": seed_spectral_entropy(x),
        "topk_energy": topk_energy(x),
    }


def seed_unit_features(sites: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for site, x in sites.items():
        kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
        if kind in ("attn", "mlp", "resid_post") or site == "embed":
            out[site] = seed_features(x)
        elif kind == "attn.z":
            for h in range(x.shape[1]):
                out[site.removesuffix(".z") + f".head.{h}"] = seed_features(x[:, h])
    return out


def seed_robust_z(values: np.ndarray, ref: np.ndarray) -> np.ndarray:
    med = np.median(ref, axis=0)
    mad = np.median(np.abs(ref - med), axis=0) * 1.4826
    return np.asarray((values - med) / np.maximum(mad, 1e-6 + 1e-3 * np.abs(med)))


def seed_loo_scores(ref: np.ndarray) -> np.ndarray:
    return np.array([np.abs(seed_robust_z(ref[i], np.delete(ref, i, axis=0))).max() for i in range(len(ref))])


def score_all(incident: dict[str, Any], reference: list[dict[str, Any]], seed: bool) -> tuple[list[Any], float]:
    """Every unit's Anomaly with the seed's or the current leave-one-out scoring; CPU s."""
    cf = CompressionForensics()
    alpha = math.erfc(cf.config.anomaly_threshold / math.sqrt(2))
    saved = compression._loo_scores, compression._robust_z
    if seed:
        compression._loo_scores, compression._robust_z = seed_loo_scores, seed_robust_z
    try:
        start = time.process_time()
        out = [cf._score(u, incident[u], [r[u] for r in reference], alpha) for u in incident]
        return out, time.process_time() - start
    finally:
        compression._loo_scores, compression._robust_z = saved


def main() -> None:
    from model_forensics.scenarios import get

    torch.manual_seed(0)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        session = SandboxReplayer().load_bundle(bundle)
        runs = [session.inputs, *baseline_inputs(session)]
        cpu = {"seed": 0.0, "current": 0.0}
        feats: dict[str, list[dict[str, Any]]] = {"seed": [], "current": []}
        capture_cpu = 0.0
        for i, batch in enumerate(runs):
            start = time.process_time()
            sites = capture(session, batch, "layer", ["blocks.*.attn.z"])
            capture_cpu += time.process_time() - start
            order = ("seed", "current") if i % 2 == 0 else ("current", "seed")
            for name in order:
                fn = seed_unit_features if name == "seed" else lambda s: compression.unit_features(s, heads=True)
                start = time.process_time()
                feats[name].append(fn(sites))
                cpu[name] += time.process_time() - start
        diff = max(
            abs(a[u][f] - b[u][f])
            for a, b in zip(feats["seed"], feats["current"], strict=True)
            for u in a
            for f in a[u]
        )
        scored = {name: score_all(f[0], f[1:], seed=name == "seed") for name, f in feats.items()}
        score_diff = max(abs(a.score - b.score) for a, b in zip(scored["seed"][0], scored["current"][0], strict=True))
        same_flags = [a.flagged for a in scored["seed"][0]] == [b.flagged for b in scored["current"][0]]
        whole = {}
        for ranker in ("features", "relative"):
            fresh = SandboxReplayer().load_bundle(bundle)
            start, wall = time.process_time(), time.perf_counter()
            report = CompressionForensics(ranker=ranker).analyze(fresh)
            whole[ranker] = {
                "cpu_seconds": time.process_time() - start,
                "wall_seconds": time.perf_counter() - wall,
                "forward_passes": report.forward_passes,
                "flagged": len(report.flagged),
                "units": len(report),
                "held_out_false_positive_rate": report.false_positive_rate,
            }
    units = len(feats["current"][0])
    data = {
        "machine": machine(),
        "commit": commit(),
        "load_average": [load_start, os.getloadavg()],
        "runs": len(runs),
        "units_per_run": units,
        "prompt_tokens": session.prompt_len,
        "capture_cpu_seconds": capture_cpu,
        "features_cpu_seconds": cpu,
        "scoring_cpu_seconds": {name: s[1] for name, s in scored.items()},
        "max_feature_difference": diff,
        "max_score_difference": score_diff,
        "same_flags": same_flags,
        "analyze": whole,
    }
    rows = [
        ["features (all runs)", f"{cpu['seed']:.1f}", f"{cpu['current']:.1f}", f"{cpu['seed'] / cpu['current']:.1f}×"],
        [
            "scoring (leave-one-out, all units)",
            f"{scored['seed'][1]:.1f}",
            f"{scored['current'][1]:.1f}",
            f"{scored['seed'][1] / scored['current'][1]:.1f}×",
        ],
        ["capturing the runs (both, once)", f"{capture_cpu:.1f}", f"{capture_cpu:.1f}", "1.0×"],
    ]
    table = (
        "# Compression forensics cost on SmolLM2-135M (benchmarks/cf_features.py)\n\n"
        f"Commit {data['commit']}; {data['machine']['threads']} torch thread(s); load average "
        f"{load_start[0]:.1f} → {os.getloadavg()[0]:.1f} (the machine is shared with other jobs; CPU seconds, "
        f"measured side by side in one process on the same captured tensors, alternating order per run).\n\n"
        f"{len(runs)} runs (the incident and its benign reference set), {units} units per run "
        f"(embed, 30 × attn/mlp/resid_post, 270 heads), {session.prompt_len} prompt tokens.\n\n"
    )
    table += markdown_table(["part", "seed CPU s", "current CPU s", "speed-up"], rows)
    table += (
        f"\n\nExactness: largest feature difference {diff:.2g}, largest unit-score difference {score_diff:.2g}, "
        f"flagged units {'identical' if same_flags else 'DIFFERENT'}.\n\n"
    )
    table += markdown_table(
        ["ranker", "analyze CPU s", "wall s", "forward passes", "units scored", "flagged", "held-out FPR"],
        [
            [
                k,
                f"{v['cpu_seconds']:.1f}",
                f"{v['wall_seconds']:.1f}",
                v["forward_passes"],
                v["units"],
                v["flagged"],
                "n/a" if v["held_out_false_positive_rate"] is None else f"{v['held_out_false_positive_rate']:.1%}",
            ]
            for k, v in whole.items()
        ],
    )
    print(table)
    write_results("cf_features", data, table)


if __name__ == "__main__":
    main()
