"""Benchmark the prepare stage on a generated table; prints rows/s and peak memory.

    make perf-data                                   # 1,000,000 rows (goal: < 60 s, < 4 GB on 2 cores)
    python perf/perf_data.py --rows 20000      # quick look

The table mixes Chinese and English, with 1% empty outputs and 1% exact duplicates, so the
cleaning and drop-counting paths run too. It is generated deterministically in a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_table(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["成语", "解释", "意思", "model", "data", "学习", "训练", "example", "拼音", "历史"]
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["question", "context", "answer"])
        last = None
        for i in range(rows):
            if last and rng.random() < 0.01:
                out.writerow(last)  # an exact duplicate
                continue
            q = f"问题 {i}: " + " ".join(rng.choices(words, k=rng.randint(3, 12)))
            a = "" if rng.random() < 0.01 else " ".join(rng.choices(words, k=rng.randint(5, 40)))
            last = [q, rng.choice(["", "上下文"]), a]
            out.writerow(last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="perf_data.") as tmp:
        tmp = Path(tmp)
        table = tmp / "big.csv"
        t0 = time.perf_counter()
        make_table(table, args.rows)
        print(f"generated {args.rows:,} rows ({table.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        params = {"prepare": {"input": str(table), "val_size": 0.01, "seed": 42}}
        (tmp / "params.yaml").write_text(json.dumps(params))  # JSON is valid YAML
        cmd = [
            sys.executable,
            str(ROOT / "src/prepare.py"),
            "--params",
            str(tmp / "params.yaml"),
            "--out",
            str(tmp / "processed"),
            "--metrics",
            str(tmp / "stats.json"),
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - t0
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # Linux: KiB
        stats = json.loads((tmp / "stats.json").read_text())
    print(
        f"prepare: {args.rows:,} rows in {seconds:.1f} s = {args.rows / seconds:,.0f} rows/s; "
        f"peak RSS {peak_gb:.2f} GB; kept {stats['kept']:,}, dropped {stats['dropped_total']:,} "
        f"({', '.join(f'{k}={v}' for k, v in stats['dropped'].items() if v)})"
    )
    print("goal: < 60 s and < 4 GB for 1,000,000 rows on 2 cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
