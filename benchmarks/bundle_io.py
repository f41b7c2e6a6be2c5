"""Bundle I/O on SmolLM2 (128 tokens, every site), side by side in one process.

Per sketch (full, fp16, int8, topk) and digest algorithm (``bundle.hash``: blake3, the
default, format 1.3; and sha256, the digests of format 1.2, to show what the algorithm
buys), each round runs six conditions back to back (rounds interleaved, medians over
rounds, CPU time beside wall time):

  write  ours   ``RecorderHooks.create_bundle`` of the recorded run: the recorder's part (site
                table, output logits and their digest, provenance, ActivityCube), then
                ``write_bundle`` (timed apart too): site by site from the spool,
                sketch-encode, each byte hashed once — the stored entries and, for
                fp16/int8/topk, the exact tensor each site's ``sha256`` key names —,
                safetensors files + cube + calls + manifest, fsync, atomic rename
  write  peer   ``safetensors.torch.save_file`` of the very tensors the bundle stores
                (inputs, outputs, encoded activations) + fsync of each file
  write  floor  the least a one-thread writer of this format does, with library calls
                only: each site's exact digest, sketch-encode, each stored entry's
                digest, then the peer's save_file + fsync of the stored tensors (its
                ratio to the peer is the best a serial writer could reach)
  read   ours   ``Bundle.open(verify=False).verify_contents()``: every entry's digest once,
                file and site digests derived from them (and the exact digest for
                ``full``), site checks, cube schema, calls, verdict
  read   peers  a plain sha256 pass and a plain blake3 pass (1 MiB reads, one thread each)
                over the same files

MB/s counts the bundle's bytes on disk. Targets (issue 16): write ≥ 50% of the peer,
read + full verification ≥ 50% of the plain sha256 pass (the table gives the ratio against
the plain blake3 pass too: a blake3 bundle against a hash as fast as its own). Ratios are
the median of the per-round ratios of wall times (throughput ours / peer), and beside them
of CPU times (process CPU, all threads), which a loaded machine distorts less. Also: peak RSS of a child
process that loads SmolLM2 and records it at all granularity (default fp16 sketch), with
the default ``recorder.memory_budget_mb`` and with 0 (every captured step streamed to the
spool file on disk as it is produced).

Run: .venv/bin/python benchmarks/bundle_io.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import torch
from safetensors.torch import save_file

from _common import commit, machine, markdown_table, median, smollm2_prompt, write_results
from model_forensics import Bundle, RecorderHooks
from model_forensics.core import digests, sketches
from model_forensics.recorder import hooks

SKETCHES = ("full", "fp16", "int8", "topk")
FILES = ("inputs.safetensors", "outputs.safetensors", "activations.safetensors", "cube.json", "calls.jsonl")


def _clock(fn: Any) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


class _TimedWriter:
    """``write_bundle`` as the recorder calls it, with the (wall, cpu) seconds of each call kept."""

    def __init__(self) -> None:
        self.real, self.times = hooks.write_bundle, []

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.times.append((time.perf_counter() - wall, time.process_time() - cpu))


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _stored_tensors(rec: RecorderHooks, bundle: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors the bundle stores, per safetensors file, as ``create_bundle`` encodes them."""
    opened = Bundle.open(bundle)
    activations: dict[str, torch.Tensor] = {}
    for site, tensor in rec.recorded().items():
        activations.update(sketches.encode(site, tensor, rec.config.sketch, rec.config.compression_ratio))
    return {"inputs": opened.inputs, "outputs": opened.outputs, "activations": activations}


def _hash_pass(folder: Path, new: Any) -> None:
    """One plain pass of a hash (``new()``: a fresh hasher) over the bundle's files."""
    for name in FILES:
        digest = new()
        with (folder / name).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.hexdigest()


