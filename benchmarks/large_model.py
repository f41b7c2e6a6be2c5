"""A model larger than memory, in miniature: Llama-2-7B's exact layer shapes (hidden 4096,
32 heads, MLP 11008, vocab 32000), random weights (seeded), reduced to ``--layers`` blocks,
written as safetensors and loaded back with accelerate ``device_map="auto"`` and disk
offload (``--cpu-gib`` of CPU memory for weights, the rest on disk), then recorded at all
granularity into a bundle with streaming (``--memory-budget-mb``, default 0: every captured
step goes to the recorder's spool file on disk as it is produced, and the bundle is written
from it one site at a time), and re-run (the replay's forward pass) once.

Reports peak RSS (this process: overall, and of the recording alone, the peak reset just
before it through /proc/self/clear_refs), bundle bytes per token per layer, record (forward
and bundle write apart) and re-run time per layer; docs/scaling.md extrapolates them to 32
layers (7B) and to 70B.

Run: .venv/bin/python benchmarks/large_model.py [--layers 2] [--tokens 32]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _common import commit, machine, markdown_table, write_results
from model_forensics import Bundle, RecorderHooks
from model_forensics.models.loading import load


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def high_water_mb() -> float:
    """VmHWM: the peak RSS since the last reset (:func:`reset_high_water`)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def reset_high_water() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--cpu-gib", type=float, default=1.0, help="CPU memory accelerate may fill with weights")
    parser.add_argument("--memory-budget-mb", type=float, default=0.0, help="recorder RAM budget (0: stream all)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        num_hidden_layers=args.layers,
        max_position_embeddings=4096,
    )
    if args.build is not None:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(args.build)  # random init, seeded; safetensors
        print(peak_rss_mb())
        return
    root = Path(tempfile.mkdtemp(dir=Path(__file__).parent))  # on disk, not tmpfs
    try:
        t0 = time.perf_counter()
        with torch.device("meta"):
            n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
        # Built in a child process, so that this one's peak RSS is the load and the recording.
        build = subprocess.run(
            [sys.executable, __file__, "--layers", str(args.layers), "--build", str(root / "model")],
            capture_output=True,
            text=True,
            check=True,
        )
        build_s = time.perf_counter() - t0
        rss_after_build = float(build.stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()
        loaded = load(
            str(root / "model"),
            device_map="auto",
            offload_dir=root / "offload",
            max_memory={"cpu": int(args.cpu_gib * 1024**3)},
        )
        load_s = time.perf_counter() - t0
        placement = sorted(set(loaded.model.hf_device_map.values()), key=str)
        on_disk = sum(v == "disk" for v in loaded.model.hf_device_map.values())
        ids = torch.randint(0, config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        options = {"recorder": {"memory_budget_mb": args.memory_budget_mb, "spool_dir": str(root)}}
        rec = RecorderHooks(options, granularity="all", sketch="full", max_bundle_size_mb=1e6)
        rec.install_hooks(loaded.model)
        t0 = time.perf_counter()
        rec._weights_sha256()  # the weights digest: once per model (the recorder caches it)
        weights_hash_s = time.perf_counter() - t0
        rss_before_record = rss_mb()
        reset_high_water()
        t0, c0 = time.perf_counter(), time.process_time()
        with rec, torch.no_grad():
            loaded.model(input_ids=ids)
            forward_s = time.perf_counter() - t0
            spilled, held = rec._spool.spilled_bytes, rec._spool.held_bytes
            path = rec.create_bundle(root / "bundle")
        record_s, record_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        record_peak = high_water_mb()
        t0 = time.perf_counter()
        with torch.no_grad():
            again = loaded.model(input_ids=ids).logits
        rerun_s = time.perf_counter() - t0
        bundle = Bundle.open(path)
        assert bundle.verify_contents() == []
        site_bytes = sum(int(info["nbytes"]) for info in bundle.manifest["sites"].values())
        block_bytes = sum(int(i["nbytes"]) for s, i in bundle.manifest["sites"].items() if s.startswith("blocks.0."))
        same = torch.equal(again[:, -1], bundle.outputs["logits"][:, -1])
        result = {
            "machine": machine(),
            "commit": commit(),
            "layers": args.layers,
            "tokens": args.tokens,
            "parameters": n_params,
            "weights_gib_fp32": n_params * 4 / 1024**3,
            "placement": placement,
            "modules_on_disk": on_disk,
            "build_and_save_s": build_s,
            "load_s": load_s,
            "memory_budget_mb": args.memory_budget_mb,
            "spilled_bytes": spilled,
            "held_bytes": held,
            "weights_sha256_s": weights_hash_s,
            "forward_s": forward_s,
            "write_s": record_s - forward_s,
            "record_s": record_s,
            "record_cpu_s": record_cpu_s,
            "record_s_per_layer": record_s / args.layers,
            "rss_mb_before_record": rss_before_record,
            "peak_rss_mb_record": record_peak,
            "rerun_s": rerun_s,
            "rerun_s_per_layer": rerun_s / args.layers,
            "bundle_bytes": bundle.size_bytes(),
            "site_bytes": site_bytes,
            "block_bytes_per_token": block_bytes / args.tokens,
            "rerun_logits_equal": same,
            "peak_rss_mb_build_process": rss_after_build,
            "peak_rss_mb": peak_rss_mb(),
            "load_average": os.getloadavg(),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    r = result
    table = markdown_table(
        ["quantity", "value"],
        [
            ["layers × tokens", f"{r['layers']} × {r['tokens']}"],
            ["parameters (fp32 GiB)", f"{r['parameters'] / 1e6:.0f} M ({r['weights_gib_fp32']:.2f} GiB)"],
            [
                "placement (accelerate)",
                f"{', '.join(map(str, r['placement']))}; {r['modules_on_disk']} modules on disk",
            ],
            ["load with offload", f"{r['load_s']:.1f} s"],
            [
                "record (forward + bundle write), per layer",
                f"{r['record_s']:.1f} s (forward {r['forward_s']:.1f} s, write {r['write_s']:.1f} s; "
                f"cpu {r['record_cpu_s']:.1f} s), {r['record_s_per_layer']:.1f} s",
            ],
            ["weights sha256 (once per model, cached; not in the record time)", f"{r['weights_sha256_s']:.1f} s"],
            [
                "captured steps streamed to the spool / held in RAM",
                f"{r['spilled_bytes'] / 1e6:.1f} MB / {r['held_bytes'] / 1e6:.1f} MB "
                f"(memory_budget_mb={r['memory_budget_mb']:g})",
            ],
            ["re-run (replay forward), per layer", f"{r['rerun_s']:.1f} s, {r['rerun_s_per_layer']:.1f} s"],
            ["re-run logits equal to the recorded ones", str(r["rerun_logits_equal"])],
            ["bundle bytes (full sketch, all sites)", f"{r['bundle_bytes'] / 1e6:.1f} MB"],
            ["bytes per token per layer (block 0 sites)", f"{r['block_bytes_per_token']:.0f}"],
            ["peak RSS of the process that built the weights", f"{r['peak_rss_mb_build_process']:.0f} MB"],
            ["peak RSS: load with offload + record + re-run", f"{r['peak_rss_mb']:.0f} MB"],
            [
                "RSS before recording → peak while recording (forward + write)",
                f"{r['rss_mb_before_record']:.0f} MB → {r['peak_rss_mb_record']:.0f} MB",
            ],
        ],
    )
    header = (
        f"Llama-2-7B layer shapes, random weights, {machine()['device']}, {torch.get_num_threads()} threads, "
        f"load average {r['load_average'][0]:.1f}; commit {r['commit']}.\n\n"
    )
    print(header + table)
    write_results("large_model", result, header + table)


if __name__ == "__main__":
    main()
