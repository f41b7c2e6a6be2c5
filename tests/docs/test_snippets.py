"""Docs are tests: every ```python / ```bash block of docs/*.md runs as written (README.md:
test_readme.py, a file of its own so that ``pytest -n 2 --dist loadfile`` runs it beside
these), plus the harness's own tests.

One test per document: its blocks run in reading order in one fresh temporary directory,
in a fresh Python process (``snippets.py``), with ``.venv/bin`` first on PATH so
``model-forensics`` is this checkout's CLI, and offline. A failure names the document line
of the failing block. Markers (``<!-- docs-test: skip (why) -->``, ``replace OLD with NEW``)
are described in ``snippets.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from snippets import ROOT, Block, SnippetError, check_document, parse, run_driver

DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_document_runs_as_written(doc: Path, tmp_path: Path) -> None:
    check_document(doc, tmp_path)


def test_every_document_is_collected() -> None:
    assert {"replay.md", "rca.md", "security.md", "metrics.md"} <= {d.name for d in DOCS}


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_a_failing_block_fails_and_names_its_line(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    proc = run_driver(doc, tmp_path)
    assert proc.returncode == 1
    assert "FAILED doc.md:9 (python block at line 9)" in proc.stderr
    assert 'doc.md", line 10' in proc.stderr and "x is 1" in proc.stderr


def test_blocks_share_one_namespace_and_directory_in_order(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "```python\nopen('a.txt', 'w').write('hi')\nn = 3\n```\n"
        '```bash\ntest "$(cat a.txt)" = hi\necho ok > b.txt\n```\n'
        "```python\nassert n == 3 and open('b.txt').read() == 'ok\\n'\n```\n",
    )
    assert run_driver(doc, tmp_path).returncode == 0


def test_a_failing_shell_command_fails_and_names_its_line(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```bash\ntrue\nmodel-forensics bundle info missing-bundle\necho never\n```\n")
    proc = run_driver(doc, tmp_path)
    assert proc.returncode == 1
    assert "FAILED doc.md:1 (bash block at line 1)" in proc.stderr
    assert "doc.md:3: model-forensics bundle info missing-bundle" in proc.stderr
    assert "never" not in proc.stdout


def test_samples_are_not_run(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```json\n{not json\n```\n```text\nexit 1\n```\n```\nexit 1\n```\n")
    assert not any(b.runs for b in parse(doc))


def test_console_blocks_run_only_their_prompt_lines(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```console\n$ echo one > out.txt\none\n$ test -s out.txt\n```\n")
    assert parse(doc)[0].source() == "echo one > out.txt\ntest -s out.txt\n"
    assert run_driver(doc, tmp_path).returncode == 0


def test_skip_marker_needs_a_reason(tmp_path: Path) -> None:
    ok = parse(_doc(tmp_path, "<!-- docs-test: skip (needs a GPU; and CUDA) -->\n```bash\nexit 1\n```\n"))
    assert ok[0].skip == "needs a GPU; and CUDA" and not ok[0].runs
    with pytest.raises(SnippetError, match="doc.md:1.*needs a reason"):
        parse(_doc(tmp_path, "<!-- docs-test: skip -->\n```bash\nexit 1\n```\n"))


def test_replace_marker_edits_the_block_and_must_be_stated(tmp_path: Path) -> None:
    text = '<!-- docs-test: replace smollm2 with zoo:gpt2-injection; replace "= 12" with "= 2" -->\n'
    text += "```python\nm = load('smollm2'); n = 12\n```\n"
    with pytest.raises(SnippetError, match="must be stated"):
        parse(_doc(tmp_path, text))
    block: Block = parse(_doc(tmp_path, text + "(The docs tests run this on zoo:gpt2-injection.)\n"))[0]
    assert block.source() == "m = load('zoo:gpt2-injection'); n = 2\n"
    stale = parse(_doc(tmp_path, text.replace("n = 12", "n = 99") + "docs tests: zoo\n"))[0]
    with pytest.raises(SnippetError, match="not in the block"):
        stale.source()


def test_unknown_marker_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SnippetError, match="unknown docs-test marker"):
        parse(_doc(tmp_path, "<!-- docs-test: sometimes -->\n```bash\ntrue\n```\n"))
