"""Training throughput: plain LLaMA-Factory vs our `train.profile: fast`, same random-init model, same data.

    make perf                                                  # CUDA: Llama-2-7B shape; CPU: a tiny shape
    python perf/perf_train.py --steps 35 --warmup 5      # the CUDA defaults, spelled out
    python perf/perf_train.py --shape tiny --steps 6 --warmup 2 --arms plain,fast   # CI's smoke test
    python perf/perf_train.py --table                    # Markdown table of reports/perf/*.json
    python perf/perf_train.py --readme docs/performance.md   # ... written between <!-- perf:start/end -->
    python perf/perf_train.py --export-tokenizer .perf/tokenizer   # for the GPU machine (gpu/run.sh)

One run builds a random-init Llama of the chosen shape (real weights are not needed for speed), generates
seeded data of varied lengths, and trains each arm through LLaMA-Factory's own `run_exp` (what
`llamafactory-cli train` calls), in a fresh process per arm, from a config that src/llmft/lf/config.py builds
exactly as the train stage does (only evaluation, checkpoints and reporting are switched off):
  plain    LLaMA-Factory defaults: flash_attn auto, no packing, no Liger, gradient checkpointing on
  fast     train.profile fast, as `auto` picks it on this machine
  fast-gc  fast with gradient checkpointing forced back on (extra.disable_gradient_checkpointing: false),
           the memory-lean variant
Both see the same examples in every optimizer step: the data come in blocks of --per-pack examples whose
lengths (as LLaMA-Factory tokenizes them) add up to exactly cutoff_len - 1, the room of one pack; shuffling
is off and LLaMA-Factory packs each block on its own (preprocessing_batch_size), so plain's micro-batch of
--batch examples is fast's pack. Real (non-pad) tokens per step are therefore equal by construction, and
each arm's counted tokens are checked against the design.

Per arm: real tokens/s (median over the timed steps, after --warmup steps), model FLOPs utilisation
(4 x frozen linear params + 6 x LoRA params per token, plus causal attention 12 x layers x heads x head_dim
x context; pads never count) against --peak-tflops (989: H100/H200 dense bf16) and against a matmul
measured on the same device in this run, peak memory (GPU: max allocated; CPU: max RSS), final loss. The
learning guard compares each arm's loss curve with plain's, step by step.
Results go to reports/perf/<device>-<shape>.json (atomically) and a table is printed.
Goals on an H100/H200: fast >= 2.0x plain real tokens/s, <= 0.7x its peak memory, MFU >= 45% of 989.
The pieces: perf_train_setup.py (tokenizer, model, data), perf_train_flops.py (model FLOPs, the matmul ceiling),
perf_train_arm.py (an arm's config and process), perf_train_worker.py (inside that process), perf_train_report.py
(summaries, ratios, goals, the printed report and the Markdown table).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmft.common import atomic_write_json
from llmft.cpu import detect_cpu
from llmft.lf import config as lf_config
from perf_train_arm import arm_sections, run_arm, runtime_here
from perf_train_flops import flops_per_example, linear_params, matmul_ceiling
from perf_train_report import (
    compare,
    device_name,
    goal_lines,
    goals_met,
    render_table,
    report,
    slug,
    summarize,
    write_readme,
)
from perf_train_setup import ROOT, SHAPES, Encoder, build_model, export_tokenizer, make_data, model_shape, tokenizer_dir
from perf_train_worker import worker


@dataclass
class Setup:
    """What every arm trains on, and the rate it is measured against: built once per run."""

    shape: dict
    shape_name: str
    model_dir: Path
    data_dir: Path
    lengths: list[int]  # each train example's exact token length, in order
    per_step: int  # examples per optimizer step
    step_tokens: list[int]  # real tokens of each optimizer step, by design
    step_flops: list[float]  # model FLOPs of each optimizer step
    ceiling: float  # matmul TFLOP/s on this device
    matmul: str  # what that matmul was


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", choices=["auto", *SHAPES], default="auto", help="auto: llama2-7b on CUDA, smollm2-135m on a CPU"
    )
    parser.add_argument("--hidden", type=int, help="override the shape's hidden size")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--cutoff-len", type=int, help="default: 2048 on CUDA, 512 on CPU")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm, warm-up included (CUDA 35, CPU 14)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing (CUDA 5, CPU 2)")
    parser.add_argument("--arms", help="comma-separated: plain,fast,fast-gc (default on CUDA; plain,fast on CPU)")
    parser.add_argument("--batch", type=int, default=4, help="plain's per_device_train_batch_size (params.yaml)")
    parser.add_argument("--accum", type=int, help="plain's gradient_accumulation_steps (CUDA 4, the guide's; CPU 1)")
    parser.add_argument("--per-pack", type=int, default=4, help="examples per block (one pack); divides --batch")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="high, so that the loss moves within a few steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16")
    parser.add_argument("--tokenizer", help="a directory with tokenizer.json (default: models/base, else embedded)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, data, configs and logs here (default: temp)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "reports/perf")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per arm")
    parser.add_argument(
        "--table", action="store_true", help="print the Markdown table of --out-dir/*.json, run nothing"
    )
    parser.add_argument(
        "--readme", type=Path, help="write that table into this file between the perf markers (docs/performance.md)"
    )
    parser.add_argument("--export-tokenizer", type=Path, help="copy the tokenizer files here (for gpu/run.sh), exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.table or args.readme:
        return print_table(args.out_dir, args.readme)
    if args.export_tokenizer:
        export_tokenizer(args.tokenizer, args.export_tokenizer)
        print(f"wrote {', '.join(sorted(p.name for p in args.export_tokenizer.iterdir()))} to {args.export_tokenizer}")
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="perf_train."))
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(args.tokenizer, work)

    import torch

    cuda = torch.cuda.is_available()
    arms = resolve_defaults(args, cuda)
    isa, bf16, precisions, notes = device_plan(args, cuda)
    setup = prepare(args, tok, work, cuda, bf16)
    runtime = runtime_here(cuda, setup.shape, setup.model_dir, setup.lengths, isa, notes)
    results = {arm: measure_arm(arm, args, setup, precisions[arm], runtime, work) for arm in arms}
    compare(results)
    out = result(args, argv, setup, cuda, {arm: precisions[arm] for arm in arms}, precisions["fast"], results, notes)
    path = args.out_dir / f"{slug(out['device'])}-{setup.shape_name}.json"
    atomic_write_json(path, out)
    print(report(out))
    for line in goal_lines(out["goals"]):
        print(line)
    print(f"wrote {path}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    bad = [a for a, r in results.items() if not r["learning_guard_ok"] or r["token_mismatches"]]
    if bad:
        print(f"learning guard or token check FAILED for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def print_table(out_dir: Path, readme: Path | None) -> int:
    """--table, --readme: the Markdown table of out_dir/*.json, printed and, with --readme, written there."""
    table = render_table(list(out_dir.glob("*.json")))
    if readme:
        write_readme(readme, table)
    print(table, end="")
    return 0


def resolve_defaults(args: argparse.Namespace, cuda: bool) -> list[str]:
    """Fill the device's defaults into `args` (shape, cutoff_len, accum, steps, warmup); the arms, plain first."""
    args.shape = args.shape if args.shape != "auto" else ("llama2-7b" if cuda else "smollm2-135m")
    args.cutoff_len = args.cutoff_len or (2048 if cuda else 512)
    args.accum = args.accum or (4 if cuda else 1)
    args.steps, args.warmup = (
        args.steps or (35 if cuda else 14),
        args.warmup if args.warmup is not None else (5 if cuda else 2),
    )
    arms = (args.arms or ("plain,fast,fast-gc" if cuda else "plain,fast")).split(",")
    if arms[0] != "plain" or not set(arms) <= {"plain", "fast", "fast-gc"}:
        sys.exit("--arms: plain first, then any of fast, fast-gc")
    if args.batch % args.per_pack or args.steps <= args.warmup:
        sys.exit("--per-pack must divide --batch, and --steps must exceed --warmup")
    return arms


def device_plan(args: argparse.Namespace, cuda: bool) -> tuple:
    """(the CPU's ISA, None on CUDA; bf16 support; each arm's precision; the notes the report opens with)."""
    import torch

    notes = []
    if cuda and args.steps - args.warmup < 30:
        notes.append(f"only {args.steps - args.warmup} timed steps (the goal asks for >= 30)")
    isa = None if cuda else detect_cpu()
    if not cuda:
        notes.append(
            f"CPU ({isa.describe()}): MFU against {args.peak_tflops:g} TFLOP/s means nothing here; the share of "
            "the measured matmul rate (bf16 where the CPU has a bf16 unit) does"
        )
    bf16 = torch.cuda.is_bf16_supported() if cuda else isa.bf16
    # plain LLaMA-Factory on a CPU is fp32 (autocast only when asked); the fast profile takes bf16 where it pays
    precisions = {
        arm: lf_config.choose_precision("auto", cuda, bf16, cpu_fast=arm != "plain")
        for arm in ("plain", "fast", "fast-gc")
    }
    return isa, bf16, precisions, notes


def prepare(args: argparse.Namespace, tok: Path, work: Path, cuda: bool, bf16: bool) -> Setup:
    """The random-init model and the data in `work`, each step's designed tokens and FLOPs, the matmul ceiling."""
    t0 = time.perf_counter()
    enc = Encoder(tok, args.cutoff_len)
    shape = model_shape(args, len(enc.tokenizer))
    shape_name = args.shape
    if any((args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads)):
        shape_name = f"h{shape['hidden_size']}-l{shape['num_hidden_layers']}-i{shape['intermediate_size']}"
    model_dir, data_dir = work / "model", work / "data"
    build_model(shape, tok, model_dir, cuda)
    (work / "shape").write_text(shape_name)  # for gpu/run.sh's label of the eval benchmark
    per_step = args.batch * args.accum
    lengths = make_data(
        enc,
        data_dir,
        steps=args.steps,
        per_step=per_step,
        per_pack=args.per_pack,
        cutoff_len=args.cutoff_len,
        seed=args.seed,
    )
    step_tokens = [sum(lengths[i : i + per_step]) for i in range(0, len(lengths), per_step)]
    step_flops = [
        sum(flops_per_example(shape, args.lora_rank, n) for n in lengths[i : i + per_step])
        for i in range(0, len(lengths), per_step)
    ]
    ceiling, matmul = matmul_ceiling(cuda, shape, bf16)
    print(
        f"setup {time.perf_counter() - t0:.0f} s: model, {len(lengths)} examples ({min(lengths)}-{max(lengths)} "
        f"tokens, median {statistics.median(lengths):.0f}), matmul {ceiling:.1f} TFLOP/s",
        file=sys.stderr,
    )
    return Setup(shape, shape_name, model_dir, data_dir, lengths, per_step, step_tokens, step_flops, ceiling, matmul)


def measure_arm(arm: str, args: argparse.Namespace, setup: Setup, precision: str, runtime, work: Path) -> dict:
    """Train one arm in its own process; its summary, config and the profile's notes and memory estimate."""
    sections, plan = arm_sections(
        arm, args, setup.model_dir, setup.data_dir, work / arm, precision, runtime, args.steps
    )
    print(f"arm {arm}: {'; '.join(plan.notes)}", file=sys.stderr)
    raw = run_arm(arm, sections, work, args.timeout)
    summary = summarize(
        arm,
        raw,
        warmup=args.warmup,
        step_tokens=setup.step_tokens,
        step_flops=setup.step_flops,
        peak_tflops=args.peak_tflops,
        ceiling_tflops=setup.ceiling,
    )
    summary |= {
        "config": lf_config.flat(sections),
        "profile_notes": plan.notes,
        "estimate_gib": plan.estimate_gib,
    }
    print(f"arm {arm}: {summary['tokens_per_s']:,.0f} real tokens/s, {summary['wall_s']} s in all", file=sys.stderr)
    return summary


def result(
    args: argparse.Namespace,
    argv: list[str] | None,
    setup: Setup,
    cuda: bool,
    dtypes: dict[str, str],
    dtype: str,
    arms: dict,
    notes: list[str],
) -> dict:
    """The run's JSON: device, model, data design, steps, the matmul ceiling, every arm, goals, notes, versions."""
    import llamafactory
    import torch
    import transformers

    goals = goals_met(arms) if cuda else None  # the goals are for a GPU, one arm against plain, from this run
    linear, lora = linear_params(setup.shape, args.lora_rank)
    n_params = sum(f.stat().st_size for f in setup.model_dir.glob("*.safetensors")) // (2 if cuda else 4)
    lengths = setup.lengths
    return {
        "kind": "train",
        "device": device_name(cuda),
        "shape": setup.shape_name,
        "dtype": dtype,
        "dtypes": dtypes,
        "model": setup.shape | {"params": n_params, "linear_params": linear, "lora_params": lora},
        "lora_rank": args.lora_rank,
        "cutoff_len": args.cutoff_len,
        "data": {
            "examples_per_step": setup.per_step,
            "examples_per_pack": args.per_pack,
            "real_tokens_per_step": setup.step_tokens[0],
            "length_min": min(lengths),
            "length_max": max(lengths),
            "length_median": statistics.median(lengths),
            "seed": args.seed,
        },
        "steps": {"total": args.steps, "warmup": args.warmup, "timed": args.steps - args.warmup},
        "peak_tflops": args.peak_tflops,
        "matmul_ceiling_tflops": setup.ceiling,
        "matmul": setup.matmul,
        "arms": arms,
        "goals": goals,
        "notes": notes,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "llamafactory": llamafactory.__version__,
        },
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["perf/perf_train.py", *(argv if argv is not None else sys.argv[1:])]),
    }


if __name__ == "__main__":
    raise SystemExit(main())
