"""Stage `train`: models/base + data/processed -> LoRA/QLoRA/full fine-tuning with LLaMA-Factory -> models/lora.

    dvc repro train              # or: make train
    python src/train.py --params params.yaml --model-dir models/base --data-dir data/processed --out models/lora \
        --checkpoints checkpoints --live-dir dvclive/train --metrics reports/metrics/train.json

Reads `model.trust_remote_code` and `train:`. Writes models/lora/train_config.yaml, which
`llamafactory-cli train models/lora/train_config.yaml` reruns as is, and launches it that way (LLaMA-Factory
starts torchrun and DeepSpeed itself). A rerun resumes from the newest complete checkpoint, unless data, model
or train params changed: then it starts fresh and says so. DVCLive draws loss, eval loss and learning rate live;
at the end the curves are redrawn from trainer_state.json with x = optimizer step, across resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lf_config  # noqa: E402
import lf_run  # noqa: E402
from common import (ROOT, UserError, atomic_path, atomic_write_json, get_logger, git_commit, run_main,  # noqa: E402
                    write_environment)
from params import TrainParams, load_params  # noqa: E402

log = get_logger("train")


def device_checks(t: TrainParams) -> str:
    """The precision to use; QLoRA and DeepSpeed prerequisites, checked before anything loads."""
    import torch

    cuda = torch.cuda.is_available()
    if t.quantization_bit and not cuda:
        raise UserError(f"train.quantization_bit={t.quantization_bit} (QLoRA, bitsandbytes) needs a CUDA GPU; set it "
                        "to null on this machine (plain LoRA), or run on a GPU")
    if t.deepspeed and not cuda:
        raise UserError(f"train.deepspeed={t.deepspeed} needs CUDA GPUs; set it to null on this machine")
    for key, pkg in (("quantization_bit", "bitsandbytes"), ("deepspeed", "deepspeed")):
        if getattr(t, key) and importlib.util.find_spec(pkg) is None:
            raise UserError(f"train.{key} needs the {pkg} package: pip install {pkg}")
    return lf_config.choose_precision(t.precision, cuda, cuda and torch.cuda.is_bf16_supported())


def log_estimate(model_path: str, sections: dict, t: TrainParams, precision: str) -> None:
    if not (Path(model_path) / "config.json").exists():
        return log.info("no memory estimate: %s is not a local directory", model_path)
    batch = sections["train"]["per_device_train_batch_size"]
    est = lf_config.estimate_peak_gib(
        json.loads((Path(model_path) / "config.json").read_text()),
        sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")), finetuning_type=t.finetuning_type,
        lora_rank=t.lora_rank, quantization_bit=t.quantization_bit, precision=precision, batch=batch, seq=t.cutoff_len,
        grad_checkpointing=not any(s.get("disable_gradient_checkpointing") for s in sections.values()))
    log.info("estimated peak GPU memory ~%.1f GiB = %s GiB (%s, %s, batch %d x %d tokens; see lf_config.py)",
             est.pop("total"), " + ".join(f"{k} {v:.2f}" for k, v in est.items()), t.finetuning_type, precision,
             batch, t.cutoff_len)


def finish(args, sections: dict, header: list[str], metrics: dict) -> None:
    """models/lora <- the final adapter and LLaMA-Factory's records (one rename); metrics JSON; redrawn plots."""
    ckpt = args.checkpoints
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        for f in ckpt.iterdir():
            if f.is_file() and f.name not in ("fingerprint.json", "run_metrics.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "train_config.yaml").write_text(lf_config.to_yaml(sections, header), encoding="utf-8")
    results = json.loads((ckpt / "all_results.json").read_text())
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    step = max(e["step"] for e in history)
    if not any(e.get("step") == step and "eval_loss" in e for e in history):  # the eval LF runs after training
        history.append({k: v for k, v in results.items() if k.startswith("eval_")} | {"step": step})
    shutil.rmtree(args.live_dir / "plots" / "metrics", ignore_errors=True)
    for name, text in lf_run.live_rows(history).items():
        (args.live_dir / "plots" / "metrics" / name).parent.mkdir(parents=True, exist_ok=True)
        (args.live_dir / "plots" / "metrics" / name).write_text(text)
    if "train_loss" not in metrics:  # first finish of this run; a rerun of a finished one reuses its metrics
        epoch, resumed_epoch = results.get("epoch") or 1, metrics.pop("resumed_epoch", 0)
        tps = results["effective_tokens_per_sec"] * (epoch - resumed_epoch) / epoch  # LF assumes all epochs ran now
        # LF's train_loss averages over this launch only (wrong after a resume): report the last logged loss
        last_loss = next((e["loss"] for e in reversed(history) if "loss" in e), results["train_loss"])
        metrics = {"train_loss": last_loss, "eval_loss": results["eval_loss"], "global_step": step, "epoch": epoch,
                   "train_runtime_s": results["train_runtime"],
                   "tokens_per_sec": round(tps, 1) if tps else None} | metrics
        atomic_write_json(ckpt / "run_metrics.json", metrics)
    atomic_write_json(args.metrics, metrics)
    log.info("wrote %s and %s: train loss %.4f, eval loss %.4f after %d steps", args.out, args.metrics,
             metrics["train_loss"], metrics["eval_loss"], step)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model-dir", default="models/base", type=Path, help="output of the model stage")
    parser.add_argument("--data-dir", default="data/processed", type=Path, help="output of the prepare stage")
    parser.add_argument("--out", default="models/lora", type=Path, help="final adapter (or model) + train_config.yaml")
    parser.add_argument("--checkpoints", default="checkpoints", type=Path, help="kept between runs, to resume")
    parser.add_argument("--live-dir", default="dvclive/train", type=Path, help="DVCLive metrics and plots")
    parser.add_argument("--metrics", default="reports/metrics/train.json", type=Path)
    parser.add_argument("--env", default="reports/env/train.json", type=Path, help="environment manifest")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    t = params.train
    for f, stage in ((args.model_dir / "model_info.json", "model"), (args.data_dir / "dataset_info.json", "prepare")):
        if not f.exists():
            raise UserError(f"{f} not found: run `dvc repro {stage}` first")
    info = json.loads((args.model_dir / "model_info.json").read_text())
    model_path = info.get("path") or str(args.model_dir)
    precision = device_checks(t)
    sections = lf_config.build_config(
        t, model_path=model_path, template=info.get("template", "default"), data_dir=str(args.data_dir),
        trust_remote_code=params.model.trust_remote_code, output_dir=str(args.checkpoints), precision=precision,
        deepspeed_config=os.path.relpath(ROOT / lf_config.DEEPSPEED_CONFIGS[t.deepspeed]) if t.deepspeed else None,
        runtime=lf_run.probe_runtime(t, model_path, info.get("template", "default"), args.data_dir, precision,
                                     params.model.trust_remote_code))
    if precision == "fp32" and "disable_gradient_checkpointing" not in t.extra:
        # fp32 means a CPU (or a forced choice): RAM is not the limit there, and recomputing activations costs ~30%.
        sections["train"]["disable_gradient_checkpointing"] = True
    lf_config.validate(sections, t.extra, typed=set(TrainParams.model_fields) - {"extra"})
    lf_run.sync_checkpoints(args.checkpoints, lf_run.fingerprint(args.data_dir, args.model_dir, sections))
    header = [f"llamafactory-cli train {args.out / 'train_config.yaml'}",
              (f"Written by src/train.py from {args.params} (model.trust_remote_code, train) and "
               f"{args.model_dir}/model_info.json: change those, not this file."),
              f"git {git_commit()}; paths are relative to where the stage ran (the repo root)."]

    # transformers' DVCLiveCallback calls Live() with no arguments: it writes ./dvclive and merges its plots into
    # ./dvc.yaml, which from the repo root would rewrite the pipeline's own dvc.yaml. So the child runs in a
    # scratch directory whose ./dvclive links to --live-dir; the dvc.yaml written there is thrown away.
    args.live_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="train-run-"))
    (run_dir / "dvclive").symlink_to(args.live_dir.resolve(), target_is_directory=True)
    resumed: dict = {}

    def launch(sections: dict) -> tuple[int, str]:
        cfg, ckpt = lf_config.absolute_paths(sections), lf_run.newest_complete(args.checkpoints)
        resumed.clear()
        if ckpt:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            resumed.update(step=state["global_step"], epoch=state.get("epoch") or 0)
            cfg["output"]["resume_from_checkpoint"] = str(ckpt.resolve())
            log.info("resuming from %s (step %d)", ckpt, resumed["step"])
        (run_dir / "train_config.yaml").write_text(lf_config.to_yaml(cfg, header), encoding="utf-8")
        log_estimate(model_path, sections, t, precision)
        cmd, env = lf_config.launch_command(str(run_dir / "train_config.yaml"), os.environ, t.deepspeed,
                                            str(Path(sys.executable).parent))
        return lf_run.run_child(cmd, env | ({"DVCLIVE_RESUME": "1"} if ckpt else {}), run_dir)

    try:
        if (args.checkpoints / "run_metrics.json").exists():
            log.info("%s holds a finished run of these inputs: nothing to train (delete it to train again)",
                     args.checkpoints)
            metrics = json.loads((args.checkpoints / "run_metrics.json").read_text())
        else:
            sections, retries, rc = lf_run.train_with_backoff(sections, launch, t.oom_backoff)
            if rc != 0:
                print(f"error: llamafactory-cli train exited with code {rc}; its messages are above", file=sys.stderr)
                return rc
            metrics = {"resumed_from_step": resumed.get("step", 0), "resumed_epoch": resumed.get("epoch", 0),
                       "oom_retries": retries, "precision": precision}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    train = sections["train"]
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):  # what finally ran
        train[key] = metrics[key] = metrics.get(key, train[key])
    finish(args, sections, header, metrics)
    write_environment(args.env, "train")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
