"""lm-eval tasks: the local task files checked as lm-eval reads them, the task index, and every task built (its
data and a first prompt) before any model loads, with one error line naming the task, its file and the fix."""

from __future__ import annotations

import difflib
import glob
from dataclasses import fields
from pathlib import Path

import yaml

from llmft.benchmark.hub import hub_access
from llmft.common import UserError
from llmft.params import BenchmarkParams

EXAMPLE_TASK = "data/benchmarks/tasks/mmlu_subset.yaml"  # the local task to copy: offline data, MMLU's prompt
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
STRUCTURAL_KEYS = {"tag", "group", "task_list"}  # lm-eval reads these itself; the rest must be TaskConfig fields


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
