"""`fix export` takes mean ablations over the baselines the analysis fitted them on: the
search part of its held-out split, not every baseline the bundle carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from model_forensics import SandboxReplayer
from model_forensics.core.errors import ForensicsError
from model_forensics.models import zoo
from model_forensics.rca.fitted import fitted_on
from model_forensics.rca.heldout import split_prompts
from model_forensics.replay import Intervention
from model_forensics.replay.export import export_fix

pytestmark = pytest.mark.skipif("gpt2-injection" not in zoo.names(), reason="zoo weights not shipped")
HEAD = 3
FIX = [Intervention(f"blocks.0.attn.head.{HEAD}", kind="mean")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_forensics.scenarios import get

    return get("gpt2-injection").record(tmp_path_factory.mktemp("inj"), limit=1).incidents[0]


@pytest.fixture(scope="module")
def session(bundle: Path) -> Any:
    return SandboxReplayer().load_bundle(bundle)


def _analysis(session: Any, fraction: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """The parts of an `analyze --out` JSON that export reads: the fix, its held-out split
    (as HeldOut.to_json writes it) and the baseline bundles (none)."""
    split = split_prompts(session.extras, fraction, seed)
    return {
        "bundle": str(session.bundle.path),
        "baseline_bundles": [],
        "incident": {"baselines": len(session.extras["baseline"])},
        "fix_set": {"interventions": [iv.to_json() for iv in FIX], "held_out": {"split": split.to_json()}},
    }


def _means(session: Any, analysis: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's baseline mean over the search part's baselines and over all of them."""
    fraction, seed = (analysis["fix_set"]["held_out"]["split"][k] for k in ("fraction", "seed"))
    search = split_prompts(session.extras, fraction, seed).search["baseline"]
    with session.restricted({"baseline": search}):
        fitted = session.prepare(FIX)[0].baseline
    return fitted.double(), session.prepare(FIX)[0].baseline.double()


def test_export_takes_the_mean_over_the_search_part(session: Any, tmp_path: Path) -> None:
    analysis = _analysis(session)
    fitted, everything = _means(session, analysis)
    assert (fitted - everything).abs().max() > 1e-4  # the split changes the mean on this bundle
    every = len(session.baselines)
    with fitted_on(session, analysis) as split:
        assert split is not None and len(session.baselines) == len(split.search["baseline"]) < every
        result = export_fix(session, FIX, tmp_path / "out", analysis=analysis)
    assert len(session.baselines) == every  # restored on leaving
    assert result.mean_baselines == len(split.search["baseline"])
    spec = json.loads((tmp_path / "out" / "fix.json").read_text())
    exported = torch.tensor(spec["interventions"][0]["baseline"], dtype=torch.float64)
    assert torch.equal(exported, fitted) and not torch.allclose(exported, everything)
    # the folded bias holds the search part's mean contribution through the head's columns
    name = "transformer.h.0.attn.c_proj"
    proj = dict(session.model.named_modules())[name]
    d = proj.weight.shape[0] // session.model.config.n_head
    columns = proj.weight[HEAD * d : (HEAD + 1) * d].double()  # GPT-2 Conv1D: (in, out), the head's rows
    added = load_file(tmp_path / "out" / "weights_delta.safetensors")[f"{name}.bias"].double() - proj.bias.double()
    head_mean = fitted.reshape(session.model.config.n_head, d)[HEAD]  # (d_head,) the mean of its z
    assert torch.allclose(added, head_mean @ columns, atol=1e-5)
    assert f"mean over {result.mean_baselines} clean baseline" in (tmp_path / "out" / "MODEL_CARD.md").read_text()


def test_export_outside_the_fitted_baselines_is_refused(session: Any, tmp_path: Path) -> None:
    with pytest.raises(ForensicsError, match="took its mean ablations over"):
        export_fix(session, FIX, tmp_path / "out", analysis=_analysis(session))
    assert not (tmp_path / "out").exists()


def test_fix_export_cli_uses_the_split_and_refuses_a_corrupt_one(session: Any, tmp_path: Path) -> None:
    from model_forensics.cli import app

    analysis = _analysis(session)
    fitted, _ = _means(session, analysis)
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    res = CliRunner().invoke(app, ["fix", "export", str(tmp_path / "analysis.json"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "o" / "fix.json").read_text())
    assert torch.equal(torch.tensor(spec["interventions"][0]["baseline"], dtype=torch.float64), fitted)
    analysis["fix_set"]["held_out"]["split"]["seed"] = "zero"
    (tmp_path / "bad.json").write_text(json.dumps(analysis))
    res = CliRunner().invoke(app, ["fix", "export", str(tmp_path / "bad.json"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "split.seed is not an integer" in res.output, res.output