def bench_sketch(
    model: Any, tok: Any, ids: torch.Tensor, sketch: str, repeats: int, root: Path, hash: str = "blake3"
) -> dict[str, Any]:
    config = {"bundle": {"hash": hash}}
    rec = RecorderHooks(config, granularity="all", sketch=sketch, max_bundle_size_mb=1e6).install_hooks(model, tok)
    with torch.no_grad():
        model(input_ids=ids)
    ours, peer = root / f"{sketch}-{hash}-ours", root / f"{sketch}-{hash}-peer"
    rec.create_bundle(ours)  # warm: the weights hash is computed once per recorder
    stored = _stored_tensors(rec, ours)
    mb = Bundle.open(ours).size_bytes() / 1e6

    writer = _TimedWriter()

    def write_ours() -> None:
        hooks.write_bundle = writer  # type: ignore[assignment]
        try:
            rec.create_bundle(ours, overwrite=True)
        finally:
            hooks.write_bundle = writer.real

    def write_peer() -> None:
        shutil.rmtree(peer, ignore_errors=True)
        peer.mkdir()
        for name, tensors in stored.items():
            save_file(tensors, str(peer / f"{name}.safetensors"))
            _fsync(peer / f"{name}.safetensors")

    exact = rec.recorded()  # the spool's exact tensors, loaded once, outside the clock
    floor = root / f"{sketch}-{hash}-floor"

    def write_floor() -> None:
        # the least a one-thread writer of this format does, with library calls only: each
        # site's exact digest (of the tensor its sha256 key names; for full, the stored entry
        # is that tensor: hashed once), sketch-encode, each stored entry's digest, then
        # save_file + fsync of the very tensors the bundle stores
        shutil.rmtree(floor, ignore_errors=True)
        floor.mkdir()
        encoded: dict[str, torch.Tensor] = {}
        for site, tensor in exact.items():
            if sketch != "full":
                digests.digest(sketches.tensor_bytes(tensor), hash)
            entries = sketches.encode(site, tensor, rec.config.sketch, rec.config.compression_ratio)
            for entry in entries.values():
                digests.digest(sketches.tensor_bytes(entry), hash)
            encoded.update(entries)
        for name, tensors in {**stored, "activations": encoded}.items():
            save_file(tensors, str(floor / f"{name}.safetensors"))
            _fsync(floor / f"{name}.safetensors")

    def read_ours() -> None:
        problems = Bundle.open(ours, verify=False).verify_contents()
        assert problems == [], problems

    conditions = {
        "write ours": write_ours,
        "write peer": write_peer,
        "write floor": write_floor,
        "read ours": read_ours,
        "read peer": lambda: _hash_pass(ours, hashlib.sha256),
        "read blake3": lambda: _hash_pass(ours, blake3.blake3),
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in conditions}
    for fn in conditions.values():
        fn()  # warm-up round
    writer.times.clear()
    for _ in range(repeats):
        for name, fn in conditions.items():
            times[name].append(_clock(fn))
    times["write_bundle"] = writer.times
    rec.remove_hooks()
    peer_mb = sum(f.stat().st_size for f in peer.iterdir()) / 1e6
    out: dict[str, Any] = {"hash": hash, "mb": mb, "peer_mb": peer_mb, "sites": len(rec.sites), "conditions": {}}
    for name, ts in times.items():
        walls, cpus = [t[0] for t in ts], [t[1] for t in ts]
        size = peer_mb if name == "write peer" else mb
        out["conditions"][name] = {
            "median_s": median(walls),
            "median_cpu_s": median(cpus),
            "mb_per_s": size / median(walls),
            "times_s": walls,
            "cpu_s": cpus,
        }
    kinds = (
        ("write", "write ours", "write peer"),
        ("write_bundle", "write_bundle", "write peer"),
        ("write_floor", "write floor", "write peer"),
        ("read", "read ours", "read peer"),
        ("read_blake3", "read ours", "read blake3"),
    )
    for kind, ours_name, peer_name in kinds:
        peer_size = mb if kind.startswith("read") else peer_mb
        pairs = list(zip(times[ours_name], times[peer_name], strict=True))
        for index, suffix in ((0, "ratio"), (1, "cpu_ratio")):
            out[f"{kind}_{suffix}"] = median([(mb / o[index]) / (peer_size / p[index]) for o, p in pairs])
    for folder in (ours, peer, floor):
        shutil.rmtree(folder, ignore_errors=True)
    return out


