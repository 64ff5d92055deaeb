"""`make sweep`: queue a hyperparameter grid as DVC experiments, run the queue, wait, and show the results.

    python -m llmft.tools.sweep -S 'train.lora_rank=4,16' -S 'train.learning_rate=5.0e-5,2.0e-4' [--jobs 1]
    python -m llmft.tools.sweep -S 'train.lora_rank=4,16' --seeds 3    # each point 3 times: train.seed 42, 43, 44

Each -S takes comma-separated values; DVC queues one experiment per combination (`dvc exp run --queue`),
`dvc queue start` runs them in temporary copies of the repo (the workspace is left alone), and this
script waits until they are done, then prints `dvc exp show` for the grid's params and the key metrics.
Every experiment trains from scratch: its train params differ from any checkpoint it could find.

`--seeds N` repeats each point with N values of train.seed (params.yaml's, then the next ones): a difference
between two points means something only when it is larger than the spread one point shows across seeds. The
script then also prints one row per point with each key metric's mean ± spread (sample standard deviation)
over its seeds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

from llmft.common import UserError, run_main
from llmft.env import dvc

QUEUED = re.compile(r"Queued experiment '([^']+)'")
SEED = "train.seed"
METRICS = [
    "train_loss",
    "eval_loss",
    "global_step",
    "train_runtime_s",
    "tuned.val.loss",
    "tuned.val.rougeL",
    "delta.val.rougeL",
    "changed.val",
    "persona.tuned",
    "probes.tuned.pass_rate",
    "kept.tuned.leak",
    "kept.tuned.facts_kept",
    "kept.tuned.language",
    "kept.drift",
]


def states(names: set[str], baseline: str) -> dict[str, str] | None:
    """The queue state of each named experiment: Queued, Running, Success or Failed (Success once it is done);
    None when DVC cannot say right now."""
    import dvc.api
    from dvc.exceptions import DvcException

    found = {}
    try:
        # The experiments hang off the commit they were queued from; HEAD may have moved on since (a commit meanwhile).
        rows = dvc.api.exp_show(repo=".", revs=baseline)
    except DvcException:  # an executor between its start and its temporary repo existing: ask again next poll
        return None
    for row in rows:
        if row.get("Experiment") in names:
            found[row["Experiment"]] = row.get("State") or "Success"  # a finished experiment has no executor left
    return {name: found.get(name, "Queued") for name in names}


def finished(now: dict[str, str], baseline: str) -> list[dict]:
    """The exp_show rows of the experiments that succeeded."""
    import dvc.api

    return [r for r in dvc.api.exp_show(repo=".", revs=baseline) if now.get(r.get("Experiment")) == "Success"]


def seed_values(seeds: int, params_file: str = "params.yaml") -> list[int]:
    """train.seed of params.yaml and the next `seeds - 1` integers."""
    from llmft.params import load_params

    first = load_params(params_file).train.seed
    return list(range(first, first + seeds))


def _column(row: dict, key: str):
    """A value of an exp_show row by its name, whether DVC printed it bare or prefixed with its file."""
    if key in row:
        return row[key]
    return next((v for k, v in row.items() if k.endswith(":" + key)), None)


def mean_spread(values: list[float]) -> str:
    """'mean ± sample standard deviation' over the seeds of one point; the value alone for one seed."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def seed_table(rows: list[dict], keys: list[str], metrics: list[str]) -> list[str]:
    """One tab-separated line per grid point (its `keys` values, train.seed aside): how many seeds finished, then
    each metric's mean ± spread over them; a header line first. Metrics no row has are left out."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault(tuple(_column(row, k) for k in keys), []).append(row)
    shown = [m for m in metrics if any(_column(r, m) is not None for r in rows)]
    lines = ["\t".join([*keys, "seeds", *shown])]
    for point, group in points.items():
        cells = [str(v) for v in point] + [str(len(group))]
        for metric in shown:
            values = [float(v) for r in group if isinstance(v := _column(r, metric), (int, float))]
            cells.append(mean_spread(values) if values else "")
        lines.append("\t".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="grid",
        action="append",
        required=True,
        help="params.yaml key=v1,v2,... (as dvc exp run -S); repeat for a grid",
    )
    parser.add_argument("--jobs", type=int, default=1, help="experiments run at once; 1 unless you have the cores")
    parser.add_argument(
        "--stage",
        help="run each experiment up to this stage (e.g. evaluate: its metrics, without export, gguf and report); "
        "default: the whole pipeline",
    )
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between queue checks")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per point, train.seed counting up from params.yaml's: 3 shows the spread, at 3x the time",
    )
    args = parser.parse_args(argv)
    for item in args.grid:
        if "=" not in item:
            raise UserError(f"-S {item!r}: write key=value1,value2 (e.g. train.lora_rank=4,16)")
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give at least 1 (SEEDS=3 runs each point three times)")
    if args.seeds > 1:
        if any(item.split("=", 1)[0] == SEED for item in args.grid):
            raise UserError(f"-S {SEED}=... and --seeds {args.seeds} both set the seed: keep one of them")
        args.grid.append(f"{SEED}={','.join(map(str, seed_values(args.seeds)))}")

    baseline = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = dvc(
        "exp", "run", "--queue", *[a for item in args.grid for a in ("-S", item)], *([args.stage] if args.stage else [])
    )
    names = set(QUEUED.findall(out))
    if not names:
        raise UserError(f"dvc exp run --queue queued nothing; it said: {out.strip()[:300]}")
    print(f"queued {len(names)} experiments: {', '.join(sorted(names))}", flush=True)
    # The queue's worker inherits the output streams of `dvc queue start`: captured, they would stay open until the
    # whole grid ran, and no progress would show. So they go nowhere; `dvc queue logs <name>` has each run's output.
    started = subprocess.run(
        [sys.executable, "-m", "dvc", "queue", "start", "--jobs", str(args.jobs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if started.returncode:
        raise UserError("dvc queue start failed; run it by hand to see why, then `make sweep` again")

    last: dict[str, str] = {}
    while True:
        now = states(names, baseline)
        if now is None:
            time.sleep(args.poll)
            continue
        if now != last:
            counts = {s: sum(v == s for v in now.values()) for s in sorted(set(now.values()))}
            print(
                f"{time.strftime('%H:%M:%S')} " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()), flush=True
            )
            last = now
        if not {"Queued", "Running"} & set(now.values()):
            break
        time.sleep(args.poll)

    keys = sorted({item.split("=", 1)[0] for item in args.grid})
    keep = "|".join(re.escape(k) for k in keys + METRICS) + "|Experiment|Created"
    print(dvc("exp", "show", "--no-pager", "--hide-queued", "--rev", baseline, "--keep", keep, "--drop", ".*"), end="")
    if args.seeds > 1:
        done = finished(now, baseline)
        print(f"\nmean ± spread (sample standard deviation) over {args.seeds} seeds ({SEED}), per point:")
        print("\n".join(seed_table(done, [k for k in keys if k != SEED], METRICS)))
    failed = sorted(name for name, state in now.items() if state == "Failed")
    if failed:
        raise UserError(
            f"{len(failed)} experiment(s) failed: {', '.join(failed)}; see `dvc queue logs <name>` for each"
        )
    print("compare two of them: make compare A=<name> B=<name>")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
