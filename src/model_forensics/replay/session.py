"""SandboxReplayer and Session: a bundle turned back into a live, controllable run.

::

    session = SandboxReplayer().load_bundle("incident_dir")    # or a .mfb.zip
    assert session.verify().bit_identical                      # replay == recording, per site
    r = session.run([Intervention("blocks.1.attn.head.3", "zero")])
    r.failed, r.text, r.logits                                 # predicate re-evaluated
    rs = session.sweep([[Intervention("blocks.0.mlp", "mean")], ...])

Loading resolves the model from the manifest (or an override), checks its weights sha256,
and applies the recorded determinism settings (seed, threads, deterministic algorithms)
around every replay, restoring the caller's settings afterwards. Every replay runs inside
the sandbox: recorded external calls are served from ``calls.jsonl``, and network or
process access raises :class:`SandboxViolation` unless allowed.
"""

from __future__ import annotations

import os
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ForensicsConfig, ReplayConfig, load_config
from model_forensics.core.errors import BundleError, ForensicsError, ModelLoadError
from model_forensics.core.manifest import attn_implementation, bundle_relative, forward_kwargs, generation_kwargs
from model_forensics.core.predicates import Predicate
from model_forensics.core.sketches import tensor_sha256
from model_forensics.models.adapters import Adapter, HookPoint, adapter_for, read
from model_forensics.models.loading import LoadedModel, load, model_ref, weights_sha256
from model_forensics.recorder.calls import CallServer, serving
from model_forensics.replay.interventions import (
    NEEDS_BASELINE,
    Clock,
    Intervention,
    Prepared,
    Target,
    intervening,
    resolve,
)
from model_forensics.replay.sandbox import sandboxed

Inputs = dict[str, torch.Tensor]
InputLike = str | Inputs | torch.Tensor | None


