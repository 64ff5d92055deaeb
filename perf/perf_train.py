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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmft.common import atomic_write_json
from llmft.cpu import detect_cpu
from llmft.lf import config as lf_config
from llmft.lf.profile import Runtime, plan_profile
from llmft.params import TrainParams
from llmft.train import dtype_view

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # hidden, layers, intermediate, heads, kv heads
    "llama2-7b": (4096, 32, 11008, 32, 32),
    "smollm2-135m": (576, 30, 1536, 9, 3),  # the embedded model's shape: what a CPU user trains
    "tiny": (64, 2, 128, 4, 2),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TEMPLATE = "smollm2"
README_START, README_END = "<!-- perf:start -->", "<!-- perf:end -->"
GOALS = {"speedup": 2.0, "memory": 0.7, "mfu": 0.45}


# ---------- setup: tokenizer, model, data ----------


def tokenizer_dir(arg: str | None, work: Path) -> Path:
    """--tokenizer, else models/base's tokenizer, else the embedded SmolLM2 one (converted from GGUF, ~20 s)."""
    if arg:
        if not (Path(arg) / "tokenizer.json").exists():
            sys.exit(
                f"--tokenizer {arg}: no tokenizer.json there; make one with --export-tokenizer {arg} on a "
                "machine with the venv"
            )
        return Path(arg)
    if (ROOT / "models/base/tokenizer.json").exists():
        return ROOT / "models/base"
    from llmft.model import embedded_gguf, load_embedded_tokenizer

    out = work / "tokenizer"
    load_embedded_tokenizer(embedded_gguf()).save_pretrained(out)
    return out


def model_shape(args, vocab: int) -> dict:
    hidden, layers, inter, heads, kv = SHAPES[args.shape]
    hidden, layers, inter = args.hidden or hidden, args.layers or layers, args.intermediate or inter
    heads, kv = args.heads or heads, args.kv_heads or args.heads or kv
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }


def build_model(shape: dict, tok_dir: Path, out: Path, cuda: bool) -> None:
    """A random-init Llama (bf16 on CUDA, fp32 on CPU), the tokenizer, and a model_info.json like models/base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"}))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    (out / "model_info.json").write_text(
        json.dumps(
            {
                "source": "random-init",
                "path": str(out),
                "template": TEMPLATE,
                "model_type": "llama",
                "weights_written": True,
            }
        )
    )


class Encoder:
    """Exact token lengths as LLaMA-Factory's supervised processor counts them (prompt + answer, template in)."""

    def __init__(self, tok_dir: Path, cutoff_len: int):
        from llamafactory.data.template import get_template_and_fix_tokenizer
        from llamafactory.hparams import DataArguments
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.template = get_template_and_fix_tokenizer(
            self.tokenizer, DataArguments(template=TEMPLATE, cutoff_len=cutoff_len)
        )
        self.overhead = self.length("x", "y") - 2

    def length(self, prompt: str, answer: str) -> int:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        p, a = self.template.encode_oneturn(self.tokenizer, messages, None, None)
        return len(p) + len(a) + int(self.template.efficient_eos)


class TextMaker:
    """Example text of an exact token length, from Zipf-distributed single-token English words."""

    def __init__(self, enc: Encoder, rng: random.Random):
        vocab = sorted(t for t in enc.tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,9}", t))
        self.words = [w[1:] for w in rng.sample(vocab, min(3000, len(vocab)))]
        self.weights = [1 / (rank + 1) for rank in range(len(self.words))]
        self.enc, self.rng = enc, rng

    def text(self, n: int) -> list[str]:
        return self.rng.choices(self.words, self.weights, k=max(1, n))

    def example(self, length: int) -> tuple[str, str] | None:
        """(prompt, answer) of exactly `length` tokens, or None when word boundaries don't allow it."""
        content = length - self.enc.overhead
        n_prompt = max(1, round(content * self.rng.uniform(0.2, 0.6)))
        prompt, answer = self.text(n_prompt), self.text(content - n_prompt)
        for _ in range(8):
            diff = length - self.enc.length(" ".join(prompt), " ".join(answer))
            if diff == 0:
                return " ".join(prompt), " ".join(answer)
            answer = answer + self.text(diff) if diff > 0 else answer[:diff]
            if not answer:
                return None
        return None


