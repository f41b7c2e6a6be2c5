import copy
import warnings

import pytest
import torch
from torch import nn

from model_forensics import ForensicsError, RecorderHooks
from model_forensics.models.adapters import adapter_for

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def test_layer_granularity_records_resid_attn_mlp_per_block(tiny) -> None:
    model = tiny["llama"].model
    with RecorderHooks(granularity="layer").install_hooks(model) as rec, torch.no_grad():
        model(input_ids=IDS)
    expected = ["embed"] + [f"blocks.{i}.{k}" for i in range(2) for k in ("attn", "mlp", "resid_post")] + ["final"]
    assert sorted(rec.recorded()) == sorted(expected)


def test_resid_post_equals_hidden_states(tiny) -> None:
    model = copy.deepcopy(tiny["llama"].model)  # output_hidden_states hooks it for good (see _hooks)
    with RecorderHooks(granularity="layer").install_hooks(model) as rec, torch.no_grad():
        out = model(input_ids=IDS, output_hidden_states=True)
    got = rec.recorded()
    assert torch.equal(got["embed"], out.hidden_states[0])
    assert torch.equal(got["blocks.0.resid_post"], out.hidden_states[1])


def test_gqa_shapes_and_pattern_is_eager_attention(tiny) -> None:
    model = copy.deepcopy(tiny["llama"].model)  # 4 query heads, 2 KV heads, d_head 8; a copy (see _hooks)
    with RecorderHooks(granularity="all").install_hooks(model) as rec, torch.no_grad():
        out = model(input_ids=IDS, output_attentions=True)
    got = rec.recorded()
    assert got["blocks.1.attn.q"].shape == (1, 8, 4, 8)
    assert got["blocks.1.attn.k"].shape == (1, 8, 2, 8)
    assert got["blocks.1.attn.z"].shape == (1, 8, 4, 8)
    assert got["blocks.1.mlp.post"].shape == (1, 8, 64)
    assert torch.equal(got["blocks.1.attn.pattern"], out.attentions[1])


