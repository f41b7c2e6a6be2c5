"""`model-forensics replay` and `bundle verify --replay`: results, JSON, and exit 2 on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from model_forensics.cli import app

runner = CliRunner()


def test_replay_json_verifies_and_reproduces_the_failure(bundles):
    res = runner.invoke(app, ["replay", str(bundles["forward"]), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["verify"]["bit_identical"] is True
    assert data["run"]["failed"] is True and data["recorded_failed"] is True


def test_replay_with_interventions(bundles):
    args = ["replay", str(bundles["forward"]), "--json", "--no-verify"]
    res = runner.invoke(app, [*args, "-i", "blocks.1.attn.head.3:zero", "--intervene", "final:scale=-1"])
    assert res.exit_code == 0, res.output
    run = json.loads(res.output)["run"]
    assert [iv["site"] for iv in run["interventions"]] == ["blocks.1.attn.head.3", "final"]
    assert run["flipped"] is True


def test_replay_table_and_generation(bundles):
    res = runner.invoke(app, ["replay", str(bundles["generate"]), "-i", "embed:scale=-3"])
    assert res.exit_code == 0, res.output
    assert "bit-identical" in res.output and "replayed output" in res.output


def test_bundle_verify_replay(bundles):
    res = runner.invoke(app, ["bundle", "verify", str(bundles["gpt2"]), "--replay"])
    assert res.exit_code == 0, res.output
    assert "replay bit-identical" in res.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-i", "blocks.9.mlp:zero"], "does not exist; the model has 2 blocks (0–1); nearest:"),
        (["-i", "blocks.1.attn.head.9:zero"], "head 9 does not exist"),
        (["-i", "blocks.0.mlp"], "SITE:KIND"),
        (
            ["-i", "blocks.1.resid_pre:patch:source=prompt:w5 w6"],
            "baseline has 2 tokens but the incident prompt has 16",
        ),
        (["--model", "/no/such/model"], "not found"),
    ],
)
def test_bad_replay_input_is_one_line_exit_2(bundles, extra, message):
    res = runner.invoke(app, ["replay", str(bundles["forward"]), "--no-verify", *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ")
    assert "Traceback" not in res.output


def test_bad_bundles_exit_2(bundles, lm_dirs, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(bundles["forward"], newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": "2.0"}))
    res = runner.invoke(app, ["replay", str(newer)])
    assert res.exit_code == 2 and "upgrade" in res.output

    res = runner.invoke(app, ["replay", str(bundles["forward"]), "--model", str(lm_dirs["gpt2"])])
    assert res.exit_code == 2 and "--allow-weight-mismatch" in res.output.replace("\n", " ")

    res = runner.invoke(app, ["bundle", "verify", str(bundles["forward"]), "--replay", "-m", str(lm_dirs["gpt2"])])
    assert res.exit_code == 2


def test_weight_mismatch_can_be_allowed_with_a_loud_warning(bundles, lm_dirs, tmp_path):
    from model_forensics.models.loading import load

    other = tmp_path / "other"
    loaded = load(str(lm_dirs["llama"]))
    loaded.model.lm_head.weight.data.mul_(1.01)
    loaded.model.save_pretrained(other)
    shutil.copy(lm_dirs["llama"] / "tokenizer.json", other / "tokenizer.json")
    args = ["replay", str(bundles["forward"]), "--model", str(other), "--allow-weight-mismatch"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "WEIGHT MISMATCH" in res.output and "NOT bit-identical" in res.output
