"""Many machines, measured on one: prompts/s of an inspector run and of `triage` locally
and on a local Ray cluster of 1 and 2 workers, per worker, plus what the merge costs.

For each cluster size a fresh local cluster is started; one untimed warm-up run lets its
workers import torch and load the model, then local and Ray runs alternate for ``--rounds``
rounds (medians reported). Wall time is the driver's; CPU time is the driver process only
(the workers' CPU is theirs). Ratios are Ray over local, measured side by side.

    python benchmarks/scale.py [--prompts 256] [--bundles 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from _common import commit, machine, markdown_table, median, write_results


def _prompts(n: int) -> list[str]:
    from model_forensics.scenarios.registry import get

    scenario = get("gpt2-injection")
    base = scenario.failing() + [b["prompt"] for b in scenario.benign]
    return [base[i % len(base)] + ("" if i < len(base) else f" ({i})") for i in range(n)]


def _bundles(root: Path, n: int) -> Path:
    from model_forensics import RecorderHooks, token_is
    from model_forensics.models.loading import load

    loaded = load("zoo:gpt2-injection")
    prompts = _prompts(n)
    for i, text in enumerate(prompts):
        ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = int(loaded.model(input_ids=ids).logits[0, -1].argmax())
        with RecorderHooks().install_hooks(loaded.model) as rec, torch.no_grad():
            loaded.model(input_ids=ids)  # fails by its own argmax, as the batch tests' incidents do
            rec.create_bundle(root / f"incident-{i}", predicate=token_is(top), extras={"benign": prompts[:8]})
    return root


def _clock(fn: Any) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--bundles", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import ray

    from model_forensics import ModelInspector
    from model_forensics.models.loading import load
    from model_forensics.rca.pipeline import find_bundles, run_many

    loaded = load("zoo:gpt2-injection")
    prompts = _prompts(args.prompts)
    inspector = ModelInspector(loaded.model, loaded.tokenizer, batch_size=8)
    experiments = ["sparsity", "stats"]  # the streamed experiments: the part Ray distributes
    folder = Path(tempfile.mkdtemp(prefix="scale-bundles-"))
    paths = find_bundles(_bundles(folder, args.bundles))

    def inspect(on_ray: bool) -> Any:
        return inspector.run(prompts, experiments=experiments, ray="local" if on_ray else None)

    def triage(on_ray: bool) -> Any:
        return run_many(paths, search=False, ray="local" if on_ray else None)

    rows, data = [], {"machine": machine(), "runs": []}
    for workers in [int(w) for w in args.workers.split(",")]:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        inspect(True), triage(True)  # warm-up: workers import torch and unpickle the model
        for name, fn, items in (("inspect", inspect, len(prompts)), ("triage", triage, len(paths))):
            times: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
            merge: list[float] = []
            for _ in range(args.rounds):
                for mode in ("local", "ray"):
                    wall, cpu, out = _clock(lambda m=mode, f=fn: f(m == "ray"))
                    times[mode].append((wall, cpu))
                    if mode == "ray" and name == "inspect":
                        merge.append(out.timings.get("merge", 0.0))
            local = median([w for w, _ in times["local"]])
            remote = median([w for w, _ in times["ray"]])
            run = {
                "workload": name,
                "workers": workers,
                "items": items,
                "local_wall_s": local,
                "local_cpu_s": median([c for _, c in times["local"]]),
                "ray_wall_s": remote,
                "ray_driver_cpu_s": median([c for _, c in times["ray"]]),
                "local_items_per_s": items / local,
                "ray_items_per_s": items / remote,
                "ray_items_per_s_per_worker": items / remote / workers,
                "ray_over_local_wall": remote / local,
                "merge_s": median(merge) if merge else None,
                "load_average": os.getloadavg(),
            }
            data["runs"].append(run)
            rows.append(
                [name, workers, items, f"{run['local_items_per_s']:.1f}", f"{run['ray_items_per_s']:.1f}",
                 f"{run['ray_items_per_s_per_worker']:.1f}", f"{run['ray_over_local_wall']:.2f}",
                 "—" if run["merge_s"] is None else f"{1000 * run['merge_s']:.1f} ms",
                 f"{run['local_cpu_s']:.1f} / {run['ray_driver_cpu_s']:.1f}",
                 " ".join(f"{x:.1f}" for x in run["load_average"])]
            )  # fmt: skip
        ray.shutdown()
    label = commit()
    data.update({"commit": label, "rounds": args.rounds})
    table = markdown_table(
        ["workload", "Ray workers", "items", "local items/s", "Ray items/s", "Ray items/s per worker",
         "Ray / local wall", "merge", "CPU s local / Ray driver", "load average"],
        rows,
    )  # fmt: skip
    header = (
        f"# Many machines on one: local vs Ray (commit {label})\n\n"
        f"Medians of {args.rounds} interleaved rounds after one warm-up per cluster; `inspect` streams "
        f"{len(prompts)} prompts (sparsity + stats) on zoo:gpt2-injection, `triage` analyses {len(paths)} "
        "bundles. Items are prompts (inspect) or bundles (triage).\n\n"
    )
    write_results("scale", data, header + table)
    print(header + table)


if __name__ == "__main__":
    main()
