"""The train stage's work: params -> a LLaMA-Factory config, launched (with resume and OOM back-off), collected.

    outcome = train(load_params("params.yaml"), TrainPaths())   # TrainPaths() = the dvc.yaml paths
    outcome.metrics["eval_loss"]

A rerun resumes from the newest complete checkpoint, unless data, model or train params changed: then it
starts fresh and says so. DVCLive draws loss, eval loss and learning rate live; at the end the curves are
redrawn from trainer_state.json with x = optimizer step, across resumes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from llmft.common import ROOT, UserError, atomic_path, atomic_write_json, get_logger, read_json, write_json
from llmft.cpu import detect_cpu
from llmft.env import git_commit
from llmft.lf import config as lf_config
from llmft.lf import run as lf_run
from llmft.lf.budget import CpuPlan, describe_stages, plan_cpu_eval, plan_cpu_run, plan_stages, reference_rate
from llmft.lf.encode import example_lengths
from llmft.lf.memory import estimate_peak_gib
from llmft.lf.mixing import NAME, Mix, describe, fingerprint_extra, plan_mix, run_datasets, write_dataset_info
from llmft.lf.profile import Profile, plan_profile, probe_runtime, resolve_name
from llmft.lf.world import World, resolve_world, usable_cores, wait_for_master
from llmft.model import read_model_info
from llmft.params import Params, TrainParams

log = get_logger("train")
RUN_METRICS = "run_metrics.json"  # in the checkpoints folder: a finished run of these inputs


@dataclasses.dataclass(frozen=True)
class TrainPaths:
    """Where the train stage reads and writes; the defaults are dvc.yaml's."""

    params: Path = Path("params.yaml")
    model_dir: Path = Path("models/base")
    data_dir: Path = Path("data/processed")
    out: Path = Path("models/lora")
    checkpoints: Path = Path("checkpoints")
    live_dir: Path = Path("dvclive/train")
    metrics: Path = Path("reports/metrics/train.json")
    rehearsal_dir: Path = Path("data/rehearsal")  # the rehearse stage's output, mixed in when rehearse.enabled


@dataclasses.dataclass
class TrainOutcome:
    """What a run ended with: the config that finally ran (after any OOM back-off) and its metrics."""

    sections: dict
    metrics: dict
    trained_now: bool  # False: the checkpoints held a finished run of the same inputs, reused as is
    returncode: int = 0  # llamafactory-cli's exit code; non-zero = failed, nothing written
    main_node: bool = True  # False on nodes other than node 0: they write nothing


@dataclasses.dataclass
class Resumed:
    step: int = 0
    epoch: float = 0


def device_checks(t: TrainParams) -> str:
    """The precision to use; QLoRA and DeepSpeed prerequisites, checked before anything loads."""
    import torch

    from llmft.gpu import check_driver

    check_driver(log)  # a GPU that nvidia-smi shows but torch cannot use (driver too old for its CUDA) stops here
    cuda = torch.cuda.is_available()
    if t.quantization_bit and not cuda:
        raise UserError(
            f"train.quantization_bit={t.quantization_bit} (QLoRA, bitsandbytes) needs a CUDA GPU; set it "
            "to null on this machine (plain LoRA), or run on a GPU"
        )
    if t.deepspeed and not cuda:
        raise UserError(f"train.deepspeed={t.deepspeed} needs CUDA GPUs; set it to null on this machine")
    for key, pkg in (("quantization_bit", "bitsandbytes"), ("deepspeed", "deepspeed")):
        if getattr(t, key) and importlib.util.find_spec(pkg) is None:
            raise UserError(f"train.{key} needs the {pkg} package: pip install {pkg}")
    if cuda:
        return lf_config.choose_precision(t.precision, cuda, torch.cuda.is_bf16_supported())
    isa, fast = detect_cpu(), resolve_name(t.profile, cuda) == "fast"
    precision = lf_config.choose_precision(t.precision, cuda, isa.bf16, cpu_fast=fast)
    if fast and t.precision == "auto" and precision == "fp32":
        log.info("precision fp32: this CPU (%s) has no bf16 matrix unit, where bf16 would run slower", isa.describe())
    return precision


