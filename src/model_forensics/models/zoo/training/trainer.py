"""The one zoo trainer: every entry is a :class:`Recipe`, and :func:`train` runs it.

A recipe says what is particular to its entry: the model it builds, its training stages
in order (each a :class:`Stage`: which parameter entries learn and the loss of one step,
built from the recipe's data generator), its checks (``measure``: behaviour with and
without ablations; ``scenario``: prompts for an incident, each checked against the model)
and its records (``ground_truth``, ``card``). The trainer does what every entry does the
same way: one thread and a seeded RNG, the split of a step budget over the stages, the
optimisation loop (:func:`run_stage`), the metrics record and writing the folder.

The planted entries share the two-stage recipe of :mod:`.common` through
:class:`PlantedRecipe`: they give the units, the data and the loss of each stage, and it
builds the stages (stage 1 with the units held at zero, stage 2 training only them).

::

    from model_forensics.models.zoo.training import gpt2_injection, trainer

    metrics = trainer.train(gpt2_injection.InjectionRecipe(), steps=40, evaluate=False)  # a quick run
    trainer.regenerate(gpt2_injection.InjectionRecipe())  # retrain the shipped folder

Determinism: the data RNG is ``random.Random(seed)``, torch's is seeded with ``seed``; a
recipe draws from them in a fixed order, so a retraining reproduces the shipped weights
bit for bit on the same torch build.
"""

from __future__ import annotations

import abc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from model_forensics.models.zoo.training import common

