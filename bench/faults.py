"""The fault suite as a bench: the same mesh and faults as ``tests/integration/test_faults.py``, with more
load, printed as one table (and saved with ``--save``). See bench/README.md."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshllm.engine.build import find_engine  # noqa: E402
from meshllm.engine.tinygguf import write_dense  # noqa: E402
from tests.integration.faults import BATCH_INVARIANT, FAULTS, FaultMesh, reference_text, run_fault, table  # noqa: E402
from tests.integration.nodes import Mesh  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=8, help="concurrent greedy streams through the client node")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--only", action="append", default=[], help="run only this fault (repeatable)")
    parser.add_argument("--save", type=Path, help="write the table to this file too")
    args = parser.parse_args()
    os.environ[BATCH_INVARIANT[0]] = BATCH_INVARIANT[1]
    engine = find_engine()
    if engine is None:
        sys.exit("the engine is not built: meshllm engine build")
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        model = write_dense(Path(tmp) / "faulty.gguf")
        mesh = Mesh(Path(tmp), engine, allow_models=(Path(tmp),))
        rows = []
        try:
            fm = FaultMesh(mesh, model)
            reference = reference_text(fm, max_tokens=args.max_tokens)
            for name in args.only or list(FAULTS):
                fm.settle()
                started = time.monotonic()
                rows.append(run_fault(fm, name, workers=args.workers, max_tokens=args.max_tokens, reference=reference))
                print(f"{name}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        finally:
            mesh.close()
    text = (f"bench/faults.py --workers {args.workers} --max-tokens {args.max_tokens}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}\n\n{table(rows)}\n")
    print(text)
    if args.save:
        args.save.write_text(text)


if __name__ == "__main__":
    main()
