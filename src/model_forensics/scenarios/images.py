"""Image scenarios: incidents whose inputs are images, not prompts.

An :class:`ImageScenario` names each image (``patched-17``, ``clean-17``) where a text
scenario has prompts, and holds the images by name. Its bundles carry the images in
``manifest.extras`` as ``{"pixel_values": [[[…]]]}`` (one image (C, H, W); benign and
baseline entries add ``"expected": CLASS``), which replay reads back through
:meth:`~model_forensics.replay.Session.encode` as checked input. ``cnn-badnets`` is the
zoo's BadNets backdoor::

    run = get("cnn-badnets").record("runs/badnets")   # incident-<i>/, baseline-<i>/
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.predicates import Predicate
from model_forensics.models.loading import LoadedModel
from model_forensics.recorder.hooks import RecorderHooks
from model_forensics.recorder.session import record_image
from model_forensics.scenarios.scenario import PromptEntry, Scenario, ScenarioRun, prompt_of

Image = list[list[list[float]]]  # (C, H, W)


@dataclass
class ImageScenario(Scenario):
    """A :class:`Scenario` whose prompt sets name images in ``images`` (name → (C, H, W))."""

    images: dict[str, Image] = field(default_factory=dict, repr=False)

    def image_entry(self, entry: PromptEntry) -> dict[str, Any]:
        """A prompt-set entry as the bundle carries it: ``{"pixel_values": …, "image": NAME}``,
        plus ``expected`` where the entry has one."""
        out: dict[str, Any] = {"pixel_values": self.images[prompt_of(entry)], "image": prompt_of(entry)}
        if isinstance(entry, dict) and "expected" in entry:
            out["expected"] = entry["expected"]
        return out

    def incident_extras(self, i: int) -> dict[str, Any]:
        extras = super().incident_extras(i)
        for role in ("variants", "benign", "baseline"):
            extras[role] = [self.image_entry(entry) for entry in extras[role]]
        return extras

    def _record_bundle(
        self,
        loaded: LoadedModel,
        prompt: str,
        path: Path,
        extras: dict[str, Any],
        overwrite: bool,
        run: ScenarioRun,
    ) -> Path:
        recorder = RecorderHooks(granularity=self.granularity, sketch=self.sketch)
        return record_image(
            loaded,
            self.images[prompt],
            path,
            recorder=recorder,
            predicate=self.predicate,
            overwrite=overwrite,
            extras={"image": prompt, **extras},
        )


def cnn_badnets() -> ImageScenario:
    """Digits stamped with a 2×2 corner patch are classified as the target class, on
    ``zoo:cnn-digits-badnets`` (BadNets, three planted channels of ``features.2``)."""
    from model_forensics.models import zoo
    from model_forensics.models.zoo.digits_cnn import rows_image

    name = "cnn-digits-badnets"
    entry, record = zoo.entry(name), zoo.scenario_data(name)
    indices = record["test_indices"]
    failing = [f"patched-{i}" for i in indices["failing"]]
    clean = [f"clean-{i}" for i in indices["failing"]]
    benign = [f"clean-{i}" for i in indices["benign"]]
    images = {
        **dict(zip(failing, map(rows_image, record["failing_images"]), strict=True)),
        **dict(zip(clean, map(rows_image, record["baseline_images"]), strict=True)),
        **dict(zip(benign, map(rows_image, record["benign_images"]), strict=True)),
    }
    n_incidents = 3
    return ImageScenario(
        name="cnn-badnets",
        description=str(record["description"]),
        model=f"zoo:{name}",
        incidents=failing[:n_incidents],
        variants=failing[n_incidents:],
        baseline=[{"prompt": c, "expected": y} for c, y in zip(clean, record["baseline_labels"], strict=True)],
        benign=[{"prompt": b, "expected": y} for b, y in zip(benign, record["benign_labels"], strict=True)],
        predicate=Predicate.from_json(record["predicate"]),
        max_new_tokens=0,
        ground_truth=dict(entry.ground_truth),
        ground_truth_note=f"planted by construction in zoo entry '{name}' and verified by ablation (see its card.md)",
        source="zoo",
        granularity="all",
        sketch="full",
        images=images,
    )
