"""Bundle ids of the served test directory (a module of its own: test modules import it by a
name no other test directory uses, unlike ``conftest``)."""

from __future__ import annotations

from pathlib import Path


def bundle_id(served: dict[str, Path], key: str) -> str:
    return served[key].relative_to(served["root"]).as_posix()
