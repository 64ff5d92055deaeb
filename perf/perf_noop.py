"""`make perf-noop`: how long `make all` takes when nothing changed, beyond DVC's own start-up.

    python perf/perf_noop.py [--runs 5]       # after `make all`, in the repo root

Times, best of --runs each: `dvc --version` (Python + DVC import, the floor of any dvc command),
`dvc status` (reads dvc.yaml, dvc.lock and params, checks every dep and out against the lock) and
`make all` (make's setup check + `dvc repro`, which finds nothing to run). The overhead is
`make all` minus `dvc --version`. Goal: under 3 s. Big outputs (models/) cost little here: DVC keeps
their hashes in its state database, keyed by inode, size and mtime, and re-hashes only what changed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_of(cmd: list[str], runs: int, cwd: Path, env: dict) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=ROOT, help="a repo where the pipeline has run")
    args = parser.parse_args(argv)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}

    _, first = best_of(["make", "--no-print-directory", "all"], 1, args.repo, env)  # also warms the state db
    if "Running stage" in first:
        print("note: `make all` had work to do; the timings below are of the runs after it", file=sys.stderr)
    startup, _ = best_of(["dvc", "--version"], args.runs, args.repo, env)
    status, _ = best_of(["dvc", "status"], args.runs, args.repo, env)
    noop, out = best_of(["make", "--no-print-directory", "all"], args.runs, args.repo, env)
    if "Running stage" in out:
        raise SystemExit(f"`make all` keeps running stages, so it is no no-op:\n{out}")
    stages = out.count("didn't change, skipping")
    print(f"{args.repo}: best of {args.runs}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  dvc --version (start-up): {startup:6.2f} s")
    print(f"  dvc status:               {status:6.2f} s")
    print(f"  make all, nothing to do:  {noop:6.2f} s ({stages} stages checked)")
    print(f"  overhead beyond start-up: {noop - startup:6.2f} s (goal < 3 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
