"""The benchmark stage's work: standard benchmarks (lm-eval tasks) on the base and the fine-tuned model, offline.

    metrics, samples = run_benchmark(p, Path("models/base"), Path("models/lora"))

Both models get the same lm-eval run (tasks, shots, limit, batch size, seeds); the tuned model is the base with the
LoRA adapter folded in, or models/merged when given. Nothing is downloaded: a task's data must be in the repo, as
for the default task, mmlu_subset (data/benchmarks/tasks/mmlu_subset.yaml on the questions in data/benchmarks/mmlu).
metrics: per task base, tuned, delta = tuned - base, n, chance, whether the delta is within noise, whether the base
scores beyond chance (above_chance: a task at chance cannot show a loss) and the paired base-vs-tuned difference.
samples: one row per scored question: the prompt, the choices, and each model's log-likelihoods and answer.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from unittest import mock

import yaml

from llmft.common import UserError, get_logger
from llmft.infer.loading import check_adapter, merge_adapter, resolve_dtype, set_threads
from llmft.infer.vllm import require_vllm
from llmft.model import read_model_info
from llmft.params import BenchmarkParams
from llmft.stats import paired_difference

log = get_logger("benchmark")
EXAMPLE_TASK = "data/benchmarks/tasks/mmlu_subset.yaml"  # the local task to copy: offline data, MMLU's prompt
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
STRUCTURAL_KEYS = {"tag", "group", "task_list"}  # lm-eval reads these itself; the rest must be TaskConfig fields


@contextmanager
def offline() -> Iterator[None]:
    """No Hub traffic: a missing dataset fails at once instead of retrying for minutes, and no result depends on
    what the Hub served that day. The flags are read at call time, so this works after the libraries are imported."""
    import datasets.config
    import huggingface_hub.constants

    with (
        mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True),
    ):
        yield


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers here (and the user has not set HF_HUB_OFFLINE): lm-eval's own tasks
    fetch their data from it."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:  # no route, no DNS, refused, timed out: all mean offline
        return False
    return True


def hub_access(online: bool):
    """The Hub as it is when `online`, else no Hub traffic at all (offline())."""
    return contextlib.nullcontext() if online else offline()


def is_local(manager, name: str, include_path: str) -> bool:
    """Whether task `name` comes from a YAML under include_path (its data in the repo), not from lm-eval's own."""
    entry = manager.task_index.get(name)
    source = entry.yaml_path if entry and entry.yaml_path else None
    return bool(source) and Path(include_path).resolve() in Path(source).resolve().parents


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def check_task_file(path: Path) -> None:
    """One local task YAML, parsed as lm-eval parses it; UserError naming the file and what to fix.

    lm-eval itself skips a file it cannot read without a word, and the task then looks unknown.
    """
    from lm_eval.config.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml  # what TaskManager uses: includes and !function resolved

    fix = f"fix it (see {EXAMPLE_TASK})"
    try:
        cfg = load_yaml(path)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())[:300]}); {fix}") from None
    except (ValueError, OSError, ImportError, AttributeError) as err:  # not a mapping, bad include or !function
        raise UserError(f"{path}: cannot be read as an lm-eval task ({first_line(err)}); {fix}") from None
    if "group" in cfg or "class" in cfg:
        return  # a group of tasks, or a Python task: lm-eval checks those when it builds them
    if not isinstance(cfg.get("task"), str):
        raise UserError(
            f"{path}: no `task:` name, so lm-eval would skip the file; {fix}, or rename a shared template "
            "so it does not end in .yaml (lm-eval's own are named _default_template_yaml)"
        )
    known = {f.name for f in fields(TaskConfig)} | STRUCTURAL_KEYS
    for key in sorted(set(cfg) - known):
        close = difflib.get_close_matches(key, known, n=1)
        raise UserError(f"{path}: unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; {fix}")
    output_type = cfg.get("output_type", "generate_until")
    needed = ["doc_to_text", "doc_to_target"] + (["doc_to_choice"] if output_type == "multiple_choice" else [])
    missing = [k for k in needed if k not in cfg]
    if not cfg.get("dataset_path") and not cfg.get("custom_dataset"):
        missing.insert(0, "dataset_path")
    if not cfg.get("test_split") and not cfg.get("validation_split"):
        missing.append("test_split")
    if missing:
        raise UserError(f"{path}: task {cfg['task']!r} is missing {', '.join(missing)}; {fix}")
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"{path}: output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}; {fix}")


