"""The fenced code blocks of a Markdown document, and running them as a reader would.

A reader runs a document's blocks top to bottom in one working directory: ```python blocks
in one interpreter (later blocks see the names of earlier ones), ```bash / ```sh /
```console blocks in a shell (a ```console block runs only its ``$ `` lines). Other fences
(```json, ```yaml, ```text, bare ```) are samples and are not run.

A block is run differently when the nearest non-blank line above its fence is a marker::

    <!-- docs-test: skip (why it cannot run here) -->
    <!-- docs-test: replace smollm2 with zoo:gpt2-injection -->
    <!-- docs-test: replace "max_new_tokens=12" with "max_new_tokens=4"; replace a with b -->

``skip`` needs a reason. ``replace OLD with NEW`` (shell-quoted words, several joined by
``;``) edits the block before it runs; OLD must occur in the block, and the document must
say so within a few lines of the block (it must contain "docs test"), so a reader knows
what was run instead.

Run as a script (``python snippets.py DOC``) it executes DOC's blocks in the current
directory, stops at the first failing block, names it (``DOC:LINE``) on stderr with its
traceback or shell output, and exits 1.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
NOTE = re.compile(r"docs[- ]tests?", re.IGNORECASE)
NOTE_WINDOW = 6  # lines above the marker or below the closing fence that must state a replacement
ROOT = Path(__file__).parents[2]
TIMEOUT_S = 1500  # seconds per document: generous for a loaded machine, still fails a hung block


class SnippetError(Exception):
    """A marker or fence the harness cannot honour; the message names the document line."""


@dataclass(frozen=True)
class Replace:
    old: str
    new: str


@dataclass
class Block:
    """One fenced block: ``line`` is the 1-based line of its opening fence."""

    doc: Path
    line: int
    lang: str
    code: str
    end: int = 0
    skip: str | None = None
    replaces: list[Replace] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.name}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.lang in PYTHON | SHELL and self.skip is None

    def source(self) -> str:
        """The code as run: replacements applied; a console block keeps its ``$`` lines."""
        code = self.code
        for r in self.replaces:
            if r.old not in code:
                raise SnippetError(f"{self.where}: docs-test replace {r.old!r}: not in the block")
            code = code.replace(r.old, r.new)
        if self.lang == "console":
            code = _console_commands(code)
        return code


def _console_commands(code: str) -> str:
    lines, keep = [], False
    for line in code.splitlines():
        if line.startswith("$ "):
            lines.append(line[2:])
            keep = line.rstrip().endswith("\\")
        elif keep:
            lines.append(line)
            keep = line.rstrip().endswith("\\")
    return "\n".join(lines) + "\n"


def _directives(body: str) -> list[str]:
    """``body`` split at the ``;`` that are outside parentheses and quotes."""
    parts, current, depth, quote = [], "", 0, ""
    for char in body:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        elif char == ";" and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    return [*parts, current]


def _parse_marker(body: str, where: str) -> tuple[str | None, list[Replace]]:
    skip: str | None = None
    replaces: list[Replace] = []
    for part in filter(None, (p.strip() for p in _directives(body))):
        if part.startswith("skip"):
            reason = part[len("skip") :].strip().strip("()").strip()
            if not reason:
                raise SnippetError(f"{where}: 'docs-test: skip' needs a reason: skip (why)")
            skip = reason
            continue
        words = shlex.split(part)
        if len(words) != 4 or words[0] != "replace" or words[2] != "with":
            raise SnippetError(
                f"{where}: unknown docs-test marker {part!r}; use 'skip (why)' or 'replace OLD with NEW'"
            )
        replaces.append(Replace(words[1], words[3]))
    return skip, replaces


def parse(doc: Path) -> list[Block]:
    """Every fenced block of ``doc`` in reading order, with its marker applied."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = (m["info"].strip().split() or [""])[0].lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        if j == len(lines):
            raise SnippetError(f"{doc.name}:{i + 1}: fence {fence} is never closed")
        block = Block(doc, i + 1, lang, "\n".join(body) + "\n", end=j + 1)
        _apply_marker(block, lines, i)
        blocks.append(block)
        i = j + 1
    return blocks


def _apply_marker(block: Block, lines: list[str], fence_index: int) -> None:
    k = fence_index - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    marker = MARKER.match(lines[k]) if k >= 0 else None
    if marker is None:
        return
    block.skip, block.replaces = _parse_marker(marker["body"], f"{block.doc.name}:{k + 1}")
    if block.replaces:
        nearby = lines[max(0, k - NOTE_WINDOW) : k] + lines[block.end : block.end + NOTE_WINDOW]
        if not any(NOTE.search(line) for line in nearby):
            raise SnippetError(
                f"{block.where}: a docs-test replace must be stated in the text next to the block "
                "(e.g. '(The docs tests run this block on zoo:gpt2-injection.)')"
            )


def run_driver(doc: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run this file on ``doc`` in a fresh process in ``cwd``: offline, ``.venv/bin`` first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [sys.executable, __file__, str(doc)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def check_document(doc: Path, cwd: Path) -> None:
    """The pytest check for one document: all its blocks pass (skip when it has none to run)."""
    import pytest

    if not any(block.runs for block in parse(doc)):
        pytest.skip(f"{doc.name} has no runnable blocks")
    proc = run_driver(doc, cwd)
    assert proc.returncode == 0, f"{doc.relative_to(ROOT)}\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}"


def run_document(doc: Path) -> int:
    """Run ``doc``'s blocks in the current directory; 0 when all pass, else 1 (first failure)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in parse(doc):
        if not block.runs:
            continue
        print(f"--- {block.where} ({block.lang})", flush=True)
        start = time.perf_counter()
        code = block.source()
        if block.lang in PYTHON:
            # Pad to the fence so a traceback's line numbers are the document's.
            padded = "\n" * block.line + code
            try:
                exec(compile(padded, str(doc), "exec"), namespace)
            except BaseException:
                print(f"FAILED {block.where} (python block at line {block.line}):", file=sys.stderr)
                traceback.print_exc()
                return 1
        else:
            # Each traced command is shown with its document line: ``+ README.md:66: model-forensics …``.
            # PS4 is set on the block's first line (bash ignores it from the environment as root).
            traced = f"PS4='+ {doc.name}:$((LINENO + {block.line})): '; {code}"
            proc = subprocess.run(["bash", "-x", "-e", "-u", "-o", "pipefail", "-c", traced], check=False)
            if proc.returncode != 0:
                print(
                    f"FAILED {block.where} ({block.lang} block at line {block.line}): exit code {proc.returncode}",
                    file=sys.stderr,
                )
                return 1
        print(f"--- {block.where} passed in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_document(Path(sys.argv[1])))
