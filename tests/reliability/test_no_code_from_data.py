"""No code from data: nothing a bundle says can make replay run code or reach a library
call outside the allowlist (the custom_generate hole first)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hostile import edit_manifest
from typer.testing import CliRunner

from model_forensics import Bundle, BundleError, ForensicsError, SandboxReplayer
from model_forensics.cli import app

SRC = Path(__file__).parents[2] / "src" / "model_forensics"


def _plant_custom_generate(tmp_path: Path) -> tuple[Path, Path]:
    """A transformers custom_generate folder whose generate() leaves a marker file."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil"
    (folder / "custom_generate").mkdir(parents=True)
    (folder / "custom_generate" / "generate.py").write_text(
        f"import pathlib\ndef generate(model, *args, **kwargs):\n    pathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    return folder, marker


def test_custom_generate_from_a_bundle_never_runs(fresh, word_models, tmp_path: Path) -> None:
    bundle = fresh("generate")
    folder, marker = _plant_custom_generate(tmp_path)
    edit_manifest(
        bundle,
        lambda m: m["input"]["generation"].update(custom_generate=str(folder), trust_remote_code=True),
    )
    with pytest.raises(BundleError, match=r"input\.generation\.custom_generate.*not allowed"):
        SandboxReplayer().load_bundle(bundle, model=word_models["llama"]).run([])
    with pytest.raises(BundleError, match="custom_generate"):
        Bundle.open(bundle)
    runner = CliRunner()
    for args in (["replay", str(bundle)], ["bundle", "verify", str(bundle), "--replay"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "custom_generate" in result.output
    assert not marker.exists()


def test_a_folder_shipped_inside_a_bundle_is_refused(fresh, tmp_path: Path) -> None:
    bundle = fresh("generate")
    (bundle / "custom_generate").mkdir()
    (bundle / "custom_generate" / "generate.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(BundleError, match="unexpected entry 'custom_generate'"):
        Bundle.open(bundle)


@pytest.mark.parametrize(
    ("part", "key", "value"),
    [
        ("generation", "trust_remote_code", True),
        ("generation", "custom_generate", "some/repo"),
        ("generation", "assistant_model", "zoo:gpt2-injection"),
        ("generation", "streamer", "x"),
        ("generation", "prefix_allowed_tokens_fn", "os.system"),
        ("kwargs", "trust_remote_code", True),
        ("kwargs", "labels", 3),
    ],
)
def test_keys_off_the_allowlist_are_refused_by_name(fresh, part: str, key: str, value: object) -> None:
    bundle = fresh("generate")
    edit_manifest(bundle, lambda m: m["input"].setdefault(part, {}).update({key: value}))
    with pytest.raises(BundleError, match=rf"input\.{part}\.{key}.*not allowed"):
        Bundle.open(bundle)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda m: m["model"]["config"].update(_attn_implementation="kernels-community/flash-attn"),
            "_attn_implementation",
        ),
        (lambda m: m["model"]["config"].update(trust_remote_code=True), "trust_remote_code"),
        (lambda m: m["model"]["config"].update(auto_map={"AutoModel": "evil.Model"}), "auto_map"),
        (lambda m: m["model"].update(dtype="load"), r"model\.dtype"),
        (lambda m: next(iter(m["sites"].values())).update(dtype="__import__"), "dtype"),
        (lambda m: m["input"]["tensors"]["input_ids"].update(dtype="object"), "dtype"),
        (lambda m: next(iter(m["sites"].values())).update(sketch="pickle"), "sketch"),
        (lambda m: m["predicate"]["args"].update(code="print(1)"), "predicate"),
        (lambda m: m.update(predicate={"kind": "eval", "args": {}, "holds": True}), "predicate"),
        (lambda m: m["input"]["generation"].update(max_new_tokens=10**9), "max_new_tokens"),
        (lambda m: m["input"]["generation"].update(num_beams=10_000), "num_beams"),
        (lambda m: m["input"]["generation"].update(max_new_tokens="4"), "max_new_tokens"),
        (lambda m: m["input"]["generation"].update(do_sample="yes"), "do_sample"),
        (lambda m: m["determinism"].update(seed=2**70), "seed"),
        (lambda m: m["determinism"]["torch"].update(num_threads=10**6), "num_threads"),
        (lambda m: m["recorder"].update(granularity="everything"), "granularity"),
    ],
)
def test_values_that_reach_library_calls_are_typed_and_bounded(fresh, change, match: str) -> None:
    bundle = fresh("generate")
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=match):
        Bundle.open(bundle)


def test_a_regex_predicate_is_checked_and_cannot_hang_the_reader(fresh) -> None:
    bundle = fresh("generate")
    edit_manifest(
        bundle, lambda m: m.update(predicate={"kind": "regex", "args": {"pattern": "(unclosed"}, "holds": True})
    )
    with pytest.raises(BundleError, match="not a valid regex"):
        Bundle.open(bundle)
    edit_manifest(
        bundle, lambda m: m.update(predicate={"kind": "regex", "args": {"pattern": "(a|aa)+$"}, "holds": True})
    )
    predicate = Bundle.open(bundle).predicate
    assert predicate is not None
    start = time.perf_counter()
    with pytest.raises(ForensicsError, match="took over"):
        predicate.evaluate(text="a" * 60 + "!")
    assert time.perf_counter() - start < 10


def test_a_model_reference_into_the_bundle_itself_is_refused(fresh) -> None:
    bundle = fresh("forward")
    edit_manifest(bundle, lambda m: m["model"].update(reference=str(bundle), source="local"))
    with pytest.raises(BundleError, match="inside the bundle itself"):
        SandboxReplayer().load_bundle(bundle)


def test_the_recorder_keeps_only_replayable_generate_options(word_models, tmp_path: Path) -> None:
    import torch

    from model_forensics import RecorderHooks
    from model_forensics.recorder.session import encode_prompt

    loaded = word_models["llama"]
    batch = encode_prompt(loaded, "w3 w4 w5 w6")
    with RecorderHooks(sketch="full").install_hooks(loaded.model, loaded.tokenizer) as rec:
        with pytest.warns(UserWarning, match=r"\['output_scores'\] are not recorded"):
            rec.generate(batch, max_new_tokens=2, do_sample=False, pad_token_id=1, output_scores=False)
        path = rec.create_bundle(tmp_path / "b")
    generation = Bundle.open(path).manifest["input"]["generation"]
    assert generation == {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 1}
    assert torch.equal(Bundle.open(path).outputs["generated_ids"][:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_no_pickle_eval_or_dynamic_import_in_the_package() -> None:
    banned = re.compile(
        r"\bpickle\b|(?<![.\w])eval\(|(?<![.\w])exec\(|torch\.load\(|import_module\(|__import__\(|trust_remote_code=True"
    )
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if banned.search(line) and not line.lstrip().startswith("#") and "No pickle" not in line
    ]
    assert offenders == []