def task_manager(p: BenchmarkParams):
    """lm-eval's TaskManager with the local tasks of p.include_path; UserError for a broken file or unknown task."""
    from lm_eval.tasks import TaskManager

    include = Path(p.include_path)
    if not include.is_dir():
        raise UserError(f"benchmark.include_path: {include} is not a directory (run from the repo root)")
    for path in sorted(include.rglob("*.yaml")):
        if "__pycache__" not in path.parts:
            check_task_file(path)
    local = TaskManager(include_path=str(include), include_defaults=False)
    if all(name in local.all_tasks for name in p.tasks):
        return local  # indexing lm-eval's ~15,000 built-in tasks costs seconds: only when a task needs them
    manager = TaskManager(include_path=str(include))
    for name in p.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.7)
            raise UserError(
                f"benchmark.tasks: unknown lm-eval task {name!r}"
                + (f" (close: {', '.join(close)})" if close else "")
                + f"; to add one, put a task YAML in {include} (copy {EXAMPLE_TASK})"
            )
    return manager


def is_data_error(err: BaseException) -> bool:
    """The task's dataset could not be had: not on the Hub offline, a missing local file, or a loading script
    (datasets 4 no longer runs those)."""
    from datasets.exceptions import DatasetsError

    return isinstance(err, (ConnectionError, FileNotFoundError, DatasetsError)) or "scripts are no longer" in str(err)


def data_hint(err: BaseException, local: bool, online: bool) -> str:
    if "scripts are no longer" in str(err):
        return "datasets 4 no longer runs loading scripts: convert the data to JSON lines and read it with "
    if local and isinstance(err, FileNotFoundError):
        return "data_files are relative to the working directory: run from the repo root, or fix the path in "
    if not online:
        return "no Hugging Face Hub answers here: put the data in the repo (data/benchmarks/) and read it with "
    return "the Hub did not serve it: put the data in the repo (data/benchmarks/) and read it with "


def data_files(path: Path) -> list[str]:
    """The local files a task YAML reads (dataset_kwargs.data_files: a path, a list, or a split -> path(s) map)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = (load_yaml(path).get("dataset_kwargs") or {}).get("data_files") or []
    values = files.values() if isinstance(files, dict) else [files]
    return [f for v in values for f in ([v] if isinstance(v, str) else v)]


def check_data_files(name: str, source: str) -> None:
    """UserError naming the task and its first missing data file: lm-eval's own error names neither the task nor,
    offline, always the file."""
    for file in data_files(Path(source)):
        if not glob.glob(file):  # a path or a pattern (datasets accepts both)
            raise UserError(
                f"benchmark task {name!r} ({source}): data file {file} is missing; run from the repo root, or "
                f"rebuild it with the build script in its folder (see its NOTICE.md), or drop {name} from "
                "benchmark.tasks"
            )


def check_tasks_load(manager, p: BenchmarkParams, online: bool) -> None:
    """Build every task (its dataset too) and its first prompt before any model is loaded; UserError naming the
    task, its file and the fix."""
    for name in p.tasks:
        entry = manager.task_index.get(name)
        source = entry.yaml_path if entry and entry.yaml_path else "lm-eval"
        local = is_local(manager, name, p.include_path)
        if local:
            check_data_files(name, source)
        try:
            with hub_access(online):
                tasks = manager.load([name])["tasks"]
        except Exception as err:  # the boundary with user-written task files: say which one broke, and why
            if is_data_error(err):
                where = "" if online else " offline"
                raise UserError(
                    f"benchmark task {name!r} ({source}): its data could not be loaded{where} ({first_line(err)}); "
                    f"{data_hint(err, local, online)}dataset_path: json + dataset_kwargs.data_files, as "
                    f"{EXAMPLE_TASK} does"
                ) from None
            raise UserError(
                f"{source}: task {name!r} could not be built ({type(err).__name__}: {first_line(err)}); "
                f"fix the task file (see {EXAMPLE_TASK})"
            ) from None
        for task_name, task in tasks.items():
            try:
                task.fewshot_context(doc=task.eval_docs[0], num_fewshot=p.num_fewshot)
            except Exception as err:  # a template or few-shot pool that cannot serve this many examples
                raise UserError(
                    f"benchmark task {task_name!r} ({source}): cannot build a {p.num_fewshot}-shot prompt "
                    f"({type(err).__name__}: {first_line(err)}); lower benchmark.num_fewshot or fix the task file"
                ) from None


def hf_models(base_dir: Path, adapter_dir: Path, merged_dir: Path | None, batch_size: int) -> Iterator:
    """("base", lm) then ("tuned", lm): lm-eval HFLMs on one set of weights, the adapter folded in between.

    Folded, the tuned model runs at base speed; lm-eval's own peft= keeps LoRA unmerged (~1.6x slower on CPU).
    """
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_model_info(base_dir)
    trust = bool(info.get("params", {}).get("trust_remote_code", False))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        set_threads()

    def load(path: str):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=resolve_dtype("auto", device), trust_remote_code=trust
            )
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load model weights from {path}: {first_line(err)}") from None
        return model.to(device).eval()

    tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=trust)  # both models: same tokens
    model = load(info["path"])
    yield "base", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    model = load(str(merged_dir)) if merged_dir else merge_adapter(model, adapter_dir)
    yield "tuned", HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def vllm_models(base_dir: Path, adapter_dir: Path, batch_size: int) -> Iterator:
    """("base", lm) then ("tuned", lm) from one vLLM engine, the adapter applied per request (not with --merged).

    Optional GPU backend (benchmark.backend: vllm). Not covered by the tests: vLLM needs CUDA.
    """
    from lm_eval.models.vllm_causallms import VLLM

    info = read_model_info(base_dir)
    rank = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))["r"]
    lm = VLLM(
        pretrained=info["path"],
        lora_local_path=str(adapter_dir),
        max_lora_rank=max(8, 2 ** math.ceil(math.log2(rank))),
        batch_size=batch_size,
        trust_remote_code=bool(info.get("params", {}).get("trust_remote_code", False)),
    )
    lora, lm.lora_request = lm.lora_request, None
    yield "base", lm
    lm.lora_request = lora
    yield "tuned", lm


def leaves(results: dict, name: str) -> list[str]:
    """The scored tasks under `name`: itself, or a group's subtasks."""
    children = results.get("group_subtasks", {}).get(name) or []
    return [leaf for child in children for leaf in leaves(results, child)] if children else [name]


