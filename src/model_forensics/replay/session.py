"""Session: a bundle turned back into a live, controllable run (opened by SandboxReplayer).

::

    session = SandboxReplayer().load_bundle("incident_dir")    # or a .mfb.zip
    assert session.verify().bit_identical                      # replay == recording, per site
    r = session.run([Intervention("blocks.1.attn.head.3", "zero")])
    r.failed, r.text, r.logits                                 # predicate re-evaluated
    rs = session.sweep([[Intervention("blocks.0.mlp", "mean")], ...])

Loading resolves the model from the manifest (or an override) and checks its weights sha256
(:mod:`~model_forensics.replay.loading`). Every replay runs inside the session's
environment (:mod:`~model_forensics.replay.environment`): the recorded determinism
settings, the sandbox, recorded external calls served from ``calls.jsonl``, and the
counter of forward passes. The session runs; verification, baselines, reading outputs and
sweeps live in their own modules beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from model_forensics.core.bundle import Bundle
from model_forensics.core.config import ReplayConfig
from model_forensics.core.errors import ForensicsError
from model_forensics.core.manifest import forward_kwargs, generation_kwargs
from model_forensics.core.predicates import Predicate
from model_forensics.models.adapters import Adapter, adapter_for
from model_forensics.models.hooks import hooks, logits_of
from model_forensics.models.inputs import ModelInputs
from model_forensics.models.loading import LoadedModel, load
from model_forensics.recorder.calls import CallServer
from model_forensics.replay.baselines import Baselines
from model_forensics.replay.encoding import InputLike, Inputs, encode_input
from model_forensics.replay.environment import PassCounter, ReplayEnvironment, deterministic
from model_forensics.replay.interventions import (
    NEEDS_BASELINE,
    Clock,
    Intervention,
    Prepared,
    Target,
    gates_opened,
    intervening,
    resolve,
)
from model_forensics.replay.outcomes import Readout, settled_stop
from model_forensics.replay.results import RunResult, SiteCheck, VerifyReport
from model_forensics.replay.sweep import (
    PrefixCache,
    SweepResult,
    prompt_ladder,
    run_sweep,
    shared_prompt_pass,
    sweep_each,
)
from model_forensics.replay.verification import check_weights, verify

# Importable from here as before the split (``load``: tests replace it to catch model loads).
__all__ = ["RunResult", "Session", "SiteCheck", "VerifyReport", "deterministic", "load"]

InterventionLike = Intervention | str | dict[str, Any]


class Session:
    """A loaded incident, ready to verify, re-run with interventions, and sweep.

    Attributes:
        bundle: the opened :class:`Bundle`.
        model / tokenizer / adapter: the loaded model and its site mapping.
        mode: ``forward`` or ``generate`` (greedy, token by token, as recorded).
        predicate: the bundle's failure predicate (None if it has none).
        recorded_failed: whether the predicate held on the recording.
        counter: the environment's :class:`PassCounter` (forward calls and model rows).
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
        self.weight_mismatch = check_weights(bundle, self.model, allow_weight_mismatch)
        self._environment = ReplayEnvironment(bundle, self.adapter, config)
        self.counter: PassCounter = self._environment.counter
        self.mode: str = self.manifest["input"]["mode"]
        self.generation: dict[str, Any] = generation_kwargs(self.manifest, bundle.limits)
        self.kwargs: dict[str, Any] = forward_kwargs(self.manifest)
        self.predicate: Predicate | None = bundle.predicate
        self.recorded_failed: bool | None = (self.manifest.get("predicate") or {}).get("holds")
        has_tokens = len(self.manifest["output"].get("logits_shape") or []) == 3
        self.readout = Readout(self.model, self.tokenizer, self.predicate, has_tokens)
        self.inputs: ModelInputs = self._incident_inputs()
        self._baselines = Baselines(self, [self.encode(e) for e in self.extras.get("baseline", [])])
        self.verification: VerifyReport | None = None
        self._clean_failed: dict[tuple[int, ...], bool | None] = {}
        self._prefixes = PrefixCache()  # the clean prefixes this session's sweeps share

    # -- inputs ----------------------------------------------------------------------------
    def _incident_inputs(self) -> ModelInputs:
        inputs = ModelInputs(self.bundle.inputs)
        return inputs.for_generation() if self.mode == "generate" else inputs

    @property
    def extras(self) -> dict[str, Any]:
        """Free JSON carried by the bundle (``variants``, ``benign``, ``baseline``; docs/replay.md)."""
        return dict(self.manifest.get("extras") or {})

    @property
    def prompt_len(self) -> int:
        return self.inputs.length

    @property
    def forward_passes(self) -> int:
        """Forward calls made in this session's environment so far (every verify, run,
        sweep and baseline pass counts, and any call of the model inside
        :meth:`environment`; a prefix-shared partial pass counts as one)."""
        return self.counter.passes

    @property
    def baselines(self) -> list[ModelInputs]:
        """The baseline set ``mean``/``resample``/``patch`` read without a source."""
        return self._baselines.inputs

    def encode(self, entry: InputLike | dict[str, Any]) -> ModelInputs:
        """Model inputs for anything :func:`~model_forensics.replay.encoding.encode_input`
        takes (a prompt, chat messages, ids, an image, an input dict); None gives the
        incident's own inputs.

        Raises:
            ForensicsError: anything else (named), ids outside the vocabulary, messages
                for a model without a chat template.
        """
        return self.inputs if entry is None else encode_input(self.loaded, entry)

    def variants(self) -> list[ModelInputs]:
        """Inputs of the incident's failing variants (``extras.variants``), the incident first."""
        return [self.inputs] + [self.encode(e) for e in self.extras.get("variants", [])]

    def benign(self) -> list[ModelInputs]:
        """Inputs of the benign prompt set (``extras.benign``), for side-effect checks."""
        return [self.encode(e) for e in self.extras.get("benign", [])]

    def set_baseline(self, entries: Sequence[InputLike | dict[str, Any]]) -> None:
        """Replace the baseline set that ``mean``/``resample``/``patch`` use without a source."""
        self._baselines.replace([self.encode(e) for e in entries])

    @contextmanager
    def restricted(self, extras: dict[str, Any]) -> Iterator[None]:
        """Inside the block the session sees ``extras`` in place of the bundle's entries of
        the same kinds (``variants``, ``benign``, ``near_miss``…), and ``extras["baseline"]``,
        when given, as its baseline set; both are restored on leaving, also on an exception.

        Example (measure on the first two variants only)::

            with session.restricted({"variants": session.extras["variants"][:2]}):
                session.sweep(candidate_sets)
        """
        manifest, baselines = self.manifest, self.baselines
        self.manifest = {**manifest, "extras": {**self.extras, **extras}}
        if "baseline" in extras:
            self.set_baseline(extras["baseline"])
        try:
            yield
        finally:
            self.manifest = manifest
            if "baseline" in extras:
                self._baselines.replace(baselines)

    # -- environment ---------------------------------------------------------------------------
    def environment(self) -> AbstractContextManager[CallServer]:
        """The replay environment: determinism applied, recorded calls served in order,
        network and processes blocked (unless the config allows them), autograd off, and
        every forward call of the model counted in :attr:`forward_passes`.

        Use it around your own code (an agent step, a tool call) to replay it offline::

            with session.environment():
                answer = lookup("user 42")     # a record_call function: served from calls.jsonl
        """
        return self._environment.active()

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

    def verify(self) -> VerifyReport:
        """Replay the incident unchanged and compare every recorded site's digest and the
        outputs with the recording (see :mod:`~model_forensics.replay.verification`)."""
        self.verification = verify(self)
        return self.verification

    # -- interventions -----------------------------------------------------------------------------
    def resolve(self, interventions: Sequence[InterventionLike]) -> list[Target]:
        """Resolve interventions (objects, CLI specs or JSON dicts) against the model.

        Raises:
            SiteError: a site or head does not exist (the message names the nearest ones).
        """
        return [resolve(as_intervention(iv), self.adapter) for iv in interventions]

    def prepare(self, interventions: Sequence[InterventionLike], inputs: Inputs | None = None) -> list[Prepared]:
        """Resolve interventions and fetch the baseline tensors their kinds read."""
        return self.prepare_sets([interventions], inputs)[0]

    def prepare_sets(
        self, sets: Sequence[Sequence[InterventionLike]], inputs: Inputs | None = None
    ) -> list[list[Prepared]]:
        """:meth:`prepare` for many intervention sets: every baseline site they read is
        captured in one clean pass per baseline input (not one pass per site and input)."""
        prompt_len = ModelInputs.of(inputs or self.inputs).length
        resolved = [self.resolve(interventions) for interventions in sets]
        self._baselines.warm([t for targets in resolved for t in targets])
        return [
            [
                Prepared(t, *self._baselines.value(t, prompt_len)) if t.kind in NEEDS_BASELINE else Prepared(t)
                for t in ts
            ]
            for ts in resolved
        ]

    # -- running -------------------------------------------------------------------------------
    def run(self, interventions: Sequence[InterventionLike] = (), *, inputs: InputLike = None) -> RunResult:
        """Replay once with ``interventions`` applied and re-evaluate the predicate.

        Args:
            interventions: applied in the forward order of their sites; at one site, in
                list order.
            inputs: run on other inputs (a prompt, chat messages, ids or an input dict;
                see :meth:`encode`) instead of the incident's, e.g. a failing variant; same
                mode and predicate.
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

    @property
    def prefixes(self) -> PrefixCache:
        """The clean prefixes this session's sweeps and teacher-forced screens share."""
        return self._prefixes

    def sweep(
        self,
        sets: Sequence[Sequence[InterventionLike]],
        *,
        inputs: InputLike = None,
        share_prefix: bool = True,
        verdicts_only: bool = False,
    ) -> SweepResult:
        """Run many intervention sets in few forward passes (see :mod:`model_forensics.replay.sweep`).

        Args:
            verdicts_only: a generation stops once every run's verdict is settled
                (:func:`~model_forensics.replay.outcomes.settled_stop`: every reply has
                ended or already shows what the predicate looks for): each result's
                ``failed`` and ``flipped`` are those of the full run, its text, scores and
                gates end where the batch stopped. For flip checks.

        Returns:
            A :class:`~model_forensics.replay.sweep.SweepResult` with one RunResult per set,
            equal to what :meth:`run` gives for each set alone.
        """
        return run_sweep(
            self, sets, inputs=inputs, share_prefix=share_prefix, prefixes=self._prefixes, verdicts_only=verdicts_only
        )

    def sweep_each(
        self,
        prompts: Sequence[InputLike],
        sets: Sequence[Sequence[InterventionLike]] | Sequence[Sequence[Sequence[InterventionLike]]],
        *,
        verdicts_only: bool = False,
        per_prompt: bool = False,
    ) -> Iterator[tuple[int, SweepResult]]:
        """:meth:`sweep` of ``sets`` on each of ``prompts`` (``per_prompt``: ``sets[i]`` are
        prompt i's own sets): yields (index, result) for every prompt, prompts of one token
        length together; small generation sweeps of such prompts share batches
        (:func:`~model_forensics.replay.sweep.sweep_each`)."""
        return sweep_each(self, prompts, sets, verdicts_only=verdicts_only, per_prompt=per_prompt)

    def execute(
        self,
        batch: Inputs,
        rows: Sequence[Sequence[Prepared]],
        verdicts_only: bool = False,
        share_prefix: bool = True,
        pads: Sequence[int] = (),
        prompts: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``len(rows)`` copies of ``batch`` in one batch, row i with ``rows[i]`` applied
        (``verdicts_only``: see :meth:`sweep`; ``share_prefix``: a generation's prompt pass
        runs the blocks before every row's first intervention once,
        :func:`~model_forensics.replay.sweep.shared_prompt_pass`). A ``batch`` of
        ``len(rows)`` rows (prompts of one length, or left-padded prompts with ``pads[i]``
        pad tokens on row i, :meth:`~model_forensics.models.inputs.ModelInputs.left_padded`)
        runs row i on its own row i; interventions and gates see each row's own positions.
        ``prompts[i]`` says which prompt row i holds (rows of one prompt are equal rows of
        ``batch``): the prompt pass then shares blocks among the rows of each prompt.

        Returns:
            (step_logits (N, S, V) last-position scores per forward call, S = 1 for a forward
            pass; sequences (N, T + S) for generation, else None; a padded row keeps its pads).
        """
        inputs = ModelInputs.of(batch)
        clock = Clock(0, inputs.length, tuple(pads) if any(pads) else ())
        logits: list[torch.Tensor] = []
        several = len(set(prompts)) > 1  # rows of several prompts (sweep_each)
        share = share_prefix and (inputs.one_row or several) and self.mode == "generate"
        starts = prompt_ladder(self, rows, inputs.length) if share else None
        order = list(range(len(rows)))
        if starts is not None and not several:  # one prompt's ladder: rows by first changed block
            order.sort(key=starts.__getitem__)
        ordered = [rows[i] for i in order]
        with self.environment(), _stepping(self.adapter, clock, logits), intervening(self.adapter, ordered, clock):
            if self.mode == "generate":
                stop = settled_stop(self.readout, inputs.length) if verdicts_only else None
                options = self.generation if stop is None else {**self.generation, "stopping_criteria": stop}
                ladder = [] if starts is None else [starts[i] for i in order]
                with shared_prompt_pass(self, ladder, prompts if several else (), clock):
                    out = self.model.generate(**inputs.expand(len(rows)), **options)  # type: ignore[operator]
                sequences = out if isinstance(out, torch.Tensor) else out.sequences
            else:
                self.model(**inputs.expand(len(rows)), **self.kwargs)
                sequences = None
        step_logits = torch.stack(logits, dim=1)
        if starts is None:
            return step_logits, sequences
        back = torch.tensor(order).argsort()
        return step_logits[back], None if sequences is None else sequences[back]

    def forced(self, batch: Inputs, rows: Sequence[Sequence[Prepared]], prompt_len: int | None = None) -> torch.Tensor:
        """Teacher-forced: one forward pass (no generation) of ``len(rows)`` copies of
        ``batch``, row i with ``rows[i]`` applied; the full logits (N, T, V). Negative
        intervention positions count from ``prompt_len`` (default: the whole input)."""
        inputs = ModelInputs.of(batch)
        clock = Clock(0, inputs.length if prompt_len is None else prompt_len)
        with self.environment(), intervening(self.adapter, rows, clock):
            logits = logits_of(self.model(**inputs.expand(len(rows))))
        assert logits is not None
        return logits

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
        prompt_len = ModelInputs.of(batch).length
        outcomes = [self.readout.outcome(prompt_len, step_logits[i], sequences[i]) for i in range(len(rows))]
        clean_row = next((i for i, r in enumerate(rows) if not r), None)
        if clean_row is not None and batch is not self.inputs and self.predicate is not None:
            # A clean run in the batch answers "did it fail unchanged?" without another pass.
            clean_run = outcomes[clean_row]
            failed = self.readout.failed(clean_run.text, clean_run.steps[-1])
            self._clean_failed.setdefault(ModelInputs.of(batch).key, failed)
        clean = self._baseline_failed(batch)
        results = []
        for prepared, outcome, used in zip(rows, outcomes, passes, strict=True):
            logits = outcome.steps[-1]
            failed = self.readout.failed(outcome.text, logits)
            flipped = None if failed is None or clean is None else bool(clean and not failed)
            outputs = {"logits": outcome.steps}
            if outcome.ids is not None:
                outputs["generated_ids"] = outcome.ids
            interventions = [p.target.intervention for p in prepared]
            prediction = int(logits.argmax())
            results.append(
                RunResult(
                    interventions,
                    failed,
                    flipped,
                    outcome.text,
                    prediction,
                    logits,
                    outputs,
                    used,
                    gates_opened(prepared),
                )
            )
        return results

    def _baseline_failed(self, batch: Inputs) -> bool | None:
        """Whether the unchanged run fails on ``batch`` (recorded, for the incident itself;
        computed once and cached for other inputs)."""
        if self.predicate is None:
            return None
        if batch is self.inputs and self.recorded_failed is not None and not self.weight_mismatch:
            return bool(self.recorded_failed)
        key = ModelInputs.of(batch).key
        if key not in self._clean_failed:
            logits, sequences = self.execute(batch, [[]])
            clean_run = self.readout.outcome(
                ModelInputs.of(batch).length, logits[0], None if sequences is None else sequences[0]
            )
            self._clean_failed[key] = self.readout.failed(clean_run.text, clean_run.steps[-1])
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


@contextmanager
def _stepping(adapter: Adapter, clock: Clock, logits: list[torch.Tensor]) -> Iterator[None]:
    """Move ``clock`` to each forward call's first position (generation steps advance it by
    the tokens of the calls before) and keep each call's last-position scores in ``logits``:
    (N, V), or the whole (N, C) of a classifier."""
    consumed = 0

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        clock.offset = consumed

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        nonlocal consumed
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
            consumed += int(ids.shape[1])
        out = logits_of(output)
        if out is not None:
            logits.append(out[:, -1].detach().clone() if out.dim() == 3 else out.detach().clone())

    with hooks(adapter, before={"": pre}, after={"": post}):
        yield


def as_intervention(item: InterventionLike) -> Intervention:
    """An :class:`Intervention`, a spec string (``"blocks.1.attn.head.3:zero"``) or a dict, as an Intervention."""
    if isinstance(item, Intervention):
        return item
    if isinstance(item, str):
        return Intervention.parse(item)
    if isinstance(item, dict):
        return Intervention.from_json(item)
    raise ForensicsError(f"cannot use {item!r} as an intervention; pass Intervention(...), a spec string or its JSON")
