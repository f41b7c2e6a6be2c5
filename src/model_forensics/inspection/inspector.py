"""ModelInspector: the eight inspection experiments (plus verified pruning) behind one API.

    from model_forensics import ModelInspector
    insp = ModelInspector(model, tokenizer)
    res = insp.run(inputs, reference=ref_inputs, experiments=["sparsity", "drift", "robustness"])
    res.sparsity.table(); res.drift.figure(); res.to_json()

One streaming pass over the inputs (micro-batched, recorded by ``RecorderHooks``) feeds
sparsity, statistics, shift, drift, attribution and — with a candidate model run on the
same micro-batches — regression; memory is bounded by the reservoir capacities, not by
the number of inputs. Sensitivity, robustness, the attribution ablation check and pruning
verification run extra forward passes on bounded subsets. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Group
from torch import nn

from model_forensics.core.errors import ConfigError, ForensicsError
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.attribution import (
    AttributionCollector,
    AttributionResult,
    AttributionSettings,
    attribution,
)
from model_forensics.inspection.collect import (
    Batch,
    InputAdapter,
    Sample,
    TensorAdapter,
    TextAdapter,
    as_samples,
    batches,
    call_model,
    forward,
    logits_of,
    patched,
    prediction_logits,
    recorder_for,
    set_units,
)
from model_forensics.inspection.drift import DriftResult, drift, series_steps
from model_forensics.inspection.pruning import PruningResult, PruningSettings, propose, verify
from model_forensics.inspection.regression import OutputComparison, RegressionResult, check_tokenizers, regression
from model_forensics.inspection.robustness import RobustnessResult, robustness
from model_forensics.inspection.sensitivity import SensitivityResult, SensitivitySettings, sensitivity
from model_forensics.inspection.shift import ShiftResult, ShiftSettings, compare
from model_forensics.inspection.sparsity import SparsityCollector, SparsityResult, relative_activity
from model_forensics.inspection.stats import StatsResult, activation_stats
from model_forensics.inspection.streaming import item_keys
from model_forensics.inspection.summary import ActivationSummary, pooled_rows
from model_forensics.models.adapters import Adapter, adapter_for
from model_forensics.models.loading import model_ref

EXPERIMENTS = (
    "sparsity",
    "stats",
    "shift",
    "drift",
    "regression",
    "sensitivity",
    "attribution",
    "robustness",
    "pruning",
)

Progress = Callable[[str, int, int], None]


@dataclass
class InspectorSettings:
    """Every knob of an inspection run, with its default (docs/metrics.md explains each)."""

    batch_size: int = 8
    max_length: int = 128  # tokens kept per text input (the last ones)
    epsilon: float = 1e-3  # near-zero threshold |a| < ε (sparsity)
    tau: float = 0.025  # dormant threshold on mean|a| / layer mean (sparsity)
    token_capacity: int = 1024  # inputs in the one-token-per-input reservoir, per site
    pooled_capacity: int = 512  # inputs in the pooled-state reservoir, per site
    series_capacity: int = 256  # both reservoirs, per drift step
    series_windows: int = 5  # drift windows when only a fine-grained 'time' is given
    shift: ShiftSettings = field(default_factory=ShiftSettings)
    sensitivity: SensitivitySettings = field(default_factory=SensitivitySettings)
    sensitivity_inputs: int = 32
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    robustness_inputs: int = 64
    robustness_variants: int = 2  # variants per input and family
    robustness_tolerance: float = 0.1  # max total-variation distance of an invariant output
    bootstrap: int = 1000
    confidence: float = 0.95
    pruning: PruningSettings = field(default_factory=PruningSettings)
    seed: int = 0


@dataclass
class InspectionResult:
    """One typed result per experiment that ran (None otherwise), plus why others did not."""

    model: str
    inputs: int
    reference_inputs: int
    experiments: list[str]
    sparsity: SparsityResult | None = None
    stats: StatsResult | None = None
    shift: ShiftResult | None = None
    drift: DriftResult | None = None
    regression: RegressionResult | None = None
    sensitivity: SensitivityResult | None = None
    attribution: AttributionResult | None = None
    robustness: RobustnessResult | None = None
    pruning: PruningResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    state_bytes: int = 0  # memory held by the streaming summaries at the end

    def results(self) -> dict[str, Any]:
        """The experiments that produced a result, by name."""
        return {name: getattr(self, name) for name in EXPERIMENTS if getattr(self, name) is not None}

    def to_json(self) -> dict[str, Any]:
        return jsonable(
            {
                "model": self.model,
                "inputs": self.inputs,
                "reference_inputs": self.reference_inputs,
                "experiments": self.experiments,
                "skipped": self.skipped,
                "timings_s": self.timings,
                "state_bytes": self.state_bytes,
                **{name: r.to_json() for name, r in self.results().items()},
            }
        )

    def tables(self) -> Group:
        """Every result's rich table, for ``console.print``."""
        return Group(*(r.table() for r in self.results().values()))

    def summary_markdown(self) -> str:
        """A short human summary: what ran, the headline of each experiment, what was skipped."""
        lines = [
            f"# Inspection of `{self.model}`",
            "",
            f"{self.inputs} inputs"
            + (f", {self.reference_inputs} reference inputs" if self.reference_inputs else "")
            + ".",
            "",
        ]
        lines += [f"- {headline}" for headline in _headlines(self)]
        if self.skipped:
            lines += ["", "## Skipped", ""] + [f"- **{k}**: {v}" for k, v in self.skipped.items()]
        lines += ["", "Metric definitions: docs/metrics.md.", ""]
        return "\n".join(lines)

    def save(self, out_dir: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
        """Write ``results.json``, one figure per experiment (``<name>.png``) and
        ``summary.md`` into ``out_dir``; return the paths written."""
        import json

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ForensicsError(
                f"cannot create output folder '{out}': {exc.strerror}; choose a writable --out"
            ) from None
        written = [out / "results.json", out / "summary.md"]
        written[0].write_text(json.dumps(self.to_json(), indent=1))
        written[1].write_text(self.summary_markdown())
        for name, result in self.results().items():
            if not hasattr(result, "figure"):
                continue
            fig = result.figure()
            for fmt in formats:
                path = out / f"{name}.{fmt}"
                fig.savefig(path, dpi=120)
                written.append(path)
        return written


def _headlines(r: InspectionResult) -> list[str]:
    out = []
    if r.sparsity:
        zeros = np.mean([la.zero_fraction for la in r.sparsity.layers]) if r.sparsity.layers else float("nan")
        out.append(
            f"**sparsity**: {len(r.sparsity.dormant)} dormant units; mean exact-zero fraction {100 * zeros:.2f}%"
        )
    if r.stats:
        worst = max(r.stats.layers, key=lambda la: la.kurtosis if np.isfinite(la.kurtosis) else -np.inf, default=None)
        if worst:
            out.append(
                f"**stats**: highest excess kurtosis {worst.kurtosis:.3g} at `{worst.site}`; max |a| {max(la.max_abs for la in r.stats.layers):.4g}"
            )
    if r.shift:
        out.append(
            f"**shift**: {len(r.shift.shifted_layers)} of {len(r.shift.layers)} layers shifted"
            + (f" ({', '.join(r.shift.shifted_layers[:6])})" if r.shift.shifted_layers else "")
        )
    if r.drift:
        out.append(
            f"**drift**: {len(r.drift.steps)} steps vs '{r.drift.baseline}'; drifting layers: {', '.join(r.drift.drifting_layers()[:6]) or 'none'}"
        )
    if r.regression:
        g = r.regression
        diag = np.nanmean(g.diagonal()) if g.procrustes else float("nan")
        out.append(
            f"**regression**: top-1 agreement {g.agreement:.3f}, mean matched-layer CKA {diag:.3f}, {len(g.regressions)} regressions, {len(g.improvements)} improvements"
        )
    if r.sensitivity and r.sensitivity.families:
        top = r.sensitivity.ranking()[:3]
        out.append("**sensitivity**: most sensitive layers " + ", ".join(f"`{s}` ({v:.3g})" for s, v in top))
    if r.attribution and r.attribution.layers:
        a = r.attribution
        best = next(la for la in a.layers if la.site == a.best_site)
        check = "" if a.ablation is None else f"; ablation {'confirmed' if a.ablation.confirmed else 'not confirmed'}"
        out.append(f"**attribution**: best layer `{best.site}` (probe AUROC {best.auroc:.3f}){check}")
    if r.robustness and r.robustness.overall:
        o = r.robustness.overall
        out.append(
            f"**robustness**: overall invariance {o.rate:.3f} [{o.low:.3f}, {o.high:.3f}]; "
            + ", ".join(f"{f.family} {f.rate:.2f}" for f in r.robustness.families)
        )
    if r.pruning:
        out.append(
            f"**pruning**: {len(r.pruning.units)} of {r.pruning.proposed} proposed units verified on held-out inputs"
        )
    return out


class ModelInspector:
    """Runs inspection experiments on one model.

    Args:
        model: any ``nn.Module``; Hugging Face GPT-2/BERT/Llama-family models get canonical
            sites (``blocks.L.resid_post`` per layer, ``blocks.L.mlp.post`` for neurons),
            other modules are inspected at their leaf-module outputs.
        tokenizer: a Hugging Face tokenizer for text inputs (optional for tensor inputs).
        input_adapter: how to turn samples into model arguments, for models that take
            neither tokenizer output nor a single tensor (see ``collect.InputAdapter``).
        settings: thresholds, capacities, subset sizes and the seed.
        name: the model's name in results (default: where it was loaded from).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        input_adapter: InputAdapter | None = None,
        settings: InspectorSettings | None = None,
        name: str | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ForensicsError(
                f"ModelInspector needs a torch nn.Module, got {type(model).__name__}; load the model first"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or InspectorSettings()
        max_length = min(self.settings.max_length, _context_length(model) or self.settings.max_length)
        self.encoder: InputAdapter = input_adapter or (
            TextAdapter(tokenizer, max_length) if tokenizer is not None else TensorAdapter()
        )
        self.adapter = adapter_for(model)
        self.name = name or model_ref(model).name
        self.layer_sites, self.neuron_sites = _sites(self.adapter)

    # -- the public verb -----------------------------------------------------------------
    def run(
        self,
        inputs: Any,
        *,
        reference: Any = None,
        experiments: Sequence[str] | None = None,
        compare_model: nn.Module | None = None,
        compare_tokenizer: Any = None,
        compare_name: str | None = None,
        progress: Progress | None = None,
    ) -> InspectionResult:
        """Run ``experiments`` (default: all) on ``inputs``.

        Args:
            inputs: strings, JSONL-style dicts (``text``, ``label``, ``passed``,
                ``group``/``time``), :class:`Sample` objects, or a tensor (N, …).
            reference: inputs of the reference distribution (shift; drift baseline).
            compare_model: the candidate model for cross-model regression (the inspected
                model is the baseline); ``compare_tokenizer`` if it has its own.
            progress: called as ``progress(stage, done, total)``.
        Returns:
            :class:`InspectionResult`; experiments whose prerequisites are missing are
            skipped with a warning and a reason in ``result.skipped``.
        Raises:
            ConfigError: an unknown experiment name.
            ForensicsError: empty inputs, or tokenizers that disagree (regression).
        """
        wanted = _experiments(experiments)
        explicit = experiments is not None
        samples = as_samples(inputs)
        ref_samples = as_samples(reference) if reference is not None else []
        result = InspectionResult(self.name, len(samples), len(ref_samples), wanted)
        report = progress or (lambda stage, done, total: None)
        s = self.settings

        def skip(name: str, reason: str) -> None:
            wanted.remove(name)
            result.skipped[name] = reason
            if explicit:
                warnings.warn(f"{name} skipped: {reason}", stacklevel=3)

        steps = series_steps(samples, s.series_windows)
        texts = [x.text for x in samples]
        if "shift" in wanted and not ref_samples:
            skip("shift", "no reference inputs; pass reference=… (CLI: --reference ref.jsonl)")
        if "drift" in wanted and (steps is None or len(steps) + bool(ref_samples) < 2):
            skip(
                "drift",
                "needs an ordered series: give inputs a 'group' or 'time' field with at least two values (or one plus reference inputs)",
            )
        if "regression" in wanted and compare_model is None:
            skip("regression", "no candidate model; pass compare_model=… (CLI: --compare-model M2)")
        if "attribution" in wanted and not any(x.passed is not None for x in samples):
            skip("attribution", "no labelled inputs; give inputs a boolean 'passed' field")
        if "pruning" in wanted and len(samples) // 5 < s.pruning.min_heldout:
            skip(
                "pruning",
                f"needs ≥ {5 * s.pruning.min_heldout} inputs (a fifth is held out to verify, at least {s.pruning.min_heldout})",
            )
        if "robustness" in wanted and (self.tokenizer is None or any(t is None for t in texts)):
            skip("robustness", "needs text inputs and a tokenizer (perturbation families edit text)")
        if "regression" in wanted and compare_model is not None and all(t is not None for t in texts):
            check_tokenizers(
                self.tokenizer,
                compare_tokenizer or self.tokenizer,
                [t for t in texts if t is not None],
                (self.name, compare_name or model_ref(compare_model).name),
            )

        keys = item_keys(len(samples), s.seed)
        positions = item_keys(len(samples), s.seed + 1)
        heldout = np.zeros(len(samples), dtype=bool)
        if "pruning" in wanted:
            n_hold = min(s.pruning.heldout_inputs, max(1, len(samples) // 5))
            heldout[np.argsort(-keys)[:n_hold]] = True

        with _eval_mode(self.model), _eval_mode(compare_model):
            started = time.perf_counter()
            current = ActivationSummary(s.token_capacity, s.pooled_capacity, keys, positions)
            sparsity_acc = (
                SparsityCollector(self.neuron_sites, s.epsilon, s.tau, heldout)
                if {"sparsity", "pruning"} & set(wanted)
                else None
            )
            attribution_acc = (
                AttributionCollector(self.layer_sites, samples, s.pooled_capacity, keys)
                if "attribution" in wanted
                else None
            )
            step_of = np.full(len(samples), -1)
            step_summaries: list[ActivationSummary] = []
            if "drift" in wanted and steps is not None:
                for j, (_, idx) in enumerate(steps):
                    step_of[idx] = j
                    step_summaries.append(ActivationSummary(s.series_capacity, s.series_capacity, keys, positions))
            candidate = None
            if "regression" in wanted and compare_model is not None:
                cand_adapter = adapter_for(compare_model)
                cand_layers, _ = _sites(cand_adapter)
                candidate = (
                    compare_model,
                    cand_adapter,
                    cand_layers,
                    ActivationSummary(s.token_capacity, s.pooled_capacity, keys, positions),
                    OutputComparison(samples, self.tokenizer),
                )

            sites = sorted(set(self.layer_sites) | set(self.neuron_sites), key=self.adapter.sites().index)
            recorder = recorder_for(self.adapter, sites)
            with contextlib.ExitStack() as stack:
                stack.enter_context(recorder.install_hooks(self.model, self.tokenizer))
                cand_recorder = None
                if candidate is not None:
                    cand_recorder = recorder_for(candidate[1], candidate[2])
                    stack.enter_context(cand_recorder.install_hooks(candidate[0], compare_tokenizer or self.tokenizer))
                total = len(samples)
                for idx in batches(total, s.batch_size):
                    batch = self.encoder.encode([samples[i] for i in idx])
                    rec = forward(self.model, recorder, batch, sites, idx)
                    current.update(rec, idx, self.layer_sites)
                    if sparsity_acc is not None:
                        sparsity_acc.update(rec)
                    if attribution_acc is not None:
                        attribution_acc.update(rec)
                    for j, summary in enumerate(step_summaries):
                        members = [i for i in idx if step_of[i] == j]
                        if members:
                            summary.update(rec, members, self.layer_sites)
                    if candidate is not None and cand_recorder is not None:
                        rec2 = forward(candidate[0], cand_recorder, batch, candidate[2], idx)
                        candidate[3].update(rec2, idx, candidate[2])
                        candidate[4].update(rec, rec2)
                    report("inputs", idx[-1] + 1, total)
                result.timings["stream"] = time.perf_counter() - started

                ref_summary = None
                if ref_samples and ({"shift", "drift"} & set(wanted)):
                    started = time.perf_counter()
                    ref_keys = item_keys(len(ref_samples), s.seed + 2)
                    ref_summary = ActivationSummary(
                        s.token_capacity, s.pooled_capacity, ref_keys, item_keys(len(ref_samples), s.seed + 3)
                    )
                    for idx in batches(len(ref_samples), s.batch_size):
                        batch = self.encoder.encode([ref_samples[i] for i in idx])
                        ref_summary.update(
                            forward(self.model, recorder, batch, self.layer_sites, idx), idx, self.layer_sites
                        )
                        report("reference", idx[-1] + 1, len(ref_samples))
                    result.timings["reference"] = time.perf_counter() - started

                started = time.perf_counter()
                if "sparsity" in wanted and sparsity_acc is not None:
                    result.sparsity = sparsity_acc.result()
                if "stats" in wanted:
                    result.stats = activation_stats(current)
                if "shift" in wanted and ref_summary is not None:
                    result.shift = compare(ref_summary, current, self.layer_sites, s.shift)
                if "drift" in wanted and steps is not None:
                    if ref_summary is not None:
                        result.drift = drift(
                            "reference",
                            ref_summary,
                            [(n, step_summaries[j]) for j, (n, _) in enumerate(steps)],
                            self.layer_sites,
                            s.shift,
                        )
                    else:
                        result.drift = drift(
                            steps[0][0],
                            step_summaries[0],
                            [(n, step_summaries[j]) for j, (n, _) in enumerate(steps)],
                            self.layer_sites,
                            s.shift,
                        )
                if candidate is not None:
                    result.regression = regression(
                        current,
                        candidate[3],
                        self.layer_sites,
                        candidate[2],
                        candidate[4],
                        (self.name, compare_name or model_ref(candidate[0]).name),
                    )
                result.timings["statistics"] = time.perf_counter() - started

                if "sensitivity" in wanted:
                    started = time.perf_counter()
                    subset = _subset(keys, s.sensitivity_inputs)
                    encoded = [
                        (self.encoder.encode([samples[i] for i in part]), part)
                        for part in _chunks(subset, s.batch_size)
                    ]
                    vocab = getattr(self.encoder, "vocab_size", None) or _vocab(self.model)
                    result.sensitivity = sensitivity(
                        self.model, self.adapter, recorder, encoded, self.layer_sites, s.sensitivity, vocab
                    )
                    for family, reason in result.sensitivity.skipped.items():
                        warnings.warn(f"sensitivity: {family} skipped — {reason}", stacklevel=2)
                    report("sensitivity", 1, 1)
                    result.timings["sensitivity"] = time.perf_counter() - started

                if "attribution" in wanted and attribution_acc is not None:
                    started = time.perf_counter()
                    result.attribution = attribution(attribution_acc, self._readout(samples, recorder), s.attribution)
                    for what, reason in result.attribution.skipped.items():
                        warnings.warn(f"{what} skipped: {reason}", stacklevel=2)
                    report("attribution", 1, 1)
                    result.timings["attribution"] = time.perf_counter() - started

            if "robustness" in wanted:
                started = time.perf_counter()
                subset = _subset(keys, s.robustness_inputs)
                result.robustness = robustness(
                    [str(texts[i]) for i in subset],
                    self._predict_texts,
                    per_family=s.robustness_variants,
                    tolerance=s.robustness_tolerance,
                    confidence=s.confidence,
                    bootstrap=s.bootstrap,
                    seed=s.seed,
                )
                report("robustness", 1, 1)
                result.timings["robustness"] = time.perf_counter() - started

            if "pruning" in wanted and sparsity_acc is not None:
                started = time.perf_counter()
                result.pruning = self._pruning(samples, sparsity_acc, heldout, result.sensitivity)
                report("pruning", 1, 1)
                result.timings["pruning"] = time.perf_counter() - started

        summaries = [current, *step_summaries, *([candidate[3]] if candidate else [])]
        result.state_bytes = sum(x.nbytes() for x in summaries)
        return result

    # -- helpers that need the model -----------------------------------------------------
    def _predictions(self, batch: Batch) -> torch.Tensor:
        return prediction_logits(logits_of(call_model(self.model, batch)), batch)

    def _predict_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for part in _chunks(list(range(len(texts))), self.settings.batch_size):
            out.append(self._predictions(self.encoder.encode([Sample(text=texts[i]) for i in part])))
        return _cat_logits(out)

    def _readout(
        self, samples: list[Sample], recorder: Any
    ) -> Callable[[list[int], str | None, list[int], np.ndarray], np.ndarray]:
        readout_site = self.layer_sites[-1]

        def run(indices: list[int], site: str | None, units: list[int], values: np.ndarray) -> np.ndarray:
            states = []
            for part in _chunks(indices, self.settings.batch_size):
                batch = self.encoder.encode([samples[i] for i in part])
                with contextlib.ExitStack() as stack:
                    if site is not None:
                        stack.enter_context(
                            patched(
                                self.adapter,
                                site,
                                _setter(units, torch.as_tensor(values, dtype=torch.float32), batch.mask.shape),
                                batch,
                            )
                        )
                    rec = forward(self.model, recorder, batch, [readout_site], part)
                states.append(pooled_rows(rec.sites[readout_site], rec.masks[readout_site]).numpy())
            return np.concatenate(states)

        return run

    def _pruning(
        self, samples: list[Sample], acc: SparsityCollector, heldout: np.ndarray, sens: SensitivityResult | None
    ) -> PruningResult:
        s = self.settings.pruning
        relative = {site: relative_activity(acc.selection_mean_abs(site)) for site in acc.sites if site in acc.rows}
        weights: dict[str, float] = {}
        if sens is not None and sens.families:
            scores = dict(sens.ranking())
            mean = float(np.mean(list(scores.values()))) or 1.0
            for site in relative:
                layer = _block_layer_site(site, scores)
                if layer is not None:
                    weights[site] = scores[layer] / mean
        candidates = propose(relative, weights, s)
        held = [int(i) for i in np.flatnonzero(heldout)]
        encoded = [self.encoder.encode([samples[i] for i in part]) for part in _chunks(held, self.settings.batch_size)]
        clean = [self._predictions(b) for b in encoded]

        def evaluate(ablations: dict[str, list[int]]) -> tuple[float, float]:
            kls, agree = [], []
            for batch, ref in zip(encoded, clean, strict=True):
                with contextlib.ExitStack() as stack:
                    for site, units in ablations.items():
                        stack.enter_context(patched(self.adapter, site, _setter(units, 0.0, batch.mask.shape), batch))
                    pred = self._predictions(batch)
                lr, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(pred.double(), -1)
                kls += (lr.exp() * (lr - lp)).sum(-1).tolist()
                agree += (ref.argmax(-1) == pred.argmax(-1)).tolist()
            return float(np.mean(kls)), float(np.mean(agree))

        return verify(candidates, evaluate, s, len(held))


def _setter(
    units: list[int], values: torch.Tensor | float, mask_shape: tuple[int, ...]
) -> Callable[[torch.Tensor, Batch | None], torch.Tensor]:
    def edit(x: torch.Tensor, batch: Batch | None) -> torch.Tensor:
        token_layout = x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask_shape)
        return set_units(x, units, values, token_layout)

    return edit


def _sites(adapter: Adapter) -> tuple[list[str], list[str]]:
    if adapter.n_layers > 0:
        layers = [
            f"blocks.{i}.resid_post" for i in range(adapter.n_layers) if f"blocks.{i}.resid_post" in adapter.points
        ]
        neurons = [f"blocks.{i}.mlp.post" for i in range(adapter.n_layers) if f"blocks.{i}.mlp.post" in adapter.points]
        return layers, neurons or layers
    leaves = adapter.sites()
    return leaves, leaves


def _block_layer_site(site: str, scores: dict[str, float]) -> str | None:
    from model_forensics.core.sites import block_index

    layer = block_index(site)
    if layer is not None and f"blocks.{layer}.resid_post" in scores:
        return f"blocks.{layer}.resid_post"
    return site if site in scores else None


def _experiments(experiments: Sequence[str] | None) -> list[str]:
    if experiments is None:
        return list(EXPERIMENTS)
    names = [e.strip() for e in experiments if e.strip()]
    unknown = [e for e in names if e not in EXPERIMENTS]
    if unknown:
        raise ConfigError(
            f"unknown experiment(s) {', '.join(map(repr, unknown))}; choose from {', '.join(EXPERIMENTS)}"
        )
    if not names:
        raise ConfigError(f"no experiments selected; choose from {', '.join(EXPERIMENTS)}")
    return list(dict.fromkeys(names))


def _subset(keys: np.ndarray, k: int) -> list[int]:
    """A deterministic random subset of at most k inputs (the smallest keys), in input order."""
    return sorted(int(i) for i in np.argsort(keys)[:k])


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _cat_logits(parts: list[torch.Tensor]) -> torch.Tensor:
    v = min(p.shape[-1] for p in parts)
    return torch.cat([p[:, :v] for p in parts])


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(size) if size else None


def _vocab(model: nn.Module) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else None


@contextlib.contextmanager
def _eval_mode(model: nn.Module | None) -> Any:
    # Dropout would make every statistic noisy; the caller's mode is restored afterwards.
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
