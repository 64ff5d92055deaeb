"""Stage `benchmark` (src/benchmark.py, src/llmft/benchmark/): lm-eval on the shipped MMLU and HellaSwag subsets,
offline."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from llmft.benchmark.hub import hub_reachable
from llmft.benchmark.run import run_benchmark
from llmft.benchmark.scores import pair_samples, task_metrics
from llmft.benchmark.tasks import check_task_file, check_tasks_load, is_local, task_manager
from llmft.common import UserError
from llmft.params import BenchmarkParams
from llmft.stats import paired_difference
from scripts import ROOT

MMLU = ROOT / "data/benchmarks/mmlu"
HELLASWAG = ROOT / "data/benchmarks/hellaswag"
TASKS = ROOT / "data/benchmarks/tasks"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_params(path: Path, **section) -> Path:
    params = {"prepare": {"input": "unused.csv"}, "benchmark": section}
    path.write_text(json.dumps(params), encoding="utf-8")  # JSON is YAML
    return path


def bench_argv(params: Path, base: Path, adapter: Path, out: Path) -> list[str]:
    """The stage's arguments, as dvc.yaml passes them, outputs under `out`."""
    return ["--params", str(params), "--base", str(base), "--adapter", str(adapter),
            "--metrics", str(out / "benchmark.json"), "--samples", str(out / "samples.jsonl"),
            "--env", str(out / "env.json")]  # fmt: skip


