"""Write the inspection console's OpenAPI schema to src/model_forensics/server/openapi.json.

The UI generates its TypeScript types from that file (``npm run gen:api`` in ui/), and
tests/server/test_openapi.py checks it equals ``create_app(...).openapi()``: run this after
changing a route or a response model.

    .venv/bin/python scripts/export_openapi.py          # write
    .venv/bin/python scripts/export_openapi.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from model_forensics.server.app import create_app, openapi_text

TARGET = Path(__file__).parents[1] / "src" / "model_forensics" / "server" / "openapi.json"


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as root:
        text = openapi_text(create_app(root))
    if "--check" in argv:
        current = TARGET.read_text() if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET} is stale; run python scripts/export_openapi.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
