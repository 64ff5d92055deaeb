"""The benchmark stage's work: standard benchmarks (lm-eval tasks) on the base and the fine-tuned model, offline.

    from llmft.benchmark.run import run_benchmark
    metrics, samples = run_benchmark(p, Path("models/base"), Path("models/lora"))

Both models get the same lm-eval run (tasks, shots, limit, batch size, seeds); the tuned model is the base with the
LoRA adapter folded in, or models/merged when given. Nothing is downloaded: a task's data must be in the repo, as
for the default task, mmlu_subset (data/benchmarks/tasks/mmlu_subset.yaml on the questions in data/benchmarks/mmlu).
metrics: per task base, tuned, delta = tuned - base, n, chance, whether the delta is within noise, whether the base
scores beyond chance (above_chance: a task at chance cannot show a loss) and the paired base-vs-tuned difference.
samples: one row per scored question: the prompt, the choices, and each model's log-likelihoods and answer.
The pieces: tasks.py (task files checked, every task built first), models.py (base, then tuned), scores.py
(metrics and the paired samples), hub.py (the Hub only when a task needs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from llmft.benchmark.hub import hub_access, hub_reachable
from llmft.benchmark.models import lm_models
from llmft.benchmark.scores import paired_rows, task_metrics
from llmft.benchmark.tasks import check_tasks_load, is_local, task_manager
from llmft.common import UserError, get_logger
from llmft.infer.loading import check_adapter
from llmft.infer.vllm import require_vllm
from llmft.params import BenchmarkParams

log = get_logger("benchmark")


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
    runs = run_lm_eval(lm_models(p, base_dir, adapter_dir, merged_dir), manager, p, online)
    samples = paired_rows(runs)
    tuned = str(merged_dir) if merged_dir and p.backend == "hf" else f"{base_dir} + {adapter_dir}"
    metrics = {
        "enabled": True,
        "tasks": {name: task_metrics(name, runs, samples, p.num_fewshot) for name in p.tasks},
        "lm_eval_version": lm_eval.__version__,
        "settings": {**p.model_dump(exclude={"enabled"}), "base": str(base_dir), "tuned": tuned, "online": online},
    }
    return metrics, samples


def run_lm_eval(models: Iterator, manager, p: BenchmarkParams, online: bool) -> dict[str, dict]:
    """lm-eval's results of each (name, lm) in `models`, one run each with the same tasks, shots, limit and seeds."""
    import lm_eval

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
    return runs