def scores(results: dict, name: str) -> dict:
    """{metric: value, metric_stderr: value} of one task or group, lm-eval's unfiltered ("none") numbers."""
    out = {}
    for key, value in results["results"][name].items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric] = round(float(value), 6)
    return out


def sample_row(sample: dict, multiple_choice: bool) -> dict:
    """One model's side of a scored question: the choices' log-likelihoods and the one it picks, or its responses;
    and its metrics."""
    side = {m: sample[m] for m in sample.get("metrics", []) if isinstance(sample.get(m), (int, float))}
    if multiple_choice:
        loglik = [round(float(r[0]), 4) for r in sample["filtered_resps"]]  # (loglik, is_greedy) per choice
        return {"loglik": loglik, "pred": loglik.index(max(loglik)), **side}
    return {"resps": sample["filtered_resps"], **side}


def pair_samples(task: str, base: list[dict], tuned: list[dict], multiple_choice: bool) -> list[dict]:
    """One row per question: the prompt (and choices), and both models' answers side by side."""
    tuned_by_id = {s["doc_id"]: s for s in tuned}
    rows = []
    for s in base:
        args = s["arguments"]  # (context, continuation) per choice, or (context, generation kwargs)
        rows.append(
            {
                "task": task,
                "doc_id": s["doc_id"],
                "doc": s["doc"],
                "prompt": args[0][0],
                **({"choices": [a[1] for a in args]} if multiple_choice else {}),
                "target": s["target"],
                "base": sample_row(s, multiple_choice),
                "tuned": sample_row(tuned_by_id[s["doc_id"]], multiple_choice),
            }
        )
    return rows


