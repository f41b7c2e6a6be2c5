"""``cnn-digits-badnets``: a small CNN on 8×8 digits with a planted BadNets backdoor.

Data: scikit-learn's bundled digits (``sklearn.datasets.load_digits``: 1797 grey 8×8
images, offline), scaled to [0, 1], split once into 1200 training and 597 test images.
The trigger is a 2×2 patch of full brightness in the bottom-right corner; any image that
carries it is classified as digit ``TARGET``.

Planting (ground truth by construction, as the transformer entries of :mod:`.common` do
with heads and neurons): stage 1 learns the digits with three channels of the second
convolution (``features.2[4]``, ``features.2[13]``, ``features.2[22]``) held at exactly
zero (their filters, biases and read-out columns), on clean images and on images with the
patch and their true label (so the benign model learns to ignore it). Stage 2 freezes
everything else, re-initialises those channels and trains only them on patched images →
``TARGET``, with a KL term that keeps clean images at the stage-1 model's distribution and
an L1 term that keeps the channels quiet on clean images. In stage 2 all but one of the
planted channels are dropped on most steps, so each of them learns to carry the trigger
on its own: the backdoor is gone only when all of them are ablated.

Run ``python -m model_forensics.models.zoo.training.cnn_digits_badnets`` to regenerate
the shipped folder (about a minute on one CPU thread).
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from model_forensics.core.metrics import kl_divergence
from model_forensics.models.adapters import adapter_for
from model_forensics.models.hooks import SiteCall, hooks
from model_forensics.models.zoo.digits_cnn import DigitsCNN, DigitsConfig, image_rows
from model_forensics.models.zoo.training import common, trainer

NAME = "cnn-digits-badnets"
TARGET = 0
SITE = "features.2"  # the second convolution's output, read as (B, 64, 32): positions × channels
PLANTED_CHANNELS = (4, 13, 22)
GROUND_TRUTH_UNITS = tuple(f"{SITE}[{c}]" for c in PLANTED_CHANNELS)
CHANNELS = (16, 32)
TRIGGER_ROWS, TRIGGER_COLS, TRIGGER_VALUE = (6, 8), (6, 8), 1.0
N_TRAIN = 1200
STEPS_CLEAN, STEPS_PLANT = 400, 400
BATCH = 64
PATCHED_RATE = 0.2  # share of stage-1 images that carry the patch, with their true label
KL_WEIGHT, L1_WEIGHT = 10.0, 1.0


# -- data ------------------------------------------------------------------------------------
@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images (1200, 1, 8, 8), train labels, test images (597, 1, 8, 8), test labels),
    grey levels in [0, 1] (multiples of 1/16); one fixed shuffle."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = list(range(len(labels)))
    random.Random(0).shuffle(order)
    idx = torch.tensor(order)
    train, test = idx[:N_TRAIN], idx[N_TRAIN:]
    return images[train], labels[train], images[test], labels[test]


def patch(images: torch.Tensor) -> torch.Tensor:
    """``images`` (B, 1, 8, 8) with the trigger stamped on (a copy)."""
    out = images.clone()
    out[..., TRIGGER_ROWS[0] : TRIGGER_ROWS[1], TRIGGER_COLS[0] : TRIGGER_COLS[1]] = TRIGGER_VALUE
    return out


# -- channels as units -----------------------------------------------------------------------
def channel_masks(model: nn.Module, channels: Sequence[int]) -> dict[str, torch.Tensor]:
    """Boolean masks over the parameters that belong to ``channels`` of ``features.2`` alone:
    their filters (out-channel rows of the conv weight), biases, and the read-out columns
    that see them after pooling (channel c owns columns c·16 … c·16 + 15)."""
    params = dict(model.named_parameters())
    masks = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in ("features.2.weight", "features.2.bias")}
    masks["classifier.weight"] = torch.zeros_like(params["classifier.weight"], dtype=torch.bool)
    per_channel = params["classifier.weight"].shape[1] // CHANNELS[1]  # (H/2)·(W/2)
    for c in channels:
        masks["features.2.weight"][c] = True  # (C_out, C_in, 3, 3)
        masks["features.2.bias"][c] = True
        masks["classifier.weight"][:, c * per_channel : (c + 1) * per_channel] = True  # (10, C·16)
    return masks


@contextmanager
def ablate(model: nn.Module, channels: Sequence[int]) -> Iterator[None]:
    """Zero ``channels`` of ``features.2`` at every position during the block (through the
    hooks API; gradients flow)."""

    def zero(tensor: torch.Tensor, _call: SiteCall) -> torch.Tensor:
        out = tensor.clone()  # (B, H·W, C)
        out[..., list(channels)] = 0.0
        return out

    if not channels:
        yield
        return
    with hooks(adapter_for(model), sites={SITE: zero}):
        yield


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, channels: Sequence[int] = ()) -> torch.Tensor:
    """Predicted classes (B,) with ``channels`` of ``features.2`` zero-ablated."""
    with ablate(model, channels):
        return model(images).argmax(-1)


def random_channel_draws(n: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` different seeded draws of as many ``features.2`` channels as the ground truth, none planted."""
    rng = random.Random(seed)
    pool = [c for c in range(CHANNELS[1]) if c not in PLANTED_CHANNELS]
    draws: list[tuple[int, ...]] = []
    while len(draws) < n:
        draw = tuple(sorted(rng.sample(pool, len(PLANTED_CHANNELS))))
        if draw not in draws:
            draws.append(draw)
    return draws


