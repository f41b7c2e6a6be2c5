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

Every knob (batch size, thresholds, capacities, subset sizes, seeds) comes from the
``inspection:`` section of the config (``configs/default.yaml``); ``settings=`` and
constructor keywords override it key by key. Ablations and perturbations go through
:func:`~model_forensics.models.hooks.hooks` (via ``collect.patched``).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from rich.console import Group
from torch import nn

from model_forensics.core.config import ForensicsConfig, InspectionConfig, load_config, validation_message
from model_forensics.core.distributed import cluster_cpus, map_tasks, ray_session, shard_spans
from model_forensics.core.errors import ConfigError, ForensicsError
from model_forensics.core.metrics import kl_divergence
from model_forensics.inspection._json import jsonable
from model_forensics.inspection.attribution import AttributionCollector, AttributionResult, attribution
from model_forensics.inspection.collect import (
    Batch,
    InputAdapter,
    Recorded,
    Sample,
    TensorAdapter,
    TextAdapter,
    as_samples,
    batches,
    call_model,
    forward,
    output_logits,
    patched,
    prediction_logits,
    recorder_for,
    set_units,
)
from model_forensics.inspection.drift import DriftResult, drift, series_steps
from model_forensics.inspection.pruning import PruningResult, propose, verify
from model_forensics.inspection.regression import OutputComparison, RegressionResult, check_tokenizers, regression
from model_forensics.inspection.robustness import RobustnessResult, robustness
from model_forensics.inspection.sensitivity import SensitivityResult, sensitivity
from model_forensics.inspection.shift import ShiftResult, compare
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