def task_metrics(name: str, runs: dict[str, dict], rows: list[dict], num_fewshot: int) -> dict:
    """base, tuned, delta = tuned - base, n, chance, changed answers, the noise verdict of one task, whether the
    base scores beyond chance (above_chance: else a loss could not show) and the paired difference per question."""
    base, tuned = scores(runs["base"], name), scores(runs["tuned"], name)
    n_samples = runs["base"]["n-samples"]
    n = sum(n_samples[leaf]["effective"] for leaf in leaves(runs["base"], name) if leaf in n_samples)
    mine = [r for r in rows if r["task"] in leaves(runs["base"], name)]
    chance = None  # known for multiple choice: the mean of 1/choices
    if mine and all("choices" in r for r in mine):
        chance = round(sum(1 / len(r["choices"]) for r in mine) / len(mine), 6)
    out = {
        "base": base,
        "tuned": tuned,
        "delta": {k: round(tuned[k] - v, 6) for k, v in base.items() if k in tuned and not k.endswith("_stderr")},
        "n": n,
        "num_fewshot": num_fewshot,
        "chance": chance,
        "changed": sum(r["base"].get("pred") != r["tuned"].get("pred") for r in mine if "pred" in r["base"]),
    }
    metric = "acc" if "acc" in base else next((k for k in out["delta"] if f"{k}_stderr" in base), None)
    if metric and f"{metric}_stderr" in base and f"{metric}_stderr" in tuned:
        noise = 2 * math.hypot(base[f"{metric}_stderr"], tuned[f"{metric}_stderr"])
        out["within_noise"] = abs(out["delta"][metric]) <= noise  # +-2 standard errors of the difference
        out["noise"] = round(noise, 6)
    if chance is not None and metric in base and f"{metric}_stderr" in base:
        # a model at chance cannot get worse, so only a task the base passes can show what fine-tuning cost
        out["above_chance"] = base[metric] - chance > 2 * base[f"{metric}_stderr"]
    if metric and mine and all(metric in r["base"] and metric in r["tuned"] for r in mine):
        out["paired"] = paired_difference([r["base"][metric] for r in mine], [r["tuned"][metric] for r in mine])
    return out


def run_benchmark(
    p: BenchmarkParams, base_dir: Path, adapter_dir: Path, merged_dir: Path | None = None
) -> tuple[dict, list[dict]]:
    """Run p.tasks with lm-eval on the base and the tuned model; return (metrics, samples).

    Args:
        p: the benchmark section of params.yaml.
        base_dir: models/base (model_info.json says where the weights are).
        adapter_dir: the LoRA adapter; the tuned model is the base with it folded in.
        merged_dir: a merged model (models/merged) to use as the tuned model instead (hf backend only).
    Returns:
        metrics: {"tasks": {task: {base, tuned, delta, n, num_fewshot, chance, changed, within_noise, noise,
        above_chance, paired}}, "lm_eval_version", "settings"}; samples: one row per question (see pair_samples).
    Raises:
        UserError: a broken local task file, an unknown task, data that cannot be had offline, no adapter,
        or backend vllm without vllm.
    """
    import lm_eval

    check_adapter(adapter_dir)  # the cheap checks first: a mistake is reported in seconds, not after loading
    if merged_dir and not (Path(merged_dir) / "config.json").is_file():
        raise UserError(f"{merged_dir}: no merged model here (config.json missing); run `dvc repro export` first")
    if p.backend == "vllm":
        require_vllm("benchmark.backend")
    manager = task_manager(p)
    # Local tasks never touch the network; lm-eval's own (mmlu, cmmlu, ceval-valid, gsm8k...) fetch their data from
    # the Hub where it answers, and fail at once, in one line, where it does not.
    online = not all(is_local(manager, name, p.include_path) for name in p.tasks) and hub_reachable()
    check_tasks_load(manager, p, online)
    if p.backend == "vllm":
        if merged_dir:
            log.info("backend vllm: the tuned model is the base with the adapter per request; %s unused", merged_dir)
        models = vllm_models(base_dir, adapter_dir, p.batch_size)
    else:
        models = hf_models(base_dir, adapter_dir, merged_dir, p.batch_size)
    runs = {}
    with hub_access(online):
        for name, lm in models:
            log.info("%s: %s, %d-shot, limit %s", name, ", ".join(p.tasks), p.num_fewshot, p.limit)
            runs[name] = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(p.tasks),
                num_fewshot=p.num_fewshot,
                limit=p.limit,
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=1000,  # > 0 or lm-eval reports no stderr; acc's stderr is closed-form, not bootstrapped
            )
    base_run, tuned_run = runs["base"], runs["tuned"]
    samples = [
        row
        for task in sorted(base_run["samples"])
        for row in pair_samples(
            task,
            base_run["samples"][task],
            tuned_run["samples"][task],
            multiple_choice=base_run["configs"][task].get("output_type") == "multiple_choice",
        )
    ]
    tuned = str(merged_dir) if merged_dir and p.backend == "hf" else f"{base_dir} + {adapter_dir}"
    metrics = {
        "enabled": True,
        "tasks": {name: task_metrics(name, runs, samples, p.num_fewshot) for name in p.tasks},
        "lm_eval_version": lm_eval.__version__,
        "settings": {**p.model_dump(exclude={"enabled"}), "base": str(base_dir), "tuned": tuned, "online": online},
    }
    return metrics, samples