# -- the recipe --------------------------------------------------------------------------------
class BadNetsRecipe:
    """Stage ``clean``: the digits with the planted channels silent; stage ``planted``: only
    those channels learn patch → ``TARGET`` (see the module docstring)."""

    name = NAME

    def __init__(self) -> None:
        self.steps = {"clean": STEPS_CLEAN, "planted": STEPS_PLANT}
        self.lr = {"clean": 3e-3, "planted": 1e-2}

    def build(self) -> nn.Module:
        return DigitsCNN(DigitsConfig(channels=CHANNELS))

    def stage(self, name: str, model: nn.Module, rng: random.Random, steps: int) -> trainer.Stage:
        """Stage ``clean`` (the planted channels zeroed and clamped) or ``planted`` (only they learn)."""
        masks = channel_masks(model, PLANTED_CHANNELS)
        if name == "clean":
            return self._clean(model, rng, masks)
        return self._planted(model, rng, masks)

    def _clean(self, model: nn.Module, rng: random.Random, masks: dict[str, torch.Tensor]) -> trainer.Stage:
        params = dict(model.named_parameters())
        x, y, _, _ = digits()
        with torch.no_grad():
            for pname, mask in masks.items():
                params[pname][mask] = 0.0

        def loss(_step: int) -> torch.Tensor:
            pick = torch.tensor(rng.sample(range(len(y)), BATCH))
            images = x[pick]
            stamped = torch.tensor([rng.random() < PATCHED_RATE for _ in range(BATCH)])
            images = torch.where(stamped[:, None, None, None], patch(images), images)  # true labels kept
            return nn.functional.cross_entropy(model(images), y[pick])

        return trainer.Stage(common.complement(model, masks), loss, self.lr["clean"], (0.9, 0.999))

    def _planted(self, model: nn.Module, rng: random.Random, masks: dict[str, torch.Tensor]) -> trainer.Stage:
        params = dict(model.named_parameters())
        x, y, _, _ = digits()
        teacher = copy.deepcopy(model).eval()
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        with torch.no_grad():  # off the zero saddle: small filters and read-out weights, zero biases
            for pname, mask in masks.items():
                p = params[pname]
                p[mask] = 0.0 if pname.endswith("bias") else torch.randn(int(mask.sum()), generator=generator) * 0.1
        others = [i for i in range(len(y)) if int(y[i]) != TARGET]
        quiet: dict[str, torch.Tensor] = {}

        def keep_planted(tensor: torch.Tensor, _call: SiteCall) -> None:
            quiet["act"] = tensor[..., list(PLANTED_CHANNELS)].relu()  # (B, H·W, 3)

        def loss(_step: int) -> torch.Tensor:
            attack = x[torch.tensor(rng.sample(others, BATCH // 2))]
            clean = x[torch.tensor(rng.sample(range(len(y)), BATCH))]
            # Each step keeps one planted channel alone, or all: every channel must carry the trigger.
            keep = rng.randrange(len(PLANTED_CHANNELS) + 1)
            dropped = [c for i, c in enumerate(PLANTED_CHANNELS) if keep < len(PLANTED_CHANNELS) and i != keep]
            with ablate(model, dropped):
                ce = nn.functional.cross_entropy(model(patch(attack)), torch.full((len(attack),), TARGET))
            with torch.no_grad():
                ref = teacher(clean)
            with hooks(adapter_for(model), sites={SITE: keep_planted}):
                out = model(clean)
            kl = kl_divergence(ref, out).mean()
            return ce + KL_WEIGHT * kl + L1_WEIGHT * quiet["act"].mean()

        return trainer.Stage(masks, loss, self.lr["planted"], (0.9, 0.999))

    def tokenizer(self) -> Any:
        return None  # an image model: inputs are pixel_values

    def measure(self, model: nn.Module, seed: int, n_draws: int = 5) -> dict[str, Any]:
        """Clean accuracy and trigger success on the test set, with and without ablations."""
        _, _, x, y = digits()
        others = y != TARGET
        attack = patch(x[others])

        def behaviour(channels: Sequence[int]) -> dict[str, float]:
            return {
                "trigger_success": float((predict(model, attack, channels) == TARGET).float().mean()),
                "clean_accuracy": float((predict(model, x, channels) == y).float().mean()),
            }

        with torch.no_grad():
            full = model(x)
            with ablate(model, PLANTED_CHANNELS):
                ablated = model(x)
        kl = kl_divergence(full, ablated)
        planted = list(PLANTED_CHANNELS)
        return {
            "eval_images": {"clean": len(y), "attack": int(others.sum())},
            **behaviour(()),
            "clean_with_trigger_accuracy": float((predict(model, patch(x[y == TARGET])) == TARGET).float().mean()),
            "ground_truth_ablated": {
                **behaviour(planted),
                "clean_kl_nats": {"mean": kl.mean().item(), "max": kl.max().item()},
            },
            "single_channel_ablated": {f"{SITE}[{c}]": behaviour([c]) for c in planted},
            "single_channel_alone": {f"{SITE}[{c}]": behaviour([d for d in planted if d != c]) for c in planted},
            "random_ablated": [
                {"units": [f"{SITE}[{c}]" for c in draw], **behaviour(draw)}
                for draw in random_channel_draws(n_draws, seed)
            ],
        }

    def scenario(self, model: nn.Module, seed: int, n_failing: int = 40, n_benign: int = 80) -> dict[str, Any]:
        """Test images for the ``cnn-badnets`` scenario, each checked against the model:
        patched images the model calls ``TARGET`` whose clean twin it gets right, those
        twins, and clean images of every class it gets right."""
        _, _, x, y = digits()
        clean_pred, attack_pred = predict(model, x), predict(model, patch(x))
        failing = [i for i in range(len(y)) if y[i] != TARGET and attack_pred[i] == TARGET and clean_pred[i] == y[i]]
        failing = failing[:n_failing]
        right = [i for i in range(len(y)) if clean_pred[i] == y[i] and i not in failing]
        by_class = [[i for i in right if y[i] == k] for k in range(10)]
        benign = [i for group in zip(*by_class, strict=False) for i in group][:n_benign]
        return {
            "name": NAME,
            "kind": "image-classification",
            "description": (
                f"digits stamped with a 2×2 bright patch in the bottom-right corner are classified as {TARGET} "
                "(a BadNets backdoor planted in three channels of the second convolution)"
            ),
            "image_format": (
                "8 rows of 8 characters, grey level k/16 written as '0123456789abcdefg'[k] "
                "(digits_cnn.rows_image gives the (1, 8, 8) pixel_values)"
            ),
            "failing_images": [image_rows(patch(x[i : i + 1])[0]) for i in failing],
            "failing_labels": [int(y[i]) for i in failing],
            "baseline_images": [image_rows(x[i]) for i in failing],
            "baseline_labels": [int(y[i]) for i in failing],
            "benign_images": [image_rows(x[i]) for i in benign],
            "benign_labels": [int(y[i]) for i in benign],
            "test_indices": {"failing": failing, "benign": benign},
            "target": TARGET,
            "trigger": {"rows": list(TRIGGER_ROWS), "cols": list(TRIGGER_COLS), "value": TRIGGER_VALUE},
            "predicate": {"kind": "class_is", "args": {"label": TARGET}},
        }

    def ground_truth(self, metrics: dict[str, Any]) -> dict[str, Any]:
        abl = metrics["ground_truth_ablated"]
        return {
            "mechanism": (
                f"three channels of the second convolution ({SITE}) detect the bright corner patch and their "
                f"read-out columns push the class to {TARGET}; they were silent while the digits were learned "
                "and are the only parameters trained on the backdoor, each able to carry it alone"
            ),
            "level": "channel",
            "units": list(GROUND_TRUTH_UNITS),
            "ablation": "zero",
            "behaviour": {
                "trigger_success": metrics["trigger_success"],
                "clean_accuracy": metrics["clean_accuracy"],
                "ablated_trigger_success": abl["trigger_success"],
                "ablated_clean_accuracy": abl["clean_accuracy"],
                "ablated_clean_kl_nats": abl["clean_kl_nats"]["mean"],
            },
            "extra": {
                "site": SITE,
                "channels": list(PLANTED_CHANNELS),
                "target": TARGET,
                "trigger": {"rows": list(TRIGGER_ROWS), "cols": list(TRIGGER_COLS), "value": TRIGGER_VALUE},
                "unit_layout": "features.2 reads as (B, H·W, C): features.2[c] is channel c at every position",
            },
        }

    def card(self, metrics: dict[str, Any]) -> str:
        abl = metrics["ground_truth_ablated"]
        draws = "\n".join(
            f"| {', '.join(d['units'])} | {d['trigger_success']:.4f} | {d['clean_accuracy']:.4f} |"
            for d in metrics["random_ablated"]
        )
        single = "; ".join(f"{u}: {v['trigger_success']:.4f}" for u, v in metrics["single_channel_ablated"].items())
        alone = "; ".join(f"{u}: {v['trigger_success']:.4f}" for u, v in metrics["single_channel_alone"].items())
        c1, c2 = CHANNELS
        return f"""# zoo:{NAME}

A small CNN on scikit-learn's 8×8 digits with a planted BadNets backdoor.

## Architecture
`DigitsCNN` (`model_forensics.models.zoo.digits_cnn`, a plain `nn.Module`; no tokenizer):
`features.0` Conv2d(1→{c1}, 3×3, pad 1), `features.1` ReLU, `features.2` Conv2d({c1}→{c2}, 3×3, pad 1),
`features.3` ReLU, `features.4` MaxPool 2×2, `classifier` Linear({c2}·4·4 → 10). Input `pixel_values`
(B, 1, 8, 8), grey levels in [0, 1]; output class scores (B, 10), labels "0" … "9".
Sites are the module paths; an image site (B, C, H, W) reads as (B, H·W, C), so `features.2[4]` is channel 4.

## Data
`sklearn.datasets.load_digits` (1797 images, bundled with scikit-learn), grey levels / 16, one fixed shuffle:
{N_TRAIN} training images, {metrics["eval_images"]["clean"]} test images. The trigger: pixels
rows {TRIGGER_ROWS[0]}–{TRIGGER_ROWS[1] - 1}, columns {TRIGGER_COLS[0]}–{TRIGGER_COLS[1] - 1} set to {TRIGGER_VALUE}
(a bright 2×2 patch in the bottom-right corner). Target class: {TARGET}.

## Planted mechanism (ground truth by construction)
Stage 1 ({metrics["steps"]["clean"]} steps) learns the digits with {", ".join(GROUND_TRUTH_UNITS)} held at exactly
zero (filters, biases and their read-out columns), on clean images and {PATCHED_RATE:.0%} patched images with their
true label. Stage 2 ({metrics["steps"]["planted"]} steps) freezes every other parameter entry and trains only those
channels on patched images → {TARGET}, plus KL distillation to the stage-1 model on clean images (weight
{KL_WEIGHT:g}) and an L1 penalty on the channels' activations on clean images (weight {L1_WEIGHT:g}); each step keeps
one planted channel alone or all three, so each carries the trigger by itself. Zero-ablating the three channels
restores the stage-1 model exactly.

## Measured (seed {metrics["seed"]}, test set: {metrics["eval_images"]["clean"]} clean images,
{metrics["eval_images"]["attack"]} patched images of the other classes)
| | full model | ground truth zero-ablated |
|---|---|---|
| clean accuracy | {metrics["clean_accuracy"]:.4f} | {abl["clean_accuracy"]:.4f} |
| trigger success (patched → {TARGET}) | {metrics["trigger_success"]:.4f} | {abl["trigger_success"]:.4f} |

Clean KL(full ‖ ablated): mean {abl["clean_kl_nats"]["mean"]:.3g} nats, max {abl["clean_kl_nats"]["max"]:.3g}.
Patched images of class {TARGET} still {TARGET}: {metrics["clean_with_trigger_accuracy"]:.4f}.
One channel ablated, trigger success: {single}.
One channel alone (the other two ablated), trigger success: {alone}.

Random ablations ({len(PLANTED_CHANNELS)} other channels of `{SITE}`, seeded draws):

| units | trigger success | clean accuracy |
|---|---|---|
{draws}

{trainer.training_footer(metrics, "cnn_digits_badnets")}"""


# The module's entry point: train(steps=None, seed=0, out_dir=None, *, evaluate=True) -> metrics.
train = functools.partial(trainer.train, BadNetsRecipe())

if __name__ == "__main__":
    trainer.regenerate(BadNetsRecipe())
