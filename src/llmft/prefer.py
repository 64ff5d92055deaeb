"""The prefer stage's work: preference tuning after SFT, by LLaMA-Factory's own trainers, into one adapter.

    outcome = prefer(params.prefer, params.train, PreferPaths())   # PreferPaths() = the stage's default paths
    outcome.metrics["eval_rewards/accuracies"]

DPO, ORPO and SimPO run as LLaMA-Factory's `stage: dpo` (pref_loss sigmoid, orpo, simpo), KTO as `stage: kto`,
on data/pairs (llmft.data.pairs writes it). The SFT adapter (models/lora) is merged into the base in memory and a
new LoRA is trained on top (`create_new_adapter: true`), so the reference model of DPO and KTO, which LLaMA-Factory
gets by disabling the trained adapter, is the SFT model and not the base (docs/preference.md: the source lines).
The stage then writes ONE adapter, SFT and preference update together (combine_adapters: the two LoRAs' ranks
side by side, exactly), so evaluate, export and gguf load models/prefer on models/base as they load models/lora.

A rerun resumes from the newest complete checkpoint, unless the pairs, the SFT adapter, the base or the params
changed: then it starts fresh and says so. On a CPU the run's cost is said first and capped at
prefer.cpu_token_budget (plan_cpu_prefer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from llmft.adapters import combine_adapters, dora_message
from llmft.common import UserError, atomic_path, atomic_write_json, get_logger, read_json, write_json
from llmft.data.pairs import kind_of
from llmft.lf import config as lf_config
from llmft.lf import run as lf_run
from llmft.lf.budget import FORWARD_SPEEDUP, CpuPlan, reference_rate
from llmft.params import PreferParams

log = get_logger("prefer")
RUN_METRICS = "run_metrics.json"  # in the checkpoints folder: a finished run of these inputs
CONFIG = "prefer_config.yaml"  # beside the adapter: `llamafactory-cli train` reruns the preference run from it
DELTA = "delta"  # beside the adapter: the preference LoRA alone, as LLaMA-Factory wrote it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PREF_LOSS = {"dpo": "sigmoid", "orpo": "orpo", "simpo": "simpo"}


@dataclasses.dataclass(frozen=True)
class PreferPaths:
    """Where the prefer stage reads and writes."""

    params: Path = Path("params.yaml")
    model_dir: Path = Path("models/base")
    adapter: Path = Path("models/lora")  # the SFT adapter (the train stage's output)
    data_dir: Path = Path("data/pairs")  # train.json, val.json, dataset_info.json (llmft.data.pairs.write_pairs)
    out: Path = Path("models/prefer")  # the combined adapter, its records, and delta/ (the preference LoRA alone)
    checkpoints: Path = Path("checkpoints-prefer")  # not inside train's checkpoints/, which train empties itself
    live_dir: Path = Path("dvclive/prefer")
    metrics: Path = Path("reports/metrics/prefer.json")


@dataclasses.dataclass
class PreferOutcome:
    sections: dict
    metrics: dict
    trained_now: bool  # False: the checkpoints held a finished run of the same inputs, reused as is
    returncode: int = 0  # llamafactory-cli's exit code; non-zero = failed, nothing written


# --- the LLaMA-Factory config ---------------------------------------------------------------------------------


def check_inputs(t, adapter_dir: Path) -> dict:
    """The SFT adapter's config; UserError where LLaMA-Factory's reference would not be the SFT model, or the
    adapters could not be combined. `t` is params.train."""
    if t.finetuning_type != "lora":
        raise UserError(
            f"prefer needs a LoRA adapter from train; train.finetuning_type is {t.finetuning_type}: set it to lora"
        )
    if t.quantization_bit:  # LF: "Cannot create new adapter upon a quantized model" (hparams/parser.py)
        raise UserError(
            "prefer on QLoRA (train.quantization_bit): LLaMA-Factory cannot merge the SFT adapter into a quantized "
            "model, so its reference would be the base, not the SFT model; set train.quantization_bit: null"
        )
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise UserError(f"{config_file} not found: run `dvc repro train` first")
    config = read_json(config_file)
    if config.get("use_dora"):
        raise UserError(dora_message(adapter_dir))
    return config


def build_sections(
    p: PreferParams,
    t,
    *,
    model_path: str,
    template: str,
    trust_remote_code: bool,
    adapter_dir: str,
    data_dir: str,
    output_dir: str,
    precision: str,
) -> dict[str, dict[str, Any]]:
    """One LLaMA-Factory preference config, in the sections of its examples/train_lora/*_dpo.yaml. `t` is
    params.train: the new LoRA takes its rank, alpha, dropout and targets."""
    method: dict[str, Any] = {
        "stage": "kto" if p.method == "kto" else "dpo",
        "do_train": True,
        "finetuning_type": "lora",
        # merge the SFT adapter into the weights and train a new LoRA: the reference (adapter disabled) = SFT model
        "create_new_adapter": True,
        "lora_rank": t.lora_rank,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "lora_target": t.lora_target,
        "use_rslora": t.use_rslora,
        "pref_beta": p.beta,
        "pref_ftx": p.ftx,
    }
    if p.method != "kto":
        method["pref_loss"] = PREF_LOSS[p.method]
    if p.method == "simpo":
        method["simpo_gamma"] = p.simpo_gamma
    train: dict[str, Any] = {
        "per_device_train_batch_size": p.per_device_train_batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "learning_rate": p.learning_rate,
        "num_train_epochs": p.num_train_epochs,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,  # a ratio (transformers 5), as LLaMA-Factory's DPO examples
        "seed": p.seed,
        "data_seed": p.seed,
    }
    if p.max_steps:
        train["max_steps"] = p.max_steps
    if precision in ("bf16", "fp16"):
        train[precision] = True
    else:  # fp32 means a CPU: RAM is not the limit there, and recomputing activations costs ~30%
        train["disable_gradient_checkpointing"] = True
    output = {
        "output_dir": output_dir,
        "overwrite_output_dir": False,
        "logging_steps": 1,
        "save_steps": p.save_steps,
        "save_total_limit": 2,
        "plot_loss": True,
        "report_to": "dvclive",
    }
    if p.method != "kto":  # LLaMA-Factory counts pairwise tokens only (train/dpo/workflow.py)
        output["include_effective_tokens_per_second"] = True
    return {
        "model": {
            "model_name_or_path": model_path,
            "adapter_name_or_path": adapter_dir,
            "template": template,
            "trust_remote_code": trust_remote_code,
        },
        "method": method,
        "dataset": {"dataset_dir": data_dir, "dataset": "train", "eval_dataset": "val", "cutoff_len": p.cutoff_len},
        "output": output,
        "train": train,
        "eval": {"eval_strategy": "steps", "eval_steps": p.save_steps},
    }


# --- what it costs on a CPU -----------------------------------------------------------------------------------


def example_tokens(
    model_path: str, template: str, data_dir: Path, cutoff_len: int, trust_remote_code: bool = False, name="train"
) -> list[int]:
    """The tokens each example of split `name` puts through the policy, as LLaMA-Factory encodes and cuts them:
    a pair is two sequences padded to the longer (2 x (prompt + longer answer)); a KTO example one. Imports
    LLaMA-Factory; [] when the tokenizer or the data can't be read."""
    from llamafactory.data.processor.processor_utils import infer_seqlen
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    from llmft.lf.encode import convert_rows, dataset_attr

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        data_args = DataArguments(template=template, cutoff_len=cutoff_len)
        tmpl = get_template_and_fix_tokenizer(tokenizer, data_args)
        attr = dataset_attr(data_dir, name)
        rows = json.loads((data_dir / attr.dataset_name).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, UserError) as err:
        log.warning("no CPU estimate: cannot measure the pairs (%s)", str(err).splitlines()[0][:200])
        return []
    out = []
    for ex in convert_rows(attr, data_args, rows):
        if ex is None:
            continue
        answers = [m for m in ex["_response"] if m["content"]]  # kto: the answer; its empty side is no sequence
        encoded = [tmpl.encode_oneturn(tokenizer, ex["_prompt"] + [m], ex["_system"] or None) for m in answers]
        prompt = len(encoded[0][0])
        longest = max(len(ids) for _, ids in encoded) + int(tmpl.efficient_eos)
        source, target = infer_seqlen(prompt, longest, cutoff_len)
        out.append(len(encoded) * (source + target))
    return out


def cost_factor(method: str) -> float:
    """A policy token's cost in training tokens: DPO adds a reference forward per token (a forward is about a third
    of forward + backward, lf/budget.py FORWARD_SPEEDUP); KTO adds three (its KL forward without gradients, and the
    reference's forwards of the answer and of the KL sequence); ORPO and SimPO none."""
    return {"dpo": 1 + 1 / FORWARD_SPEEDUP, "kto": 1 + 3 / FORWARD_SPEEDUP}.get(method, 1.0)


def plan_cpu_prefer(
    p: PreferParams, tokens: list[int], num_parameters: int | None, tokens_per_s: float | None = None
) -> CpuPlan | None:
    """The steps, tokens and minutes params.prefer asks for on these pairs (`tokens`: example_tokens), capped at
    prefer.cpu_token_budget; None when the lengths are unknown. Tokens are training-token equivalents (cost_factor),
    so the budget means the same CPU time as train.cpu_token_budget.

    Raises:
        UserError: the budget is smaller than one optimizer step.
    """
    if not tokens:
        return None
    per_step = p.per_device_train_batch_size * p.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(tokens) / per_step)
    steps = p.max_steps or max(1, math.ceil(p.num_train_epochs * steps_per_epoch))
    factor = cost_factor(p.method)
    step_tokens = sum(tokens) * factor / steps_per_epoch
    total = round(step_tokens * steps)
    rate = tokens_per_s or reference_rate("fp32", num_parameters)
    plan = CpuPlan(steps, total, total / rate / 60, rate, own_examples=len(tokens))
    reference = {"dpo": "with the SFT model's reference forwards", "kto": "with its KL and reference forwards"}
    plan.notes.append(
        f"CPU prefer run ({p.method}): {steps} optimizer steps of {per_step} examples ({len(tokens)} examples, "
        f"{sum(tokens):,} tokens an epoch{', ' + reference[p.method] if p.method in reference else ''}) = "
        f"~{total:,} training tokens, ~{plan.minutes:.1f} min at ~{rate:.0f} tokens/s (an estimate from 2-core CPUs)"
    )
    budget = p.cpu_token_budget
    if budget and budget < step_tokens:
        raise UserError(
            f"prefer.cpu_token_budget={budget:,} is smaller than one optimizer step (~{step_tokens:,.0f} tokens): "
            f"raise it to at least {math.ceil(step_tokens):,}, lower prefer.per_device_train_batch_size or "
            "prefer.cutoff_len, or set it to null"
        )
    if budget and total > budget:
        plan.max_steps = max(1, math.floor(steps * budget / total))
        plan.notes.append(
            f"over prefer.cpu_token_budget={budget:,}: training stops at step {plan.max_steps} of {steps} "
            f"(~{budget / rate / 60:.1f} min); the learning-rate schedule ends there. Raise the budget, or set it "
            "to null, to train all of it"
        )
    plan.own_seen = min(len(tokens), (plan.max_steps or steps) * per_step)
    return plan


# --- the run --------------------------------------------------------------------------------------------------


def adapter_digest(adapter_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + (adapter_dir / name).read_bytes())
    return h.hexdigest()


class Launcher:
    """`llamafactory-cli train` on a config, resumed from the newest complete checkpoint, in a scratch directory
    whose ./dvclive links to the live dir (transformers' DVCLive callback writes ./dvclive and a ./dvc.yaml, which
    from the repo root would rewrite the pipeline's own; see llmft.train.Launcher)."""

    def __init__(self, paths: PreferPaths, header: list[str]):
        self.paths, self.header, self.resumed_step = paths, header, 0
        self.run_dir = Path(tempfile.mkdtemp(prefix="prefer-run-"))
        paths.live_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "dvclive").symlink_to(paths.live_dir.resolve(), target_is_directory=True)

    def __call__(self, sections: dict) -> tuple[int, str]:
        cfg = lf_config.absolute_paths(sections)
        ckpt = lf_run.newest_complete(self.paths.checkpoints)
        self.resumed_step = 0
        if ckpt:
            self.resumed_step = read_json(ckpt / "trainer_state.json")["global_step"]
            cfg["output"]["resume_from_checkpoint"] = str(ckpt.resolve())
            log.info("resuming from %s (step %d)", ckpt, self.resumed_step)
        config = self.run_dir / CONFIG
        config.write_text(lf_config.to_yaml(cfg, self.header), encoding="utf-8")
        cmd, env = lf_config.launch_command(str(config), os.environ, {}, str(Path(sys.executable).parent))
        return lf_run.run_child(cmd, env | ({"DVCLIVE_RESUME": "1"} if ckpt else {}), self.run_dir)

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def header_lines(paths: PreferPaths, commit: str) -> list[str]:
    return [
        f"llamafactory-cli train {paths.out / CONFIG}",
        f"Written by the prefer stage from {paths.params} (prefer, and train's LoRA shape): change those, not this.",
        f"It writes the preference LoRA alone (kept as {paths.out / DELTA}); the stage then adds it to the SFT one:",
        f"  python -m llmft.adapters combine {paths.adapter} <output_dir> {paths.out}",
        f"git {commit}; paths are relative to where the stage ran (the repo root).",
    ]


def run_metrics(checkpoints: Path, resumed_step: int) -> dict:
    """prefer.json's figures from LLaMA-Factory's all_results.json and log history: the last logged loss, the eval
    loss, and the reward statistics (rewards/accuracies: the share of held-out pairs the model prefers right)."""
    results = read_json(checkpoints / "all_results.json")
    history = read_json(checkpoints / "trainer_state.json")["log_history"]
    last_loss = next((e["loss"] for e in reversed(history) if "loss" in e), results.get("train_loss"))
    metrics = {
        "train_loss": last_loss,
        "global_step": max(e["step"] for e in history),
        "resumed_from_step": resumed_step,
        "train_runtime_s": results.get("train_runtime"),
    }
    metrics |= {k: v for k, v in results.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    if results.get("effective_tokens_per_sec"):
        metrics["tokens_per_sec"] = round(results["effective_tokens_per_sec"], 1)
    return metrics


def collect(paths: PreferPaths, sections: dict, header: list[str], record: dict, metrics: dict) -> None:
    """models/prefer <- the combined adapter, LLaMA-Factory's records, delta/ and the config (one rename); metrics
    JSON; the curves redrawn from trainer_state.json with x = optimizer step, across resumes."""
    ckpt = paths.checkpoints
    with tempfile.TemporaryDirectory(prefix="prefer-combined-") as scratch:
        combined = Path(scratch) / "combined"
        combine_adapters(paths.adapter, ckpt, combined)
        with atomic_path(paths.out) as tmp:
            (tmp / DELTA).mkdir(parents=True)
            for f in ckpt.iterdir():
                if f.is_file() and f.name not in ("fingerprint.json", RUN_METRICS):
                    shutil.copy2(f, tmp / DELTA / f.name if f.name in ADAPTER_FILES else tmp / f.name)
            for name in ADAPTER_FILES:
                shutil.copy2(combined / name, tmp / name)
            (tmp / CONFIG).write_text(lf_config.to_yaml(sections, header), encoding="utf-8")
            write_json(tmp / "prefer_params.json", record)
    history = read_json(ckpt / "trainer_state.json")["log_history"]
    # Only the curves stay, as in train: DVCLive's metrics.json repeats prefer.json; its params.yaml has temp paths
    paths.live_dir.mkdir(parents=True, exist_ok=True)
    for entry in paths.live_dir.iterdir():
        if entry.name != "plots":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    plots = paths.live_dir / "plots" / "metrics"
    shutil.rmtree(plots, ignore_errors=True)
    for name, text in lf_run.live_rows(history).items():
        (plots / name).parent.mkdir(parents=True, exist_ok=True)
        (plots / name).write_text(text)
    atomic_write_json(paths.metrics, metrics)


def pass_through(paths: PreferPaths) -> dict:
    """prefer.enabled false: models/prefer <- the SFT adapter as it is, data/pairs <- no pairs, and the metrics say
    so. Downstream stages read models/prefer either way, so switching the stage off reruns them on the SFT adapter:
    no preference adapter from an earlier run stays in use. (DVC stores the copy once: its files hash the same.)"""
    if not (paths.adapter / "adapter_config.json").exists():
        raise UserError(f"{paths.adapter / 'adapter_config.json'} not found: run `dvc repro train` first")
    with atomic_path(paths.out) as tmp:
        shutil.copytree(paths.adapter, tmp)
    with atomic_path(paths.data_dir) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / "dataset_info.json", {})
    paths.checkpoints.mkdir(parents=True, exist_ok=True)  # a DVC output: it exists, empty, until a run fills it
    metrics = {"enabled": False, "adapter": f"{paths.adapter} (copied as is to {paths.out})"}
    atomic_write_json(paths.metrics, metrics)
    log.info("prefer.enabled is false: %s is %s as it is", paths.out, paths.adapter)
    return metrics


def check_data(p: PreferParams, t, paths: PreferPaths) -> dict:
    """The SFT adapter's config, once the model, the pairs and the method agree; UserError naming what to run."""
    for f, stage in ((paths.model_dir / "model_info.json", "model"), (paths.data_dir / "dataset_info.json", "prefer")):
        if not f.exists():
            raise UserError(f"{f} not found: run `dvc repro {stage}` first")
    sft_config = check_inputs(t, paths.adapter)
    data_kind = "kto" if "kto_tag" in json.dumps(read_json(paths.data_dir / "dataset_info.json")) else "pairwise"
    if data_kind != kind_of(p.method):
        raise UserError(
            f"{paths.data_dir} holds {data_kind} data but prefer.method is {p.method}: `dvc repro prefer` "
            "rebuilds the pairs for the method"
        )
    return sft_config


def announce_cpu_plan(p: PreferParams, info: dict, data_dir: Path, sections: dict, trust_remote_code: bool):
    """On a CPU: log what the run will cost, and cut it at prefer.cpu_token_budget (sections' max_steps)."""
    tokens = example_tokens(info["path"], info["template"], data_dir, p.cutoff_len, trust_remote_code)
    plan = plan_cpu_prefer(p, tokens, info.get("num_parameters"))
    for note in plan.notes if plan else ():
        log.warning("%s", note) if "over prefer.cpu_token_budget" in note else log.info("%s", note)
    if plan and plan.max_steps:
        sections["train"]["max_steps"] = plan.max_steps
    return plan


def prefer(
    p: PreferParams, t, paths: PreferPaths, trust_remote_code: bool = False, pairs: dict | None = None
) -> PreferOutcome:
    """Preference-tune the SFT adapter on paths.data_dir as params.prefer says (`t`: params.train, the LoRA shape and
    precision); write the combined adapter, its records and metrics (with `pairs`, what the pairs were built
    from). Nothing is written when the run fails."""
    import torch

    from llmft.env import git_commit
    from llmft.model import read_model_info

    sft_config = check_data(p, t, paths)
    info = read_model_info(paths.model_dir)
    cuda = torch.cuda.is_available()
    precision = lf_config.choose_precision(t.precision, cuda, cuda and torch.cuda.is_bf16_supported())
    sections = build_sections(
        p,
        t,
        model_path=info["path"],
        template=info["template"],
        trust_remote_code=trust_remote_code,
        adapter_dir=str(paths.adapter),
        data_dir=str(paths.data_dir),
        output_dir=str(paths.checkpoints),
        precision=precision,
    )
    plan = None if cuda else announce_cpu_plan(p, info, paths.data_dir, sections, trust_remote_code)
    fp = lf_run.fingerprint(paths.data_dir, paths.model_dir, sections, adapter_digest(paths.adapter))
    batch = sections["train"]["per_device_train_batch_size"] * sections["train"]["gradient_accumulation_steps"]
    lf_run.sync_checkpoints(paths.checkpoints, fp, 1, batch)
    commit = git_commit()
    header = header_lines(paths, commit)
    splits = {n: len(read_json(paths.data_dir / f"{n}.json")) for n in ("train", "val")}
    record = {
        "prefer": p.model_dump(),
        "train_lora": {k: getattr(t, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")},
        "sft_adapter": {"path": str(paths.adapter), "r": sft_config.get("r"), "sha256": adapter_digest(paths.adapter)},
        "git_commit": commit,
        "precision": precision,
        "examples": splits,
    }
    if (paths.checkpoints / RUN_METRICS).exists():
        log.info(
            "%s holds a finished run of these inputs: nothing to train (delete it to train again)", paths.checkpoints
        )
        outcome = PreferOutcome(sections, read_json(paths.checkpoints / RUN_METRICS), trained_now=False)
    else:
        launcher = Launcher(paths, header)
        try:
            sections, retries, rc = lf_run.train_with_backoff(sections, launcher, t.oom_backoff and cuda)
        finally:
            launcher.close()
        if rc != 0:
            return PreferOutcome(sections, {}, trained_now=True, returncode=rc)
        metrics = {"enabled": True, "method": p.method, "precision": precision, "oom_retries": retries}
        metrics |= {"examples": splits, "pairs": pairs or {}} | run_metrics(paths.checkpoints, launcher.resumed_step)
        metrics |= {"cpu_plan": dataclasses.asdict(plan) | {"notes": None, "eval": None}} if plan else {}
        atomic_write_json(paths.checkpoints / RUN_METRICS, metrics)
        outcome = PreferOutcome(sections, metrics, trained_now=True)
    collect(paths, outcome.sections, header, record, outcome.metrics)
    log.info(
        "wrote %s (SFT + %s in one adapter) and %s: loss %.4f after %d steps%s",
        paths.out,
        p.method,
        paths.metrics,
        outcome.metrics["train_loss"],
        outcome.metrics["global_step"],
        f", held-out reward accuracy {outcome.metrics['eval_rewards/accuracies']:.2f}"
        if "eval_rewards/accuracies" in outcome.metrics
        else "",
    )
    return outcome
