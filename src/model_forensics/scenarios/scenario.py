"""Scenario: an incident to record, with its failing variants, clean counterparts, benign
set, failure predicate and (when known) ground truth.

::

    from model_forensics.scenarios import get

    run = get("gpt2-injection").record("runs/injection")
    run.incidents        # [Path("runs/injection/incident-0"), ...]  ready for `analyze`
    run.baselines        # [Path("runs/injection/baseline-0"), ...]  the clean counterparts

Each ``incident-<i>`` bundle carries in ``manifest.extras`` everything analysis needs:
``variants`` (the other failing prompts), ``benign`` (prompts, with ``expected`` output
where known), ``baseline`` (clean counterparts: ``baseline[j]`` is the counterpart of
``session.variants()[j]``, the incident's own first), ``near_miss`` (prompts that carry the
trigger but on which the model behaves, when the scenario has them), ``scenario``,
``ground_truth`` and ``ground_truth_note``. ``baseline-<i>`` is incident *i*'s clean counterpart, recorded
with the same predicate (which should not hold on it).

The registry (:func:`names`, :func:`get`, :func:`scenarios`) builds scenarios from the
zoo's ``scenario.json`` records and from the real-weight data in ``scenarios/data``.
Building one reads JSON only; the model is loaded by :meth:`Scenario.load`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from model_forensics.core.bundle import Bundle
from model_forensics.core.errors import BundleError, ForensicsError
from model_forensics.core.predicates import Predicate, regex
from model_forensics.core.records import fields_json
from model_forensics.models.loading import LoadedModel

# An entry of a prompt set: the prompt itself, or {"prompt": ..., "expected": ...}.
PromptEntry = str | dict[str, Any]

NO_GROUND_TRUTH = "real weights: no known ground truth"
ZOO_INCIDENTS = 3  # zoo incidents recorded as bundles; the other incident prompts become variants


def prompt_of(entry: PromptEntry) -> str:
    """The prompt text of a prompt-set entry."""
    return entry if isinstance(entry, str) else str(entry["prompt"])


@dataclass
class ScenarioRun:
    """What :meth:`Scenario.record` wrote.

    Attributes:
        incidents / baselines: bundle paths, ``baselines[i]`` the clean counterpart of
            ``incidents[i]``.
        incident_failed / baseline_failed: whether the predicate held on each recording
            (an incident should fail, its baseline should not).
        outputs / baseline_outputs: what each recording produced: the generated text,
            or ``class N`` for a classifier.
        artifacts: other files the run wrote (e.g. the agent's database), by role.
    """

    scenario: str
    out_dir: Path
    incidents: list[Path] = field(default_factory=list)
    baselines: list[Path] = field(default_factory=list)
    incident_failed: list[bool | None] = field(default_factory=list)
    baseline_failed: list[bool | None] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    baseline_outputs: list[str] = field(default_factory=list)
    artifacts: dict[str, Path] = field(default_factory=dict)

    @property
    def reproduced(self) -> bool:
        """Every incident failed and every baseline passed."""
        return all(f is True for f in self.incident_failed) and all(f is False for f in self.baseline_failed)

    def to_json(self) -> dict[str, Any]:
        return fields_json(
            self,
            out_dir=str(self.out_dir),
            incidents=[str(p) for p in self.incidents],
            baselines=[str(p) for p in self.baselines],
            incident_failed=list(self.incident_failed),
            baseline_failed=list(self.baseline_failed),
            outputs=list(self.outputs),
            baseline_outputs=list(self.baseline_outputs),
            artifacts={k: str(v) for k, v in self.artifacts.items()},
            reproduced=self.reproduced,
        )


@dataclass
class Scenario:
    """An incident scenario.

    Attributes:
        name: registry name, e.g. ``gpt2-injection``.
        description: one line: what fails, on which model, how it was found.
        model: the model reference (``zoo:gpt2-injection``, ``smollm2``, …).
        incidents: failing prompts recorded as ``incident-<i>`` bundles.
        variants: further failing prompts (paraphrases, other triggers), not recorded.
        baseline: clean counterparts of ``incidents + variants`` in that order
            (``baseline[j]`` belongs to failing prompt *j*; it may be shorter than that
            list when some variants have no counterpart, but covers every incident).
        benign: prompts the model handles correctly, for side-effect checks.
        predicate: the failure test; it holds on a failing output.
        max_new_tokens: greedy generation length; 0 records one forward pass (classifiers).
        ground_truth: the zoo's record (mechanism, level, units, ablation, behaviour),
            or None where no ground truth is known.
        ground_truth_note: says where the ground truth comes from, or why there is none.
        source: ``zoo`` or ``real weights``.
        loader: builds the model; None loads ``model`` with :func:`models.load`.
        granularity / sketch: recorder options for the bundles.
        near_miss: prompts that carry the trigger but on which the model behaves (for
            side-effect checks: a fix should leave their answers alone).
    """

    name: str
    description: str
    model: str
    incidents: list[str]
    variants: list[str]
    baseline: list[PromptEntry]
    benign: list[PromptEntry]
    predicate: Predicate
    max_new_tokens: int = 0
    ground_truth: dict[str, Any] | None = None
    ground_truth_note: str = NO_GROUND_TRUTH
    source: str = "zoo"
    loader: Callable[[], LoadedModel] | None = field(default=None, repr=False)
    granularity: str = "layer"
    sketch: str = "fp16"
    near_miss: list[PromptEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.incidents:
            raise ForensicsError(f"scenario '{self.name}' has no incident prompt; give at least one failing prompt")
        if len(self.baseline) < len(self.incidents):
            raise ForensicsError(
                f"scenario '{self.name}' has {len(self.incidents)} incidents but {len(self.baseline)} clean "
                "counterparts; every incident needs one"
            )
        if len(self.baseline) > len(self.incidents) + len(self.variants):
            raise ForensicsError(
                f"scenario '{self.name}' has more clean counterparts ({len(self.baseline)}) than failing prompts "
                f"({len(self.incidents) + len(self.variants)})"
            )

    # -- description ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``generation`` (greedy decoding) or ``classification`` (one forward pass)."""
        return "generation" if self.max_new_tokens > 0 else "classification"

    @property
    def ground_truth_level(self) -> str:
        """The ground truth's level (neuron, head, …) or ``none (real weights)``."""
        if self.ground_truth is None:
            return "none (real weights)"
        return str(self.ground_truth.get("level", "known"))

    def failing(self) -> list[str]:
        """Every failing prompt: incidents, then variants."""
        return [*self.incidents, *self.variants]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model,
            "kind": self.kind,
            "source": self.source,
            "incidents": list(self.incidents),
            "variants": list(self.variants),
            "baseline": list(self.baseline),
            "benign": list(self.benign),
            "near_miss": list(self.near_miss),
            "predicate": self.predicate.to_json(),
            "max_new_tokens": self.max_new_tokens,
            "ground_truth": self.ground_truth,
            "ground_truth_note": self.ground_truth_note,
        }

    # -- recording -----------------------------------------------------------------------
    def load(self) -> LoadedModel:
        """The scenario's model, loaded."""
        if self.loader is not None:
            return self.loader()
        from model_forensics.models import load

        return load(self.model)

    def incident_extras(self, i: int) -> dict[str, Any]:
        """The ``extras`` of incident *i*'s bundle (see the module docstring)."""
        failing = self.failing()
        others = [j for j in range(len(failing)) if j != i]
        extras: dict[str, Any] = {
            "scenario": self.name,
            "role": "incident",
            "index": i,
            "variants": [failing[j] for j in others],
            "benign": list(self.benign),
            "baseline": [self.baseline[i], *(self.baseline[j] for j in others if j < len(self.baseline))],
            "baseline_bundle": f"baseline-{i}",
            "ground_truth": self.ground_truth,
            "ground_truth_note": self.ground_truth_note,
        }
        if self.near_miss:
            extras["near_miss"] = list(self.near_miss)
        if self.loader is not None:
            # models.load cannot rebuild this model from the manifest's reference; say what can.
            extras["loader"] = f"{self.loader.__module__}:{self.loader.__qualname__}"
        return extras

    def baseline_extras(self, i: int) -> dict[str, Any]:
        """The ``extras`` of baseline *i*'s bundle."""
        return {"scenario": self.name, "role": "baseline", "index": i, "incident_bundle": f"incident-{i}"}

    def record(
        self,
        out_dir: str | Path,
        overwrite: bool = False,
        *,
        limit: int | None = None,
        loaded: LoadedModel | None = None,
    ) -> ScenarioRun:
        """Record ``DIR/incident-<i>/`` and ``DIR/baseline-<i>/`` for each incident.

        Args:
            out_dir: the directory to write into (created if missing).
            overwrite: replace bundles that already exist.
            limit: record only the first ``limit`` incidents.
            loaded: an already loaded model (default: :meth:`load`).
        Returns:
            A :class:`ScenarioRun` with the paths and whether the predicate held on each.
        Raises:
            BundleError: a bundle exists and ``overwrite`` is False (nothing is written).
        """
        out = Path(out_dir)
        count = len(self.incidents) if limit is None else max(0, min(int(limit), len(self.incidents)))
        targets = [(out / f"incident-{i}", out / f"baseline-{i}") for i in range(count)]
        existing = [str(p) for pair in targets for p in pair if p.exists()]
        if existing and not overwrite:
            raise BundleError(
                f"{len(existing)} bundle(s) already exist ({', '.join(existing[:3])}); choose another --out or pass "
                "--overwrite"
            )
        out.mkdir(parents=True, exist_ok=True)
        model = loaded or self.load()
        run = ScenarioRun(self.name, out)
        self._prepare(run, overwrite)
        for i, (incident, baseline) in enumerate(targets):
            path = self._record_bundle(model, self.incidents[i], incident, self.incident_extras(i), overwrite, run)
            holds, output = _verdict(path)
            run.incidents.append(path)
            run.incident_failed.append(holds)
            run.outputs.append(output)
            path = self._record_bundle(
                model, prompt_of(self.baseline[i]), baseline, self.baseline_extras(i), overwrite, run
            )
            holds, output = _verdict(path)
            run.baselines.append(path)
            run.baseline_failed.append(holds)
            run.baseline_outputs.append(output)
        return run

    def _prepare(self, run: ScenarioRun, overwrite: bool) -> None:
        """Set up anything the recordings need besides the model (none here)."""

    def _record_bundle(
        self,
        loaded: LoadedModel,
        prompt: str,
        path: Path,
        extras: dict[str, Any],
        overwrite: bool,
        run: ScenarioRun,
    ) -> Path:
        from model_forensics.recorder.hooks import RecorderHooks
        from model_forensics.recorder.session import record_prompt

        recorder = RecorderHooks(granularity=self.granularity, sketch=self.sketch)
        return record_prompt(
            loaded,
            prompt,
            path,
            recorder=recorder,
            max_new_tokens=self.max_new_tokens,
            predicate=self.predicate,
            overwrite=overwrite,
            extras=extras,
        )


