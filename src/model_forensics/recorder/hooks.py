"""RecorderHooks: record what a model computed on one input into an incident bundle.

Usage (the seed API)::

    recorder = RecorderHooks(config="configs/default.yaml")
    recorder.install_hooks(model)
    outputs = model(**inputs)
    bundle = recorder.create_bundle("incident_20240812")

Hooks copy each recorded site's tensor at full precision (a plain clone: no hashing, no
conversion on the hot path) into an :class:`~model_forensics.recorder.spool.ActivationSpool`:
in RAM up to ``recorder.memory_budget_mb``, streamed to a spool file on disk beyond it, so a
recording's memory does not grow with the number of sites. :meth:`create_bundle` writes
the bundle from the spool one site at a time (load, hash, sketch, write, free). The
logits are kept without a copy (the model never writes its output again); if the caller
changes them in place before :meth:`create_bundle`, their version counter shows it and the
bundle is refused. ``model.generate`` is recorded too: every decoding step appends its
positions, so a site covers prompt + generated tokens.

Recording never hurts the host: an exception inside any hook is caught, so the model's
output is the same as without the recorder (the hooks only read). A failing site is warned
about once per recording, its tensors are dropped and the bundle lists it under
``partial``; if the root hooks (inputs, logits) fail, the run is unusable as an incident and
:meth:`RecorderHooks.create_bundle` refuses to write it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import warnings
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from model_forensics.core import digests, sketches
from model_forensics.core.bundle import FORMAT_NAME, FORMAT_VERSION, BundleContents, write_bundle
from model_forensics.core.config import ForensicsConfig, RecorderConfig, load_config, validation_message
from model_forensics.core.errors import ConfigError, ForensicsError, SiteError
from model_forensics.core.predicates import Predicate
from model_forensics.core.provenance import collect_provenance
from model_forensics.core.sites import match_sites, parse_selector, site_order, site_priority
from model_forensics.models.adapters import Adapter, adapter_for
from model_forensics.models.hooks import SiteCall, SiteFn, hooks, logits_of
from model_forensics.models.loading import model_ref, weights_sha256
from model_forensics.recorder.calls import CallLog, CallRecorder
from model_forensics.recorder.cube import ActivityCube, cube_from_sites
from model_forensics.recorder.spool import ActivationSpool, SketchedSites, SpooledSites, budget_bytes

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "pixel_values")
# Names under which the root hooks' failures are kept (never site names: no site has spaces).
_INPUT_HOOK = "root input hook"
_OUTPUT_HOOK = "root output hook"
_MAX_ERROR_CHARS = 300


class RecorderHooks:
    """Records sites, inputs, outputs and external calls of a model's forward passes.

    Args:
        config: YAML path, :class:`ForensicsConfig`, mapping, or None for defaults.
        granularity / sites / sketch: override the config's recorder options.
        max_bundle_size_mb: override the size cap (lowest-priority sites are dropped first).
    """

    def __init__(
        self,
        config: str | Path | ForensicsConfig | dict[str, Any] | None = None,
        *,
        granularity: str | None = None,
        sites: list[str] | None = None,
        sketch: str | None = None,
        max_bundle_size_mb: float | None = None,
    ):
        full = load_config(config)
        overrides = {
            k: v
            for k, v in {
                "granularity": granularity,
                "sites": sites,
                "sketch": sketch,
                "max_bundle_size_mb": max_bundle_size_mb,
            }.items()
            if v is not None
        }
        self.config_tree = full
        self.config: RecorderConfig = full.recorder.model_copy(update=overrides)
        try:
            RecorderConfig.model_validate(self.config.model_dump())  # re-validate overrides
        except ValidationError as exc:
            raise ConfigError(validation_message(exc, "the recorder options")) from None
        self.model: nn.Module | None = None
        self.adapter: Adapter | None = None
        self.tokenizer: Any = None
        self.calls = CallLog()
        self.dropped: list[str] = []
        self._installed = ExitStack()
        self._targets: list[str] = []
        self._recomputed: set[str] = set()
        self._weights_hash: tuple[tuple[Any, ...], str] | None = None
        self.reset()

    # -- installing ------------------------------------------------------------------------
    def install_hooks(self, model: nn.Module, tokenizer: Any = None) -> RecorderHooks:
        """Attach hooks to ``model`` (never modifies it otherwise). Returns self.

        Raises:
            ForensicsError: ``model`` is not an ``nn.Module``.
            SiteError: a configured site selector names nothing in this model.
        """
        if not isinstance(model, nn.Module):
            raise ForensicsError(f"can only record a torch nn.Module, got {type(model).__name__}; load the model first")
        self.remove_hooks()
        self.model, self.tokenizer = model, tokenizer
        self.adapter = adapter_for(model)
        self._targets = self._resolve_targets(self.adapter)
        sites = {site: self._reader(site) for site in self._targets} if self.config.enabled else {}
        installed = ExitStack()
        installed.enter_context(
            hooks(
                self.adapter,
                sites,
                before={"": self._root_pre_hook},
                after={"": self._root_hook},
                recompute_patterns=True,
                on_error=self._fail,
            )
        )
        self._installed = installed
        return self

    def remove_hooks(self) -> None:
        """Remove every hook this recorder added."""
        self._installed.close()

    def __enter__(self) -> RecorderHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    def reset(self) -> None:
        """Forget everything recorded so far (hooks stay installed)."""
        # A fresh spool; the old one (and its directory) goes when nothing holds it any more:
        # BundleContents made from it stay writable.
        self._spool = ActivationSpool(budget_bytes(self.config.memory_budget_mb), self.config.spool_dir)
        self._inputs: list[dict[str, torch.Tensor]] = []
        self._kwargs: dict[str, Any] = {}
        self._logits: list[torch.Tensor] = []
        self._logit_versions: list[int | None] = []  # each one's _version when kept (None: a copy)
        self._projected = 0
        self._sizes: dict[str, int] = defaultdict(int)  # projected bundle bytes per site
        self._failed: dict[str, str] = {}  # site (or root hook) → "ExceptionType: message"
        self._generated: torch.Tensor | None = None
        self._generation: dict[str, Any] = {}
        self.dropped = []
        self.calls = CallLog()

    @property
    def sites(self) -> list[str]:
        """The sites being recorded (after any dropped by the size cap or whose hook failed)."""
        return [s for s in self._targets if s not in self.dropped and s not in self._failed]

    @property
    def partial(self) -> dict[str, str]:
        """Sites whose hook raised during this recording, with the error ("Type: message");
        they are left out of the bundle, which lists them under ``partial``."""
        return {s: e for s, e in self._failed.items() if s not in (_INPUT_HOOK, _OUTPUT_HOOK)}

    def record_call(self, name: str) -> CallRecorder:
        """Log an external call (decorator or context manager) into ``calls.jsonl``."""
        return CallRecorder(self.calls, name)

    # -- hooks -----------------------------------------------------------------------------
    def _reader(self, site: str) -> SiteFn:
        """The site function that keeps ``site``'s tensor; what it raises goes to :meth:`_fail`
        (through ``on_error``) and never reaches the model."""

        def take(tensor: torch.Tensor, call: SiteCall) -> None:
            if site in self._failed or self._void():
                return
            if call.recomputed:
                self._recomputed.add(site)
            self._keep(site, tensor)

        return take

    def _keep(self, site: str, tensor: torch.Tensor) -> None:
        if site in self.dropped:
            return
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor = tensor.detach()
        size = sketches.encoded_nbytes(
            tuple(tensor.shape), tensor.dtype, self.config.sketch, self.config.compression_ratio
        )
        if not self._fits(site, size):
            return
        self._spool.add(site, tensor)
        self._sizes[site] += size
        self._projected += size

    def _fits(self, site: str, size: int) -> bool:
        cap = int(self.config.max_bundle_size_mb * 1024 * 1024)
        while self._projected + size > cap:
            recorded = [s for s in self._spool.sites() if s not in self.dropped]
            victim = max([*recorded, site], key=lambda s: (site_priority(s), site_order(s)))
            self.dropped.append(victim)
            if victim == site:
                return False
            self._forget(victim)
        return True

    def _forget(self, site: str) -> None:
        """Drop every tensor kept for ``site`` so far."""
        self._spool.forget(site)
        self._projected -= self._sizes.pop(site, 0)

    def _fail(self, where: str, exc: Exception) -> None:
        """Stop recording ``where`` (a site or a root hook) after its hook raised; the first
        failure of a recording is warned about, the others only listed."""
        first = not self._failed
        error = self._failed.setdefault(where, _describe(exc))
        self._forget(where)
        if not first:
            return
        if where in (_INPUT_HOOK, _OUTPUT_HOOK):
            message = (
                f"the recorder's {where} failed ({error}); the model's output is unaffected, but this run "
                "cannot be written as a bundle (create_bundle will refuse it)"
            )
        else:
            message = (
                f"the recorder's hook for site '{where}' failed ({error}); the model's output is unaffected; "
                "the site is not recorded further and the bundle will be marked partial"
            )
        with contextlib.suppress(Exception):  # warnings made errors (-W error) must not reach the model either
            warnings.warn(message, stacklevel=2)

    def _void(self) -> bool:
        """True when a root hook failed: this run's inputs or outputs are unknown."""
        return _INPUT_HOOK in self._failed or _OUTPUT_HOOK in self._failed

    def _root_pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._take_inputs(args, kwargs)
        except Exception as exc:
            self._fail(_INPUT_HOOK, exc)

    def _take_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A decoding step continues the recording of its prompt, also when the prompt's
        # inputs were lost (then the whole run stays unrecorded).
        continuing = _cache_length(kwargs) > 0 and (bool(self._inputs) or self._void())
        if not continuing:
            self._clear_recording()
        if self._void():
            return
        tensors = {k: v.detach().clone() for k, v in kwargs.items() if k in _INPUT_KEYS and isinstance(v, torch.Tensor)}
        if args and isinstance(args[0], torch.Tensor):
            tensors.setdefault("input_ids", args[0].detach().clone())
        self._inputs.append(tensors)
        if not continuing:
            self._kwargs = _replayable(
                {k: v for k, v in kwargs.items() if isinstance(v, bool | int | float | str) and k != "return_dict"},
                "ForwardKwargs",
                "forward",
            )

    def _root_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._void():
            return
        try:
            self._take_logits(output)
        except Exception as exc:
            self._fail(_OUTPUT_HOOK, exc)

    def _take_logits(self, output: Any) -> None:
        logits = logits_of(output)
        if not isinstance(logits, torch.Tensor):
            return
        logits = logits.detach()
        if logits.is_inference() or logits._base is not None:
            # no version counter to check later (inference mode), or a view that would keep
            # a larger tensor alive: copy now
            self._logits.append(logits.clone())
            self._logit_versions.append(None)
            return
        # Kept without a copy (the logits are often the largest tensor of a forward: 25 MB for
        # SmolLM2 at 128 tokens). The model does not write its output again; only the caller
        # can, in place, and that bumps the tensor's _version, checked by _checked_logits.
        self._logits.append(logits)
        self._logit_versions.append(logits._version)

    def logits(self) -> list[torch.Tensor]:
        """The full output scores of every forward call recorded, in order (the model's own
        tensors where it allowed: see ``_take_logits``); refused if any was changed in place."""
        return list(self._checked_logits())

    def _checked_logits(self) -> list[torch.Tensor]:
        """The recorded logits of every step, refused if any was changed in place since."""
        for step, (t, version) in enumerate(zip(self._logits, self._logit_versions, strict=True)):
            if version is not None and t._version != version:
                raise ForensicsError(
                    f"the logits of forward call {step} were changed in place after the recorder kept them "
                    "(the recorder keeps the model's output without a copy); change a copy instead "
                    "(logits = out.logits.clone()), or write the bundle before changing them"
                )
        return self._logits

    def _clear_recording(self) -> None:
        calls = self.calls
        self.reset()
        self.calls = calls

    # -- generation ------------------------------------------------------------------------
    def generate(self, inputs: dict[str, torch.Tensor] | torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
        """Run ``model.generate`` under the hooks and remember the generated ids.

        Returns the full sequences (B, T_prompt + T_new), as ``generate`` does.
        """
        if self.model is None:
            raise ForensicsError("call install_hooks(model) before generate()")
        batch = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        self._clear_recording()  # a new incident; external calls logged so far belong to it
        with torch.no_grad():
            out = self.model.generate(**batch, **generate_kwargs)  # type: ignore[operator]
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self._generated = sequences.detach().clone()
        self._generation = _replayable(generate_kwargs, "GenerationSettings", "generate")
        return sequences

    # -- results ---------------------------------------------------------------------------
    def recorded(self) -> dict[str, torch.Tensor]:
        """Every recorded site's exact tensor, decoding steps joined along the token axis
        (all loaded at once: :meth:`create_bundle` streams them instead)."""
        return dict(self._recorded())

    def _recorded(self) -> SpooledSites:
        """The recorded sites in site order, each loaded from the spool when asked for."""
        return SpooledSites(self._spool, sorted(self._spool.sites(), key=site_order))

    def input_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the (first) forward call received; for generation, the prompt."""
        if not self._inputs:
            raise ForensicsError(
                "nothing was recorded: run the model (model(**inputs) or recorder.generate) after install_hooks"
            )
        return dict(self._inputs[0])

    def cube(self, model_name: str | None = None) -> ActivityCube:
        """The ActivityCube of what was recorded (tokens × layers × metrics)."""
        tokens = self._token_strings()
        assert self.adapter is not None
        name = model_name or type(self.model).__name__
        shape = _input_shape(self.input_tensors())
        return cube_from_sites(self._recorded(), self.adapter, tokens, name, shape)

    def create_bundle(
        self,
        path: str | Path,
        *,
        predicate: Predicate | None = None,
        overwrite: bool = False,
        extras: dict[str, Any] | None = None,
        seed: int | None = None,
        sign_key: str | Path | None = None,
    ) -> Path:
        """Write everything recorded to an incident bundle at ``path`` and return the path.

        Sites whose hook failed are left out and named in the manifest's ``partial``.

        Args:
            predicate: failure test, evaluated here on the recorded output and stored.
            overwrite: replace an existing bundle at ``path`` (atomically).
            extras: JSON data carried along (failing variants, benign prompts, notes).
            seed: the torch seed the run used, if any, for replay.
            sign_key: an ed25519 private key file; the bundle is written already signed
                (``signature.json``, see :mod:`model_forensics.core.signing`).
        Raises:
            BundleError: ``path`` exists (without ``overwrite``) or is not writable.
            ForensicsError: nothing was recorded, or a root hook failed (inputs or logits
                unknown).
        """
        if self.model is None or self.adapter is None:
            raise ForensicsError("call install_hooks(model) and run the model before create_bundle()")
        self._refuse_void()
        inputs = self.input_tensors()
        if self.dropped:
            warnings.warn(
                f"max_bundle_size_mb={self.config.max_bundle_size_mb} reached: dropped {len(self.dropped)} "
                f"lowest-priority sites ({', '.join(self.dropped[:8])}{' …' if len(self.dropped) > 8 else ''})",
                stacklevel=2,
            )
        recorded = self._recorded()
        source = SketchedSites(self._spool, list(recorded), self.config.sketch, self.config.compression_ratio)
        site_table: dict[str, Any] = {}
        for site in recorded:
            point = self.adapter.points.get(site)
            site_table[site] = {
                "shape": list(self._spool.shape(site)),
                "dtype": str(self._spool.dtype(site)).removeprefix("torch."),
                "sketch": self.config.sketch,
                "sha256": None,  # filled in by the writer: hashed once, while the site is written
                "nbytes": source.nbytes(site),
                "module": point.module if point else None,
                "recomputed": site in self._recomputed,
            }
        outputs, output_info = self._outputs()
        output_info["tensors"] = _table(outputs)
        text = output_info.get("text")
        holds = None
        if predicate is not None:
            last = outputs.get("logits")
            holds = predicate.evaluate(
                text=text, logits=None if last is None else last[0, -1] if last.dim() == 3 else last[0]
            )
        ref = model_ref(self.model)
        first = next(iter(self.model.parameters()), None)
        provenance = collect_provenance()  # once: it runs git and reads package metadata
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "hash": self.hash_algorithm,  # of every content digest in the bundle (format 1.3)
            "name": Path(path).name,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "model": {
                **ref.to_json(),
                "weights_sha256": self._weights_sha256(),
                "dtype": str(first.dtype).removeprefix("torch.") if first is not None else "float32",
                "class": type(self.model).__name__,
                "config": _model_config(self.model),
                **self.adapter.describe(),
            },
            "input": {
                "mode": "generate" if self._generated is not None else "forward",
                "tensors": _table(inputs),
                "kwargs": self._kwargs,
                "text": self._decode(inputs.get("input_ids")),
                "tokens": self._token_strings(),
                "generation": self._generation,
            },
            "output": output_info,
            "predicate": None if predicate is None else {**predicate.to_json(), "holds": holds},
            "sites": site_table,
            "dropped_sites": list(self.dropped),
            "partial": self.partial,
            "determinism": {"seed": seed, "torch": provenance["torch"]},
            "provenance": provenance,
            "recorder": self.config.model_dump(mode="json", exclude={"spool_dir"}),
            "extras": extras or {},
        }
        cube = cube_from_sites(
            recorded,
            self.adapter,
            self._token_strings(),
            ref.name,
            _input_shape(inputs),
            provenance={k: provenance[k] for k in ("commit_hash", "package_versions")},
        )
        contents = BundleContents(manifest, inputs, outputs, source, cube.to_json(), self.calls.entries)
        return write_bundle(path, contents, overwrite=overwrite, sign_key=sign_key)

    # -- internals -------------------------------------------------------------------------
    def _refuse_void(self) -> None:
        for hook in (_INPUT_HOOK, _OUTPUT_HOOK):
            if hook in self._failed:
                raise ForensicsError(
                    f"nothing was recorded: the recorder's {hook} failed during the run ({self._failed[hook]}); "
                    "the model ran unaffected, but its inputs or outputs are unknown, so no bundle is written; "
                    "run the model again to record it"
                )

    def _weights_sha256(self) -> str:
        # Hashing 135M parameters takes ~0.5 s; reuse the hash while no parameter has been
        # replaced or modified in place (torch bumps a tensor's _version on every in-place op).
        # A weight offloaded by accelerate is a meta tensor between forwards, swapped in (a new
        # tensor) from the offload folder for each one; its bytes live in that folder, so only
        # its name and shape key it (else every offloaded forward would cost a full re-hash).
        assert self.model is not None
        key = tuple(
            (n, tuple(t.shape)) if t.is_meta else (n, t.data_ptr(), t._version)
            for n, t in self.model.state_dict(keep_vars=True).items()
        )
        if self._weights_hash is None or self._weights_hash[0] != key:
            self._weights_hash = (key, weights_sha256(self.model))
        return self._weights_hash[1]

    @property
    def hash_algorithm(self) -> str:
        """The digest algorithm of the bundles this recorder writes (``bundle.hash``): the
        manifest's ``hash``, and what the output logits are hashed with at capture time."""
        return self.config_tree.bundle.hash

    def _outputs(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        info: dict[str, Any] = {
            "logits_sha256": None,
            "step_logits_sha256": [],
            "logits_shape": None,
            "text": None,
            "prediction": None,
        }
        outputs: dict[str, torch.Tensor] = {}
        steps = self._checked_logits()
        if steps:
            first = steps[0]
            info["logits_sha256"] = digests.tensor_digest(first, self.hash_algorithm)
            info["logits_shape"] = list(first.shape)
            info["step_logits_sha256"] = [digests.tensor_digest(t, self.hash_algorithm) for t in steps[1:]]
            if first.dim() == 3:  # (B, T, V): keep the last position of every step → (B, steps, V)
                outputs["logits"] = torch.stack([t[:, -1] for t in steps], dim=1).contiguous()
            else:
                outputs["logits"] = first
            info["prediction"] = int(outputs["logits"].reshape(first.shape[0], -1, first.shape[-1])[0, -1].argmax())
            if first.dim() == 3 and self._generated is None:  # forward only: the text is the next token
                info["text"] = self._decode(torch.tensor([[info["prediction"]]]))
        if self._generated is not None:
            prompt_len = self.input_tensors()["input_ids"].shape[1]
            outputs["generated_ids"] = self._generated
            info["text"] = self._decode(self._generated[:, prompt_len:])
        return outputs, info

    def _decode(self, ids: torch.Tensor | None) -> str | None:
        if ids is None or self.tokenizer is None:
            return None
        return str(self.tokenizer.decode(ids[0], skip_special_tokens=True))

    def _token_strings(self) -> list[str]:
        ids = self._generated if self._generated is not None else self.input_tensors().get("input_ids")
        if ids is None:
            return []
        if self._generated is not None:
            ids = ids[:, :-1]  # the last generated token was never fed to the model
        if self.tokenizer is None:
            return [str(int(i)) for i in ids[0]]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids[0].tolist())]

    def _resolve_targets(self, adapter: Adapter) -> list[str]:
        targets = adapter.granularity_sites(self.config.granularity)
        available = adapter.sites()
        for selector in self.config.sites:
            sel = parse_selector(selector)
            if sel.neurons is not None or sel.positions is not None or sel.head is not None:
                raise SiteError(f"record whole sites, not '{selector}'; narrow with selectors at analysis time")
            targets += [s for s in match_sites(sel, available) if s not in targets]
        return sorted(targets, key=site_order)


