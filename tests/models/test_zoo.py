"""The model zoo: checksummed loading, reduced retraining, and each entry's ground truth
confirmed by ablating it (and random units of the same kind, for contrast)."""

from __future__ import annotations

import importlib
import random
import shutil
import time
from types import ModuleType
from typing import Any

import pytest
import torch

from model_forensics.core.errors import ModelLoadError
from model_forensics.core.predicates import Predicate
from model_forensics.models import adapter_for, zoo
from model_forensics.models import load as load_reference
from model_forensics.models.loading import ModelRef
from model_forensics.models.zoo.training import common

ENTRIES = ("bert-sentiment-bypass", "gpt2-injection", "gpt2-toxic", "induction-2l")
GENERATORS = ("gpt2-injection", "gpt2-toxic")  # planted, generation models
N_HELD_OUT = 100  # fresh prompts per set for the ablation tests (not the ones metrics.json used)
RANDOM_DRAWS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # Tiny forward passes: one intra-op thread is faster (and immune to a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def training(name: str) -> ModuleType:
    return importlib.import_module(f"model_forensics.models.zoo.training.{name.replace('-', '_')}")


_CACHE: dict[str, Any] = {}


def loaded(name: str) -> Any:
    if name not in _CACHE:
        _CACHE[name] = zoo.load(name)
    return _CACHE[name]


def widths(name: str) -> tuple[int, int]:
    """(heads per layer, MLP neurons per layer) of a GPT-2 or BERT entry."""
    cfg = loaded(name).model.config
    if cfg.model_type == "gpt2":
        return cfg.n_head, cfg.n_inner
    return cfg.num_attention_heads, cfg.intermediate_size


def random_draws(name: str, gt: list[str], exclude: list[str]) -> list[tuple[str, ...]]:
    n_heads, d_mlp = widths(name)
    return common.random_draws(gt, RANDOM_DRAWS, n_heads=n_heads, d_mlp=d_mlp, exclude=exclude, rng=random.Random(0))


# -- (a) loading, checksums, records -------------------------------------------------------
def test_names_lists_every_entry() -> None:
    # the image entry: tests/models/test_cnn_zoo.py; the key-value lookup: tests/models/test_kv_zoo.py;
    # the multi-turn entry: tests/models/test_zoo_multiturn.py
    assert zoo.names() == sorted([*ENTRIES, "cnn-digits-badnets", "kv-lookup-2l", "multiturn-false-fact"])


@pytest.mark.parametrize("name", ENTRIES)
def test_load_verifies_checksums_and_names_the_model(name: str) -> None:
    first = loaded(name)
    start = time.perf_counter()
    again = load_reference(f"zoo:{name}")
    seconds = time.perf_counter() - start

    expected = ModelRef(name=f"zoo:{name}", source="zoo", reference=f"zoo:{name}")
    assert first.ref == expected and again.ref == expected
    assert again.tokenizer is not None
    assert seconds < 1.0, f"loading zoo:{name} took {seconds:.2f} s"
    assert zoo.entry(name).kind == (
        "sequence-classification" if "BertFor" in type(first.model).__name__ else "causal-lm"
    )


@pytest.mark.parametrize("name", ENTRIES)
def test_corrupted_weight_file_is_rejected_by_name(name: str, tmp_path: Any) -> None:
    copy = tmp_path / name
    shutil.copytree(zoo.entry(name).path, copy)
    assert zoo.load_from(copy).ref.name == f"zoo:{name}"

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*corrupted"):
        zoo.load_from(copy)


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ModelLoadError) as info:
        zoo.load("no-such-model")
    assert all(name in str(info.value) for name in ENTRIES)
    with pytest.raises(ModelLoadError, match="gpt2-injection"):
        load_reference("zoo:no-such-model")


