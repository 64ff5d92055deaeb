"""The figures of perf/perf_train.py: each arm's summary, the ratios to plain and the learning guard, the goals,
the printed report, and the Markdown table of reports/perf/*.json (also written into docs/performance.md)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from pathlib import Path

README_START, README_END = "<!-- perf:start -->", "<!-- perf:end -->"
GOALS = {"speedup": 2.0, "memory": 0.7, "mfu": 0.45}


def summarize(
    arm: str,
    result: dict,
    *,
    warmup: int,
    step_tokens: list[int],
    step_flops: list[float],
    peak_tflops: float,
    ceiling_tflops: float,
) -> dict:
    steps = result["steps"]
    problems = [
        f"step {s['step']}: {s['real_tokens']} real tokens, designed {step_tokens[i]}"
        for i, s in enumerate(steps)
        if s["real_tokens"] != step_tokens[i]
    ]
    timed = steps[warmup:]
    tps = [s["real_tokens"] / s["seconds"] for s in timed]
    flops = [step_flops[warmup + i] / s["seconds"] / 1e12 for i, s in enumerate(timed)]
    grads = [s.get("grad_norm") for s in steps]
    return {
        "attn_implementation": result.get("attn_implementation"),
        "liger": result.get("liger"),
        "gradient_checkpointing": result.get("gradient_checkpointing"),
        "micro_batch": result.get("micro_batch"),
        "accumulation": result.get("accumulation"),
        "tokens_per_s": statistics.median(tps),
        "step_s": statistics.median(s["seconds"] for s in timed),
        "model_tflops": statistics.median(flops),
        "mfu_vs_peak": statistics.median(flops) / peak_tflops,
        "mfu_vs_ceiling": statistics.median(flops) / ceiling_tflops,
        "peak_mem_gib": result["peak_mem_gib"],
        "peak_reserved_gib": result.get("peak_reserved_gib"),
        "memory": result["memory"],
        "final_loss": steps[-1].get("loss"),
        "losses": [s.get("loss") for s in steps],
        "grad_norms": grads,
        "real_tokens_per_step": [s["real_tokens"] for s in steps],
        "label_tokens_per_step": [s["label_tokens"] for s in steps],
        "step_seconds": [round(s["seconds"], 4) for s in steps],
        "timed_steps": len(timed),
        "grad_norms_ok": all(g is not None and math.isfinite(g) and g > 0 for g in grads),
        "token_mismatches": problems,
        "wall_s": result.get("wall_s"),
    }


def compare(arms: dict) -> None:
    """Ratios to plain and the learning guard (final loss within 1%, grad norms finite and non-zero)."""
    plain = arms["plain"]
    for arm in arms.values():
        arm["speedup_vs_plain"] = arm["tokens_per_s"] / plain["tokens_per_s"]
        arm["memory_vs_plain"] = arm["peak_mem_gib"] / plain["peak_mem_gib"]
        diffs = [abs(a - b) / abs(b) for a, b in zip(arm["losses"], plain["losses"]) if a is not None and b]
        arm["final_loss_rel_diff"] = abs(arm["final_loss"] - plain["final_loss"]) / abs(plain["final_loss"])
        arm["max_step_loss_rel_diff"] = max(diffs) if diffs else None
        arm["learning_guard_ok"] = (
            arm["final_loss_rel_diff"] <= 0.01
            and arm["grad_norms_ok"]
            and arm["real_tokens_per_step"] == plain["real_tokens_per_step"]
        )


def goals_met(arms: dict) -> dict:
    """Per arm but plain: whether it meets each of GOALS against plain."""
    return {
        name: {
            "speedup": a["speedup_vs_plain"] >= GOALS["speedup"],
            "memory": a["memory_vs_plain"] <= GOALS["memory"],
            "mfu": a["mfu_vs_peak"] >= GOALS["mfu"],
        }
        for name, a in arms.items()
        if name != "plain"
    }


def goal_lines(goals: dict | None) -> list[str]:
    return [
        f"  goals, {name} vs plain (>= {GOALS['speedup']}x tokens/s, <= {GOALS['memory']}x memory, MFU >= "
        f"{GOALS['mfu']:.0%}): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items())
        for name, met in (goals or {}).items()
    ]


def device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pct(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 else "<0.1%"


def render_table(paths: list[Path]) -> str:
    """A Markdown table of the benchmark JSON files (train: one row per arm; eval: one row)."""
    lines = [
        (
            "| device | model | run | real tokens/s | vs plain | MFU (989 TF) | MFU (matmul here) | peak memory "
            "| vs plain | final loss | steps timed |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    evals = []
    for path in sorted(paths):
        r = json.loads(path.read_text())
        if r.get("kind") == "eval":
            evals.append(r)
            continue
        for name, a in r.get("arms", {}).items():
            lines.append(
                f"| {r['device']} | {r['shape']} | {name} | {a['tokens_per_s']:,.0f} | "
                f"{a['speedup_vs_plain']:.2f}x | {pct(a['mfu_vs_peak'])} | {pct(a['mfu_vs_ceiling'])} | "
                f"{a['peak_mem_gib']:.1f} GiB{' RSS' if a.get('memory') == 'max RSS' else ''} | "
                f"{a['memory_vs_plain']:.2f}x | {a['final_loss']:.4f} | "
                f"{a['timed_steps']} |"
            )
    if evals:
        lines += [
            "",
            "| device | model | generation | ours tokens/s | LLaMA-Factory do_predict tokens/s | speedup |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r in evals:
            lines.append(
                f"| {r['device']} | {r['model']} | {r['examples']} prompts x {r['max_new_tokens']} new tokens, "
                f"batch {r['batch_size']} | {r['ours_tokens_per_s']:,.0f} | {r['lf_tokens_per_s']:,.0f} | "
                f"{r['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, table: str) -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        sys.exit(f"{readme}: add the lines {README_START} and {README_END} where the table goes")
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(text[: start + len(README_START)] + "\n" + table + text[end:], encoding="utf-8")
    os.replace(tmp, readme)


def report(r: dict) -> str:
    lines = [
        (
            f"{r['device']}, {r['shape']} ({r['model']['params'] / 1e9:.2f} B params, {r['dtype']}), LoRA rank "
            f"{r['lora_rank']}, cutoff_len {r['cutoff_len']}: {r['data']['real_tokens_per_step']} real tokens per "
            f"optimizer step in every arm; {r['steps']['timed']} steps timed after {r['steps']['warmup']}; matmul "
            f"ceiling {r['matmul_ceiling_tflops']:.1f} TFLOP/s ({r['matmul']})"
        )
    ]
    for name, a in r["arms"].items():
        lines.append(
            f"  {name:8s} {a['tokens_per_s']:10,.0f} real tokens/s ({a['speedup_vs_plain']:.2f}x)  "
            f"step {a['step_s']:.3f} s  MFU {pct(a['mfu_vs_peak'])} of {r['peak_tflops']:.0f} TF, "
            f"{a['mfu_vs_ceiling']:.1%} of the matmul  peak {a['peak_mem_gib']:.2f} GiB "
            f"({a['memory_vs_plain']:.2f}x)  final loss {a['final_loss']:.4f} "
            f"({a['final_loss_rel_diff']:.2%} from plain; guard {'ok' if a['learning_guard_ok'] else 'FAILED'})"
            f"  [{r.get('dtypes', {}).get(name, r['dtype'])}, {a['attn_implementation']}, liger {a['liger']}, "
            f"grad ckpt {a['gradient_checkpointing']}, "
            f"{a['micro_batch']} x {a['accumulation']}]"
        )
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