def fake_adapter(path: Path) -> Path:
    """Enough of an adapter for the checks that run before any model loads."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text('{"r": 8}')
    return path


def local_task(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def test_shipped_subset_is_three_questions_per_subject_in_mmlu_layout():
    test, dev = read_jsonl(MMLU / "test.jsonl"), read_jsonl(MMLU / "dev.jsonl")
    assert len(test) == 171 and set(Counter(r["subject"] for r in test).values()) == {3}
    assert len({r["subject"] for r in test[:57]}) == 57  # round by round: benchmark.limit: 57 is one per subject
    for row in test + dev:
        assert set(row) == {"question", "subject", "choices", "answer", "split"}
        assert len(row["choices"]) == 4 and row["answer"] in range(4) and row["question"].strip()
    assert {r["split"] for r in test} == {"test"} and {r["split"] for r in dev} == {"dev"}
    assert max(Counter(r["subject"] for r in dev).values()) <= 5
    assert not {(r["subject"], r["question"]) for r in test} & {(r["subject"], r["question"]) for r in dev}


def test_shipped_hellaswag_subset_is_400_short_questions_with_4_endings():
    test, dev = read_jsonl(HELLASWAG / "test.jsonl"), read_jsonl(HELLASWAG / "dev.jsonl")
    assert len(test) == 400 and len(dev) == 10
    for row in test + dev:
        assert set(row) == {"query", "endings", "label", "split"}
        assert len(row["endings"]) == 4 and row["label"] in range(4) and row["query"].strip()
        assert len(row["query"]) + sum(map(len, row["endings"])) <= 400  # build_subset.py --max-chars
    assert {r["split"] for r in test} == {"test"} and {r["split"] for r in dev} == {"dev"}
    assert not {r["query"] for r in test} & {r["query"] for r in dev}
    assert 0.15 < Counter(r["label"] for r in test)[0] / len(test) < 0.35  # gold endings spread over 0-3


@pytest.mark.parametrize("name", ["mmlu_subset", "hellaswag_subset"])
def test_shipped_task_file_passes_the_checks(name):
    check_task_file(TASKS / f"{name}.yaml")


def test_hellaswag_subset_loads_offline_in_cloze_form(monkeypatch):
    monkeypatch.chdir(ROOT)
    p = BenchmarkParams(tasks=["hellaswag_subset"], num_fewshot=2)
    manager = task_manager(p)
    check_tasks_load(manager, p, online=False)
    task = manager.load(["hellaswag_subset"])["tasks"]["hellaswag_subset"]
    doc, first = task.eval_docs[0], read_jsonl(HELLASWAG / "test.jsonl")[0]
    assert len(task.eval_docs) == 400 and doc["query"] == first["query"]
    assert task.doc_to_choice(doc) == first["endings"] and task.doc_to_target(doc) == first["label"]
    prompt = task.fewshot_context(doc=doc, num_fewshot=2)
    assert prompt.endswith(first["query"]) and prompt.count("\n\n") == 2  # 2 examples, then the question


def test_missing_task_data_is_one_line_naming_the_task_and_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (TASKS / "hellaswag_subset.yaml").read_text(encoding="utf-8").replace("hellaswag/test", "gone/test")
    folder = local_task(tmp_path / "tasks", "hellaswag_subset", text)
    p = BenchmarkParams(tasks=["hellaswag_subset"], include_path=str(folder))
    with pytest.raises(UserError) as err:
        check_tasks_load(task_manager(p), p, online=False)
    message = str(err.value)
    assert "'hellaswag_subset'" in message and "data file data/benchmarks/gone/test.jsonl is missing" in message
    assert "\n" not in message


HEAD = "task: t\ndataset_path: json\ntest_split: test\n"  # a task's first lines; each case breaks what follows


@pytest.mark.parametrize(
    "text, message",
    [
        ("task: t\ndataset_path: json\n  doc_to_text: [oops\n", "not valid YAML"),
        ("- just\n- a list\n", "cannot be read as an lm-eval task"),
        ("dataset_path: json\n", "no `task:` name"),
        (HEAD + "doc_to_txt: q\ndoc_to_target: a\n", "did you mean 'doc_to_text'"),
        ("task: t\noutput_type: multiple_choice\ntest_split: test\ndoc_to_text: q\n", "missing dataset_path, doc_to"),
        (HEAD + "output_type: mc\ndoc_to_text: q\ndoc_to_target: a\n", "output_type 'mc' is not one of"),
    ],
)
def test_broken_local_task_file_is_named_with_the_fix(tmp_path, text, message):
    path = local_task(tmp_path, "broken", text) / "broken.yaml"
    with pytest.raises(UserError, match="broken.yaml") as err:
        check_task_file(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hub_dataset_fails_at_once_offline_and_says_how_to_ship_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    folder = local_task(
        tmp_path / "tasks",
        "hub_task",
        "task: hub_task\ndataset_path: cais/mmlu\ndataset_name: anatomy\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: answer\ndoc_to_choice: [A, B, C, D]\n",
    )
    p = BenchmarkParams(tasks=["hub_task"], include_path=str(folder))
    with pytest.raises(UserError, match="data could not be loaded offline") as err:
        check_tasks_load(task_manager(p), p, online=False)
    assert "hub_task" in str(err.value) and "dataset_path: json" in str(err.value)


def test_shipped_task_outside_the_repo_root_says_to_run_from_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = BenchmarkParams(include_path=str(TASKS))
    with pytest.raises(UserError, match="test.jsonl.*run from the repo root"):
        check_tasks_load(task_manager(p), p, online=False)


def test_more_shots_than_the_pool_holds_is_one_error(monkeypatch):
    monkeypatch.chdir(ROOT)
    p = BenchmarkParams(num_fewshot=6, tasks=["mmlu_subset"])
    with pytest.raises(UserError, match="cannot build a 6-shot prompt.*only 5 dev questions"):
        check_tasks_load(task_manager(p), p, online=False)


def test_few_shot_examples_come_from_the_same_subject(monkeypatch):
    monkeypatch.chdir(ROOT)
    p = BenchmarkParams(num_fewshot=2)
    task = task_manager(p).load(["mmlu_subset"])["tasks"]["mmlu_subset"]
    doc = task.eval_docs[1]
    prompt = task.fewshot_context(doc=doc, num_fewshot=2)
    dev = [r for r in read_jsonl(MMLU / "dev.jsonl") if r["subject"] == doc["subject"]]
    assert prompt.startswith(
        f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}."
    )
    assert dev[0]["question"].strip() in prompt and dev[1]["question"].strip() in prompt
    assert prompt.endswith(f"{doc['question'].strip()}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}"
                           f"\nC. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")  # fmt: skip


def test_vllm_backend_without_vllm_is_one_error(tmp_path):
    if importlib.util.find_spec("vllm"):
        pytest.skip("vllm is installed here")
    p = BenchmarkParams(backend="vllm")
    with pytest.raises(UserError, match="vllm is not installed"):
        run_benchmark(p, tmp_path / "base", fake_adapter(tmp_path / "lora"))


def test_delta_is_tuned_minus_base_and_noise_is_two_standard_errors():
    def run(acc, stderr, preds):
        samples = [
            {"doc_id": i, "doc": {}, "arguments": [["q", f" {c}"] for c in "ABCD"], "target": 0,
             "filtered_resps": [[0.0 if j == pred else -1.0, False] for j in range(4)], "metrics": ["acc"],
             "acc": float(pred == 0)}
            for i, pred in enumerate(preds)
        ]  # fmt: skip
        return {
            "results": {"t": {"acc,none": acc, "acc_stderr,none": stderr, "alias": "t"}},
            "n-samples": {"t": {"original": 10, "effective": len(preds)}},
            "group_subtasks": {"t": []},
            "samples": {"t": samples},
        }

    runs = {"base": run(0.25, 0.1, [0, 1, 2, 3]), "tuned": run(0.75, 0.1, [0, 0, 0, 3])}
    rows = pair_samples("t", runs["base"]["samples"]["t"], runs["tuned"]["samples"]["t"], True)
    m = task_metrics("t", runs, rows, num_fewshot=0)
    assert m["delta"] == {"acc": 0.5} and m["n"] == 4 and m["chance"] == 0.25 and m["changed"] == 2
    assert m["noise"] == pytest.approx(2 * 0.1 * 2**0.5, abs=1e-6) and m["within_noise"] is False
    assert rows[1]["base"] == {"loglik": [-1.0, 0.0, -1.0, -1.0], "pred": 1, "acc": 0.0}
    assert m["above_chance"] is False  # 0.25 is chance itself
    assert m["paired"] == paired_difference([1, 0, 0, 0], [1, 1, 1, 0])  # each question's acc, in doc order
    assert m["paired"]["diff"] == 0.5 and m["paired"]["beyond_noise"] is False  # 3 changed: too few to tell

    for acc, verdict in [(0.44, False), (0.46, True)]:  # beyond chance by more than 2 standard errors (0.2)
        runs = {"base": run(acc, 0.1, [0, 1, 2, 3]), "tuned": run(acc, 0.1, [0, 1, 2, 3])}
        m = task_metrics("t", runs, rows, num_fewshot=0)
        assert m["above_chance"] is verdict


def test_chance_follows_the_number_of_choices():
    def run(n_choices):
        sample = {"doc_id": 0, "doc": {}, "arguments": [["q", f" {c}"] for c in "ABCDE"[:n_choices]], "target": 0,
                  "filtered_resps": [[-1.0, False]] * n_choices, "metrics": ["acc"], "acc": 1.0}  # fmt: skip
        return {"results": {"t": {"acc,none": 1.0, "acc_stderr,none": 0.0}}, "n-samples": {"t": {"effective": 1}},
                "samples": {"t": [sample]}}  # fmt: skip

    for n_choices, chance in [(2, 0.5), (5, 0.2)]:
        runs = {"base": run(n_choices), "tuned": run(n_choices)}
        rows = pair_samples("t", runs["base"]["samples"]["t"], runs["tuned"]["samples"]["t"], True)
        m = task_metrics("t", runs, rows, num_fewshot=0)
        assert m["chance"] == chance and m["above_chance"] is True and m["paired"]["diff"] == 0.0


def test_disabled_writes_enabled_false_and_loads_nothing(tmp_path, stage):
    params = write_params(tmp_path / "params.yaml", enabled=False)
    out = tmp_path / "out"
    assert stage("benchmark").main(bench_argv(params, tmp_path / "no_base", tmp_path / "no_lora", out)) == 0
    assert json.loads((out / "benchmark.json").read_text()) == {"enabled": False}
    assert (out / "samples.jsonl").read_text() == ""


@pytest.mark.slow
def test_stage_scores_base_and_tuned_on_the_shipped_subset(tiny_model_dir, adapter_dir, tmp_path, stage, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files are relative to the repo root, as when dvc runs the stage
    params = write_params(tmp_path / "params.yaml", limit=8, batch_size=4, tasks=["mmlu_subset"])
    out = tmp_path / "out"
    assert stage("benchmark").main(bench_argv(params, tiny_model_dir, adapter_dir, out)) == 0
    metrics = json.loads((out / "benchmark.json").read_text())
    m = metrics["tasks"]["mmlu_subset"]
    assert metrics["enabled"] is True and metrics["lm_eval_version"] == "0.4.13"
    assert metrics["settings"]["limit"] == 8 and metrics["settings"]["tasks"] == ["mmlu_subset"]
    assert m["n"] == 8 and m["num_fewshot"] == 0 and m["chance"] == 0.25
    assert set(m["base"]) == set(m["tuned"]) == {"acc", "acc_stderr"}
    assert m["delta"]["acc"] == pytest.approx(m["tuned"]["acc"] - m["base"]["acc"])
    assert isinstance(m["within_noise"], bool)
    rows = read_jsonl(out / "samples.jsonl")
    assert len(rows) == 8 and [r["doc_id"] for r in rows] == list(range(8))
    assert rows[0]["choices"] == [" A", " B", " C", " D"] and rows[0]["prompt"].endswith("Answer:")
    assert sum(r["base"]["acc"] for r in rows) / 8 == pytest.approx(m["base"]["acc"])
    assert rows[0]["base"]["loglik"] != rows[0]["tuned"]["loglik"]  # the adapter was applied
    assert m["changed"] == sum(r["base"]["pred"] != r["tuned"]["pred"] for r in rows)
    assert isinstance(m["above_chance"], bool)
    assert m["paired"]["n"] == 8 and m["paired"]["base"] == pytest.approx(m["base"]["acc"])
    assert m["paired"]["diff"] == pytest.approx(m["delta"]["acc"])


@pytest.mark.slow
def test_stage_scores_the_hellaswag_subset_in_cloze_form(tiny_model_dir, adapter_dir, tmp_path, stage, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = write_params(tmp_path / "params.yaml", tasks=["hellaswag_subset"], limit=3, batch_size=4)
    out = tmp_path / "out"
    assert stage("benchmark").main(bench_argv(params, tiny_model_dir, adapter_dir, out)) == 0
    m = json.loads((out / "benchmark.json").read_text())["tasks"]["hellaswag_subset"]
    assert m["n"] == 3 and m["chance"] == 0.25
    assert set(m["base"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert isinstance(m["above_chance"], bool) and m["paired"]["n"] == 3
    rows = read_jsonl(out / "samples.jsonl")
    first = read_jsonl(HELLASWAG / "test.jsonl")[0]
    assert rows[0]["prompt"] == first["query"] and rows[0]["choices"] == [" " + e for e in first["endings"]]


def run_cli(tmp_path: Path, **section) -> subprocess.CompletedProcess:
    """The stage as DVC runs it, from the repo root; it must fail with one `error:` line and write nothing."""
    out = tmp_path / "out"
    params = write_params(tmp_path / "p.yaml", **section)
    argv = [
        sys.executable,
        str(ROOT / "src/benchmark.py"),
        *bench_argv(params, tmp_path / "base", tmp_path / "lora", out),
    ]
    fake_adapter(tmp_path / "lora")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists()
    return result


@pytest.mark.integration
def test_broken_local_task_file_stops_the_stage_with_one_line(tmp_path):
    folder = local_task(tmp_path / "tasks", "mine", "task: mine\ndataset_path: json\n  doc_to_text: [oops\n")
    result = run_cli(tmp_path, include_path=str(folder))
    assert f"{folder}/mine.yaml: not valid YAML" in result.stderr.splitlines()[-1]


@pytest.mark.integration
@pytest.mark.slow  # indexes lm-eval's ~15,000 built-in tasks to find close names
def test_unknown_task_is_one_line_with_close_names(tmp_path):
    result = run_cli(tmp_path, tasks=["mmlu_subest"])
    last = result.stderr.splitlines()[-1]
    assert "unknown lm-eval task 'mmlu_subest'" in last and "mmlu_subset" in last and "data/benchmarks/tasks" in last


def test_the_hub_is_asked_only_for_tasks_that_need_it_and_never_when_the_user_says_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False  # the user's word, without a connection attempt
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.chdir(ROOT)
    manager = task_manager(BenchmarkParams())
    assert is_local(manager, "mmlu_subset", "data/benchmarks/tasks")  # shipped: no network needed