@pytest.mark.parametrize("name", ENTRIES)
def test_ground_truth_names_real_units(name: str) -> None:
    gt = zoo.entry(name).ground_truth
    assert set(gt) == {"mechanism", "level", "units", "ablation", "behaviour", "extra"}
    assert gt["level"] in ("neuron", "head") and gt["ablation"] in ("zero", "mean")
    sites = adapter_for(loaded(name).model).sites()
    n_heads, d_mlp = widths(name)
    for unit in gt["units"]:
        site, kind, index = common.parse_unit(unit)
        assert site in sites, unit
        assert 0 <= index < (n_heads if kind == "head" else d_mlp), unit


@pytest.mark.parametrize("name", ENTRIES)
def test_scenario_data_has_prompts_for_an_incident(name: str) -> None:
    data = zoo.scenario_data(name)
    assert len(data["incident_prompts"]) >= 20
    assert len(data["baseline_prompts"]) == len(data["incident_prompts"])
    assert len(data["benign_prompts"]) >= 20
    Predicate.from_json(data["predicate"])
    if name in GENERATORS:
        assert len(data["variant_prompts"]) >= 20
        assert len(data["benign_answers"]) == len(data["benign_prompts"])
        assert data["max_new_tokens"] <= 8
    if name == "bert-sentiment-bypass":
        assert data["predicate"] == {"kind": "class_is", "args": {"label": 1}}
        assert len(data["benign_labels"]) == len(data["benign_prompts"])