# -- results -------------------------------------------------------------------------------
@dataclass
class SiteCheck:
    """One site (or output) compared between recording and replay."""

    site: str
    identical: bool
    recorded_sha256: str | None
    replayed_sha256: str | None
    max_abs_diff: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyReport:
    """The result of :meth:`Session.verify`: per-site and per-output sha256 comparisons.

    ``max_abs_diff`` of a differing site is measured against the bundle's stored sketch
    (exact for ``full`` sketches, approximate otherwise; the note says which). ``verdict``
    compares the manifest's ``output.text`` and ``predicate.holds`` with the replay's.
    """

    bit_identical: bool
    sites: list[SiteCheck]
    outputs: list[SiteCheck]
    forward_passes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    verdict: list[SiteCheck] = field(default_factory=list)

    @property
    def differing(self) -> list[SiteCheck]:
        """Sites, outputs and the recorded verdict (``output.text``, ``predicate.holds``)
        where the replay differs from the manifest."""
        return [c for c in self.sites + self.outputs + self.verdict if not c.identical]

    def summary(self) -> str:
        n = len(self.sites)
        if self.bit_identical:
            verdict = f"; recorded {' and '.join(c.site for c in self.verdict)} confirmed" if self.verdict else ""
            return f"bit-identical: {n} sites and {len(self.outputs)} outputs match their recorded sha256{verdict}"
        worst = ", ".join(
            f"{c.site} (max |Δ| {c.max_abs_diff:.3g})" if c.max_abs_diff is not None else f"{c.site} ({c.note})"
            for c in self.differing[:5]
        )
        return (
            f"NOT bit-identical: {len(self.differing)} of {n + len(self.outputs) + len(self.verdict)} differ: {worst}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "bit_identical": self.bit_identical,
            "summary": self.summary(),
            "sites": [c.to_json() for c in self.sites],
            "outputs": [c.to_json() for c in self.outputs],
            "verdict": [c.to_json() for c in self.verdict],
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


@dataclass
class RunResult:
    """One replay, with or without interventions.

    Attributes:
        interventions: what was changed.
        failed: the failure predicate holds on this run's output (None: no predicate).
        flipped: the unchanged run failed and this one does not (None: unknown).
        text: generated continuation (generation) or decoded next token (forward).
        prediction: argmax of ``logits``.
        logits: (V,) or (C,): the scores the predicate reads (last step, last position).
        outputs: ``logits`` (S, V) per-step last-position scores (S = 1 for a forward
            pass); ``generated_ids`` (T_prompt + S,) for generation.
        forward_passes: forward calls the run (or its sweep batch) took.
    """

    interventions: list[Intervention]
    failed: bool | None
    flipped: bool | None
    text: str | None
    prediction: int
    logits: torch.Tensor
    outputs: dict[str, torch.Tensor]
    forward_passes: int

    def to_json(self) -> dict[str, Any]:
        top = torch.topk(self.logits.float(), k=min(5, self.logits.numel()))
        return {
            "interventions": [iv.to_json() for iv in self.interventions],
            "failed": self.failed,
            "flipped": self.flipped,
            "text": self.text,
            "prediction": self.prediction,
            "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices, strict=True)],
            "forward_passes": self.forward_passes,
        }


# -- determinism ---------------------------------------------------------------------------
@contextmanager
def deterministic(seed: int, num_threads: int | None, enabled: bool) -> Iterator[None]:
    """Apply a replay's determinism settings; restore the caller's on exit (even on errors)."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        if num_threads:
            torch.set_num_threads(max(1, min(int(num_threads), os.cpu_count() or 1)))
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_rng_state(rng)


# -- replayer --------------------------------------------------------------------------------
class SandboxReplayer:
    """Opens incident bundles as replay :class:`Session`\\ s.

    Args:
        config: YAML path, :class:`ForensicsConfig`, mapping, or None for defaults
            (its ``replay`` section: seed, deterministic, max_batch_size, memory_budget_mb,
            allow_network, allow_subprocess).
        **overrides: any ``replay`` option, e.g. ``max_batch_size=32``, ``allow_network=True``.
    """

    def __init__(self, config: str | Path | ForensicsConfig | dict[str, Any] | None = None, **overrides: Any):
        base = load_config(config).replay
        unknown = sorted(set(overrides) - set(ReplayConfig.model_fields))
        if unknown:
            raise ForensicsError(f"unknown replay options {unknown}; known: {sorted(ReplayConfig.model_fields)}")
        self.config = ReplayConfig.model_validate(
            {**base.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}
        )

    def load_bundle(
        self,
        path: str | Path | Bundle,
        *,
        model: str | nn.Module | LoadedModel | None = None,
        tokenizer: Any = None,
        allow_weight_mismatch: bool = False,
        verify: bool = False,
    ) -> Session:
        """Open a bundle and load its model, ready to replay.

        Args:
            path: bundle directory, ``.mfb.zip`` or an opened :class:`Bundle`.
            model: override the manifest's model: a reference (``smollm2``, ``zoo:NAME``,
                a directory, a .gguf), an ``nn.Module`` or a :class:`LoadedModel`.
            tokenizer: tokenizer for an ``nn.Module`` override (for text outputs).
            allow_weight_mismatch: replay even if the weights sha256 differs from the
                recording (warns loudly; results are then not a faithful replay).
            verify: run :meth:`Session.verify` now and warn if it is not bit-identical.
        Raises:
            BundleError: unreadable bundle, newer format, failed checksums, or weights that
                differ from the recording (without ``allow_weight_mismatch``).
            ModelLoadError: the model cannot be found; pass ``model=``.
        """
        bundle = path if isinstance(path, Bundle) else Bundle.open(path)
        loaded = _resolve_model(bundle, model, tokenizer)
        session = Session(bundle, loaded, self.config, allow_weight_mismatch=allow_weight_mismatch)
        if verify:
            report = session.verify()
            if not report.bit_identical:
                warnings.warn(f"replay of '{bundle.name}' is {report.summary()}", stacklevel=2)
        return session


def _resolve_model(bundle: Bundle, override: str | nn.Module | LoadedModel | None, tokenizer: Any) -> LoadedModel:
    info = bundle.manifest["model"]
    if isinstance(override, LoadedModel):
        return override
    if isinstance(override, nn.Module):
        return LoadedModel(override.eval(), tokenizer, model_ref(override))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(info.get("dtype")), torch.float64 if info.get("dtype") == "float64" else torch.float32
    )
    attn = attn_implementation(bundle.manifest)
    if isinstance(override, str):
        return load(override, dtype=dtype, attn_implementation=attn, progress=False)
    reference = info.get("reference")
    if not reference:
        raise ModelLoadError(
            f"bundle '{bundle.name}' was recorded from an in-memory model ({info.get('class')}) with no reference to "
            "load it from; pass the model: load_bundle(path, model=...) or --model PATH"
        )
    if info.get("source") != "zoo" and bundle_relative(str(reference), bundle.source):
        raise BundleError(
            f"bundle '{bundle.name}' names a model inside the bundle itself ({reference!r}); a bundle may not ship "
            "the model it is replayed with. Pass the model you trust: --model / model="
        )
    if info.get("source") == "zoo" and not str(reference).startswith("zoo:"):
        reference = f"zoo:{reference}"
    try:
        return load(str(reference), dtype=dtype, attn_implementation=attn, progress=False)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"cannot load the model bundle '{bundle.name}' was recorded with: {exc}; pass --model / model= to choose one"
        ) from None


def _expand(inputs: Inputs, n: int) -> Inputs:
    return {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 and n != 1 else v for k, v in inputs.items()}


def _eos_ids(model: nn.Module, generation: dict[str, Any]) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, list | tuple) else [eos]
    return {int(i) for i in ids if i is not None}


# -- session ---------------------------------------------------------------------------------
class Session:
    """A loaded incident, ready to verify, re-run with interventions, and sweep.

    Attributes:
        bundle: the opened :class:`Bundle`.
        model / tokenizer / adapter: the loaded model and its site mapping.
        mode: ``forward`` or ``generate`` (greedy, token by token, as recorded).
        predicate: the bundle's failure predicate (None if it has none).
        recorded_failed: whether the predicate held on the recording.
        forward_passes: forward calls made by this session so far (every verify, run,
            sweep and baseline pass counts; a prefix-shared partial pass counts as one).
    """

    def __init__(
        self, bundle: Bundle, loaded: LoadedModel, config: ReplayConfig, *, allow_weight_mismatch: bool = False
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.loaded = loaded
        self.model: nn.Module = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.adapter: Adapter = adapter_for(self.model)
        self.forward_passes = 0
        self.weight_mismatch = False
        self._check_weights(allow_weight_mismatch)
        spec = self.manifest["input"]
        self.mode: str = spec["mode"]
        self.generation: dict[str, Any] = generation_kwargs(self.manifest, bundle.limits)
        self.kwargs: dict[str, Any] = forward_kwargs(self.manifest)
        self.predicate: Predicate | None = bundle.predicate
        pred = self.manifest.get("predicate") or {}
        self.recorded_failed: bool | None = pred.get("holds")
        self.inputs: Inputs = self._incident_inputs()
        self.baselines: list[Inputs] = [self.encode(e) for e in self.extras.get("baseline", [])]
        self.verification: VerifyReport | None = None
        self._baseline_cache: dict[tuple[str, str], list[tuple[torch.Tensor, int]]] = {}
        self._mean_cache: dict[tuple[Any, str, str], torch.Tensor] = {}  # (source, site, align): the mean
        self._clean_failed: dict[tuple[int, ...], bool | None] = {}
        self._prefix: dict[Any, Any] = {}  # sweep.py: clean prefixes by input, and "usable"

    # -- setup -----------------------------------------------------------------------------
    def _check_weights(self, allow: bool) -> None:
        recorded = self.manifest["model"].get("weights_sha256")
        actual = weights_sha256(self.model)
        if recorded and actual != recorded:
            message = (
                f"the model's weights (sha256 {actual[:12]}…) differ from those bundle '{self.bundle.name}' was recorded "
                f"with (sha256 {recorded[:12]}…)"
            )
            if not allow:
                raise BundleError(
                    message + "; pass the model it was recorded with, or allow_weight_mismatch=True "
                    "(--allow-weight-mismatch) to replay anyway (results will not be a faithful replay)"
                )
            self.weight_mismatch = True
            warnings.warn(
                "WEIGHT MISMATCH: " + message + "; replaying anyway, results are NOT a faithful replay", stacklevel=3
            )

    def _incident_inputs(self) -> Inputs:
        inputs = dict(self.bundle.inputs)
        if self.mode == "generate":
            # generate() derives positions itself; the first step saw the prompt only.
            inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if "attention_mask" not in inputs and "input_ids" in inputs:
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    @property
    def extras(self) -> dict[str, Any]:
        """Free JSON carried by the bundle (``variants``, ``benign``, ``baseline``; docs/replay.md)."""
        return dict(self.manifest.get("extras") or {})

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1]) if "input_ids" in self.inputs else 0

    def encode(self, entry: InputLike | dict[str, Any]) -> Inputs:
        """Model inputs for a prompt string, ``{"prompt": …}``, ``{"input_ids": [[…]]}``, a
        (1, T) id tensor, or an input dict. None gives the incident's own inputs."""
        if entry is None:
            return self.inputs
        if isinstance(entry, torch.Tensor):
            ids = entry if entry.dim() == 2 else entry.unsqueeze(0)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if isinstance(entry, dict) and "prompt" in entry:
            entry = str(entry["prompt"])
        if isinstance(entry, dict):
            if all(isinstance(v, torch.Tensor) for v in entry.values()):
                return dict(entry)
            if "input_ids" in entry:
                ids = torch.tensor(entry["input_ids"], dtype=torch.long)
                return self.encode(ids)
            raise ForensicsError(f"cannot turn {entry!r} into model inputs; give a prompt string or input_ids")
        from model_forensics.recorder.session import encode_prompt

        return encode_prompt(self.loaded, str(entry))

    def variants(self) -> list[Inputs]:
        """Inputs of the incident's failing variants (``extras.variants``), the incident first."""
        return [self.inputs] + [self.encode(e) for e in self.extras.get("variants", [])]

    def benign(self) -> list[Inputs]:
        """Inputs of the benign prompt set (``extras.benign``), for side-effect checks."""
        return [self.encode(e) for e in self.extras.get("benign", [])]

    def set_baseline(self, entries: Sequence[InputLike | dict[str, Any]]) -> None:
        """Replace the baseline set that ``mean``/``resample``/``patch`` use without a source."""
        self.baselines = [self.encode(e) for e in entries]
        self._baseline_cache = {k: v for k, v in self._baseline_cache.items() if k[0] != "<baseline>"}
        self._mean_cache = {k: v for k, v in self._mean_cache.items() if k[0] is not None}

    # -- environment ---------------------------------------------------------------------------
    @contextmanager
    def environment(self) -> Iterator[CallServer]:
        """The replay environment: determinism applied, recorded calls served in order,
        network and processes blocked (unless the config allows them).

        Use it around your own code (an agent step, a tool call) to replay it offline::

            with session.environment():
                answer = lookup("user 42")     # a record_call function: served from calls.jsonl
        """
        det = self.manifest.get("determinism") or {}
        seed = det.get("seed")
        threads = (det.get("torch") or {}).get("num_threads")
        with ExitStack() as stack:
            stack.enter_context(
                deterministic(self.config.seed if seed is None else int(seed), threads, self.config.deterministic)
            )
            stack.enter_context(sandboxed(self.config.allow_network, self.config.allow_subprocess))
            server = stack.enter_context(serving(self.bundle.calls()))
            stack.enter_context(torch.no_grad())
            yield server

    @contextmanager
    def first_steps(self, n: int = 1) -> Iterator[None]:
        """Generate at most ``n`` new tokens inside the block (for measurements that read
        only the first decoding steps, such as side-effect KLs); a no-op for forward passes."""
        saved = dict(self.generation)
        if self.mode == "generate":
            self.generation["max_new_tokens"] = min(n, int(saved.get("max_new_tokens") or n))
            self.generation.pop("max_length", None)
        try:
            yield
        finally:
            self.generation = saved

    @contextmanager
    def _counting(self, clock: Clock | None = None, logits: list[torch.Tensor] | None = None) -> Iterator[None]:
        """Count root forward calls; advance ``clock`` by each call's tokens; keep each
        call's last-position scores in ``logits``."""
        state = {"consumed": 0}

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.forward_passes += 1
            if clock is not None:
                clock.offset = state["consumed"]

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs.get("inputs_embeds")
            if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
                state["consumed"] += int(ids.shape[1])
            if logits is not None:
                out = getattr(output, "logits", output[0] if isinstance(output, tuple) else output)
                if isinstance(out, torch.Tensor):
                    logits.append(out[:, -1].detach().clone() if out.dim() == 3 else out.detach().clone())

        handles = [
            self.model.register_forward_pre_hook(pre, with_kwargs=True),
            self.model.register_forward_hook(post, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- verification ----------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Replay the incident unchanged, recording the same sites, and compare the sha256
        of every recorded site's exact tensor and of the outputs with the recording.

        Returns:
            A :class:`VerifyReport`; ``bit_identical`` is True when every hash matches.
        """
        from model_forensics.recorder.hooks import RecorderHooks

        start = time.perf_counter()
        passes = self.forward_passes
        recorded_sites = self.manifest["sites"]
        rec = RecorderHooks(
            granularity=self.manifest["recorder"].get("granularity", "layer"),
            sites=list(recorded_sites),
            sketch="full",
            max_bundle_size_mb=1e12,
        )
        logits: list[torch.Tensor] = []
        full_logits: list[torch.Tensor] = []

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            out = getattr(output, "logits", output[0] if isinstance(output, tuple) else output)
            if isinstance(out, torch.Tensor):
                full_logits.append(out.detach().clone())

        with self.environment(), rec.install_hooks(self.model, self.tokenizer), self._counting(None, logits):
            handle = self.model.register_forward_hook(keep)
            try:
                if self.mode == "generate":
                    sequences = rec.generate(self.inputs, **self.generation)
                else:
                    self.model(**self.inputs, **self.kwargs)
                    sequences = None
            finally:
                handle.remove()
        replayed = rec.recorded()
        sites = [self._check_site(site, info, replayed.get(site)) for site, info in recorded_sites.items()]
        outputs = self._check_outputs(full_logits, sequences)
        verdict = self._check_verdict(logits, sequences)
        notes = self._environment_notes()
        identical = all(c.identical for c in sites + outputs + verdict)
        report = VerifyReport(
            identical, sites, outputs, self.forward_passes - passes, time.perf_counter() - start, notes, verdict
        )
        self.verification = report
        return report

    def _check_site(self, site: str, info: dict[str, Any], tensor: torch.Tensor | None) -> SiteCheck:
        if tensor is None:
            return SiteCheck(site, False, info["sha256"], None, note="the replay did not produce this site")
        digest = tensor_sha256(tensor)
        if digest == info["sha256"]:
            return SiteCheck(site, True, info["sha256"], digest)
        if list(tensor.shape) != list(info["shape"]):
            return SiteCheck(
                site, False, info["sha256"], digest, note=f"shape {list(tensor.shape)} vs recorded {info['shape']}"
            )
        stored = self.bundle.activation(site)
        diff = float((tensor.double() - stored.double()).abs().max())
        note = "" if info["sketch"] == "full" else f"max |Δ| measured against the {info['sketch']} sketch (approximate)"
        return SiteCheck(site, False, info["sha256"], digest, diff, note)

    def _check_outputs(self, full_logits: list[torch.Tensor], sequences: torch.Tensor | None) -> list[SiteCheck]:
        out = self.manifest["output"]
        checks: list[SiteCheck] = []
        stored = self.bundle.outputs.get("logits")
        expected = [out.get("logits_sha256"), *(out.get("step_logits_sha256") or [])]
        if expected[0] is None:
            return checks
        for step, digest in enumerate(expected):
            name = "logits" if step == 0 else f"logits[step {step}]"
            if step >= len(full_logits):
                checks.append(SiteCheck(name, False, digest, None, note="the replay made fewer forward calls"))
                continue
            got = full_logits[step]
            mine = tensor_sha256(got)
            diff = None
            if mine != digest and stored is not None:
                last = got[:, -1] if got.dim() == 3 else got
                ref = stored[:, step] if stored.dim() == 3 else stored
                if last.shape == ref.shape:
                    diff = float((last.double() - ref.double()).abs().max())
            checks.append(SiteCheck(name, mine == digest, digest, mine, diff))
        if len(full_logits) > len(expected):
            checks.append(
                SiteCheck(
                    "logits[extra steps]",
                    False,
                    None,
                    None,
                    note=f"{len(full_logits) - len(expected)} more forward calls than recorded",
                )
            )
        if sequences is not None and "generated_ids" in self.bundle.outputs:
            rec_ids = self.bundle.outputs["generated_ids"]
            same = rec_ids.shape == sequences.shape and torch.equal(rec_ids, sequences)
            checks.append(SiteCheck("generated_ids", same, tensor_sha256(rec_ids), tensor_sha256(sequences)))
        return checks

    def _check_verdict(self, logits: list[torch.Tensor], sequences: torch.Tensor | None) -> list[SiteCheck]:
        """The manifest's ``output.text`` and ``predicate.holds`` against the replay's own: a
        bundle whose stored verdict was edited does not replay bit-identical."""
        if not logits:
            return []
        steps = torch.stack([step[0] for step in logits])  # (S, V) last-position scores per call
        _, _, text = self._outcome(self.inputs, steps, None if sequences is None else sequences[0])
        checks = []
        recorded_text = self.manifest["output"].get("text")
        if recorded_text is not None and text is not None:
            checks.append(SiteCheck("output.text", text == recorded_text, None, None, note=f"replayed {text!r:.80}"))
        holds = (self.manifest.get("predicate") or {}).get("holds")
        replayed = self._evaluate(text, steps[-1])
        if holds is not None and replayed is not None:
            checks.append(
                SiteCheck(
                    "predicate.holds", replayed == holds, None, None, note=f"replay: {replayed}, manifest: {holds}"
                )
            )
        return checks

    def _environment_notes(self) -> list[str]:
        notes = []
        prov = self.manifest.get("provenance") or {}
        from model_forensics.core.provenance import package_versions

        now = package_versions()
        for name, version in (prov.get("package_versions") or {}).items():
            if name in now and now[name] != version:
                notes.append(f"{name} {now[name]} now, {version} when recorded")
        recorded_threads = ((self.manifest.get("determinism") or {}).get("torch") or {}).get("num_threads")
        if recorded_threads and recorded_threads > (os.cpu_count() or 1):
            notes.append(f"recorded with {recorded_threads} threads; this machine has {os.cpu_count()} CPUs")
        if self.weight_mismatch:
            notes.append("weights differ from the recording (allow_weight_mismatch)")
        return notes

    # -- interventions -----------------------------------------------------------------------------
    def resolve(self, interventions: Sequence[Intervention | str | dict[str, Any]]) -> list[Target]:
        """Resolve interventions (objects, CLI specs or JSON dicts) against the model.

        Raises:
            SiteError: a site or head does not exist (the message names the nearest ones).
        """
        return [resolve(_as_intervention(iv), self.adapter) for iv in interventions]

    def prepare(
        self, interventions: Sequence[Intervention | str | dict[str, Any]], inputs: Inputs | None = None
    ) -> list[Prepared]:
        """Resolve interventions and fetch the baseline tensors their kinds read."""
        return self.prepare_sets([interventions], inputs)[0]

    def prepare_sets(
        self, sets: Sequence[Sequence[Intervention | str | dict[str, Any]]], inputs: Inputs | None = None
    ) -> list[list[Prepared]]:
        """:meth:`prepare` for many intervention sets: every baseline site they read is
        captured in one clean pass per baseline input (not one pass per site and input)."""
        prompt_len = int((inputs or self.inputs)["input_ids"].shape[1]) if "input_ids" in (inputs or self.inputs) else 0
        resolved = [self.resolve(interventions) for interventions in sets]
        self._warm_baselines([t for targets in resolved for t in targets])
        return [
            [
                Prepared(t, *self._baseline_value(t, prompt_len)) if t.kind in NEEDS_BASELINE else Prepared(t)
                for t in targets
            ]
            for targets in resolved
        ]

    def _baseline_value(self, target: Target, prompt_len: int) -> tuple[torch.Tensor, int]:
        """(the tensor the intervention reads, the prompt length of the baseline run)."""
        iv = target.intervention
        examples = self._baseline_activations(target.site, iv.source)
        if iv.kind == "mean":
            key = (iv.source, target.site, iv.align)
            if key not in self._mean_cache:
                if iv.align == "last":  # each example's last prompt position
                    flat = torch.stack([e[t - 1].double() for e, t in examples])
                else:
                    flat = torch.cat([e.double() for e, _ in examples])  # (Σ T_b, *per-token)
                self._mean_cache[key] = flat.mean(dim=0).to(examples[0][0].dtype)
            return self._mean_cache[key], 0
        if iv.kind == "resample":
            chosen = examples[random.Random(iv.seed).randrange(len(examples))]
        else:
            if len(examples) != 1:
                raise ForensicsError(
                    f"patch on '{iv.site}' needs one baseline run but the source gives {len(examples)}; "
                    "pass source=BUNDLE or prompt:TEXT, or use mean / resample"
                )
            chosen = examples[0]
        if iv.align == "position" and chosen[1] != prompt_len:
            raise ForensicsError(
                f"{iv.kind} on '{iv.site}': the baseline has {chosen[1]} tokens but the incident prompt has "
                f"{prompt_len}; positions cannot be aligned. Use a baseline of the same length or align='last' "
                "(right-aligned: the baseline's last token patches the prompt's last)"
            )
        return chosen

    def _warm_baselines(self, targets: Sequence[Target]) -> None:
        """Capture, in one clean pass per baseline input, every site that ``targets`` read
        from the session's baseline set and that is not cached yet (instead of one pass per
        site and input)."""
        sites = [
            t.site
            for t in targets
            if t.kind in NEEDS_BASELINE
            and t.intervention.source is None
            and ("<baseline>", t.site) not in self._baseline_cache
        ]
        sites = list(dict.fromkeys(sites))
        if len(sites) < 2 or not self.baselines:
            return
        captured = [self._capture_many(sites, inputs) for inputs in self.baselines]
        for site in sites:
            self._baseline_cache[("<baseline>", site)] = [c[site] for c in captured]

    def _baseline_activations(self, site: str, source: str | tuple[str, ...] | None) -> list[tuple[torch.Tensor, int]]:
        """Per baseline example: ``site``'s activation (T_b, *per-token) and its prompt length
        (T_b for a forward run; shorter for a recorded generation, which covers its tokens too)."""
        sources = source if isinstance(source, tuple) else (source,)
        examples: list[tuple[torch.Tensor, int]] = []
        for src in sources:
            key = (src or "<baseline>", site)
            if key not in self._baseline_cache:
                self._baseline_cache[key] = self._collect(site, src)
            examples += self._baseline_cache[key]
        return examples

    def _collect(self, site: str, source: str | None) -> list[tuple[torch.Tensor, int]]:
        if source is None:
            if not self.baselines:
                raise ForensicsError(
                    f"mean/resample/patch on '{site}' needs a baseline: pass source=BUNDLE or prompt:TEXT, call "
                    "session.set_baseline([...]), or record extras={'baseline': [...]} into the bundle"
                )
            return [self._capture(site, inputs) for inputs in self.baselines]
        if source.startswith("prompt:"):
            return [self._capture(site, self.encode(source.removeprefix("prompt:")))]
        other = Bundle.open(source)
        info = other.manifest["sites"].get(site)
        same_weights = other.manifest["model"].get("weights_sha256") == self.manifest["model"].get("weights_sha256")
        if info is not None and info["sketch"] == "full" and same_weights:
            activation = other.activation(site)[0]
            ids = other.inputs.get("input_ids")
            return [(activation, int(ids.shape[1]) if ids is not None else activation.shape[0])]
        inputs = {k: v for k, v in other.inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return [self._capture(site, inputs)]

    def _capture(self, site: str, inputs: Inputs) -> tuple[torch.Tensor, int]:
        """Run ``inputs`` clean: ``site``'s activation of row 0 (T, *per-token), and T."""
        return self._capture_many([site], inputs)[site]

    def _capture_many(self, sites: Sequence[str], inputs: Inputs) -> dict[str, tuple[torch.Tensor, int]]:
        """Run ``inputs`` clean once: each site's activation of row 0 (T, *per-token), and T."""
        kept: dict[str, torch.Tensor] = {}
        handles = []

        def keep(site: str, t: torch.Tensor | None) -> None:
            if t is not None and site not in kept:
                kept[site] = t[0].detach().clone()

        def output_hook(site: str, point: HookPoint) -> Any:
            return lambda m, args, output: keep(site, read(point, output))

        def input_hook(site: str, point: HookPoint) -> Any:
            return lambda m, args, kwargs: keep(site, read(point, args if args else (kwargs.get("hidden_states"),)))

        for site in sites:
            point = self.adapter.points[site]
            module = self.adapter.modules[point.module]
            if point.io == "output":
                handles.append(module.register_forward_hook(output_hook(site, point)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(site, point), with_kwargs=True))
        try:
            with self.environment(), self._counting():
                self.model(**inputs, **self.kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return {site: (kept[site], int(kept[site].shape[0])) for site in sites}

    # -- running -------------------------------------------------------------------------------
    def run(
        self, interventions: Sequence[Intervention | str | dict[str, Any]] = (), *, inputs: InputLike = None
    ) -> RunResult:
        """Replay once with ``interventions`` applied and re-evaluate the predicate.

        Args:
            interventions: applied in the forward order of their sites; at one site, in
                list order.
            inputs: run on other inputs (a prompt, ids or an input dict) instead of the
                incident's, e.g. a failing variant; same mode and predicate.
        Returns:
            A :class:`RunResult` (generation incidents: greedy, token by token; the
            predicate reads the new text).
        """
        batch = self.encode(inputs)
        prepared = self.prepare(interventions, batch)
        before = self.forward_passes
        step_logits, sequences = self.execute(batch, [prepared])
        row = None if sequences is None else sequences[0]
        return self.results(batch, [prepared], [step_logits[0]], [row], [self.forward_passes - before])[0]

    def sweep(
        self,
        sets: Sequence[Sequence[Intervention | str | dict[str, Any]]],
        *,
        inputs: InputLike = None,
        share_prefix: bool = True,
    ) -> Any:
        """Run many intervention sets in few forward passes (see :mod:`model_forensics.replay.sweep`).

        Returns:
            A :class:`~model_forensics.replay.sweep.SweepResult` with one RunResult per set,
            equal to what :meth:`run` gives for each set alone.
        """
        from model_forensics.replay.sweep import run_sweep

        return run_sweep(self, sets, inputs=inputs, share_prefix=share_prefix)

    def execute(self, batch: Inputs, rows: Sequence[Sequence[Prepared]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``len(rows)`` copies of ``batch`` in one batch, row i with ``rows[i]`` applied.

        Returns:
            (step_logits (N, S, V) last-position scores per forward call, S = 1 for a forward
            pass; sequences (N, T + S) for generation, else None).
        """
        n = len(rows)
        clock = Clock(0, int(batch["input_ids"].shape[1]) if "input_ids" in batch else 0)
        logits: list[torch.Tensor] = []
        with self.environment(), self._counting(clock, logits), intervening(self.adapter, rows, clock):
            if self.mode == "generate":
                out = self.model.generate(**_expand(batch, n), **self.generation)  # type: ignore[operator]
                sequences = out if isinstance(out, torch.Tensor) else out.sequences
            else:
                self.model(**_expand(batch, n), **self.kwargs)
                sequences = None
        return torch.stack(logits, dim=1), sequences

    def forced(self, batch: Inputs, rows: Sequence[Sequence[Prepared]], prompt_len: int | None = None) -> torch.Tensor:
        """Teacher-forced: one forward pass (no generation) of ``len(rows)`` copies of
        ``batch``, row i with ``rows[i]`` applied; the full logits (N, T, V). Negative
        intervention positions count from ``prompt_len`` (default: the whole input)."""
        clock = Clock(0, int(batch["input_ids"].shape[1]) if prompt_len is None else prompt_len)
        with self.environment(), torch.no_grad(), intervening(self.adapter, rows, clock):
            out = self.model(**_expand(batch, len(rows)))
        self.forward_passes += 1
        return out.logits if hasattr(out, "logits") else out[0]  # type: ignore[no-any-return]

    def results(
        self,
        batch: Inputs,
        rows: Sequence[Sequence[Prepared]],
        step_logits: Sequence[torch.Tensor],
        sequences: Sequence[torch.Tensor | None],
        passes: Sequence[int],
    ) -> list[RunResult]:
        """Turn raw outputs into RunResults (predicate, flip, text).

        Args:
            rows: the prepared interventions of each run.
            step_logits: per run, its last-position scores per forward call (S, V).
            sequences: per run, its generated sequence (T + S,), or None (forward pass).
            passes: per run, the forward passes of the batch it ran in.
        """
        outcomes = [self._outcome(batch, step_logits[i], sequences[i]) for i in range(len(rows))]
        clean_row = next((i for i, r in enumerate(rows) if not r), None)
        if clean_row is not None and batch is not self.inputs and self.predicate is not None:
            # A clean run in the batch answers "did it fail unchanged?" without another pass.
            steps, _, text = outcomes[clean_row]
            self._clean_failed.setdefault(_key(batch), self._evaluate(text, steps[-1]))
        clean = self._baseline_failed(batch)
        results = []
        for prepared, (steps, ids, text), used in zip(rows, outcomes, passes, strict=True):
            logits = steps[-1]
            failed = self._evaluate(text, logits)
            flipped = None if failed is None or clean is None else bool(clean and not failed)
            outputs = {"logits": steps} if ids is None else {"logits": steps, "generated_ids": ids}
            interventions = [p.target.intervention for p in prepared]
            results.append(RunResult(interventions, failed, flipped, text, int(logits.argmax()), logits, outputs, used))
        return results

    def _outcome(
        self, batch: Inputs, steps: torch.Tensor, sequence: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        """(per-step scores (S, V), ids up to the first EOS, text) of one batch row."""
        if sequence is None:
            token = torch.tensor([int(steps[-1].argmax())])
            return steps, None, self._decode(token) if self._has_tokens() else None
        prompt_len = int(batch["input_ids"].shape[1])
        eos = _eos_ids(self.model, self.generation)
        new = sequence[prompt_len:].tolist()
        # Batched rows that finished early are padded; a row ends at its first EOS.
        cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
        return steps[:cut], sequence[: prompt_len + cut], self._decode(sequence[prompt_len : prompt_len + cut])

    def _has_tokens(self) -> bool:
        shape = self.manifest["output"].get("logits_shape") or []
        return len(shape) == 3

    def _decode(self, ids: torch.Tensor) -> str | None:
        if self.tokenizer is None:
            return None
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _evaluate(self, text: str | None, logits: torch.Tensor) -> bool | None:
        if self.predicate is None:
            return None
        if self.predicate.needs_text and text is None:
            return None
        return self.predicate.evaluate(text=text, logits=logits)

    def _baseline_failed(self, batch: Inputs) -> bool | None:
        """Whether the unchanged run fails on ``batch`` (recorded, for the incident itself;
        computed once and cached for other inputs)."""
        if self.predicate is None:
            return None
        if batch is self.inputs and self.recorded_failed is not None and not self.weight_mismatch:
            return bool(self.recorded_failed)
        key = _key(batch)
        if key not in self._clean_failed:
            logits, sequences = self.execute(batch, [[]])
            steps, _, text = self._outcome(batch, logits[0], None if sequences is None else sequences[0])
            self._clean_failed[key] = self._evaluate(text, steps[-1])
        return self._clean_failed[key]

    def close(self) -> None:
        """Release the bundle's temporary files (for .mfb.zip bundles)."""
        cleanup = getattr(self.bundle, "_cleanup", None)
        if cleanup is not None:
            cleanup.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(batch: Inputs) -> tuple[int, ...]:
    """A cache key for an input: its token ids."""
    return tuple(batch["input_ids"][0].tolist()) if "input_ids" in batch else ()


def _as_intervention(item: Intervention | str | dict[str, Any]) -> Intervention:
    if isinstance(item, Intervention):
        return item
    if isinstance(item, str):
        return Intervention.parse(item)
    if isinstance(item, dict):
        return Intervention.from_json(item)
    raise ForensicsError(f"cannot use {item!r} as an intervention; pass Intervention(...), a spec string or its JSON")