def make_data(
    enc: Encoder,
    out: Path,
    *,
    steps: int,
    per_step: int,
    per_pack: int,
    cutoff_len: int,
    seed: int,
    val_examples: int = 32,
) -> list[int]:
    """train.json in blocks of `per_pack` examples that fill one pack (cutoff_len - 1 tokens) exactly; val.json;
    dataset_info.json. Lengths are log-normal, from the template's overhead + 8 to 3/4 of the pack.
    Returns the exact token length of each train example, in order."""
    rng = random.Random(seed)
    maker = TextMaker(enc, rng)
    room = cutoff_len - 1  # LLaMA-Factory packs into cutoff_len - 1 tokens
    lo, hi = enc.overhead + 8, room * 3 // 4
    sigma = 0.8
    median = room / per_pack / math.exp(sigma**2 / 2)
    if per_pack * lo > room:
        sys.exit(f"--cutoff-len {cutoff_len} is too short for {per_pack} examples of at least {lo} tokens per pack")
    rows, lengths = [], []
    for _ in range(steps * per_step // per_pack):
        while True:
            draw = [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(per_pack - 1)]
            draw.append(room - sum(draw))
            if not lo <= draw[-1] <= hi:
                continue
            rng.shuffle(draw)
            block = [maker.example(n) for n in draw]
            if all(block):
                break
        rows += [{"instruction": p, "input": "", "output": a} for p, a in block]
        lengths += draw
    val = []
    while len(val) < val_examples:
        if ex := maker.example(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))):
            val.append({"instruction": ex[0], "input": "", "output": ex[1]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    (out / "val.json").write_text(json.dumps(val, ensure_ascii=False))
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    (out / "dataset_info.json").write_text(
        json.dumps({n: {"file_name": f"{n}.json", "columns": cols} for n in ("train", "val")})
    )
    return lengths


# ---------- measurements ----------


def matmul_ceiling(cuda: bool, shape: dict | None = None, bf16: bool = True) -> tuple[float, str]:
    """TFLOP/s of matmuls on this device, median of 10 after warm-up.

    CUDA: bf16 8192^3. CPU: the model's own linear shapes (a micro-batch of 600 tokens times each weight: what a
    training step multiplies), in bf16 where the CPU has a bf16 unit (`bf16`), else fp32: the rate the arms are
    measured against.
    """
    import torch

    if cuda:
        sizes, dtype, device = [(8192, 8192, 8192)], torch.bfloat16, "cuda"
    else:
        # never below SmolLM2-135M's shapes: a tiny model's own matmuls are too small to show the CPU's rate
        h, inter = max((shape or {}).get("hidden_size", 0), 576), max((shape or {}).get("intermediate_size", 0), 1536)
        sizes, dtype, device = (
            [(600, h, inter), (600, inter, h), (600, h, h)],
            (torch.bfloat16 if bf16 else torch.float32),
            "cpu",
        )
    rates = []
    for m, k, n in sizes:
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        times = []
        for i in range(13):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000
            else:
                t0 = time.perf_counter()
                for _ in range(10):
                    a @ b
                seconds = (time.perf_counter() - t0) / 10
            if i >= 3:
                times.append(seconds)
        rates.append(2 * m * k * n / statistics.median(times) / 1e12)
        del a, b
    if cuda:
        torch.cuda.empty_cache()
    label = "x".join(map(str, sizes[0])) + ("" if len(sizes) == 1 else " and the other linear shapes")
    return statistics.mean(rates), f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} {label}"


def linear_params(shape: dict, lora_rank: int) -> tuple[int, int]:
    """(frozen linear weights incl. the lm_head, LoRA weights on every linear layer of the blocks)."""
    h, layers, inter, vocab = (
        shape[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    q = shape["num_attention_heads"] * shape["head_dim"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + h * vocab
    lora = layers * lora_rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h))
    return linear, lora


def flops_per_example(shape: dict, lora_rank: int, length: int) -> float:
    """Model FLOPs of one example of `length` tokens, forward + backward: frozen weights cost 4 per parameter and
    token (forward 2 + input gradients 2), LoRA weights 6, and causal attention 12 x layers x (heads x head_dim)
    x context per token (QK^T and AV, forward 4, backward 8). Recomputation (gradient checkpointing) never counts."""
    linear, lora = linear_params(shape, lora_rank)
    q = shape["num_attention_heads"] * shape["head_dim"]
    attention = 12 * shape["num_hidden_layers"] * q * length * (length + 1) / 2
    return (4 * linear + 6 * lora) * length + attention


# ---------- one arm: a config, a fresh process, its records ----------


def arm_sections(arm: str, args, model_dir: Path, data_dir: Path, out_dir: Path, precision: str, runtime, steps: int):
    """The LLaMA-Factory config of one arm, built by lf_config.build_config as the train stage builds it."""

    extra = {"disable_shuffling": True, "preprocessing_batch_size": args.per_pack}
    if arm == "fast-gc":
        extra["disable_gradient_checkpointing"] = False
    t = TrainParams(
        profile="plain" if arm == "plain" else "fast",
        lora_rank=args.lora_rank,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        max_steps=steps,
        cutoff_len=args.cutoff_len,
        logging_steps=1,
        seed=args.seed,
        extra=extra,
    )
    sections = lf_config.build_config(
        t,
        model_path=str(model_dir),
        template=TEMPLATE,
        trust_remote_code=False,
        data_dir=str(data_dir),
        output_dir=str(out_dir),
        precision=precision,
        runtime=runtime,
    )
    plan = plan_profile(t, runtime, precision)
    if plan.base_dtype:  # what the train stage launches: the base loaded in bf16 (training.dtype_view)
        view = dtype_view(model_dir, out_dir.parent / f"model-{plan.base_dtype}", plan.base_dtype)
        sections["model"]["model_name_or_path"] = str(view)
    # Benchmark only: no evaluation, checkpoints, reports or progress bars.
    del sections["dataset"]["eval_dataset"]
    sections["eval"] = {"eval_strategy": "no"}
    sections["output"] |= {
        "overwrite_output_dir": True,
        "save_strategy": "no",
        "report_to": "none",
        "plot_loss": False,
        "include_effective_tokens_per_second": False,
        "disable_tqdm": True,
    }
    return sections, plan


def run_arm(arm: str, sections: dict, work: Path, timeout: int) -> dict:
    """Train one arm in a fresh process (python perf_train.py --worker spec.json); its records."""

    spec = {"args": lf_config.flat(sections), "out": str(work / f"{arm}.result.json")}
    (work / f"{arm}.yaml").write_text(
        lf_config.to_yaml(
            sections,
            [f"llamafactory-cli train {arm}.yaml  (benchmark arm {arm}; written by perf/perf_train.py)"],
        )
    )
    (work / f"{arm}.spec.json").write_text(json.dumps(spec))
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(work / "hf_cache"),
        "DISABLE_VERSION_CHECK": "1",
    }
    log = work / f"{arm}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(work / f"{arm}.spec.json")],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if proc.returncode:
        sys.exit(f"arm {arm} failed (exit {proc.returncode}); the end of {log}:\n{log.read_text()[-4000:]}")
    result = json.loads(Path(spec["out"]).read_text())
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def real_tokens(batch) -> int:
    """Non-pad tokens of one micro-batch: from a 2D mask, from the diagonal of LLaMA-Factory's 4D packing mask
    (a real token attends to itself, a pad to nothing), or every token of an unpadded FlashAttention batch."""
    import torch

    mask = batch.get("attention_mask")
    if mask is None:
        return int(batch["input_ids"].numel())
    if mask.dim() == 2:
        return int((mask != 0).sum())
    diag = torch.diagonal(mask[:, 0], dim1=-2, dim2=-1)
    return int(diag.sum() if diag.dtype == torch.bool else (diag == 0).sum())


def worker(spec_path: str) -> int:
    """Inside the arm's process: LLaMA-Factory's run_exp with a callback timing every optimizer step."""
    import resource

    import torch
    import transformers
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    counts: list[tuple[int, int, int]] = []
    record: dict = {"steps": []}
    get_batch_samples = transformers.Trainer.get_batch_samples

    def counting(self, epoch_iterator, num_batches, device):  # one call per optimizer step: its micro-batches
        batches, n = get_batch_samples(self, epoch_iterator, num_batches, device)
        counts.append(
            (sum(real_tokens(b) for b in batches), sum(int((b["labels"] != -100).sum()) for b in batches), len(batches))
        )
        return batches, n

    transformers.Trainer.get_batch_samples = counting

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            record.update(
                attn_implementation=base.config._attn_implementation,
                gradient_checkpointing=bool(base.is_gradient_checkpointing),
                liger=type(base.model.norm).__name__.startswith("Liger"),
                micro_batch=args.per_device_train_batch_size,
                accumulation=args.gradient_accumulation_steps,
            )
            sync()
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            tokens, labels, micro = counts.pop(0)
            record["steps"].append(
                {
                    "step": state.global_step,
                    "seconds": now - self.last,
                    "real_tokens": tokens,
                    "label_tokens": labels,
                    "micro_batches": micro,
                }
            )
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and record["steps"] and record["steps"][-1]["step"] == state.global_step:
                record["steps"][-1] |= {"loss": logs["loss"], "grad_norm": logs.get("grad_norm")}

    run_exp(args=spec["args"], callbacks=[StepTimer()])
    if cuda:
        record |= {
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "memory": "GPU max allocated",
        }
    else:
        record |= {"peak_mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory": "max RSS"}
    atomic_write_json(spec["out"], record)
    return 0


# ---------- summary, files, table ----------


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


def liger_works() -> str | None:
    """None when Liger's kernels run a tiny Llama forward + backward on this GPU, else why not."""
    try:
        import torch
        from liger_kernel.transformers import (
            LigerRMSNorm,
            apply_liger_kernel_to_llama,  # noqa: F401
        )

        norm = LigerRMSNorm(64).cuda().to(torch.bfloat16)
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        norm(x).sum().backward()
        return None
    except Exception as err:  # any failure means: benchmark without Liger, and say why
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    if args.worker:
        return worker(args.worker)
    if args.table or args.readme:
        table = render_table(list(args.out_dir.glob("*.json")))
        if args.readme:
            write_readme(args.readme, table)
        print(table, end="")
        return 0

    if args.export_tokenizer:
        with tempfile.TemporaryDirectory() as tmp:
            tok = tokenizer_dir(args.tokenizer, Path(tmp))
            args.export_tokenizer.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                if (tok / name).exists():
                    shutil.copy(tok / name, args.export_tokenizer / name)
        print(f"wrote {', '.join(sorted(p.name for p in args.export_tokenizer.iterdir()))} to {args.export_tokenizer}")
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="perf_train."))
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_dir(args.tokenizer, work)

    import torch

    cuda = torch.cuda.is_available()
    args.shape = args.shape if args.shape != "auto" else ("llama2-7b" if cuda else "smollm2-135m")
    shape_name = args.shape
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
    precision = precisions["fast"]

    t0 = time.perf_counter()
    enc = Encoder(tok, args.cutoff_len)
    shape = model_shape(args, len(enc.tokenizer))
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

    kernels = set()
    if cuda:
        from transformers.utils import is_flash_attn_2_available

        kernels |= {"flash_attn"} if is_flash_attn_2_available() else set()
        if why := liger_works():
            notes.append(f"no Liger kernels: {why}")
        else:
            kernels.add("liger_kernel")
    runtime = Runtime(
        cuda=cuda,
        gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 0.0,
        kernels=frozenset(kernels),
        cpu_count=len(os.sched_getaffinity(0)),
        model_config=shape,
        weights_bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        example_tokens=tuple(lengths),
        cpu_isa=isa or Runtime().cpu_isa,
    )

    results = {}
    for arm in arms:
        sections, plan = arm_sections(arm, args, model_dir, data_dir, work / arm, precisions[arm], runtime, args.steps)
        print(f"arm {arm}: {'; '.join(plan.notes)}", file=sys.stderr)
        raw = run_arm(arm, sections, work, args.timeout)
        results[arm] = summarize(
            arm,
            raw,
            warmup=args.warmup,
            step_tokens=step_tokens,
            step_flops=step_flops,
            peak_tflops=args.peak_tflops,
            ceiling_tflops=ceiling,
        )
        results[arm] |= {
            "config": lf_config.flat(sections),
            "profile_notes": plan.notes,
            "estimate_gib": plan.estimate_gib,
        }
        print(
            f"arm {arm}: {results[arm]['tokens_per_s']:,.0f} real tokens/s, {results[arm]['wall_s']} s in all",
            file=sys.stderr,
        )
    compare(results)
    goals = None  # the issue's goals are for a GPU, one arm against plain, from this one run
    if cuda:
        goals = {
            name: {
                "speedup": a["speedup_vs_plain"] >= GOALS["speedup"],
                "memory": a["memory_vs_plain"] <= GOALS["memory"],
                "mfu": a["mfu_vs_peak"] >= GOALS["mfu"],
            }
            for name, a in results.items()
            if name != "plain"
        }
    linear, lora = linear_params(shape, args.lora_rank)
    n_params = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) // (2 if cuda else 4)
    import llamafactory
    import transformers

    out = {
        "kind": "train",
        "device": device_name(cuda),
        "shape": shape_name,
        "dtype": precision,
        "dtypes": {arm: precisions[arm] for arm in arms},
        "model": shape | {"params": n_params, "linear_params": linear, "lora_params": lora},
        "lora_rank": args.lora_rank,
        "cutoff_len": args.cutoff_len,
        "data": {
            "examples_per_step": per_step,
            "examples_per_pack": args.per_pack,
            "real_tokens_per_step": step_tokens[0],
            "length_min": min(lengths),
            "length_max": max(lengths),
            "length_median": statistics.median(lengths),
            "seed": args.seed,
        },
        "steps": {"total": args.steps, "warmup": args.warmup, "timed": args.steps - args.warmup},
        "peak_tflops": args.peak_tflops,
        "matmul_ceiling_tflops": ceiling,
        "matmul": matmul,
        "arms": results,
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
    path = args.out_dir / f"{slug(out['device'])}-{shape_name}.json"
    atomic_write_json(path, out)
    print(report(out))
    for name, met in (goals or {}).items():
        print(
            f"  goals, {name} vs plain (>= {GOALS['speedup']}x tokens/s, <= {GOALS['memory']}x memory, MFU >= "
            f"{GOALS['mfu']:.0%}): " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items())
        )
    print(f"wrote {path}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    bad = [a for a, r in results.items() if not r["learning_guard_ok"] or r["token_mismatches"]]
    if bad:
        print(f"learning guard or token check FAILED for: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
