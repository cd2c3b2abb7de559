"""Inject faults into a real engine cache and count what compile() does about them.

Runs every scenario of tests/reliability/faults.py (the same ones the reliability tests
assert on), each in a fresh cache under a temporary directory, with real TensorRT-RTX
builds, ONNX Runtime runs, real processes and SIGKILL, and prints one line:

    faults injected: N, recovered: N, wrong results: 0, corrupt served: 0, lost entries: 0

``--verbose`` also prints each scenario's counts and details to stderr. The exit status
is 1 if any fault was not recovered from, or if a scenario could not run.

    python benchmarks/fault_injection.py [--verbose]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import faults  # noqa: E402 - after the path is set


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="per-scenario counts and details on stderr")
    a = ap.parse_args()
    # The faults make the cache log WARNINGs by design (the scenarios capture them); the counts
    # say what happened, so they are not printed as well.
    logging.getLogger("torch_trt_module").addHandler(logging.NullHandler())
    total = faults.Counts()
    failed = []
    with tempfile.TemporaryDirectory(prefix="fault_injection_") as work:
        for i, (name, scenario) in enumerate(faults.SCENARIOS.items()):
            counts = faults.Counts()
            t0 = time.perf_counter()
            try:
                details = scenario(Path(work) / f"{i}" / "cache", counts)
            except Exception:  # noqa: BLE001 - reported, and the run fails
                failed.append(name)
                details = {"error": traceback.format_exc()}
            for field in ("injected", "recovered", "wrong_results", "corrupt_served", "lost_entries"):
                setattr(total, field, getattr(total, field) + getattr(counts, field))
            if a.verbose or name in failed:
                print(f"{name} ({time.perf_counter() - t0:.1f} s): {counts.line()}\n  "
                      f"{json.dumps(details, default=str)[:2000]}", file=sys.stderr)
    print(total.line())
    if failed:
        print(f"scenarios that could not run: {', '.join(failed)}", file=sys.stderr)
    return 0 if total.clean and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