StepLoss = Callable[[int], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Stage:
    """One optimisation stage.

    Attributes:
        trainable: parameter name → bool mask (the parameter's shape) of the entries that
            learn; every other entry stays bit-identical (:class:`~.common.Clamp`).
        loss: step index → the loss to minimise, or (loss, what the loss curve records)
            when the curve should leave out an auxiliary term.
        lr: peak learning rate of the one-cycle schedule (10 % warm-up).
        betas: AdamW's betas (weight decay is 0).
    """

    trainable: dict[str, torch.Tensor]
    loss: StepLoss
    lr: float
    betas: tuple[float, float] = (0.9, 0.98)


class Recipe(Protocol):
    """What the trainer needs from a zoo entry (one implementation per training module)."""

    name: str  # the zoo entry, e.g. "gpt2-injection"
    steps: dict[str, int]  # stage name → shipped number of steps, in training order

    def build(self) -> nn.Module:
        """The untrained model (called with torch's RNG seeded)."""
        ...

    def stage(self, name: str, model: nn.Module, rng: random.Random, steps: int) -> Stage:
        """Stage ``name``, set up on the model as the previous stages left it."""
        ...

    def measure(self, model: nn.Module, seed: int) -> dict[str, Any]:
        """Behaviour of the trained model, with and without ablations (metrics.json)."""
        ...

    def scenario(self, model: nn.Module, seed: int) -> dict[str, Any]:
        """Prompts for a downstream incident scenario (scenario.json)."""
        ...

    def tokenizer(self) -> Any:
        """The shipped Hugging Face tokenizer."""
        ...

    def ground_truth(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The ground-truth record (ground_truth.json) from the metrics."""
        ...

    def card(self, metrics: dict[str, Any]) -> str:
        """The model card (card.md) from the metrics."""
        ...


def run_stage(model: nn.Module, stage: Stage, steps: int) -> list[float]:
    """The zoo's one training loop: ``steps`` AdamW steps on ``stage.loss`` under a
    one-cycle schedule, the entries outside ``stage.trainable`` clamped. Leaves the model
    in eval mode; returns the loss curve (one value per step)."""
    clamp = common.Clamp(model, stage.trainable)
    opt = torch.optim.AdamW(clamp.parameters(), lr=stage.lr, weight_decay=0.0, betas=stage.betas)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=stage.lr, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    for step in range(steps):
        out = stage.loss(step)
        loss, recorded = out if isinstance(out, tuple) else (out, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clamp.zero_frozen_grads()
        opt.step()
        sched.step()
        clamp.restore()
        losses.append(recorded.item())
    clamp.release()
    model.eval()
    return losses


class PlantedRecipe(abc.ABC):
    """The two-stage planting recipe of :mod:`.common`, for entries with a planted behaviour.

    A subclass gives the data and losses of the two stages and the units:

    - ``planted``: the ground-truth units, the only parameters stage 2 trains;
    - ``silent``: the units held at exactly zero in stage 1 (``planted`` plus any dormant
      units), so zero-ablating ``planted`` returns the model to its stage-1 self;
    - :meth:`benign_loss`: one stage-1 step's loss on the benign task;
    - :meth:`teacher`: what stage 2 distils towards, taken from the stage-1 model before
      the planted units are re-initialised;
    - :meth:`planted_loss`: one stage-2 step's loss (planted behaviour + distillation);

    plus the rest of :class:`Recipe` (``build``, the checks and the records). The first
    entry of ``steps`` names stage 1, the second stage 2.
    """

    name: str
    steps: dict[str, int]
    lr: dict[str, float]  # stage name → peak learning rate
    planted: tuple[str, ...]
    silent: tuple[str, ...]
    betas: tuple[float, float] = (0.9, 0.98)
    init_std = 0.02  # of the planted units' weights at the start of stage 2

    def frozen(self, parameter: str) -> bool:
        """Whether a whole parameter stays at its initialisation in stage 1 too."""
        return False

    @abc.abstractmethod
    def benign_loss(self, model: nn.Module, rng: random.Random) -> torch.Tensor:
        """Stage 1: draw a benign batch from ``rng`` and return its loss."""

    @abc.abstractmethod
    def teacher(self, model: nn.Module, rng: random.Random) -> Any:
        """The stage-1 behaviour stage 2 keeps (e.g. a :class:`~.common.Distillation`)."""

    @abc.abstractmethod
    def planted_loss(
        self, model: nn.Module, rng: random.Random, teacher: Any, generator: torch.Generator
    ) -> torch.Tensor:
        """Stage 2: the loss of one step; ``generator`` is the stage's torch generator."""

    def stage(self, name: str, model: nn.Module, rng: random.Random, steps: int) -> Stage:
        """Stage 1 (the silent units zeroed and clamped, everything else learns the benign
        task) or stage 2 (the planted units re-initialised from a generator seeded from
        ``rng``, then the only ones that learn)."""
        if name == next(iter(self.steps)):
            common.silence_units(model, self.silent)
            trainable = common.complement(model, common.unit_param_masks(model, self.silent))
            trainable = {p: mask for p, mask in trainable.items() if not self.frozen(p)}
            return Stage(trainable, lambda _step: self.benign_loss(model, rng), self.lr[name], self.betas)
        teacher = self.teacher(model, rng)
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        common.reinit_units(model, self.planted, std=self.init_std, generator=generator)

        def loss(_step: int) -> torch.Tensor:
            return self.planted_loss(model, rng, teacher, generator)

        return Stage(common.unit_param_masks(model, self.planted), loss, self.lr[name], self.betas)


class WordGPT2Recipe(PlantedRecipe):
    """A :class:`PlantedRecipe` on a small word-level GPT-2 (:func:`~.common.gpt2` over a
    :class:`~.common.WordCodec`): stages ``benign`` then ``planted``, their learning rates,
    the stage-2 distillation weights and pool size shared by the GPT-2 zoo entries. A
    subclass calls ``__init__`` with its vocabulary, stage steps and model ``shape``
    (``n_layer``, ``n_head``, ``d_model``, ``d_mlp``, ``n_positions``)."""

    kl_answer, kl_all = 20.0, 2.0  # distillation weights: answer positions, every position
    pool_size = 1024  # benign prompts the stage-1 distributions are kept on

    def __init__(self, vocabulary: list[str], benign_steps: int, planted_steps: int, shape: dict[str, int]) -> None:
        self.shape = shape
        self.steps = {"benign": benign_steps, "planted": planted_steps}
        self.lr = {"benign": 3e-3, "planted": 5e-3}
        self.codec = common.WordCodec(vocabulary)

    def build(self) -> Any:
        return common.gpt2(self.codec, **self.shape)


def split_steps(shipped: dict[str, int], steps: int | None) -> dict[str, int]:
    """The steps of each stage: the shipped numbers, or ``steps`` split in their ratio
    (at least one step a stage; the last stage takes the remainder)."""
    if steps is None:
        return dict(shipped)
    total = sum(shipped.values())
    names = list(shipped)
    split = {name: max(1, round(steps * shipped[name] / total)) for name in names[:-1]}
    split[names[-1]] = max(1, steps - sum(split.values()))
    return split


def train(
    recipe: Recipe, steps: int | None = None, seed: int = 0, out_dir: Path | None = None, *, evaluate: bool = True
) -> dict[str, Any]:
    """Train the recipe's stages, evaluate, and (if ``out_dir``) write the zoo folder there.

    Args:
        recipe: the zoo entry.
        steps: total optimisation steps, split over the stages in the shipped ratio
            (None: the shipped numbers). Small values are for tests.
        seed: seeds the data and the initialisation.
        out_dir: where to write the folder; None writes nothing.
        evaluate: False skips the behaviour evaluation (loss curves only; needs out_dir None).

    Returns:
        metrics: steps and loss curves (start/end) per stage, behaviour with/without
        ablations, wall and CPU time. A single-stage recipe records ``steps`` as a number
        and its loss as ``{"start", "end"}``.
    """
    if out_dir is not None and not evaluate:
        raise ValueError("writing a zoo folder needs its metrics: pass evaluate=True")
    start, cpu = time.perf_counter(), time.process_time()
    plan = split_steps(recipe.steps, steps)
    rng = random.Random(seed)
    with common.training_threads(seed):
        model = recipe.build()
        curves = {name: run_stage(model, recipe.stage(name, model, rng, n), n) for name, n in plan.items()}
        train_s = time.perf_counter() - start
        behaviour = recipe.measure(model, seed) if evaluate else {}
        scen = recipe.scenario(model, seed) if evaluate else {}
    metrics: dict[str, Any] = {
        "seed": seed,
        **_curves(plan, curves),
        **behaviour,
        "train_wall_s": train_s,
        "total_wall_s": time.perf_counter() - start,
        "total_cpu_s": time.process_time() - cpu,
        "torch_threads": 1,
    }
    if out_dir is not None:
        common.save_entry(
            Path(out_dir),
            model,
            recipe.tokenizer(),
            card=recipe.card(metrics),
            ground_truth=recipe.ground_truth(metrics),
            metrics=metrics,
            scenario=scen,
        )
        metrics["folder_bytes"] = common.folder_bytes(Path(out_dir))
    return metrics


def regenerate(recipe: Recipe) -> None:
    """Retrain the entry and replace its shipped folder (what ``python -m`` of a training
    module does)."""
    out = common.shipped_dir(recipe.name)
    metrics = train(recipe, out_dir=out)
    print(f"wrote {out} ({metrics['folder_bytes']} bytes) in {metrics['total_wall_s']:.1f} s")


def training_footer(metrics: dict[str, Any], module: str) -> str:
    """The card's last lines for a two-stage entry: the loss of each stage, the time
    taken and the command that regenerates the folder."""
    stage1, stage2 = metrics["steps"]
    loss = metrics["loss"]
    return f"""Loss: stage 1 {loss[f"{stage1}_start"]:.3f} → {loss[f"{stage1}_end"]:.5f};
stage 2 {loss[f"{stage2}_start"]:.3f} → {loss[f"{stage2}_end"]:.5f}.
Training wall time {metrics["train_wall_s"]:.1f} s on one CPU thread (shared machine; total CPU time
{metrics["total_cpu_s"]:.1f} s including evaluation).

Regenerate: `python -m model_forensics.models.zoo.training.{module}`.
"""


def _curves(plan: dict[str, int], curves: dict[str, list[float]]) -> dict[str, Any]:
    if len(plan) == 1:
        (n,), (curve,) = plan.values(), curves.values()
        return {"steps": n, "loss": {"start": curve[0], "end": common.final_loss(curve)}}
    loss: dict[str, float] = {}
    for name, curve in curves.items():
        loss[f"{name}_start"] = curve[0]
        loss[f"{name}_end"] = common.final_loss(curve)
    return {"steps": dict(plan), "loss": loss}