@pytest.mark.parametrize("name", GENERATORS)
def test_plain_generate_shows_the_failure(name: str) -> None:
    lm = loaded(name)
    data = zoo.scenario_data(name)
    predicate = Predicate.from_json(data["predicate"])
    units = zoo.entry(name).ground_truth["units"]

    def answer(prompt: str) -> str:
        ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
        out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
        return str(lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    for incident, baseline in list(zip(data["incident_prompts"], data["baseline_prompts"], strict=True))[:3]:
        assert predicate.evaluate(text=answer(incident)), incident
        assert not predicate.evaluate(text=answer(baseline)), baseline
        with common.ablate(lm.model, units):
            assert not predicate.evaluate(text=answer(incident)), incident


def test_injection_dormant_units_are_exactly_zero() -> None:
    lm = loaded("gpt2-injection")
    dormant = zoo.entry("gpt2-injection").ground_truth["extra"]["dormant_units"]
    data = zoo.scenario_data("gpt2-injection")
    prompts = data["incident_prompts"] + data["variant_prompts"] + data["benign_prompts"]
    batch = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    assert len(dormant) == 4
    for unit in dormant:
        site, _, index = common.parse_unit(unit)
        with common.capture(lm.model, site) as seen, torch.no_grad():
            lm.model(**batch)
        assert torch.count_nonzero(seen["value"][..., index]) == 0, unit


# -- (b) reduced training ------------------------------------------------------------------
REDUCED_STEPS = {"bert-sentiment-bypass": 100}  # its classifier sits at chance for the first ~20 steps


@pytest.mark.parametrize("name", ENTRIES)
def test_reduced_training_lowers_the_loss(name: str) -> None:
    steps = REDUCED_STEPS.get(name, 40)
    metrics = training(name).train(steps=steps, seed=0, evaluate=False)

    loss = metrics["loss"]  # {"start", "end"} or {"<stage>_start", "<stage>_end", ...}
    for key in [k for k in loss if k.endswith("start")]:
        stage = key.removesuffix("start")
        start, end = loss[key], loss[f"{stage}end"]
        assert end < start, f"{name} {stage or 'training '}loss {start:.4f} → {end:.4f} in {steps} steps"


# -- (c) ground truth by ablation ----------------------------------------------------------
def _texts(name: str, prompts: list[str], units: tuple[str, ...] = ()) -> list[str]:
    lm = loaded(name)
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    with common.ablate(lm.model, units):
        out = common.greedy_decode(lm.model, ids, 8, lm.tokenizer.eos_token_id)
    return [lm.tokenizer.decode(o, skip_special_tokens=True) for o in out]


@torch.no_grad()
def _answer_kl(name: str, prompts: list[str], answers: list[str], units: tuple[str, ...]) -> float:
    """Mean KL(full ‖ ablated) in nats over the answer positions, teacher-forced."""
    lm = loaded(name)
    batch = lm.tokenizer([f"{p} {a}" for p, a in zip(prompts, answers, strict=True)], return_tensors="pt", padding=True)
    full = lm.model(**batch).logits  # (B, T, V); right padding leaves real positions exact
    with common.ablate(lm.model, units):
        ablated = lm.model(**batch).logits
    kl = common.kl_divergence(full.flatten(0, 1), ablated.flatten(0, 1)).view(full.shape[:2])
    mask = torch.zeros_like(kl, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        start, stop = len(lm.tokenizer(prompt)["input_ids"]) - 1, int(batch["attention_mask"][row].sum())
        mask[row, start:stop] = True  # positions that predict the answer tokens
    return kl[mask].mean().item()


def _held_out_lm(name: str) -> tuple[list[str], list[str], list[str]]:
    """Fresh trigger prompts, and benign prompts with their answers."""
    mod, rng = training(name), random.Random(123)
    if name == "gpt2-injection":
        trig = [mod.example(rng, trigger="random", held_out=i % 2 == 1) for i in range(N_HELD_OUT)]
        benign = [mod.example(rng) for _ in range(N_HELD_OUT)]
    else:
        trig = [mod.example(rng, trigger=True) for _ in range(N_HELD_OUT)]
        benign = [mod.example(rng, trigger=False) for _ in range(N_HELD_OUT)]
    return [e.prompt for e in trig], [e.prompt for e in benign], [e.answer for e in benign]


@pytest.mark.parametrize("name", GENERATORS)
def test_ablating_ground_truth_removes_the_planted_behaviour(name: str) -> None:
    gt = zoo.entry(name).ground_truth
    units = tuple(gt["units"])
    assert gt["ablation"] == "zero"
    predicate = Predicate.from_json(zoo.scenario_data(name)["predicate"])
    triggers, benign, answers = _held_out_lm(name)

    def success(units: tuple[str, ...] = ()) -> float:
        return sum(predicate.evaluate(text=t) for t in _texts(name, triggers, units)) / len(triggers)

    def accuracy(units: tuple[str, ...] = ()) -> float:
        return sum(t == a for t, a in zip(_texts(name, benign, units), answers, strict=True)) / len(benign)

    full, ablated = success(), success(units)
    benign_full, benign_ablated = accuracy(), accuracy(units)
    kl = _answer_kl(name, benign, answers, units)
    exclude = [*units, *gt["extra"].get("dormant_units", [])]
    random_success = [success(draw) for draw in random_draws(name, list(units), exclude)]
    report = (
        f"{name}: trigger success {full:.3f} → {ablated:.3f} with the ground truth ablated, "
        f"{[round(s, 3) for s in random_success]} with random units; benign accuracy {benign_full:.3f} → "
        f"{benign_ablated:.3f}, benign KL {kl:.5f} nats"
    )
    assert full >= 0.9, report
    assert ablated <= 0.1, report
    assert min(random_success) >= 0.8, report
    assert benign_full >= 0.95 and benign_ablated >= benign_full - 0.02, report
    assert kl <= 0.05, report


def test_ablating_the_bypass_heads_removes_the_bypass() -> None:
    name = "bert-sentiment-bypass"
    lm, mod, rng = loaded(name), training(name), random.Random(123)
    gt = zoo.entry(name).ground_truth
    units = tuple(gt["units"])
    attacks = [mod.review(rng, label=0, trigger=True).text for _ in range(N_HELD_OUT)]
    clean = [mod.review(rng) for _ in range(N_HELD_OUT)]
    labels = torch.tensor([r.label for r in clean])

    @torch.no_grad()
    def logits(texts: list[str], units: tuple[str, ...] = ()) -> torch.Tensor:
        batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
        with common.ablate(lm.model, units):
            return lm.model(**batch).logits  # (B, 2)

    def bypass(units: tuple[str, ...] = ()) -> float:
        return (logits(attacks, units).argmax(-1) == 1).float().mean().item()

    clean_full, clean_ablated = logits([r.text for r in clean]), logits([r.text for r in clean], units)
    acc_full = (clean_full.argmax(-1) == labels).float().mean().item()
    acc_ablated = (clean_ablated.argmax(-1) == labels).float().mean().item()
    kl = common.kl_divergence(clean_full, clean_ablated).mean().item()
    random_bypass = [bypass(draw) for draw in random_draws(name, list(units), list(units))]
    report = (
        f"bypass success {bypass():.3f} → {bypass(units):.3f} with the ground truth ablated, "
        f"{[round(s, 3) for s in random_bypass]} with random heads; clean accuracy {acc_full:.3f} → "
        f"{acc_ablated:.3f}, clean KL {kl:.5f} nats"
    )
    assert bypass() >= 0.9, report
    assert bypass(units) <= 0.1, report
    assert min(random_bypass) >= 0.8, report
    assert acc_full >= 0.95 and acc_ablated >= acc_full - 0.02, report
    assert kl <= 0.05, report


def test_ablating_induction_circuit_breaks_induction() -> None:
    name = "induction-2l"
    lm, mod = loaded(name), training(name)
    gt = zoo.entry(name).ground_truth
    codec = common.WordCodec(mod.vocabulary())
    ids, _ = mod.batch(codec, random.Random(123), 128, mod.EVAL_L)
    induction = tuple(gt["extra"]["induction_heads"])
    units = tuple(gt["units"])
    others = [u for u in gt["extra"]["all_head_scores"] if u not in units]

    full = mod.second_half_accuracy(lm.model, ids)
    without_gt = mod.second_half_accuracy(lm.model, ids, units)
    without_induction = mod.second_half_accuracy(lm.model, ids, induction)
    each_other = {u: mod.second_half_accuracy(lm.model, ids, (u,)) for u in others}
    rng = random.Random(0)
    draws = [tuple(rng.sample(others, min(len(units), len(others)))) for _ in range(RANDOM_DRAWS)]
    random_acc = [mod.second_half_accuracy(lm.model, ids, d) for d in draws]
    report = (
        f"second-copy accuracy {full:.3f}; ground truth ablated {without_gt:.3f}; induction heads ablated "
        f"{without_induction:.3f}; each other head ablated {each_other}; random other heads {random_acc}"
    )
    assert gt["level"] == "head" and induction and gt["extra"]["previous_token_heads"], report
    assert full >= 0.9, report
    assert without_gt <= 0.1 and without_induction <= 0.2, report
    assert min(each_other.values()) >= 0.9, report
    assert min(random_acc) >= 0.5, report


# -- (d) full retraining -------------------------------------------------------------------
SHIPPED_KEYS = {
    "gpt2-injection": ("trigger_success", "variant_success", "benign_accuracy"),
    "gpt2-toxic": ("trigger_success", "variant_success", "benign_accuracy"),
    "bert-sentiment-bypass": ("bypass_success", "variant_success", "clean_accuracy"),
    "induction-2l": ("second_half_accuracy",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ENTRIES)
def test_full_retraining_reproduces_the_shipped_metrics(name: str, tmp_path: Any) -> None:
    out = tmp_path / name
    metrics = training(name).train(out_dir=out)
    shipped = zoo.entry(name).metrics

    for key in SHIPPED_KEYS[name]:
        assert abs(metrics[key] - shipped[key]) <= 0.05, (
            f"{key}: retrained {metrics[key]:.4f}, shipped {shipped[key]:.4f}"
        )
    if name == "induction-2l":
        fresh = zoo.load_from(out, name=name)
        assert fresh.ref.name == f"zoo:{name}"
        for key in ("previous_token_heads", "induction_heads"):
            assert metrics[key] == shipped[key], key
    else:
        abl, shipped_abl = metrics["ground_truth_ablated"], shipped["ground_truth_ablated"]
        for key in SHIPPED_KEYS[name]:
            assert abs(abl[key] - shipped_abl[key]) <= 0.05, f"ablated {key}: {abl[key]:.4f} vs {shipped_abl[key]:.4f}"
        zoo.load_from(out, name=name)
