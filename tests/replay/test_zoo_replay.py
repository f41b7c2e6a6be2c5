"""The replayer on the zoo's trained models: exact replay, and sweeps equal to serial runs."""

from __future__ import annotations

import pytest
import torch
from replay_models import record

from model_forensics import Intervention, SandboxReplayer
from model_forensics.models import zoo


# Text entries; the image entry replays in tests/models/test_cnn_zoo.py.
@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.entry(n).kind != "image-classification"])
def test_zoo_incident_replays_and_sweeps_exactly(name, tmp_path):
    from model_forensics.models import load

    data = zoo.scenario_data(name)
    loaded = load(f"zoo:{name}")
    generate = 4 if data["kind"] == "causal-lm" and name != "induction-2l" else 0
    extras = {"baseline": data["baseline_prompts"][:2]} if "baseline_prompts" in data else {}
    prompt = data["incident_prompts"][0]
    bundle = record(loaded, tmp_path / name, max_new_tokens=generate, extras=extras, prompt=prompt)
    session = SandboxReplayer().load_bundle(bundle)  # model resolved from the manifest (zoo:NAME)
    assert session.verify().bit_identical
    a = session.adapter
    sets = [
        [Intervention(f"blocks.{layer}.attn.head.{h}", "zero")] for layer in range(a.n_layers) for h in range(a.n_heads)
    ]
    if extras:
        sets.append([Intervention("blocks.0.mlp", "mean")])
    swept = session.sweep(sets)
    serial = [session.run(s) for s in sets]
    for x, y in zip(swept, serial, strict=True):
        assert float((x.logits - y.logits).abs().max()) < 1e-5
        assert (x.failed, x.text, x.prediction) == (y.failed, y.text, y.prediction)
    if data["kind"] == "causal-lm" and not generate:  # classifier heads and decoding steps multiply few rows
        assert all(torch.equal(x.logits, y.logits) for x, y in zip(swept, serial, strict=True))