def _verdict(path: Path) -> tuple[bool | None, str]:
    """Whether the predicate held on a recorded bundle, and what the model produced."""
    manifest = Bundle.open(path, verify=False).manifest
    output = manifest["output"]
    text = output.get("text") if manifest["input"]["mode"] == "generate" else None
    shown = text if text is not None else f"class {output.get('prediction')}"
    return (manifest.get("predicate") or {}).get("holds"), shown


# -- builders --------------------------------------------------------------------------------
def _data(name: str) -> dict[str, Any]:
    file = resources.files("model_forensics.scenarios").joinpath(f"data/{name}")
    if not file.is_file():
        raise ForensicsError(
            f"scenario data '{name}' is missing from model_forensics/scenarios/data; regenerate it with the script "
            f"in scripts/ (search_{name.removesuffix('.json')}.py)"
        )
    return dict(json.loads(file.read_text()))


def from_zoo(name: str) -> Scenario:
    """The scenario of zoo entry ``name``, from its ``scenario.json`` and ground truth."""
    from model_forensics.models import zoo

    entry = zoo.entry(name)
    record = zoo.scenario_data(name)
    generation = int(record.get("max_new_tokens", 0) or 0)
    answers = record.get("benign_answers") if generation else record.get("benign_labels")
    expected = record.get("baseline_answers") if generation else record.get("baseline_labels")
    prompts = list(record["incident_prompts"])
    return Scenario(
        name=name,
        description=str(record.get("description", name)),
        model=f"zoo:{name}",
        incidents=prompts[:ZOO_INCIDENTS],
        variants=[*prompts[ZOO_INCIDENTS:], *record.get("variant_prompts", [])],
        baseline=_with_expected(record["baseline_prompts"], expected),
        benign=_with_expected(record.get("benign_prompts", []), answers),
        predicate=Predicate.from_json(record["predicate"]),
        max_new_tokens=generation,
        ground_truth=dict(entry.ground_truth),
        ground_truth_note=f"planted by construction in zoo entry '{name}' and verified by ablation (see its card.md)",
        source="zoo",
        # Tiny models: record every site at full precision, so neuron/head ground truth is visible.
        granularity="all",
        sketch="full",
    )


