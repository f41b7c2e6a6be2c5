"""A fix that leaves model-forensics behind: edited weights, or a dependency-free hook module.

:func:`export_fix` writes into one new directory:

- ``weights_delta.safetensors`` (when every intervention folds into weights exactly): the
  tensors the fix changes, by state-dict name; ``model.load_state_dict(delta, strict=False)``
  applies it. ``--full`` also writes the whole edited model (``model/``, ``save_pretrained``).
  An intervention folds when it changes whole input features of a linear layer at every
  position, unconditionally: zeroing a head's z (or a neuron's activation) removes the output
  projection's columns for it; scaling scales them; a mean ablation removes them and adds
  their constant contribution to the projection's bias (so only where the layer has a bias:
  GPT-2's ``c_proj`` does, Llama's ``o_proj``/``down_proj`` do not).
- ``apply_fix.py`` + ``fix.json``, always: the interventions as plain PyTorch hooks, for every
  fix (gates, directions, token positions included); the module imports only torch
  (:mod:`model_forensics.replay.standalone_fix`, copied verbatim).
- ``MODEL_CARD.md``: a model-card fragment with what changed and the analysis' figures.
- ``export.json``: what folded (and why the rest did not) and the check below.

Before anything is written, both forms are checked against the hooked replay: teacher-forced
logits over the incident prompt and up to ``check_inputs − 1`` benign prompts, edited model vs
``Session.forced`` with the interventions, and ``apply_fix`` vs the same. The largest absolute
difference of each is reported; an export whose forms disagree by more than ``tolerance`` ·
max(1, max |logit|) is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from model_forensics.core.errors import ForensicsError
from model_forensics.core.files import write_text_atomic
from model_forensics.models.adapters import HookPoint
from model_forensics.models.hooks import logits_of
from model_forensics.models.inputs import ModelInputs
from model_forensics.replay import standalone_fix
from model_forensics.replay.interventions import Intervention, Prepared
from model_forensics.replay.loading import fix_interventions, read_fix_json
from model_forensics.replay.session import Session

EXPORTABLE = standalone_fix.KINDS
FOLDABLE = ("zero", "scale", "mean")


@dataclass
class Fold:
    """How one intervention folds into weights, or why it does not."""

    site: str
    module: str | None = None
    features: list[int] = field(default_factory=list)
    reason: str | None = None  # None: it folds

    @property
    def folds(self) -> bool:
        return self.reason is None


@dataclass
class FixExport:
    """What :func:`export_fix` wrote and how well each form matched the hooked replay."""

    out: Path
    folded: bool
    folds: list[Fold]
    changed_tensors: list[str]
    checked_inputs: int
    max_abs_diff_weights: float | None  # edited weights vs hooked replay (None: not folded)
    max_abs_diff_hooks: float  # apply_fix vs hooked replay
    max_abs_logit: float
    files: list[str]
    mean_baselines: int | None = None  # baselines the mean ablations were taken over (None: no mean)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "folded": self.folded,
            "interventions": [
                {"site": f.site, "folds": f.folds, "module": f.module, "features": len(f.features), "reason": f.reason}
                for f in self.folds
            ],
            "changed_tensors": self.changed_tensors,
            "check": {
                "inputs": self.checked_inputs,
                "max_abs_diff_weights": self.max_abs_diff_weights,
                "max_abs_diff_apply_fix": self.max_abs_diff_hooks,
                "max_abs_logit": self.max_abs_logit,
            },
            "files": self.files,
            "mean_baselines": self.mean_baselines,
        }


@dataclass(frozen=True)
class FittedOn:
    """What an analysis JSON says its fix was fitted on (checked as hostile input).

    Attributes:
        fraction / seed: its held-out split (``fix_set.held_out.split``; fraction 0: none).
        counts: prompts per kind in each part of the split, as recorded (None: not recorded).
        baseline_bundles: the ``--baseline`` bundles analyze added to the baselines.
        baselines: how many baselines its mean ablations were taken over (None: the
            analysis does not say, e.g. one written before this was recorded).
    """

    fraction: float = 0.0
    seed: int = 0
    counts: dict[str, Any] | None = None
    baseline_bundles: tuple[str, ...] = ()
    baselines: int | None = None

    @classmethod
    def of(cls, analysis: Any) -> FittedOn:
        """Read it from an analysis JSON (``analyze --out``).

        Raises:
            ForensicsError: the split's settings or the bundle list are malformed.
        """
        if not isinstance(analysis, dict):
            return cls()
        bundles = analysis.get("baseline_bundles")
        if bundles is not None and (
            not isinstance(bundles, list) or not all(isinstance(p, str) and p for p in bundles)
        ):
            raise ForensicsError("the analysis' baseline_bundles is not a list of paths; it is corrupt")
        paths = tuple(bundles or ())
        fix = analysis.get("fix_set")
        held = fix.get("held_out") if isinstance(fix, dict) else None
        if held is None:
            carried = (analysis.get("incident") or {}).get("baselines")
            if isinstance(carried, bool) or not isinstance(carried, int) or bundles is None:
                return cls(baseline_bundles=paths)
            return cls(baseline_bundles=paths, baselines=carried + len(paths))
        split = held.get("split") if isinstance(held, dict) else None
        fraction = split.get("fraction") if isinstance(split, dict) else None
        seed = split.get("seed") if isinstance(split, dict) else None
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
            raise ForensicsError(
                "the analysis' fix_set.held_out.split.fraction is not a number in [0, 1); it is corrupt"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ForensicsError("the analysis' fix_set.held_out.split.seed is not an integer; it is corrupt")
        counts = split.get("counts") if isinstance(split, dict) else None
        if not isinstance(counts, dict) or not _counts(counts):
            return cls(float(fraction), seed, None, paths)
        searched = int(counts["baseline"]["search"])
        return cls(float(fraction), seed, counts, paths, searched + len(paths) if bundles is not None else None)


def _counts(counts: dict[str, Any]) -> bool:
    """Whether ``counts`` is ``{kind: {"search": n, "held_out": n}}`` with a baseline kind."""
    if not isinstance(counts.get("baseline"), dict):
        return False
    return all(
        isinstance(part, dict) and all(isinstance(n, int) and not isinstance(n, bool) for n in part.values())
        for part in counts.values()
    ) and isinstance(counts["baseline"].get("search"), int)


def export_fix(
    session: Session,
    interventions: list[Intervention],
    out: str | Path,
    *,
    analysis: dict[str, Any] | None = None,
    full_model: bool = False,
    check_inputs: int = 8,
    tolerance: float = 1e-5,
) -> FixExport:
    """Write ``interventions`` (a fix for ``session``'s model) as deployable files in ``out``.

    Args:
        session: the incident's replay session (its model, baselines and benign prompts);
            with an analysis that held prompts out, open it inside
            :func:`~model_forensics.rca.fitted.fitted_on`, so that mean ablations are taken
            over the baselines the analysis fitted them on.
        interventions: the fix set, e.g. from :func:`~model_forensics.replay.loading.read_fix_file`.
        out: a new (or empty) directory.
        analysis: the analysis JSON the fix came from; its figures go into the model card.
        full_model: also write the whole edited model (``save_pretrained``) when it folds.
        check_inputs: prompts the check runs on (the incident's, then benign ones).
        tolerance: largest allowed logit difference, relative to max(1, max |logit|).
    Raises:
        ForensicsError: ``out`` is not empty, a kind cannot be exported, a form disagrees
            with the hooked replay, or the session's baselines are not those the analysis
            fitted its mean ablations on.
    """
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ForensicsError(f"'{target}' already exists and is not an empty directory; pass a new --out")
    if not interventions:
        raise ForensicsError("the fix set is empty; there is nothing to export")
    _check_fitted(session, interventions, analysis)
    prepared = session.prepare(interventions)
    for p in prepared:
        iv = p.target.intervention
        if iv.kind not in EXPORTABLE:
            raise ForensicsError(
                f"'{iv.site}:{iv.kind}' cannot be exported: {iv.kind} reads recorded activations or randomness at "
                f"replay time; exportable kinds are {', '.join(EXPORTABLE)} (apply it with `replay --fix`)"
            )
        if p.target.point.pattern:
            raise ForensicsError(f"'{iv.site}' is an attention pattern; patterns cannot be exported as a fix")
    spec = _spec(session, prepared)
    folds = _folds(session.model, prepared)
    folded = all(f.folds for f in folds)
    edited: nn.Module | None = None
    changed: dict[str, torch.Tensor] = {}
    if folded:
        edited = copy.deepcopy(session.model)
        changed = _fold(edited, prepared, folds)

    inputs = [session.inputs, *session.benign()][: max(1, check_inputs)]
    diff_w, diff_h, scale = 0.0, 0.0, 0.0
    for batch in inputs:
        hooked = session.forced(batch, [session.prepare(interventions, batch)]).double()
        scale = max(scale, float(hooked.abs().max()))
        with session.environment():
            if edited is not None:
                diff_w = max(diff_w, _max_diff(_logits(edited, batch), hooked))
            handle = standalone_fix.apply_fix(session.model, copy.deepcopy(spec))
            try:
                diff_h = max(diff_h, _max_diff(_logits(session.model, batch), hooked))
            finally:
                handle.remove()
    limit = tolerance * max(1.0, scale)
    if diff_h > limit or (edited is not None and diff_w > limit):
        worst = diff_h if diff_h > limit else diff_w
        raise ForensicsError(
            f"the exported fix disagrees with the hooked replay by {worst:.3g} (limit {limit:.3g}); refusing to write it"
        )

    target.mkdir(parents=True, exist_ok=True)
    files = ["fix.json", "apply_fix.py", "MODEL_CARD.md", "export.json"]
    write_text_atomic(target / "fix.json", json.dumps(spec, indent=1))
    write_text_atomic(target / "apply_fix.py", Path(standalone_fix.__file__).read_text(encoding="utf-8"))
    if edited is not None:
        save_file(
            {k: v.detach().contiguous().clone() for k, v in changed.items()}, target / "weights_delta.safetensors"
        )
        files.insert(0, "weights_delta.safetensors")
        if full_model:
            save = getattr(edited, "save_pretrained", None)
            if save is None:
                raise ForensicsError("--full needs a Hugging Face model (save_pretrained); the delta was written")
            save(target / "model")
            if session.tokenizer is not None and hasattr(session.tokenizer, "save_pretrained"):
                session.tokenizer.save_pretrained(target / "model")
            files.insert(1, "model/")
    result = FixExport(
        out=target,
        folded=folded,
        folds=folds,
        changed_tensors=sorted(changed),
        checked_inputs=len(inputs),
        max_abs_diff_weights=diff_w if edited is not None else None,
        max_abs_diff_hooks=diff_h,
        max_abs_logit=scale,
        files=files,
        mean_baselines=len(session.baselines) if any(iv.kind == "mean" for iv in interventions) else None,
    )
    write_text_atomic(target / "MODEL_CARD.md", model_card(session, interventions, result, analysis))
    write_text_atomic(target / "export.json", json.dumps(result.to_json(), indent=1))
    return result


def _check_fitted(session: Session, interventions: list[Intervention], analysis: dict[str, Any] | None) -> None:
    """Refuse to export mean ablations over another baseline set than the analysis fitted
    them on (the session must be opened as :func:`~model_forensics.rca.fitted.fitted_on` does)."""
    expected = FittedOn.of(analysis).baselines
    if expected is None or not any(iv.kind == "mean" for iv in interventions):
        return
    have = len(session.baselines)
    if have != expected:
        raise ForensicsError(
            f"the analysis took its mean ablations over {expected} baselines (the search part of its held-out split "
            f"and its baseline bundles), but the session holds {have}; export inside "
            "model_forensics.rca.fitted.fitted_on(session, analysis), as `fix export` does"
        )


def read_analysis(path: str | Path) -> tuple[list[Intervention], dict[str, Any], Path | None]:
    """The fix set of an analysis JSON (checked as hostile input), the analysis itself, and
    the bundle it names (None: it names none)."""
    data = read_fix_json(path)  # size-capped, strict JSON, read once
    interventions = fix_interventions(data, f"fix file '{Path(path)}'")  # every intervention checked
    bundle = data.get("bundle") if isinstance(data, dict) else None  # an analysis, or a fix set that names one
    if "fix_set" not in data:
        data = {"fix_set": data}
    return interventions, data, Path(bundle) if isinstance(bundle, str) and bundle else None


# -- the dependency-free form --------------------------------------------------------------------
def _point(point: HookPoint) -> dict[str, Any]:
    """A hook point as fix.json holds it (the pattern flag is refused before this)."""
    fields = dataclasses.asdict(point)
    fields.pop("pattern")
    return fields


def _spec(session: Session, prepared: list[Prepared]) -> dict[str, Any]:
    gates: list[dict[str, Any]] = []
    items = []
    for p in prepared:
        iv, t = p.target.intervention, p.target
        gate_index = None
        if iv.gate is not None:
            entry = {**iv.gate.to_json(), "point": _point(session.adapter.points[iv.gate.site])}
            if entry not in gates:
                gates.append(entry)
            gate_index = gates.index(entry)
        value = iv.value
        items.append(
            {
                "site": iv.site,
                "kind": iv.kind,
                "point": _point(t.point),
                "heads": None if t.heads is None else list(t.heads),
                "neurons": None if t.neurons is None else list(t.neurons),
                "positions": None if t.positions is None else list(t.positions),
                "value": list(value) if isinstance(value, tuple) else value,
                "direction": None if iv.direction is None else list(iv.direction),
                "baseline": None if p.baseline is None else p.baseline.double().tolist(),
                "gate": gate_index,
            }
        )
    reference = session.manifest.get("model") or {}
    return {
        "format": standalone_fix.FORMAT,
        "model": {k: reference.get(k) for k in ("name", "class", "architecture", "weights_sha256") if k in reference},
        "interventions": items,
        "gates": gates,
    }


# -- folding into weights ------------------------------------------------------------------------
def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(weight, bias, features_on_dim0) of a linear layer: nn.Linear (out, in) or GPT-2's Conv1D (in, out)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, False
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        bias = getattr(module, "bias", None)
        return weight, bias if isinstance(bias, torch.Tensor) else None, True
    return None


def _folds(model: nn.Module, prepared: list[Prepared]) -> list[Fold]:
    modules = dict(model.named_modules())
    touched: dict[str, set[int]] = {}
    folds = []
    for p in prepared:
        t, iv = p.target, p.target.intervention
        fold = Fold(site=iv.site, module=t.point.module)
        point = t.point
        layer = _linear(modules[point.module]) if point.module in modules else None
        if iv.kind not in FOLDABLE:
            fold.reason = f"{iv.kind} is not a change of fixed weights"
        elif iv.gate is not None:
            fold.reason = "gated: it applies to some runs only"
        elif iv.direction is not None:
            fold.reason = "along a direction of an activation that is not a layer's input features"
        elif t.positions is not None:
            fold.reason = "limited to token positions"
        elif point.io != "input" or point.span is not None or point.channels or layer is None:
            fold.reason = f"'{iv.site}' is not the input of a linear layer"
        elif iv.kind == "mean" and layer[1] is None:
            fold.reason = f"{point.module} has no bias to hold the mean's constant contribution"
        if fold.reason is None:
            weight, _, on_dim0 = layer  # type: ignore[misc]
            width = weight.shape[0] if on_dim0 else weight.shape[1]
            fold.features = _features(t, width)
            if touched.setdefault(point.module, set()) & set(fold.features):
                fold.reason = "another intervention of the set changes the same features"
            touched[point.module].update(fold.features)
        folds.append(fold)
    return folds


def _features(target: Any, width: int) -> list[int]:
    heads = target.point.heads
    if heads is None:
        return list(target.neurons) if target.neurons is not None else list(range(width))
    d = width // heads
    chosen = target.heads if target.heads is not None else range(heads)
    dims = target.neurons if target.neurons is not None else range(d)
    return [h * d + n for h in chosen for n in dims]


@torch.no_grad()
def _fold(model: nn.Module, prepared: list[Prepared], folds: list[Fold]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    changed: dict[str, torch.Tensor] = {}
    for p, fold in zip(prepared, folds, strict=True):
        assert fold.module is not None
        module = modules[fold.module]
        weight, bias, on_dim0 = _linear(module)  # type: ignore[misc]
        idx = torch.tensor(fold.features, dtype=torch.long)
        columns = weight.index_select(0 if on_dim0 else 1, idx)  # (F, out) or (out, F)
        kind = p.target.intervention.kind
        if kind == "mean":
            assert p.baseline is not None and bias is not None
            mean = _mean_features(p).to(torch.float64)
            contribution = mean @ columns.double() if on_dim0 else columns.double() @ mean
            bias.copy_((bias.double() + contribution).to(bias.dtype))
            changed[f"{fold.module}.bias"] = bias
        factor = float(p.target.intervention.value) if kind == "scale" else 0.0  # type: ignore[arg-type]
        weight.index_copy_(0 if on_dim0 else 1, idx, columns * factor)
        changed[f"{fold.module}.weight"] = weight
    return changed


def _mean_features(p: Prepared) -> torch.Tensor:
    """The baseline mean of the folded features, flat, in feature order."""
    assert p.baseline is not None
    t = p.target
    base = p.baseline
    if t.point.heads is not None:
        heads = list(t.heads) if t.heads is not None else list(range(base.shape[-2]))
        base = base[heads]
        if t.neurons is not None:
            base = base[:, list(t.neurons)]
        return base.reshape(-1)
    return base[list(t.neurons)] if t.neurons is not None else base.reshape(-1)


def _logits(model: nn.Module, batch: ModelInputs) -> torch.Tensor:
    with torch.no_grad():
        logits = logits_of(model(**ModelInputs.of(batch).expand(1)))
    assert logits is not None
    return logits.double()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.shape == b.shape else math.inf


# -- the model card -------------------------------------------------------------------------------
def model_card(
    session: Session, interventions: list[Intervention], result: FixExport, analysis: dict[str, Any] | None
) -> str:
    """A model-card fragment (markdown): what the fix changes, how to apply it, its figures."""
    name = (session.manifest.get("model") or {}).get("name") or "the model"
    lines = [
        "## Behaviour fix (model-forensics)",
        "",
        f"This fix changes {len(interventions)} internal unit(s) of `{name}`:",
        "",
        *[f"- {_describe(iv)}" for iv in interventions],
        "",
    ]
    if result.folded:
        lines += [
            "It is folded into the weights: `weights_delta.safetensors` holds the changed tensors "
            f"({', '.join(f'`{t}`' for t in result.changed_tensors)}); apply with "
            "`model.load_state_dict(load_file('weights_delta.safetensors'), strict=False)`.",
        ]
    else:
        reasons = "; ".join(f"`{f.site}`: {f.reason}" for f in result.folds if not f.folds)
        lines += [f"It does not fold into weights ({reasons}); apply it with `apply_fix.apply_fix(model)`."]
    lines += [
        "",
        f"Checked against model-forensics' hooked replay on {result.checked_inputs} prompt(s), teacher-forced "
        f"logits: largest difference {_fmt(result.max_abs_diff_weights)} (edited weights), "
        f"{_fmt(result.max_abs_diff_hooks)} (`apply_fix`), largest |logit| {result.max_abs_logit:.3g}.",
        "",
    ]
    if result.mean_baselines is not None:
        lines += [
            f"Mean ablations use each unit's mean over {result.mean_baselines} clean baseline prompt(s), the ones "
            "the analysis fitted the fix on (the search part of its held-out split).",
            "",
        ]
    fix = (analysis or {}).get("fix_set") if isinstance(analysis, dict) else None
    if isinstance(fix, dict):
        lines += _figures(fix)
    return "\n".join(lines)


_PART_FIGURES = (  # (row label, part key, figure key): the rows of the model card's table
    ("failing prompts fixed", None, "flip_rate"),
    ("failing prompts measured", None, "failing"),
    ("benign answers kept word for word", "benign", "answers_unchanged"),
    ("benign mean KL (nats)", "benign", "mean_kl"),
    ("benign accuracy drop", "benign", "accuracy_drop"),
    ("benign prompts measured", "benign", "n_benign"),
    ("near-miss answers kept word for word", "near_miss", "answers_unchanged"),
    ("near-miss mean KL (nats)", "near_miss", "mean_kl"),
    ("gate fires on near misses", "near_miss", "gate_fired"),
    ("near misses measured", "near_miss", "n_benign"),
)


def _figures(fix: dict[str, Any]) -> list[str]:
    """The fix's figures as a markdown table: search and held-out columns when the analysis
    held prompts out (``fix_set.held_out``), the search part alone otherwise. The values
    come from an analysis file: only numbers are printed."""
    held = fix.get("held_out")
    if not isinstance(held, dict) or not isinstance(held.get("search"), dict):
        rows = ["| figure | search |", "|---|---|"]
        if _number(fix.get("total_flip_rate")) is not None:
            rows.append(f"| failing prompts fixed | {fix['total_flip_rate']:.0%} |")
        given = fix.get("side_effects")
        side: dict[str, Any] = given if isinstance(given, dict) else {}
        for label, part, key in _PART_FIGURES:
            if part == "benign" and _number(side.get(key)) is not None:
                rows.append(f"| {label} | {_cell(key, side[key])} |")
        return [*rows, "| held-out figures | not in this analysis (held_out_fraction 0) |", ""]
    parts = [held.get("search"), held.get("held_out")]
    rows = ["| figure | search | held out |", "|---|---|---|"]
    for label, part, key in _PART_FIGURES:
        cells = []
        for figures in parts:
            source = figures if part is None or not isinstance(figures, dict) else figures.get(part)
            value = source.get(key) if isinstance(source, dict) else None
            cells.append("—" if _number(value) is None else _cell(key, value))
        if cells != ["—", "—"]:
            rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    decides = "held-out" if held.get("decides") == "held_out" else "search"
    return [*rows, "", f"The {decides} flip rate decides whether the fix reaches the analysis' threshold.", ""]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cell(key: str, value: Any) -> str:
    if key in ("failing", "n_benign"):
        return str(int(value))
    if key in ("flip_rate", "answers_unchanged", "gate_fired", "accuracy_drop"):
        return f"{float(value):.0%}"
    return f"{float(value):.3g}"


def _describe(iv: Intervention) -> str:
    text = f"`{iv.site}`: {iv.kind}"
    if isinstance(iv.value, int | float):
        text += f" {iv.value:g}"
    for name in ("heads", "neurons", "positions"):
        items = getattr(iv, name)
        if items is not None:
            text += f", {name} {', '.join(str(i) for i in items)}"
    if iv.direction is not None:
        text += ", along one direction"
    if iv.gate is not None and iv.gate.reads == "each":
        text += f", only at the positions whose `{iv.gate.site}` projects above {iv.gate.above:.3g} (each)"
    elif iv.gate is not None:
        text += f", only when the prompt's `{iv.gate.site}` projects above {iv.gate.above:.3g} ({iv.gate.reads})"
    return text


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
