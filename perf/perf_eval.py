"""Evaluation speed: generated tokens/s of our evaluate path vs LLaMA-Factory's do_predict, same work.

    make perf-eval                                          # models/base + models/lora, 32 val examples
    python perf/perf_eval.py --max-examples 8         # quick look
    python perf/perf_eval.py --base /tmp/base --adapter /tmp/lora --max-examples 16

Both sides answer the first N examples of the split with the base model + LoRA adapter, the same template,
greedy decoding, max_new_tokens, batch size and thread count (from `evaluate:` in params.yaml unless overridden).
LLaMA-Factory runs as `llamafactory-cli train <yaml>` (stage sft, do_predict, predict_with_generate); its
time is the predict_runtime it reports (model loading excluded, as for ours). Tokens are counted the same
way on both sides, from the decoded answers: re-encoded answer tokens, +1 for the stop token when the answer
ended before max_new_tokens (= non-pad tokens up to and including eos). The runs alternate (ours, LF,
ours, LF, ours) and each side keeps its best time, so other jobs on the machine disturb both alike.
Goal: at least 5x on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmft import evaluate
from llmft.infer.chat_format import ChatFormat, decode_answers, load_chat_format
from llmft.infer.decode import greedy_generate
from llmft.infer.loading import check_adapter, load_model, merge_adapter, set_threads
from llmft.params import load_params

ROOT = Path(__file__).resolve().parent.parent


def count_tokens(tokenizer, texts: list[str], max_new_tokens: int) -> int:
    """Generated tokens from decoded answers: the answer's tokens, plus the stop token if it stopped early."""
    counts = [len(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    return sum(min(n + 1, max_new_tokens) for n in counts)


def prepare_ours(args, fmt: ChatFormat):
    """A function that answers the examples with our evaluate path and returns (answer ids, seconds)."""
    rows, _ = evaluate.load_rows(args.data_dir, args.split, args.max_examples)
    prompts = [ex["prompt_ids"] for ex in evaluate.encode_split(args.data_dir, args.split, rows, fmt)]
    model = merge_adapter(load_model(fmt), args.adapter)

    def run() -> tuple[list[list[int]], float]:
        start = time.perf_counter()
        answers = greedy_generate(model, prompts, fmt.stop_ids, fmt.pad_id, args.max_new_tokens, args.batch_size)
        return answers, time.perf_counter() - start

    return run


def run_llamafactory(args, fmt: ChatFormat, threads: int, tmp: Path) -> tuple[list[str], float, float]:
    config = {
        "model_name_or_path": fmt.path,
        "adapter_name_or_path": str(args.adapter),
        "trust_remote_code": False,
        "stage": "sft",
        "do_predict": True,
        "finetuning_type": "lora",
        "eval_dataset": args.split,
        "dataset_dir": str(args.data_dir),
        "template": fmt.data_args.template,
        "cutoff_len": fmt.data_args.cutoff_len,
        "max_samples": args.max_examples,
        "overwrite_cache": True,
        "output_dir": str(tmp / "lf_predict"),
        "overwrite_output_dir": True,
        "report_to": "none",
        "per_device_eval_batch_size": args.batch_size,
        "predict_with_generate": True,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
    }
    (tmp / "predict.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "HF_DATASETS_CACHE": str(tmp / "cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
    }
    start = time.perf_counter()
    cli = Path(sys.executable).with_name("llamafactory-cli")  # the venv's; else PATH's (pip install --target)
    cli = str(cli) if cli.exists() else shutil.which("llamafactory-cli") or str(cli)
    done = subprocess.run(
        [cli, "train", str(tmp / "predict.yaml")], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"llamafactory-cli failed ({done.returncode}):\n{done.stderr[-3000:]}")
    results = json.loads((tmp / "lf_predict/predict_results.json").read_text())
    lines = (tmp / "lf_predict/generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["predict"] for line in lines], results["predict_runtime"], wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="eval section: defaults for the settings below")
    parser.add_argument("--data-dir", default="data/processed", type=Path)
    parser.add_argument("--split", default="val")
    parser.add_argument("--base", default="models/base", type=Path)
    parser.add_argument("--adapter", default="models/lora", type=Path)
    parser.add_argument("--max-examples", type=int, default=32, help="first N examples of the split")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-threads", type=int, help="0 = physical cores")
    parser.add_argument("--rounds", type=int, default=2, help="LLaMA-Factory runs; ours runs once more. Best kept")
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. reports/perf/<device>-eval.json)")
    parser.add_argument("--label", help="the model's name in that file (default: its paths)")
    args = parser.parse_args(argv)
    p = load_params(args.params).evaluateuate
    for key in ("max_new_tokens", "batch_size", "num_threads"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(p, key))

    check_adapter(args.adapter)
    fmt = load_chat_format(args.base, p.cutoff_len)
    threads = set_threads(args.num_threads)
    run_ours = prepare_ours(args, fmt)
    load = os.getloadavg()[0]
    answers, seconds = run_ours()
    ours_times, lf_times, lf_walls = [seconds], [], []
    with tempfile.TemporaryDirectory(prefix="perf_eval.") as tmp:
        for _ in range(args.rounds):  # interleaved, so that a change of load hits both sides alike
            theirs, lf_seconds, lf_wall = run_llamafactory(args, fmt, threads, Path(tmp))
            lf_times.append(lf_seconds)
            lf_walls.append(lf_wall)
            ours_times.append(run_ours()[1])
            load = max(load, os.getloadavg()[0])
    seconds, lf_seconds, exact = min(ours_times), min(lf_times), sum(map(len, answers))
    ours = decode_answers(fmt, answers)[1]

    tokens = count_tokens(fmt.tokenizer, ours, args.max_new_tokens)
    lf_tokens = count_tokens(fmt.tokenizer, theirs, args.max_new_tokens)
    rate, lf_rate = tokens / seconds, lf_tokens / lf_seconds
    same = sum(a == b for a, b in zip(ours, theirs))
    print(
        f"{fmt.path} + {args.adapter}: {len(ours)} {args.split} examples, max_new_tokens {args.max_new_tokens}, "
        f"batch {args.batch_size}, {threads} threads, load average up to {load:.1f} on {os.cpu_count()} CPUs"
    )
    times = lambda values: ", ".join(f"{v:.1f}" for v in values)
    print(
        f"  ours (src/generation.py):  {tokens:6d} tokens in {seconds:7.1f} s = {rate:8.1f} tokens/s "
        f"(runs: {times(ours_times)} s; exact id count {exact})"
    )
    print(
        f"  LLaMA-Factory do_predict:  {lf_tokens:6d} tokens in {lf_seconds:7.1f} s = {lf_rate:8.1f} tokens/s "
        f"(runs: {times(lf_times)} s; whole commands {times(lf_walls)} s)"
    )
    print(f"  speedup {rate / lf_rate:.1f}x; identical answers {same}/{len(ours)}")
    if args.json:
        import torch

        from llmft.common import atomic_write_json

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        atomic_write_json(
            args.json,
            {
                "kind": "eval",
                "device": device,
                "model": args.label or f"{fmt.path} + {args.adapter}",
                "split": args.split,
                "examples": len(ours),
                "max_new_tokens": args.max_new_tokens,
                "batch_size": args.batch_size,
                "threads": threads,
                "ours_tokens": tokens,
                "ours_seconds": seconds,
                "ours_tokens_per_s": rate,
                "lf_tokens": lf_tokens,
                "lf_seconds": lf_seconds,
                "lf_tokens_per_s": lf_rate,
                "speedup": rate / lf_rate,
                "identical_answers": same,
                "ours_runs_s": ours_times,
                "lf_runs_s": lf_times,
                "lf_commands_s": lf_walls,
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
