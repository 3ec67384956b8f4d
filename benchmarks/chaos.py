"""Chaos soak (issue 17): front ends, workers and a Sentinel-managed Redis under a fault schedule
while clients keep calling; prints the figures table (``moments.app.chaos`` is the harness).

    .venv/bin/python benchmarks/chaos.py --duration-s 600 --front-ends 2 --workers 3 --clients 32 \\
        --fault-every-s 10

Loopback only; root mounts a small tmpfs on the run's data directory for the disk-full fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

from moments.app.chaos import FAULT_KINDS, ChaosConfig, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--baseline-s", type=float, default=30.0)
    parser.add_argument("--front-ends", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--fault-every-s", type=float, default=10.0)
    parser.add_argument("--max-faults", type=int, default=1000)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma list, run in rotation")
    parser.add_argument("--job-lease-s", type=float, default=4.0)
    parser.add_argument("--workdir", default="", help="keep logs here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="moments-chaos-") as tmp:
        config = ChaosConfig(workdir=Path(args.workdir or tmp), duration_s=args.duration_s, baseline_s=args.baseline_s,
                             front_ends=args.front_ends, workers=args.workers, clients=args.clients,
                             fault_every_s=args.fault_every_s, max_faults=args.max_faults,
                             faults=tuple(k for k in args.faults.split(",") if k), job_lease_s=args.job_lease_s,
                             seed=args.seed)
        report = run(config)
        print(report.table(), flush=True)
        if args.workdir:
            (Path(args.workdir) / "report.md").write_text(report.table() + "\n")
            calls = [dataclasses.asdict(c) for c in report.calls]
            (Path(args.workdir) / "calls.json").write_text(json.dumps(
                {"origin_s": report.run_origin, "calls": calls, "faults": [dataclasses.asdict(f) for f in report.faults]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