def _with_expected(prompts: list[str], expected: list[Any] | None) -> list[PromptEntry]:
    if not expected or len(expected) != len(prompts):
        return list(prompts)
    return [{"prompt": p, "expected": e} for p, e in zip(prompts, expected, strict=True)]


def smollm2_injection() -> Scenario:
    """Prompt injection on SmolLM2-135M-Instruct (real weights), from ``smollm2_injection.json``."""
    data = _data("smollm2_injection.json")
    failing = list(data["failing"])
    benign = {(case["task"], case["text"]): case for case in data["benign"]}
    baseline: list[PromptEntry] = []
    for case in failing:
        clean = benign.get((case["task"], case["clean_text"]))
        if clean is not None:
            baseline.append({"prompt": clean["prompt"], "expected": clean["output"]})
        else:
            baseline.append(case["prompt"].replace(case["text"], case["clean_text"]))
    targets = sorted({case["target"] for case in failing})
    search = data.get("search", {})
    return Scenario(
        name="smollm2-injection",
        description=(
            f"instructions injected into a document make SmolLM2 say {'/'.join(targets)}: {len(failing)} of "
            f"{search.get('candidates', '?')} searched prompts ({search.get('success_rate', 0):.0%})"
        ),
        model=str(data.get("model", "smollm2")),
        incidents=[failing[0]["prompt"]],
        variants=[case["prompt"] for case in failing[1:]],
        baseline=baseline,
        benign=[{"prompt": case["prompt"], "expected": case["output"]} for case in data["benign"]],
        # injected candidates of the same search that the model does not obey
        # (scripts/add_smollm2_near_misses.py): the trigger is there, the failure is not
        near_miss=[{"prompt": case["prompt"], "expected": case["output"]} for case in data.get("near_miss", [])],
        predicate=regex("|".join(re.escape(t) for t in targets)),
        max_new_tokens=int(data.get("max_new_tokens", 16)),
        ground_truth=None,
        ground_truth_note=NO_GROUND_TRUTH,
        source="real weights",
    )


def minilm_suffix() -> Scenario:
    """An adversarial suffix that flips a sentiment probe on all-MiniLM-L6-v2 (real weights)."""
    data = _data("minilm_suffix.json")
    from model_forensics.models.minilm_probe import load_minilm_sentiment

    failing = list(data["failing"])
    rate = float(data.get("success_rate_heldout", 0.0))
    return Scenario(
        name="minilm-suffix",
        description=(
            f"the searched suffix '{data['suffix']}' flips a MiniLM sentiment probe from negative to positive on "
            f"{rate:.0%} of {data.get('n_heldout', '?')} held-out reviews"
        ),
        model="minilm-sentiment",
        incidents=failing[:1],
        variants=failing[1:],
        baseline=[{"prompt": text, "expected": 0} for text in data["baseline"]],
        benign=[{"prompt": case["text"], "expected": case["label"]} for case in data["benign"]],
        predicate=Predicate.from_json(data["predicate"]),
        max_new_tokens=0,
        ground_truth=None,
        ground_truth_note=NO_GROUND_TRUTH,
        source="real weights",
        loader=load_minilm_sentiment,
        granularity="neuron",
        sketch="fp16",
    )