# Every knob of an inspection run: the ``inspection:`` config section (configs/default.yaml
# lists each with its default; docs/metrics.md explains them).
InspectorSettings = InspectionConfig


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
    backend: str = "local"  # where the streaming pass ran: "local" or "ray (ADDRESS, N shards)"

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
                "backend": self.backend,
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
        config: where the knobs come from: a YAML path, a :class:`ForensicsConfig`, a plain
            mapping or None (defaults); its ``inspection:`` section is used.
        input_adapter: how to turn samples into model arguments, for models that take
            neither tokenizer output nor a single tensor (see ``collect.InputAdapter``).
        settings: an :class:`InspectorSettings`; the fields set in it override ``config``.
        name: the model's name in results (default: where it was loaded from).
        **overrides: any key of the ``inspection:`` section (``batch_size=4``,
            ``shift={"alpha": 0.01}``); they override ``config`` and ``settings``.
    Raises:
        ConfigError: an unknown key or a value out of range (in the file or the keywords).

    Example::

        ModelInspector(model, tokenizer, config="configs/default.yaml", batch_size=4, seed=1)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        config: str | Path | ForensicsConfig | dict[str, Any] | None = None,
        input_adapter: InputAdapter | None = None,
        settings: InspectorSettings | None = None,
        name: str | None = None,
        **overrides: Any,
    ):
        if not isinstance(model, nn.Module):
            raise ForensicsError(
                f"ModelInspector needs a torch nn.Module, got {type(model).__name__}; load the model first"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.settings: InspectionConfig = inspection_settings(config, settings, overrides)
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
        ray: str | None = None,
    ) -> InspectionResult:
        """Run ``experiments`` (default: all) on ``inputs``.

        Args:
            inputs: strings, JSONL-style dicts (``text``, ``label``, ``passed``,
                ``group``/``time``), :class:`Sample` objects, or a tensor (N, …).
            reference: inputs of the reference distribution (shift; drift baseline).
            compare_model: the candidate model for cross-model regression (the inspected
                model is the baseline); ``compare_tokenizer`` if it has its own.
            progress: called as ``progress(stage, done, total)``.
            ray: run the streaming passes (inputs and reference) as Ray tasks, one shard of
                whole micro-batches per cluster CPU: ``"local"``, ``"auto"`` or a cluster
                address (:mod:`~model_forensics.core.distributed`). The shards' summaries
                merge into exactly what the local pass builds (reservoirs identical, moments
                to float64 rounding); the bounded-subset stages then run here.
        Returns:
            :class:`InspectionResult`; experiments whose prerequisites are missing are
            skipped with a warning and a reason in ``result.skipped``.
        Raises:
            ConfigError: an unknown experiment name.
            ForensicsError: empty inputs, or tokenizers that disagree (regression).
            RayUnavailable: ``ray`` given but Ray is missing or the address unreachable.
        """
        wanted = _experiments(experiments)
        samples = as_samples(inputs)
        ref_samples = as_samples(reference) if reference is not None else []
        self._check_kind(samples + ref_samples)
        result = InspectionResult(self.name, len(samples), len(ref_samples), wanted)
        report = progress or (lambda stage, done, total: None)
        s = self.settings
        steps = series_steps(samples, s.series_windows)
        for name, reason in self._missing(wanted, samples, ref_samples, steps, compare_model).items():
            wanted.remove(name)
            result.skipped[name] = reason
            if experiments is not None:
                warnings.warn(f"{name} skipped: {reason}", stacklevel=2)
        candidate = None
        if "regression" in wanted and compare_model is not None:
            cand_name = compare_name or model_ref(compare_model).name
            texts = [x.text for x in samples if x.text is not None]
            check_tokenizers(self.tokenizer, compare_tokenizer or self.tokenizer, texts, (self.name, cand_name))
            candidate = _Candidate(compare_model, compare_tokenizer or self.tokenizer, cand_name)

        keys = item_keys(len(samples), s.seed)
        heldout = np.zeros(len(samples), dtype=bool)
        if "pruning" in wanted:  # the largest keys: a random fifth, never used to choose
            heldout[np.argsort(-keys)[: min(s.pruning.heldout_inputs, len(samples) // 5)]] = True
        collectors = _Collectors(self, samples, wanted, steps, candidate, keys, heldout)
        sites = sorted(set(self.layer_sites) | set(self.neuron_sites), key=self.adapter.sites().index)
        recorder = recorder_for(self.adapter, sites)

        need_reference = bool(ref_samples) and bool({"shift", "drift"} & set(wanted))
        ref_summary = None
        if ray is not None:  # before any hook is installed: the tasks get a clean copy of the model
            with _stage(result, "stream"):
                shared = _Shared(self, samples, ref_samples if need_reference else [], wanted, steps, candidate)
                shared.keys, shared.heldout, shared.sites = keys, heldout, sites
                ref_summary = self._stream_on_ray(ray, shared, collectors, result, report)

        with _eval_mode(self.model), _eval_mode(compare_model), contextlib.ExitStack() as hooks:
            hooks.enter_context(recorder.install_hooks(self.model, self.tokenizer))
            if ray is None:
                with _stage(result, "stream"):
                    self._stream(samples, recorder, sites, collectors, hooks, report)
                if need_reference:
                    with _stage(result, "reference"):
                        ref_summary = self._reference(ref_samples, recorder, report)
            with _stage(result, "statistics"):
                self._statistics(result, wanted, collectors, ref_summary, steps)
            if "sensitivity" in wanted:
                with _stage(result, "sensitivity"):
                    part = _subset(keys, s.sensitivity_inputs)
                    encoded = [(self.encoder.encode([samples[i] for i in c]), c) for c in _chunks(part, s.batch_size)]
                    vocab = getattr(self.encoder, "vocab_size", None) or _vocab(self.model)
                    result.sensitivity = sensitivity(
                        self.model, self.adapter, recorder, encoded, self.layer_sites, s.sensitivity, vocab
                    )
                    for family, reason in result.sensitivity.skipped.items():
                        warnings.warn(f"sensitivity: {family} skipped — {reason}", stacklevel=2)
                    report("sensitivity", 1, 1)
            if collectors.attribution is not None:
                with _stage(result, "attribution"):
                    result.attribution = attribution(
                        collectors.attribution, self._readout(samples, recorder), s.attribution
                    )
                    for what, reason in result.attribution.skipped.items():
                        warnings.warn(f"{what} skipped: {reason}", stacklevel=2)
                    report("attribution", 1, 1)
            hooks.close()  # the remaining stages need outputs only: no recording
            if "robustness" in wanted:
                with _stage(result, "robustness"):
                    chosen = [samples[i] for i in _subset(keys, s.robustness_inputs)]
                    images = _all_images(chosen)
                    result.robustness = robustness(
                        [x.tensor for x in chosen if x.tensor is not None] if images else [str(x.text) for x in chosen],
                        self._predict_tensors if images else self._predict_texts,
                        per_family=s.robustness_variants,
                        tolerance=s.robustness_tolerance,
                        confidence=s.confidence,
                        bootstrap=s.bootstrap,
                        seed=s.seed,
                    )
                    report("robustness", 1, 1)
            if "pruning" in wanted and collectors.sparsity is not None:
                with _stage(result, "pruning"):
                    result.pruning = self._pruning(samples, collectors.sparsity, heldout, result.sensitivity)
                    report("pruning", 1, 1)
        result.state_bytes = collectors.nbytes()
        return result

    # -- the stages ------------------------------------------------------------------------
    def _check_kind(self, samples: list[Sample]) -> None:
        """Text for a model without a tokenizer (an image model given prompts) is one clear error."""
        if not isinstance(self.encoder, TensorAdapter):
            return
        text = sum(1 for x in samples if x.tensor is None)
        if text:
            raise ForensicsError(
                f"'{self.name}' takes tensors (it has no tokenizer), but {text} of {len(samples)} inputs are text; "
                "give an image model images ((C, H, W) tensors or Sample(tensor=…)), or a text model's tokenizer"
            )

    def _missing(
        self,
        wanted: list[str],
        samples: list[Sample],
        ref_samples: list[Sample],
        steps: list[tuple[str, list[int]]] | None,
        compare_model: nn.Module | None,
    ) -> dict[str, str]:
        """Why each wanted experiment cannot run on these inputs (empty when all can)."""
        min_heldout = self.settings.pruning.min_heldout
        reasons = {
            "shift": None if ref_samples else "no reference inputs; pass reference=… (CLI: --reference ref.jsonl)",
            "drift": None
            if steps is not None and len(steps) + bool(ref_samples) >= 2
            else "needs an ordered series: give inputs a 'group' or 'time' field with at least two values "
            "(or one plus reference inputs)",
            "regression": None
            if compare_model is not None
            else "no candidate model; pass compare_model=… (CLI: --compare-model M2)",
            "attribution": None
            if any(x.passed is not None for x in samples)
            else "no labelled inputs; give inputs a boolean 'passed' field",
            "pruning": None
            if len(samples) // 5 >= min_heldout
            else f"needs ≥ {5 * min_heldout} inputs (a fifth is held out to verify, at least {min_heldout})",
            "robustness": None
            if (self.tokenizer is not None and all(x.text is not None for x in samples)) or _all_images(samples)
            else "needs text inputs and a tokenizer, or image tensors (C, H, W) (perturbation families edit text "
            "or pixels)",
        }
        return {name: reason for name, reason in reasons.items() if name in wanted and reason is not None}

    def _stream(
        self,
        samples: list[Sample],
        recorder: Any,
        sites: list[str],
        collectors: _Collectors,
        hooks: contextlib.ExitStack,
        report: Progress,
        span: tuple[int, int] | None = None,
    ) -> None:
        """The one pass over the inputs (or the inputs ``span``, whole micro-batches of a
        shard); the candidate model runs on the same micro-batches."""
        cand = collectors.candidate
        cand_recorder = None
        if cand is not None:
            cand_recorder = recorder_for(cand.adapter, cand.sites)
            hooks.enter_context(cand_recorder.install_hooks(cand.model, cand.tokenizer))
        start, stop = span or (0, len(samples))
        for idx in batches(stop, self.settings.batch_size, start):
            batch = self.encoder.encode([samples[i] for i in idx])
            rec = forward(self.model, recorder, batch, sites, idx)
            other = forward(cand.model, cand_recorder, batch, cand.sites, idx) if cand and cand_recorder else None
            collectors.update(rec, other)
            report("inputs", idx[-1] + 1, len(samples))

    def _reference(
        self, ref_samples: list[Sample], recorder: Any, report: Progress, span: tuple[int, int] | None = None
    ) -> ActivationSummary:
        s = self.settings
        n = len(ref_samples)
        summary = self._reference_summary(n)
        start, stop = span or (0, n)
        for idx in batches(stop, s.batch_size, start):
            batch = self.encoder.encode([ref_samples[i] for i in idx])
            summary.update(forward(self.model, recorder, batch, self.layer_sites, idx), idx, self.layer_sites)
            report("reference", idx[-1] + 1, n)
        return summary

    def _reference_summary(self, n: int) -> ActivationSummary:
        s = self.settings
        return ActivationSummary(
            s.token_capacity, s.pooled_capacity, item_keys(n, s.seed + 2), item_keys(n, s.seed + 3)
        )

    def _stream_on_ray(
        self, address: str, shared: _Shared, collectors: _Collectors, result: InspectionResult, report: Progress
    ) -> ActivationSummary | None:
        """The streaming passes as Ray tasks (:func:`_run_shard`), merged in input order into
        ``collectors`` (and the reference summary, returned)."""
        size = self.settings.batch_size
        with ray_session(address) as ray:
            cpus = cluster_cpus(ray)
            jobs = [("inputs", a, b) for a, b in shard_spans(len(shared.samples), cpus, size)]
            jobs += [("reference", a, b) for a, b in shard_spans(len(shared.ref_samples), cpus, size)]
            done = {"inputs": 0, "reference": 0}

            def finished(i: int, _state: Any) -> None:
                kind, a, b = jobs[i]
                done[kind] += b - a
                report(kind, done[kind], len(shared.samples if kind == "inputs" else shared.ref_samples))

            states = map_tasks(_run_shard, jobs, address, shared=shared, on_done=finished)
        started = time.perf_counter()
        ref_summary = self._reference_summary(len(shared.ref_samples)) if shared.ref_samples else None
        for (kind, _, _), state in zip(jobs, states, strict=True):
            if kind == "inputs":
                collectors.merge(state)
            elif ref_summary is not None:
                ref_summary.merge(state)
        result.timings["merge"] = time.perf_counter() - started
        result.backend = f"ray ({address}, {sum(kind == 'inputs' for kind, _, _ in jobs)} shards)"
        return ref_summary

    def _statistics(
        self,
        result: InspectionResult,
        wanted: list[str],
        c: _Collectors,
        ref_summary: ActivationSummary | None,
        steps: list[tuple[str, list[int]]] | None,
    ) -> None:
        """The experiments computed from the streamed summaries alone."""
        s = self.settings
        if "sparsity" in wanted and c.sparsity is not None:
            result.sparsity = c.sparsity.result()
        if "stats" in wanted:
            result.stats = activation_stats(c.current)
        if "shift" in wanted and ref_summary is not None:
            result.shift = compare(ref_summary, c.current, self.layer_sites, s.shift)
        if "drift" in wanted and steps is not None:
            series = [(name, c.steps[j]) for j, (name, _) in enumerate(steps)]
            baseline = ("reference", ref_summary) if ref_summary is not None else series[0]
            result.drift = drift(baseline[0], baseline[1], series, self.layer_sites, s.shift)
        if c.candidate is not None:
            cand = c.candidate
            result.regression = regression(
                c.current, cand.summary, self.layer_sites, cand.sites, cand.outputs, (self.name, cand.name)
            )

    # -- helpers that need the model -----------------------------------------------------
    def _predictions(self, batch: Batch) -> torch.Tensor:
        return prediction_logits(output_logits(call_model(self.model, batch)), batch)

    def _predict_texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for part in _chunks(list(range(len(texts))), self.settings.batch_size):
            out.append(self._predictions(self.encoder.encode([Sample(text=texts[i]) for i in part])))
        return _cat_logits(out)

    def _predict_tensors(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for part in _chunks(list(range(len(tensors))), self.settings.batch_size):
            out.append(self._predictions(self.encoder.encode([Sample(tensor=tensors[i]) for i in part])))
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
                kls += kl_divergence(ref, pred, dtype=torch.float64).tolist()
                agree += (ref.argmax(-1) == pred.argmax(-1)).tolist()
            return float(np.mean(kls)), float(np.mean(agree))

        return verify(candidates, evaluate, s, len(held))


def inspection_settings(
    config: str | Path | ForensicsConfig | dict[str, Any] | None,
    settings: InspectionConfig | None = None,
    overrides: dict[str, Any] | None = None,
) -> InspectionConfig:
    """The knobs of one inspection run: the ``inspection:`` section of ``config``
    (:func:`~model_forensics.core.config.load_config`), then the fields set explicitly in
    ``settings`` (also inside its sections), then ``overrides`` (section keys; a mapping or a
    config model for a nested section changes only the keys it gives).

    Raises:
        ConfigError: an unknown key or a value out of range.
    """
    merged = load_config(config).inspection.model_dump()
    for layer in (_explicit(settings) if settings is not None else {}, overrides or {}):
        merged = _merged(merged, layer)
    try:
        return InspectionConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, "the ModelInspector keywords")) from None


def _explicit(model: BaseModel) -> dict[str, Any]:
    """The fields of a config model that were set (at construction or by assignment), by
    section; the defaults it merely carries are left out."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = _explicit(value)
            if inner:
                out[name] = inner
        elif name in model.model_fields_set:
            out[name] = value
    return out


def _merged(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, BaseModel):
            value = _explicit(value)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class _Shared:
    """What every Ray task of one run reads (stored once in the object store)."""

    inspector: ModelInspector
    samples: list[Sample]
    ref_samples: list[Sample]
    wanted: list[str]
    steps: list[tuple[str, list[int]]] | None
    candidate: _Candidate | None
    keys: np.ndarray = field(default_factory=lambda: np.empty(0))
    heldout: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=bool))
    sites: list[str] = field(default_factory=list)


@dataclass
class _ShardState:
    """The accumulators one Ray task sends back (no models, no inputs)."""

    current: ActivationSummary
    sparsity: SparsityCollector | None
    attribution: AttributionCollector | None
    steps: list[ActivationSummary]
    cand_summary: ActivationSummary | None
    cand_outputs: OutputComparison | None


def _run_shard(shared: _Shared, job: tuple[str, int, int]) -> _ShardState | ActivationSummary:
    """One Ray task: the inputs ``start:stop`` of the stream (or of the reference), recorded
    on this worker's copy of the model, as accumulators."""
    kind, start, stop = job
    insp = shared.inspector
    recorder = recorder_for(insp.adapter, shared.sites)
    cand = shared.candidate
    with (
        _eval_mode(insp.model),
        _eval_mode(cand.model if cand else None),
        contextlib.ExitStack() as hooks,
    ):
        hooks.enter_context(recorder.install_hooks(insp.model, insp.tokenizer))
        if kind == "reference":
            return insp._reference(shared.ref_samples, recorder, _silent, (start, stop))
        c = _Collectors(insp, shared.samples, shared.wanted, shared.steps, cand, shared.keys, shared.heldout)
        insp._stream(shared.samples, recorder, shared.sites, c, hooks, _silent, (start, stop))
    outputs = None
    if cand is not None:
        outputs = OutputComparison([], None)
        outputs.merge(cand.outputs)
    return _ShardState(
        c.current, c.sparsity, c.attribution, c.steps, cand.summary if cand is not None else None, outputs
    )


def _silent(stage: str, done: int, total: int) -> None:
    return None


class _Candidate:
    """The candidate model of a regression run and what is streamed about it."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapter = adapter_for(model)
        self.sites, _ = _sites(self.adapter)
        self.summary: ActivationSummary
        self.outputs: OutputComparison


class _Collectors:
    """Every streaming accumulator of one run, fed each recorded micro-batch."""

    def __init__(
        self,
        insp: ModelInspector,
        samples: list[Sample],
        wanted: list[str],
        steps: list[tuple[str, list[int]]] | None,
        candidate: _Candidate | None,
        keys: np.ndarray,
        heldout: np.ndarray,
    ):
        s = insp.settings
        positions = item_keys(len(samples), s.seed + 1)
        self.layer_sites = insp.layer_sites
        self.current = ActivationSummary(s.token_capacity, s.pooled_capacity, keys, positions)
        self.sparsity = (
            SparsityCollector(insp.neuron_sites, s.epsilon, s.tau, heldout)
            if {"sparsity", "pruning"} & set(wanted)
            else None
        )
        self.attribution = (
            AttributionCollector(insp.layer_sites, samples, s.pooled_capacity, keys)
            if "attribution" in wanted
            else None
        )
        self.step_of = np.full(len(samples), -1)
        self.steps: list[ActivationSummary] = []
        if "drift" in wanted and steps is not None:
            for j, (_, idx) in enumerate(steps):
                self.step_of[idx] = j
                self.steps.append(ActivationSummary(s.series_capacity, s.series_capacity, keys, positions))
        self.candidate = candidate
        if candidate is not None:
            candidate.summary = ActivationSummary(s.token_capacity, s.pooled_capacity, keys, positions)
            candidate.outputs = OutputComparison(samples, insp.tokenizer)

    def update(self, rec: Recorded, cand: Recorded | None) -> None:
        idx = [int(i) for i in rec.index]
        self.current.update(rec, idx, self.layer_sites)
        if self.sparsity is not None:
            self.sparsity.update(rec)
        if self.attribution is not None:
            self.attribution.update(rec)
        for j, summary in enumerate(self.steps):
            members = [i for i in idx if self.step_of[i] == j]
            if members:
                summary.update(rec, members, self.layer_sites)
        if self.candidate is not None and cand is not None:
            self.candidate.summary.update(cand, idx, self.candidate.sites)
            self.candidate.outputs.update(rec, cand)

    def merge(self, shard: _ShardState) -> None:
        """Fold in a Ray task's accumulators (shards merged in input order)."""
        self.current.merge(shard.current)
        if self.sparsity is not None and shard.sparsity is not None:
            self.sparsity.merge(shard.sparsity)
        if self.attribution is not None and shard.attribution is not None:
            self.attribution.merge(shard.attribution)
        for mine, theirs in zip(self.steps, shard.steps, strict=True):
            mine.merge(theirs)
        if self.candidate is not None and shard.cand_summary is not None and shard.cand_outputs is not None:
            self.candidate.summary.merge(shard.cand_summary)
            self.candidate.outputs.merge(shard.cand_outputs)

    def nbytes(self) -> int:
        summaries = [self.current, *self.steps, *([self.candidate.summary] if self.candidate else [])]
        return sum(x.nbytes() for x in summaries)


@contextlib.contextmanager
def _stage(result: InspectionResult, name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        result.timings[name] = time.perf_counter() - started


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


def _all_images(samples: Sequence[Sample]) -> bool:
    """Every input is an image: a float tensor (C, H, W)."""
    return bool(samples) and all(
        x.tensor is not None and x.tensor.is_floating_point() and x.tensor.dim() == 3 for x in samples
    )


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