def log_estimate(model_path: str, sections: dict, t: TrainParams, precision: str, world: World) -> None:
    if not (Path(model_path) / "config.json").exists():
        return log.info("no memory estimate: %s is not a local directory", model_path)
    batch = sections["train"]["per_device_train_batch_size"]
    est = estimate_peak_gib(
        read_json(Path(model_path) / "config.json"),
        sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")),
        finetuning_type=t.finetuning_type,
        lora_rank=t.lora_rank,
        quantization_bit=t.quantization_bit,
        precision=precision,
        batch=batch,
        seq=t.cutoff_len,
        grad_checkpointing=not any(s.get("disable_gradient_checkpointing") for s in sections.values()),
        lora_dropout=t.lora_dropout,
        liger=any(s.get("enable_liger_kernel") for s in sections.values()),
        world_size=world.size,
        zero_stage=int(t.deepspeed[1]) if t.deepspeed else None,
    )
    log.info(
        "estimated peak GPU memory ~%.1f GiB%s = %s GiB (%s, %s, batch %d x %d tokens; see lf/memory.py)",
        est.pop("total"),
        f" in each of {world.size} processes" if world.size > 1 else "",
        " + ".join(f"{k} {v:.2f}" for k, v in est.items()),
        t.finetuning_type,
        precision,
        batch,
        t.cutoff_len,
    )


def dtype_view(model_dir: Path, view: Path, dtype: str) -> Path:
    """A folder that loads `model_dir` in `dtype`: links to its files, and a config.json whose dtype says so.

    LLaMA-Factory loads a model as its config.json says (torch_dtype "auto"); the base's weights stay as stored,
    and from_pretrained casts them once at load. A hub id (no local config.json) is returned as it is."""
    if not (model_dir / "config.json").exists():
        return model_dir
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (view / f.name).exists():
            (view / f.name).symlink_to(f.resolve())
    config = read_json(model_dir / "config.json")
    config["dtype"] = config["torch_dtype"] = dtype  # transformers 5 reads dtype; older ones torch_dtype
    write_json(view / "config.json", config)
    return view


