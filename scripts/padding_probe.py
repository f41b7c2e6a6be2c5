"""Would one left-padded generation of prompts of different lengths beat one generation each?

SmolLM2's decoding step costs about the same for 1 row as for 4 (the weights are read once per
step), and analyze's sweeps held 6.6 rows on average (benchmarks/results/rca_smollm2_trace_24ba174.md).
Prompts of different lengths could not share a sweep then (they can since 885c0db). This generates the first 16 failing
variants of ``smollm2-injection`` (16 tokens, greedy) one by one and then as one left-padded
batch with an attention mask, and prints both times and how many of the 16 answers are the
same token for token. No interventions: it bounds what batching across lengths could save.

Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/padding_probe.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from model_forensics import SandboxReplayer
from model_forensics.scenarios import get


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = get("smollm2-injection").record(Path(tmp), limit=1).incidents[0]
        session = SandboxReplayer().load_bundle(bundle)
    model = session.model
    prompts = [v["input_ids"].reshape(-1) for v in session.variants()[:16]]
    tokenizer = session.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": pad}
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        one_each = [
            model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **options)[
                0, len(p) :
            ]
            for p in prompts
        ]
        each_s, each_cpu = time.perf_counter() - wall, time.process_time() - cpu
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = p
            mask[i, width - len(p) :] = 1
        wall, cpu = time.perf_counter(), time.process_time()
        padded = model.generate(input_ids=ids, attention_mask=mask, **options)[:, width:]
        padded_s, padded_cpu = time.perf_counter() - wall, time.process_time() - cpu
    same = sum(torch.equal(a, b[: len(a)]) for a, b in zip(one_each, padded, strict=True))
    print(f"prompt lengths: {sorted(len(p) for p in prompts)}; load average {os.getloadavg()[0]:.2f}")
    print(
        f"one generate per prompt: {each_s:.1f} s wall, {each_cpu:.1f} s CPU; one left-padded batch: {padded_s:.1f} s "
        f"wall, {padded_cpu:.1f} s CPU; ratio {each_s / padded_s:.2f}x; same answers {same}/{len(prompts)}"
    )


if __name__ == "__main__":
    main()