def record_rss(tokens: int, budget_mb: float | None = None) -> dict[str, float]:
    """Peak RSS (MB) of a fresh process loading SmolLM2, then (peak reset) recording it at
    all granularity, under ``budget_mb`` (None: the default memory budget)."""
    options = "{}" if budget_mb is None else f"{{'recorder': {{'memory_budget_mb': {budget_mb}}}}}"
    code = (
        "import resource, sys, tempfile, torch\n"
        "from model_forensics.models import load\n"
        "from model_forensics import RecorderHooks\n"
        "loaded = load('smollm2', progress=False)\n"
        "ids = loaded.tokenizer('The flight recorder captures every layer. ' * 40, return_tensors='pt')['input_ids']\n"
        f"ids = ids[:, :{tokens}]\n"
        "def hwm():\n"
        "    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0]\n"
        "    return int(line.split()[1]) / 1024\n"
        "loaded_peak = hwm()\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak: what follows is the recording\n"
        "if sys.argv[1] == 'record':\n"
        f"    rec = RecorderHooks({options}, granularity='all', max_bundle_size_mb=1e6)\n"
        "    rec.install_hooks(loaded.model, loaded.tokenizer)\n"
        "    with torch.no_grad():\n"
        "        loaded.model(input_ids=ids)\n"
        "    rec.create_bundle(tempfile.mkdtemp() + '/b')\n"
        "print(loaded_peak, hwm())\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "record"], capture_output=True, text=True, check=True)
    load_peak, record_peak = map(float, done.stdout.strip().splitlines()[-1].split())
    return {"load": load_peak, "record": record_peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    loaded, ids = smollm2_prompt(args.tokens)
    model, tok = loaded.model, loaded.tokenizer
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(dir=Path(__file__).parent))  # the same disk as a user's bundles
    try:
        results = {s: bench_sketch(model, tok, ids, s, args.repeats, root) for s in SKETCHES}
        results |= {f"{s} sha256": bench_sketch(model, tok, ids, s, args.repeats, root, "sha256") for s in SKETCHES}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rss = record_rss(args.tokens)
    streamed = record_rss(args.tokens, budget_mb=0)
    load_after = os.getloadavg()
    label = commit()

    def cell(c: dict[str, Any]) -> str:
        return f"{c['mb_per_s']:.0f} ({c['median_s']:.3f} s, cpu {c['median_cpu_s']:.3f} s)"

    rows = []
    for s, r in results.items():
        c = r["conditions"]
        rows.append(
            [
                s.split()[0],
                r["hash"],
                r["sites"],
                f"{r['mb']:.1f}",
                cell(c["write ours"]),
                cell(c["write_bundle"]),
                cell(c["write peer"]),
                f"{r['write_ratio']:.2f} / {r['write_cpu_ratio']:.2f}",
                f"{r['write_bundle_ratio']:.2f} / {r['write_bundle_cpu_ratio']:.2f}",
                cell(c["write floor"]),
                f"{r['write_floor_ratio']:.2f} / {r['write_floor_cpu_ratio']:.2f}",
                cell(c["read ours"]),
                cell(c["read peer"]),
                cell(c["read blake3"]),
                f"{r['read_ratio']:.2f} / {r['read_cpu_ratio']:.2f}",
                f"{r['read_blake3_ratio']:.2f} / {r['read_blake3_cpu_ratio']:.2f}",
            ]
        )
    table = markdown_table(
        [
            "sketch",
            "bundle.hash",
            "sites",
            "bundle MB",
            "write ours (create_bundle) MB/s",
            "of which write_bundle",
            "save_file+fsync MB/s",
            "write ratio wall / cpu (≥ 0.5)",
            "write_bundle ratio wall / cpu",
            "floor: serial writer of the format MB/s",
            "floor ratio wall / cpu",
            "read+full verify MB/s",
            "plain sha256 MB/s",
            "plain blake3 MB/s",
            "read ratio vs sha256 wall / cpu (≥ 0.5)",
            "read ratio vs blake3 wall / cpu",
        ],
        rows,
    )
    header = (
        f"SmolLM2-135M, {ids.shape[1]} tokens, all sites, {args.repeats} interleaved rounds, {machine()['device']}, "
        f"{torch.get_num_threads()} torch threads, load average {load_before[0]:.1f} → {load_after[0]:.1f} "
        f"on {os.cpu_count()} cores (the machine was shared with other work: see the load); commit {label}. "
        "Ratios: median of per-round ratios, of wall and of CPU time (process CPU, all threads). "
        "bundle.hash blake3 = format 1.3 (the default); sha256 = the digests of format 1.2. The plain hash passes "
        "run on one thread; our reader hashes in a small thread pool. The floor is the least a one-thread "
        "writer of this format does, with library calls only: each site's exact digest (the tensor its sha256 "
        "key names), sketch-encode, each stored entry's digest, then save_file + fsync of the stored tensors; "
        "its ratio is the best a serial writer could reach.\n\n"
    )
    footer = (
        f"\n\nPeak RSS of a fresh process (fp16 sketch, all sites): loading SmolLM2 peaks at {rss['load']:.0f} MB; "
        f"with the peak reset after loading (/proc/self/clear_refs), recording + writing the bundle peaks at "
        f"{rss['record']:.0f} MB (default recorder.memory_budget_mb) and at {streamed['record']:.0f} MB with "
        "memory_budget_mb=0 (every captured step streamed to the spool file).\n"
    )
    print(header + table + footer)
    data = {
        "machine": machine(),
        "commit": label,
        "tokens": int(ids.shape[1]),
        "repeats": args.repeats,
        "load_average": {"before": load_before, "after": load_after},
        "sketches": results,
        "peak_rss_mb": rss,
        "peak_rss_mb_streamed": streamed,
        "self_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_results("bundle_io", data, header + table + footer)


if __name__ == "__main__":
    main()