class Launcher:
    """Runs `llamafactory-cli train` on a config, resuming from the newest complete checkpoint.

    transformers' DVCLiveCallback calls Live() with no arguments: it writes ./dvclive and merges its plots into
    ./dvc.yaml, which from the repo root would rewrite the pipeline's own dvc.yaml. So the child runs in a
    scratch directory whose ./dvclive links to the live dir; the dvc.yaml written there is thrown away.

    On a node other than node 0 (`fp` given), nothing of the stage's is written: checkpoints are read (to resume
    where node 0 resumes, when they are on a shared disk), while what transformers writes on every rank (its
    rng_state_<rank>.pth) goes to the scratch directory, and so does DVCLive.
    """

    def __init__(
        self,
        paths: TrainPaths,
        t: TrainParams,
        model_path: str,
        precision: str,
        header: list[str],
        datasets: dict | None,
        world: World,
        fp: str,
        base_dtype: str | None = None,
    ):
        self.paths, self.t, self.model_path, self.precision, self.header = paths, t, model_path, precision, header
        self.datasets, self.world, self.fp, self.base_dtype = datasets, world, fp, base_dtype
        self.resumed = Resumed()  # of the last launch
        self.run_dir = Path(tempfile.mkdtemp(prefix="train-run-"))
        live = paths.live_dir if world.is_main else self.run_dir / "live"
        live.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "dvclive").symlink_to(live.resolve(), target_is_directory=True)

    def __call__(self, sections: dict) -> tuple[int, str]:
        cfg = lf_config.absolute_paths(sections)
        ckpt = lf_run.newest_complete(self.paths.checkpoints, None if self.world.is_main else self.fp)
        if not self.world.is_main:
            cfg["output"]["output_dir"] = str(self.run_dir / "checkpoints")
        self.resumed = Resumed()
        if ckpt:
            state = read_json(ckpt / "trainer_state.json")
            self.resumed = Resumed(state["global_step"], state.get("epoch") or 0)
            cfg["output"]["resume_from_checkpoint"] = str(ckpt.resolve())
            log.info("resuming from %s (step %d)", ckpt, self.resumed.step)
        if self.base_dtype:  # the train.profile's frozen weights in bf16 on a CPU: a view of the base, not a copy
            model = cfg["model"]["model_name_or_path"]
            cfg["model"]["model_name_or_path"] = str(dtype_view(Path(model), self.run_dir / "base", self.base_dtype))
        if self.datasets:  # the rehearsal mix, a draw of val: one dataset_info.json beside the config
            cfg["dataset"]["dataset_dir"] = str(write_dataset_info(self.datasets, self.run_dir).parent)
        config = self.run_dir / "train_config.yaml"
        config.write_text(lf_config.to_yaml(cfg, self.header), encoding="utf-8")
        log_estimate(self.model_path, sections, self.t, self.precision, self.world)
        world_env = self.world.launch_env(deepspeed=bool(self.t.deepspeed))
        if self.world.cpu and self.world.size > 1:  # resuming needs torch.load to know "cpu:0" (see there)
            fix = str(Path(__file__).parent / "lf" / "cpu_ddp")
            world_env["PYTHONPATH"] = os.pathsep.join(filter(None, [fix, os.environ.get("PYTHONPATH")]))
        cmd, env = lf_config.launch_command(str(config), os.environ, world_env, str(Path(sys.executable).parent))
        return lf_run.run_child(cmd, env | ({"DVCLIVE_RESUME": "1"} if ckpt else {}), self.run_dir)

    def close(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


def build_sections(
    params: Params, paths: TrainPaths, info: dict, precision: str, world: World | None = None
) -> tuple[dict, CpuPlan | None, Mix | None, Profile]:
    """The LLaMA-Factory config of this run, checked (unknown or reserved train.extra keys fail here), on a CPU
    what it will cost (steps, tokens, minutes), capped at train.cpu_token_budget, and the rehearsal mixed in."""
    import torch

    t = params.train
    model_path, cpu = info["path"], not torch.cuda.is_available()
    mix = plan_mix(paths.data_dir, paths.rehearsal_dir, params.rehearse, t.max_samples)
    for line in describe(mix, params.rehearse.share) if mix else ():
        log.info("%s", line)
    lengths, rehearsal_lengths, val_lengths = None, (), ()
    if cpu:  # the examples' token lengths size the CPU run (and feed the fast profile's packing plan)
        limit = min(t.max_samples or 20000, 20000)
        lengths = example_lengths(
            model_path, info["template"], paths.data_dir, t.cutoff_len, params.model.trust_remote_code, limit=limit
        )
        val_lengths = example_lengths(
            model_path, info["template"], paths.data_dir, t.cutoff_len, params.model.trust_remote_code, name="val"
        )
        if mix:  # LLaMA-Factory draws mix.samples of them at random, each at most mix.repeats times
            found = example_lengths(
                model_path,
                info["template"],
                paths.rehearsal_dir,
                t.cutoff_len,
                params.model.trust_remote_code,
                name=NAME,
            )
            rehearsal_lengths = tuple(found[i % len(found)] for i in range(mix.samples)) if found else ()
    runtime = probe_runtime(
        t, model_path, info["template"], paths.data_dir, precision, params.model.trust_remote_code, lengths
    )
    sections = lf_config.build_config(
        t,
        model_path=model_path,
        template=info["template"],
        data_dir=str(paths.data_dir),
        trust_remote_code=params.model.trust_remote_code,
        output_dir=str(paths.checkpoints),
        precision=precision,
        deepspeed_config=os.path.relpath(ROOT / lf_config.DEEPSPEED_CONFIGS[t.deepspeed]) if t.deepspeed else None,
        runtime=runtime,
    )
    if precision == "fp32" and not any("disable_gradient_checkpointing" in keys for keys in sections.values()):
        # fp32 means a CPU (or a forced choice): RAM is not the limit there, and recomputing activations costs ~30%.
        sections["train"]["disable_gradient_checkpointing"] = True
    size = world.size if world else 1
    rate = reference_rate(precision, info.get("num_parameters"))
    plan = (
        plan_cpu_run(t, lengths, info.get("num_parameters"), rehearsal_lengths, size, rate) if cpu and lengths else None
    )
    for note in plan.notes if plan else ():
        log.warning("%s", note) if "over train.cpu_token_budget" in note else log.info("%s", note)
    if plan and (world is None or world.is_main):
        log.info("%s", describe_stages(whole_run(params, plan, val_lengths, info.get("num_parameters"))))
    if plan and plan.max_steps:
        sections["train"]["max_steps"] = plan.max_steps
    in_training = None
    if plan and "eval" in sections:
        run_steps = plan.max_steps or plan.steps
        minutes = run_steps / plan.steps * plan.minutes
        in_training = plan_cpu_eval(
            list(val_lengths), params.evaluate.examples_cap(cuda=False), run_steps, t, minutes, plan.tokens_per_s
        )
    if in_training:
        plan.eval = in_training
        sections["eval"]["eval_steps"] = in_training.eval_steps
        if in_training.note and (world is None or world.is_main):
            log.info("%s", in_training.note)
    drawn = in_training.examples if in_training and in_training.examples < in_training.available else None
    datasets = run_datasets(mix, paths.data_dir, drawn)
    if mix:
        sections["dataset"] |= mix.dataset_keys(record_dir=str(paths.out))
    elif datasets:
        sections["dataset"]["dataset_dir"] = str(paths.out)
    lf_config.validate(sections, t.extra, typed=set(TrainParams.model_fields) - {"extra"})
    return sections, plan, mix, datasets, plan_profile(t, runtime, precision)


def whole_run(params: Params, plan: CpuPlan, val_lengths: tuple[int, ...], num_parameters: int | None) -> dict:
    """The minutes of every stage of this CPU run (lf/budget.py), from params and the sizes of the prompt lists."""

    def count(path: str | None) -> int:
        file = Path(path) if path else None
        return sum(1 for line in file.read_text(encoding="utf-8").splitlines() if line.strip()) if file else 0

    try:
        kept, rehearsal = count(params.evaluate.kept.prompts), count(params.rehearse.prompts)
    except OSError:  # the estimate is a log line: a missing list is reported by the stage that reads it
        kept = rehearsal = 0
    return plan_stages(params, plan, list(val_lengths), kept, rehearsal, num_parameters)


def rehearsal_record(mix: Mix) -> dict:
    """train.json's rehearsal block: what the share asked for, what the pool allowed, and the largest repeat."""
    return {
        "examples": mix.samples,
        "train_examples": mix.train_examples,
        "share": round(mix.share, 4),
        "asked": mix.asked,
        "available": mix.available,
        "max_repeats": mix.repeats,
    }


def run_metrics(results: dict, history: list[dict], step: int, resumed: Resumed, world_size: int = 1) -> dict:
    """train.json's figures of a run that just finished, from LLaMA-Factory's all_results.json and log history.

    tokens_per_sec counts every process: LLaMA-Factory's effective_tokens_per_sec is divided by the world size."""
    epoch = results.get("epoch") or 1
    tps = results["effective_tokens_per_sec"] * world_size * (epoch - resumed.epoch) / epoch  # LF: all epochs now
    # LF's train_loss averages over this launch only (wrong after a resume): report the last logged loss
    last_loss = next((e["loss"] for e in reversed(history) if "loss" in e), results["train_loss"])
    return {
        "train_loss": last_loss,
        "eval_loss": results["eval_loss"],
        "global_step": step,
        "epoch": epoch,
        "train_runtime_s": results["train_runtime"],
        "tokens_per_sec": round(tps, 1) if tps else None,
        "tokens_per_sec_per_process": round(tps / world_size, 1) if tps else None,
    }


def collect(
    paths: TrainPaths, sections: dict, header: list[str], outcome: TrainOutcome, resumed: Resumed, datasets: dict | None
) -> None:
    """models/lora <- the final adapter and LLaMA-Factory's records (one rename); metrics JSON; redrawn plots."""
    ckpt = paths.checkpoints
    with atomic_path(paths.out) as tmp:
        tmp.mkdir()
        for f in ckpt.iterdir():
            if f.is_file() and f.name not in ("fingerprint.json", RUN_METRICS):
                shutil.copy2(f, tmp / f.name)
        (tmp / "train_config.yaml").write_text(lf_config.to_yaml(sections, header), encoding="utf-8")
        if datasets:  # train_config.yaml's dataset_dir: paths relative to it, so it reruns from the repo root
            write_dataset_info(datasets, tmp, relative_to=paths.out)
    results = read_json(ckpt / "all_results.json")
    history = read_json(ckpt / "trainer_state.json")["log_history"]
    step = max(e["step"] for e in history)
    if not any(e.get("step") == step and "eval_loss" in e for e in history):  # the eval LF runs after training
        history.append({k: v for k, v in results.items() if k.startswith("eval_")} | {"step": step})
    # Only the curves stay: DVCLive's own metrics.json repeats train.json, and its params.yaml holds the training
    # arguments with this run's temporary paths, which would differ on every machine (and show up in git status).
    paths.live_dir.mkdir(parents=True, exist_ok=True)  # a reused finished run never launched DVCLive here
    for entry in paths.live_dir.iterdir():
        if entry.name != "plots":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    plots = paths.live_dir / "plots" / "metrics"
    shutil.rmtree(plots, ignore_errors=True)
    for name, text in lf_run.live_rows(history).items():
        (plots / name).parent.mkdir(parents=True, exist_ok=True)
        (plots / name).write_text(text)
    if outcome.trained_now:
        outcome.metrics = run_metrics(results, history, step, resumed, outcome.metrics["world_size"]) | outcome.metrics
        atomic_write_json(ckpt / RUN_METRICS, outcome.metrics)
    atomic_write_json(paths.metrics, outcome.metrics)
    log.info(
        "wrote %s and %s: train loss %.4f, eval loss %.4f after %d steps",
        paths.out,
        paths.metrics,
        outcome.metrics["train_loss"],
        outcome.metrics["eval_loss"],
        step,
    )


def train(params: Params, paths: TrainPaths) -> TrainOutcome:
    """Fine-tune models/base on data/processed as params.train says; write the adapter, metrics and curves."""
    import torch

    t = params.train
    world = resolve_world(t, os.environ, gpus=torch.cuda.device_count(), cores=usable_cores())
    for f, stage in ((paths.model_dir / "model_info.json", "model"), (paths.data_dir / "dataset_info.json", "prepare")):
        if not f.exists():
            fix = f"`dvc repro {stage}` first" if world.is_main else "`make pull` on this node (DVC runs on node 0)"
            raise UserError(f"{f} not found: run {fix}")
    info = read_model_info(paths.model_dir)
    precision = device_checks(t)
    log.info("%s", world.describe())
    wait_for_master(world)
    sections, plan, mix, datasets, profile = build_sections(params, paths, info, precision, world)
    drawn = json.dumps((datasets or {}).get("val", {}).get("num_samples"))  # the in-training eval's draw
    fp = lf_run.fingerprint(paths.data_dir, paths.model_dir, sections, fingerprint_extra(mix) + drawn, world.size)
    batch = sections["train"]["per_device_train_batch_size"] * sections["train"]["gradient_accumulation_steps"]
    layout = {
        "world_size": world.size,
        "nnodes": world.nnodes,
        "nproc_per_node": world.nproc,
        "effective_batch": batch * world.size,
    }
    if world.is_main:
        lf_run.sync_checkpoints(paths.checkpoints, fp, world.size, layout["effective_batch"])
    header = [
        f"llamafactory-cli train {paths.out / 'train_config.yaml'}",
        (
            f"Written by the train stage from {paths.params} (model.trust_remote_code, train) and "
            f"{paths.model_dir}/model_info.json: change those, not this file."
        ),
        f"git {git_commit()}; paths are relative to where the stage ran (the repo root).",
    ]
    if profile.base_dtype:
        header.append(
            f"The stage loaded {paths.model_dir} in {profile.base_dtype} (train.profile fast on a CPU), through a "
            f"folder of links whose config.json says {profile.base_dtype} (llmft.train.dtype_view). As it stands "
            "this file loads the base as stored, under bf16 autocast: an adapter within bf16 rounding of this one. "
            "Pointed at such a folder (model_name_or_path=...), it reruns exactly."
        )
    if world.is_main and (paths.checkpoints / RUN_METRICS).exists():
        log.info(
            "%s holds a finished run of these inputs: nothing to train (delete it to train again)", paths.checkpoints
        )
        outcome = TrainOutcome(sections, read_json(paths.checkpoints / RUN_METRICS), trained_now=False)
        resumed = Resumed()
    else:
        launcher = Launcher(paths, t, info["path"], precision, header, datasets, world, fp, profile.base_dtype)
        try:
            # Across nodes an OOM shows only in the log of the node it hit, so no node could retry in step.
            backoff = t.oom_backoff and world.nnodes == 1
            sections, retries, rc = lf_run.train_with_backoff(sections, launcher, backoff)
        finally:
            launcher.close()
        resumed = launcher.resumed
        outcome = TrainOutcome(
            sections,
            {"resumed_from_step": resumed.step, "oom_retries": retries, "precision": precision}
            | {"profile": profile.name, "base_dtype": profile.base_dtype or "as stored"}
            | ({} if torch.cuda.is_available() else {"cpu": detect_cpu().describe()})
            | layout
            | ({"cpu_plan": dataclasses.asdict(plan) | {"notes": None}} if plan else {})
            | ({"rehearsal": rehearsal_record(mix)} if mix else {}),
            trained_now=True,
            returncode=rc,
            main_node=world.is_main,
        )
        if rc != 0 or not world.is_main:
            if rc == 0:
                log.info("node %d of %d finished its part; node 0 writes %s", world.node_rank, world.nnodes, paths.out)
            return outcome
    train_section = outcome.sections["train"]
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):  # what finally ran
        train_section[key] = outcome.metrics[key] = outcome.metrics.get(key, train_section[key])
    collect(paths, outcome.sections, header, outcome, resumed, datasets)
    return outcome
