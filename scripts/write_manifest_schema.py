"""Regenerate src/model_forensics/core/schemas/manifest.schema.json from the pydantic model.

    .venv/bin/python scripts/write_manifest_schema.py

tests/core/test_manifest.py fails when the shipped file and the model disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

from model_forensics.core.manifest import manifest_json_schema

TARGET = Path(__file__).parents[1] / "src" / "model_forensics" / "core" / "schemas" / "manifest.schema.json"

if __name__ == "__main__":
    TARGET.write_text(json.dumps(manifest_json_schema(), indent=1) + "\n")
    print(f"wrote {TARGET}")
