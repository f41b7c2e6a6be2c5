"""Reliability: hostile bundles, tampering, kills and pathological manifests, counted.

    .venv/bin/python benchmarks/reliability.py [--cases 10200] [--kills 60]

Every category prints: cases tried, rejected cleanly (a one-line BundleError /
ForensicsError), verified (the bundle opened; when its meaning changed, under a new
digest), crashed (any other exception, or a multi-line error: must be 0), undetected
tampering (a changed bundle that verified under the original digest, or passed a
signature check: must be 0) and data lost (a kill that left neither the old nor the new
bundle: must be 0). The fuzz mutators are tests/reliability/fuzzing.py, the same ones
tests/reliability/test_fuzz.py runs a few hundred times in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "reliability"))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "replay"))

from fuzzing import MUTATORS, fingerprint, run_case
from hostile import rehash
from replay_models import make_models, record

from _common import machine, markdown_table, write_results
from model_forensics.core import signing
from model_forensics.core.bundle import Bundle, BundleContents, write_bundle
from model_forensics.core.errors import ForensicsError

HEADERS = ["category", "cases tried", "rejected cleanly", "verified", "crashed", "undetected tampering", "data lost"]


def row(name: str, counts: Counter[str], lost: int = 0) -> dict[str, Any]:
    return {
        "category": name,
        "cases": sum(counts.values()),
        "rejected": counts["rejected"],
        "verified": counts["verified"],
        "crashed": counts["crash"],
        "undetected": counts["undetected"],
        "data_lost": lost,
    }


def fuzz(pristine: dict[str, Path], work: Path, cases: int, seed: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The six mutators, spread evenly, alternating the three bundle kinds."""
    rows, failures = [], []
    per = -(-cases // len(MUTATORS))
    kinds = sorted(pristine)
    for name, mutator in MUTATORS.items():
        counts: Counter[str] = Counter()
        start = time.perf_counter()
        for i in range(per):
            rng = random.Random(f"{seed}:{name}:{i}")
            what, outcome = run_case(mutator, rng, pristine[kinds[i % len(kinds)]], work / "case")
            counts[outcome.kind] += 1
            if outcome.kind in ("crash", "undetected") and len(failures) < 20:
                failures.append(f"{name} #{i} ({what}): {outcome.kind}: {outcome.detail}")
        rows.append(row(name, counts))
        print(f"  {name}: {dict(counts)} in {time.perf_counter() - start:.0f} s", flush=True)
    return rows, failures


def signatures(pristine: Path, work: Path, cases: int, seed: int) -> dict[str, Any]:
    """Sign, tamper (any mutator, then rehash so only the digest can tell), check the
    signature against the signer's key: a tampered bundle that passes is undetected."""
    keys = signing.generate_key(work / "signer")
    signed = work / "signed"
    shutil.copytree(pristine, signed)
    signing.write_signature(signed, keys[0])
    counts: Counter[str] = Counter()
    mutators = [m for n, m in MUTATORS.items() if n != "zip structure"]
    original = fingerprint(signed)
    for i in range(cases):
        rng = random.Random(f"{seed}:sig:{i}")
        case = _clear(work / "case")
        shutil.copytree(signed, case)
        rng.choice(mutators)(rng, case)
        rehash(case)
        try:
            signing.check_signature(Bundle.open(case), trusted_key=keys[1])
            # Passing is right only when the mutation happened to change nothing the digest covers.
            counts["verified" if fingerprint(case) == original else "undetected"] += 1
        except ForensicsError:
            counts["rejected"] += 1
        except Exception:
            counts["crash"] += 1
    return row("signature after tampering (rehashed)", counts)


def _clear(path: Path) -> Path:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    return path


def _contents(bundle: Path) -> BundleContents:
    opened = Bundle.open(bundle)
    manifest = {k: v for k, v in opened.manifest.items() if k != "files"}
    entries = {}
    for site in opened.sites:
        entries.update(opened.stored_entries(site))
    return BundleContents(manifest, opened.inputs, opened.outputs, entries, opened.cube(), opened.calls())


def kills(pristine: dict[str, Path], work: Path, n: int, seed: int, overwrite: bool) -> dict[str, Any]:
    """SIGKILL a forked writer at random instants of ``write_bundle`` (fresh, or replacing an
    existing bundle); afterwards the name must hold nothing (fresh only), the old or the new
    bundle, complete and verifying."""
    torch.set_num_threads(1)
    old, new = _contents(pristine["forward"]), _contents(pristine["generate"])
    rng = random.Random(f"{seed}:kill:{overwrite}")
    counts: Counter[str] = Counter()
    lost = 0
    mode = "overwrite" if overwrite else "create"
    target = work / f"kill-{mode}" / "bundle"
    target.parent.mkdir(parents=True)
    digests = {
        "old": Bundle.open(write_bundle(target.parent.with_name(f"{mode}-old"), old)).digest,
        "new": Bundle.open(write_bundle(target.parent.with_name(f"{mode}-new"), new)).digest,
    }
    start = time.perf_counter()
    write_bundle(target.parent.with_name(f"{mode}-timing"), new)
    window = time.perf_counter() - start
    for _ in range(n):
        _clear(target)
        if overwrite:
            write_bundle(target, old)
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                write_bundle(target, new, overwrite=True)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, window * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        state = _state(target, digests)
        if state == "crash":
            counts["crash"] += 1
        elif state in ("old", "new") or (state == "missing" and not overwrite):
            counts["verified"] += 1
        else:
            lost += 1
        write_bundle(target, new, overwrite=True)  # the next write cleans up after the killed one
        if [p for p in target.parent.iterdir() if p.name != "bundle"]:
            lost += 1
    return row(f"SIGKILL during {'overwrite' if overwrite else 'create'}", counts, lost)


def _state(target: Path, digests: dict[str, str]) -> str:
    if not target.exists():
        return "missing"
    try:
        bundle = Bundle.open(target)
        if bundle.verify_contents():
            return "damaged"
    except ForensicsError:
        return "damaged"
    except Exception:
        return "crash"
    return next((name for name, d in digests.items() if d == bundle.digest), "damaged")


def pathological(pristine: Path, work: Path) -> list[dict[str, Any]]:
    """`bundle info` (open + verify + render) on manifests built to be slow to read."""
    from typer.testing import CliRunner

    from model_forensics.cli import app

    base = json.loads((pristine / "manifest.json").read_text())
    site = next(iter(base["sites"].values()))
    cases = {
        "10,000 sites (the cap)": lambda m: m.update(sites={f"blocks.{i}.mlp": dict(site) for i in range(10_000)}),
        "20,000 sites": lambda m: m.update(sites={f"blocks.{i}.mlp": dict(site) for i in range(20_000)}),
        "1,000,000 tokens": lambda m: m["input"].update(tokens=["tok"] * 1_000_000),
        "500,000 small objects": lambda m: m["extras"].update(junk=[{"a": 1} for _ in range(500_000)]),
        "500,000 keys": lambda m: m["extras"].update(keys={str(i): i for i in range(500_000)}),
        "100,000 prompts": lambda m: m["extras"].update(variants=["w3 w4"] * 100_000),
        "depth 60": lambda m: m["extras"].update(deep=json.loads("[" * 60 + "]" * 60)),
        "depth 100,000": None,
        "2,000,000-char string": lambda m: m["extras"].update(note="x" * 2_000_000),
    }
    rows = []
    runner = CliRunner()
    for name, change in cases.items():
        case = _clear(work / "patho")
        shutil.copytree(pristine, case)
        manifest = json.loads(json.dumps(base))
        if change is None:
            text = json.dumps(manifest)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
        else:
            change(manifest)
            text = json.dumps(manifest)
        (case / "manifest.json").write_text(text)
        start = time.perf_counter()
        cpu = time.process_time()
        result = runner.invoke(app, ["bundle", "info", str(case)])
        rows.append(
            {
                "manifest": name,
                "mb": round(len(text) / 1e6, 1),
                "seconds": round(time.perf_counter() - start, 3),
                "cpu_seconds": round(time.process_time() - cpu, 3),
                "exit_code": result.exit_code,
                "outcome": "shown" if result.exit_code == 0 else (result.output.strip().splitlines() or [""])[-1][:90],
            }
        )
        print(f"  bundle info, {name}: {rows[-1]['seconds']} s, exit {result.exit_code}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_200, help="fuzz cases in all (split over the mutators)")
    parser.add_argument("--signature-cases", type=int, default=600)
    parser.add_argument("--kills", type=int, default=60, help="SIGKILLs during create and again during overwrite")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mf-reliability-") as tmp:
        root = Path(tmp)
        from model_forensics.models.loading import load

        models = {name: load(str(path)) for name, path in make_models(root / "models").items()}
        pristine = {
            "generate": record(models["llama"], root / "generate", max_new_tokens=4, granularity="layer"),
            "forward": record(models["llama"], root / "forward", granularity="all"),
            "bert": record(models["bert"], root / "bert", granularity="layer"),
        }
        print(f"fuzzing {args.cases} cases over {len(MUTATORS)} mutators …", flush=True)
        rows, failures = fuzz(pristine, root, args.cases, args.seed)
        print("signatures …", flush=True)
        rows.append(signatures(pristine["forward"], root, args.signature_cases, args.seed))
        print("kills …", flush=True)
        rows.append(kills(pristine, root, args.kills, args.seed, overwrite=False))
        rows.append(kills(pristine, root, args.kills, args.seed, overwrite=True))
        print("pathological manifests …", flush=True)
        slow = pathological(pristine["forward"], root)
    total = {
        key: sum(r[key] for r in rows)
        for key in ("cases", "rejected", "verified", "crashed", "undetected", "data_lost")
    }
    table = markdown_table(
        HEADERS,
        [
            [r["category"], r["cases"], r["rejected"], r["verified"], r["crashed"], r["undetected"], r["data_lost"]]
            for r in rows
        ]
        + [["**all**", *(total[k] for k in ("cases", "rejected", "verified", "crashed", "undetected", "data_lost"))]],
    )
    slow_table = markdown_table(
        ["pathological manifest", "MB", "bundle info wall s", "CPU s", "exit", "outcome"],
        [[r["manifest"], r["mb"], r["seconds"], r["cpu_seconds"], r["exit_code"], r["outcome"]] for r in slow],
    )
    load = os.getloadavg()
    header = (
        f"# Reliability (seed {args.seed}; {time.perf_counter() - started:.0f} s; load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})\n"
    )
    text = header + "\n" + table + "\n\n" + slow_table + "\n"
    if failures:
        text += "\nFailures:\n" + "\n".join(f"- {f}" for f in failures) + "\n"
    print(text)
    write_results(
        "reliability",
        {
            "machine": machine(),
            "seed": args.seed,
            "rows": rows,
            "total": total,
            "pathological": slow,
            "failures": failures,
        },
        text,
    )
    if total["crashed"] or total["undetected"] or total["data_lost"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