def _replayable(options: dict[str, Any], part: str, call: str) -> dict[str, Any]:
    """The options a replay may pass on (the manifest schema's allowlist); warns about the rest."""
    from model_forensics.core import manifest

    allowed = manifest.allowed_keys(getattr(manifest, part))
    kept = {k: v for k, v in options.items() if k in allowed and isinstance(v, bool | int | float | str | list | None)}
    dropped = sorted(set(options) - set(kept))
    if dropped:
        warnings.warn(
            f"{call}() options {dropped} are not recorded: a bundle replays only {sorted(allowed)}; "
            "the replay runs without them (verify will say if that changes the output)",
            stacklevel=4,
        )
    return kept


def _describe(exc: BaseException) -> str:
    """``"ExceptionType: message"``, clipped; safe for any exception (a broken ``__str__`` too)."""
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:
        text = f"{type(exc).__name__}: (its message cannot be shown)"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _cache_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def _input_shape(inputs: dict[str, torch.Tensor]) -> list[int]:
    """The cube's input shape: of the token ids, else of the image (``pixel_values``)."""
    main = inputs.get("input_ids", inputs.get("pixel_values"))
    return list(main.shape) if main is not None else [0]


def _table(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()}


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    import json

    return dict(json.loads(json.dumps(config.to_dict(), default=str)))
