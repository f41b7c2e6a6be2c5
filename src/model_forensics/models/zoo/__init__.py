"""The model zoo: tiny models trained here with planted, known mechanisms.

Each entry is a folder next to this file (config, ``model.safetensors``, a word-level
tokenizer (none for the image entry), ``card.md``, ``ground_truth.json``, ``metrics.json``, ``scenario.json`` and
``checksums.json``) written by ``python -m model_forensics.models.zoo.training.<module>``.
The ground truth is known by construction: the units that carry the planted behaviour
were silent while the benign task was learned and are the only parameters trained on the
behaviour (see :mod:`model_forensics.models.zoo.training.common`).

::

    from model_forensics.models import zoo

    zoo.names()                        # ['bert-sentiment-bypass', 'gpt2-injection', ...]
    zoo.entry("gpt2-injection").ground_truth["units"]
    loaded = zoo.load("gpt2-injection")  # checksums verified; LoadedModel(model, tokenizer, ref)
    zoo.scenario_data("gpt2-injection")["incident_prompts"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_forensics.core.bundle import file_sha256
from model_forensics.core.errors import ModelLoadError
from model_forensics.models.local import load_directory
from model_forensics.models.reference import LoadedModel, ModelRef, tag_model
from model_forensics.models.zoo import digits_cnn

ZOO_DIR = Path(__file__).resolve().parent
CHECKSUMS = "checksums.json"
_KINDS = {
    "GPT2LMHeadModel": "causal-lm",
    "BertForSequenceClassification": "sequence-classification",
    digits_cnn.ARCHITECTURE: "image-classification",
}


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: where it lives and what is known about it.

    ``kind`` is "causal-lm", "sequence-classification" or "image-classification"; ``ground_truth`` and ``metrics``
    are the folder's JSON records; ``card`` its markdown model card.
    """

    name: str
    path: Path
    kind: str
    card: str = field(repr=False)
    ground_truth: dict[str, Any] = field(repr=False)
    metrics: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "kind": self.kind,
            "ground_truth": self.ground_truth,
            "metrics": self.metrics,
        }


def names() -> list[str]:
    """Names of the zoo's entries, sorted."""
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / CHECKSUMS).is_file() and not p.name.startswith("."))


def entry(name: str) -> ZooEntry:
    """The record of zoo entry ``name``.

    Raises:
        ModelLoadError: no entry has that name (the message lists the names).
    """
    return _read_entry(_folder(name), name)


def load(name: str, attn_implementation: str = "eager") -> LoadedModel:
    """Load zoo entry ``name`` after verifying every file against its ``checksums.json``.

    Returns:
        a ``LoadedModel`` whose ref is ``ModelRef(name="zoo:NAME", source="zoo",
        reference="zoo:NAME")``.

    Raises:
        ModelLoadError: unknown name, a missing or corrupted file (named in the message).
    """
    return load_from(_folder(name), name=name, attn_implementation=attn_implementation)


def load_from(path: Path, *, name: str | None = None, attn_implementation: str = "eager") -> LoadedModel:
    """Load a zoo folder from any location (a copy of an entry, a fresh retraining).

    ``name`` defaults to the folder's name; the checksums are verified as in :func:`load`.
    """
    path = Path(path)
    name = name or path.name
    verify(path)
    if _architecture(path) == digits_cnn.ARCHITECTURE:
        loaded = _load_image_model(path)
    else:
        loaded = load_directory(path, attn_implementation=attn_implementation, name=f"zoo:{name}")
    loaded.ref = ModelRef(name=f"zoo:{name}", source="zoo", reference=f"zoo:{name}")
    tag_model(loaded.model, loaded.ref)
    return loaded


def _architecture(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read '{path / 'config.json'}' ({exc}); reinstall the package") from None
    return str((config.get("architectures") or ["?"])[0]) if isinstance(config, dict) else "?"


def _load_image_model(path: Path) -> LoadedModel:
    """A zoo image classifier: a plain ``nn.Module`` without a tokenizer (its inputs are
    ``pixel_values`` (B, 1, H, W))."""
    try:
        model = digits_cnn.load(path)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the image model in '{path}': {exc}") from None
    return LoadedModel(model, None, ModelRef(name=path.name, source="zoo", reference=str(path)))


def verify(path: Path) -> None:
    """Check every file listed in ``path/checksums.json`` against its sha256.

    Raises:
        ModelLoadError: the checksums file or a listed file is missing, or a file's
            sha256 differs (the message names the file and says how to restore it).
    """
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise ModelLoadError(f"zoo folder '{path}' has no {CHECKSUMS}; regenerate it with its training module")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"'{sums_file}' is not valid JSON ({exc}); reinstall the package") from None
    for file, expected in sorted(sums.items()):
        target = path / file
        if not target.is_file():
            raise ModelLoadError(f"zoo file '{target}' is missing; reinstall the package or retrain the entry")
        actual = file_sha256(target)
        if actual != expected:
            raise ModelLoadError(
                f"zoo file '{target}' is corrupted: sha256 {actual[:12]}… differs from {expected[:12]}… in "
                f"{CHECKSUMS}; reinstall the package or retrain the entry"
            )


def scenario_data(name: str) -> dict[str, Any]:
    """The prompts a downstream incident scenario needs (the entry's ``scenario.json``).

    Keys: ``incident_prompts`` (failing, ≥ 20), ``baseline_prompts`` (the same prompts
    without the trigger, aligned with the incidents) with ``baseline_answers`` /
    ``baseline_labels``, ``variant_prompts`` (paraphrased or moved triggers),
    ``benign_prompts`` with ``benign_answers`` / ``benign_labels``, ``target``,
    ``predicate`` (``{"kind": ..., "args": ...}``), ``max_new_tokens`` (generation models).
    The image entry has ``failing_images``, ``baseline_images`` (their clean twins) and
    ``benign_images`` instead of prompts (rows of grey-level characters,
    :func:`~model_forensics.models.zoo.digits_cnn.rows_image` decodes one), with their labels.
    """
    folder = _folder(name)
    file = folder / "scenario.json"
    if not file.is_file():
        raise ModelLoadError(f"zoo entry '{name}' has no scenario.json in {folder}; retrain it to write one")
    return dict(json.loads(file.read_text()))


def _folder(name: str) -> Path:
    available = names()
    if name not in available:
        raise ModelLoadError(f"zoo model '{name}' does not exist; available: {', '.join(available) or '(none)'}")
    return ZOO_DIR / name


def _read_entry(folder: Path, name: str) -> ZooEntry:
    def record(file: str) -> dict[str, Any]:
        target = folder / file
        return dict(json.loads(target.read_text())) if target.is_file() else {}

    config = record("config.json")
    arch = (config.get("architectures") or ["?"])[0]
    card = folder / "card.md"
    return ZooEntry(
        name=name,
        path=folder,
        kind=_KINDS.get(arch, "causal-lm" if arch.endswith("LMHeadModel") else "unknown"),
        card=card.read_text() if card.is_file() else "",
        ground_truth=record("ground_truth.json"),
        metrics=record("metrics.json"),
    )
