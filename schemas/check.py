"""Check (or with --write, regenerate) the JSON Schemas in this folder from meshllm's pydantic models:
the state document's entities (``state.*``), the blackboard's posts (``board.*``) and the manifest kinds (``manifest.*``, for editors).

CI runs this: a model change without regenerated schemas fails, so the schemas here stay true.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from meshllm.state import board, manifest, schema

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    write = "--write" in argv
    stale = []
    for name, entity_schema in {**schema.json_schemas(), **board.board_json_schemas(), **manifest.json_schemas()}.items():
        path = HERE / f"{name}.schema.json"
        text = json.dumps(entity_schema, indent=2, sort_keys=True) + "\n"
        if write:
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(path.name)
    if stale:
        print(f"schemas out of date: {', '.join(stale)}; run: python schemas/check.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
