"""Baselines: the activations that ``mean``, ``resample`` and ``patch`` interventions read.

A source is the session's baseline set (``extras.baseline`` or :meth:`Session.set_baseline`),
``prompt:TEXT``, or another bundle (its stored activation when it is exact and recorded
with the same weights, else a clean run of its inputs). Each (source, site) is captured
once, from clean runs, and kept as one entry per example: the activation of row 0
(T_b, *per-token shape) and the example's prompt length. Means are cached per
(source, site, align). When many intervention sets read several sites of the baseline
set, :meth:`Baselines.warm` captures them all in one clean pass per baseline input.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import ForensicsError
from model_forensics.models.hooks import SiteCall, hooks
from model_forensics.models.inputs import GENERATE_KEYS, ModelInputs
from model_forensics.replay.interventions import NEEDS_BASELINE, Target

if TYPE_CHECKING:
    from model_forensics.replay.session import Session

Example = tuple[torch.Tensor, int]  # (activation (T_b, *per-token), prompt length of the run)
SET = "<baseline>"  # cache key of the session's baseline set


class Baselines:
    """The baseline set of a session and the activations captured from every source.

    Args:
        session: the replay session whose model runs the clean captures.
        inputs: the baseline set (inputs of benign runs).
    """

    def __init__(self, session: Session, inputs: list[ModelInputs]):
        self.session = session
        self.inputs = inputs
        self._examples: dict[tuple[str, str], list[Example]] = {}  # (source or SET, site)
        self._means: dict[tuple[Any, str, str], torch.Tensor] = {}  # (source, site, align)

    def replace(self, inputs: list[ModelInputs]) -> None:
        """A new baseline set; what was captured from the old one is dropped."""
        self.inputs = inputs
        self._examples = {k: v for k, v in self._examples.items() if k[0] != SET}
        self._means = {k: v for k, v in self._means.items() if k[0] is not None}

    def warm(self, targets: Sequence[Target]) -> None:
        """Capture, in one clean pass per baseline input, every site that ``targets`` read
        from the baseline set and that is not cached yet (instead of one pass per site and
        input)."""
        sites = [
            t.site
            for t in targets
            if t.kind in NEEDS_BASELINE and t.intervention.source is None and (SET, t.site) not in self._examples
        ]
        sites = list(dict.fromkeys(sites))
        if len(sites) < 2 or not self.inputs:
            return
        captured = [self._capture(sites, inputs) for inputs in self.inputs]
        for site in sites:
            self._examples[(SET, site)] = [c[site] for c in captured]

    def value(self, target: Target, prompt_len: int) -> tuple[torch.Tensor, int]:
        """(the tensor ``target``'s intervention reads, the prompt length of the baseline run):
        a mean (per-token shape), or one example (T_b, *per-token shape).

        Raises:
            ForensicsError: no baseline to read, a patch with several examples, or
                positions that cannot be aligned.
        """
        iv = target.intervention
        examples = self.examples(target.site, iv.source)
        if iv.kind == "mean":
            key = (iv.source, target.site, iv.align)
            if key not in self._means:
                if iv.align == "last":  # each example's last prompt position
                    flat = torch.stack([e[t - 1].double() for e, t in examples])
                else:
                    flat = torch.cat([e.double() for e, _ in examples])  # (Σ T_b, *per-token)
                self._means[key] = flat.mean(dim=0).to(examples[0][0].dtype)
            return self._means[key], 0
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

    def examples(self, site: str, source: str | tuple[str, ...] | None) -> list[Example]:
        """Per baseline example of ``source`` (several sources: all of theirs, in order):
        ``site``'s activation (T_b, *per-token) and its prompt length (T_b for a forward
        run; shorter for a recorded generation, which covers its tokens too)."""
        sources = source if isinstance(source, tuple) else (source,)
        examples: list[Example] = []
        for src in sources:
            key = (src or SET, site)
            if key not in self._examples:
                self._examples[key] = self._collect(site, src)
            examples += self._examples[key]
        return examples

    def _collect(self, site: str, source: str | None) -> list[Example]:
        if source is None:
            if not self.inputs:
                raise ForensicsError(
                    f"mean/resample/patch on '{site}' needs a baseline: pass source=BUNDLE or prompt:TEXT, call "
                    "session.set_baseline([...]), or record extras={'baseline': [...]} into the bundle"
                )
            return [self._capture([site], inputs)[site] for inputs in self.inputs]
        if source.startswith("prompt:"):
            return [self._capture([site], self.session.encode(source.removeprefix("prompt:")))[site]]
        other = Bundle.open(source)
        info = other.manifest["sites"].get(site)
        mine = self.session.manifest["model"].get("weights_sha256")
        if info is not None and info["sketch"] == "full" and other.manifest["model"].get("weights_sha256") == mine:
            activation = other.activation(site)[0]
            ids = other.inputs.get("input_ids")
            return [(activation, int(ids.shape[1]) if ids is not None else activation.shape[0])]
        # The recorded prompt as it was (no attention mask is added where it had none).
        inputs = ModelInputs({k: v for k, v in other.inputs.items() if k in GENERATE_KEYS})
        return [self._capture([site], inputs)[site]]

    def _capture(self, sites: Sequence[str], inputs: ModelInputs) -> dict[str, Example]:
        """Run ``inputs`` clean once: each site's activation of row 0 (T, *per-token), and T."""
        s = self.session
        kept: dict[str, torch.Tensor] = {}

        def keep(tensor: torch.Tensor, call: SiteCall) -> None:
            if call.site not in kept:
                kept[call.site] = tensor[0].detach().clone()

        with s.environment(), hooks(s.adapter, dict.fromkeys(sites, keep)):
            s.model(**inputs, **s.kwargs)
        return {site: (kept[site], int(kept[site].shape[0])) for site in sites}