def _hooks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every forward (pre-)hook handle on the model, by module. A recording must leave exactly
    the hooks it found: a model may carry hooks of its own, e.g. the inert output-capture hooks
    transformers installs for good the first time a model is called with output_hidden_states."""
    return {name: (*m._forward_hooks, *m._forward_pre_hooks) for name, m in model.named_modules()}


def test_hooks_are_removed_and_model_untouched(tiny) -> None:
    model = tiny["gpt2"].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    with RecorderHooks(granularity="all").install_hooks(model) as rec, torch.no_grad():
        model(input_ids=IDS)
        assert _hooks(model) != hooks  # the recording's own hooks are on
    assert rec.recorded()
    assert _hooks(model) == hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hooks_removed_even_on_exception(tiny) -> None:
    model = tiny["gpt2"].model
    hooks = _hooks(model)
    with pytest.raises(RuntimeError), RecorderHooks().install_hooks(model):
        raise RuntimeError("boom")
    assert _hooks(model) == hooks


def test_recording_leaves_a_fresh_model_without_hooks(tiny_dirs) -> None:
    from model_forensics.models.loading import load

    model = load(str(tiny_dirs["gpt2"])).model  # not the shared one: other tests may have hooked it
    with RecorderHooks(granularity="all").install_hooks(model), torch.no_grad():
        model(input_ids=IDS)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_site_selectors_add_sites(tiny) -> None:
    model = tiny["gpt2"].model
    with (
        RecorderHooks(granularity="layer", sites=["blocks.*.attn.pattern"]).install_hooks(model) as rec,
        torch.no_grad(),
    ):
        model(input_ids=IDS)
    assert {"blocks.0.attn.pattern", "blocks.1.attn.pattern"} <= set(rec.recorded())


def test_size_cap_drops_lowest_priority_and_never_exceeds(tiny, tmp_path) -> None:
    model = tiny["gpt2"].model
    rec = RecorderHooks(granularity="all", sketch="full", max_bundle_size_mb=0.02).install_hooks(model)
    with torch.no_grad():
        model(input_ids=IDS)
    kept = rec.recorded()
    total = sum(t.numel() * t.element_size() for t in kept.values())
    assert total <= 0.02 * 1024 * 1024
    assert rec.dropped, "the cap should have dropped sites"
    assert any(s.endswith("attn.pattern") for s in rec.dropped)
    assert "blocks.1.resid_post" in kept  # highest priority survives
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec.create_bundle(tmp_path / "b")
    assert any("dropped" in str(w.message) for w in caught)
    rec.remove_hooks()


def test_generation_covers_prompt_and_generated_positions(tiny) -> None:
    loaded = tiny["llama"]
    rec = RecorderHooks(granularity="head").install_hooks(loaded.model)
    seq = rec.generate({"input_ids": IDS}, max_new_tokens=5, do_sample=False)
    got = rec.recorded()
    rec.remove_hooks()
    n = seq.shape[1] - 1  # the last generated token is never fed back
    assert got["blocks.0.resid_post"].shape[1] == n
    assert got["blocks.1.attn.pattern"].shape[-2:] == (n, n)
    with torch.no_grad():
        full = copy.deepcopy(loaded.model)(input_ids=seq[:, :-1], output_hidden_states=True)  # a copy (see _hooks)
    torch.testing.assert_close(got["blocks.0.resid_post"], full.hidden_states[1], atol=1e-5, rtol=1e-5)


def test_not_a_module_is_a_clear_error() -> None:
    with pytest.raises(ForensicsError, match="nn.Module"):
        RecorderHooks().install_hooks("gpt2")  # type: ignore[arg-type]


def test_generic_adapter_records_any_module() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert adapter_for(model).architecture == "generic"
    with RecorderHooks().install_hooks(model) as rec, torch.no_grad():
        model(torch.randn(3, 4))
    assert sorted(rec.recorded()) == ["0", "1", "2"]
    assert rec.recorded()["2"].shape == (3, 2)


def test_record_call_logs_and_serves(tmp_path) -> None:
    from model_forensics import Bundle, ReplayDivergence
    from model_forensics.recorder import serving

    rec = RecorderHooks()
    model = nn.Linear(2, 2)
    rec.install_hooks(model)

    @rec.record_call("lookup")
    def lookup(key: str) -> dict:
        return {"key": key, "value": len(key)}

    with torch.no_grad():
        model(torch.ones(1, 2))
    assert lookup("abc") == {"key": "abc", "value": 3}
    with rec.record_call("db.write") as call:
        call.args, call.result = {"sql": "DELETE"}, "ok"
    b = Bundle.open(rec.create_bundle(tmp_path / "b"))
    rec.remove_hooks()
    calls = b.calls()
    assert [c["name"] for c in calls] == ["lookup", "db.write"]
    with serving(calls):
        assert lookup("abc") == {"key": "abc", "value": 3}
        with pytest.raises(ReplayDivergence, match="db.write"):
            lookup("zzz")


def test_weights_hash_follows_in_place_updates(tiny, tmp_path) -> None:
    from model_forensics import Bundle

    model = copy.deepcopy(tiny["gpt2"].model)  # the session fixture must stay untouched
    rec = RecorderHooks().install_hooks(model)
    with torch.no_grad():
        model(input_ids=IDS)
        first = Bundle.open(rec.create_bundle(tmp_path / "a")).manifest["model"]["weights_sha256"]
        again = Bundle.open(rec.create_bundle(tmp_path / "b")).manifest["model"]["weights_sha256"]
        param = next(model.parameters())
        param.add_(1.0)
        changed = Bundle.open(rec.create_bundle(tmp_path / "c")).manifest["model"]["weights_sha256"]
    rec.remove_hooks()
    assert first == again != changed


def test_calls_logged_before_generate_are_kept(tiny, tmp_path) -> None:
    from model_forensics import Bundle

    loaded = tiny["llama"]
    rec = RecorderHooks().install_hooks(loaded.model)
    with rec.record_call("read_document") as call:
        call.args, call.result = {"id": 1}, "text"
    rec.generate({"input_ids": IDS}, max_new_tokens=2, do_sample=False)
    calls = Bundle.open(rec.create_bundle(tmp_path / "b")).calls()
    rec.remove_hooks()
    assert [c["name"] for c in calls] == ["read_document"]


def test_logits_are_kept_without_a_copy_and_match_the_bundle(tiny, tmp_path) -> None:
    from model_forensics import Bundle
    from model_forensics.core.digests import tensor_digest

    model = tiny["gpt2"].model
    with RecorderHooks(granularity="layer").install_hooks(model) as rec, torch.no_grad():
        out = model(input_ids=IDS)
        assert rec._logits[0].data_ptr() == out.logits.data_ptr()  # the model's own tensor, no clone
        kept = out.logits.clone()
        out.logits.clone().mul_(2)  # changing a copy is fine
        manifest = Bundle.open(rec.create_bundle(tmp_path / "b")).manifest
    assert manifest["hash"] == "blake3"  # the default (format 1.3)
    assert manifest["output"]["logits_sha256"] == tensor_digest(kept, "blake3")


def test_logits_changed_in_place_after_the_forward_are_refused(tiny, tmp_path) -> None:
    model = tiny["gpt2"].model
    with RecorderHooks(granularity="layer").install_hooks(model) as rec, torch.no_grad():
        out = model(input_ids=IDS)
        out.logits[..., 0] = -1e9  # e.g. banning a token on the model's own output
        with pytest.raises(ForensicsError, match="changed in place after the recorder kept them"):
            rec.create_bundle(tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_inference_mode_logits_are_copied(tiny, tmp_path) -> None:
    from model_forensics import Bundle
    from model_forensics.core.digests import tensor_digest

    model = tiny["gpt2"].model
    with RecorderHooks(granularity="layer").install_hooks(model) as rec:
        with torch.inference_mode():
            out = model(input_ids=IDS)  # inference tensors have no version counter to check
            kept = out.logits.clone()
            out.logits.mul_(2)
        manifest = Bundle.open(rec.create_bundle(tmp_path / "b")).manifest
    assert manifest["hash"] == "blake3"  # the default (format 1.3)
    assert manifest["output"]["logits_sha256"] == tensor_digest(kept, "blake3")
