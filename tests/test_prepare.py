"""Stage `prepare` (src/prepare.py, src/llmft/data/prepare.py): split, outputs, and the CLI on bad input.

The outputs are also read back through LLaMA-Factory's own dataset loader, so a wrong
dataset_info.json fails here and not an hour into training.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from data_builders import IDIOM_TEMPLATES, conversation, csv, jsonl, params, prompt_of, qa
from llmft.common import UserError, run_main
from llmft.data.prepare import prepare
from llmft.params import PrepareParams
from scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


PREPARE = ROOT / "src" / "prepare.py"


def repeated_prompts(n_prompts: int = 60, seed: int = 0) -> dict[str, list[str]]:
    """Each instruction+input appears 1-4 times with different outputs; some instructions differ only by input."""
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"instruction": [], "input": [], "output": []}
    for i in range(n_prompts):
        for j in range(rng.randint(1, 4)):
            rows["instruction"].append(f"问题{i // 2}")
            rows["input"].append(f"上下文{i % 2}")
            rows["output"].append(f"答案{i}-{j}")
    return rows


@pytest.mark.parametrize(("val_size", "test_size"), [(0.1, 0), (0.2, 0.2), (5, 0), (7, 3), (1, 1)])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_same_instruction_and_input_never_appear_in_two_splits(tmp_path, val_size, test_size, seed):
    splits, _, _ = prepare(params(csv(tmp_path, repeated_prompts()), val_size=val_size, test_size=test_size, seed=seed))
    prompts = {name: {prompt_of(e) for e in rows} for name, rows in splits.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    assert sorted(names) == (["test", "train", "val"] if test_size else ["train", "val"])
    assert all(splits.values())
    assert sum(len(rows) for rows in splits.values()) == len(repeated_prompts()["output"])


def test_split_sizes_follow_a_ratio_or_a_count(tmp_path):
    path = csv(tmp_path, qa(40))

    def sizes(**split):
        return {name: len(rows) for name, rows in prepare(params(path, **split))[0].items()}

    assert sizes(val_size=0.25) == {"train": 30, "val": 10}
    assert sizes(val_size=7) == {"train": 33, "val": 7}
    assert sizes(val_size=0.1, test_size=5) == {"train": 31, "val": 4, "test": 5}
    assert sizes(val_size=0.01) == {"train": 39, "val": 1}  # a ratio never rounds val away


def test_split_is_deterministic_by_seed(tmp_path):
    path = csv(tmp_path, qa(200))

    def val(seed):
        return [e["instruction"] for e in prepare(params(path, val_size=20, seed=seed))[0]["val"]]

    assert val(1) == val(1)
    assert val(1) != val(2)


def test_row_order_does_not_change_which_prompt_goes_to_which_split(tmp_path):
    rows = pd.DataFrame(repeated_prompts())
    shuffled = rows.sample(frac=1.0, random_state=3)
    assert not rows.equals(shuffled.reset_index(drop=True))
    where = []
    for name, frame in (("a.csv", rows), ("b.csv", shuffled)):
        splits, _, _ = prepare(params(csv(tmp_path, frame, name), val_size=0.2, test_size=0.1))
        where.append({name_: sorted(json.dumps(e, ensure_ascii=False) for e in ex) for name_, ex in splits.items()})
    assert where[0] == where[1]


def test_split_keeps_input_order_inside_each_split(tmp_path):
    splits, _, _ = prepare(params(csv(tmp_path, qa(30)), val_size=10))
    for rows in splits.values():
        numbers = [int(e["instruction"].removeprefix("问题")) for e in rows]
        assert numbers == sorted(numbers)


def test_sharegpt_is_split_by_first_question_not_by_a_shared_system_turn(tmp_path):
    system = {"role": "system", "content": "你是助手"}
    convs = [[system] + conversation(f"问{i % 10}", f"答{i}", "role") for i in range(30)]
    splits, _, _ = prepare(params(jsonl(tmp_path, [{"messages": c} for c in convs]), val_size=0.2))
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 24, "val": 6}
    questions = {name: {e["conversations"][1]["content"] for e in rows} for name, rows in splits.items()}
    assert len(questions["val"]) == 2 and not questions["train"] & questions["val"]


def test_split_leaving_no_training_prompt_is_a_user_error(tmp_path):
    path = csv(tmp_path, {"instruction": ["同一个问题"] * 3, "output": ["a", "b", "c"]})
    with pytest.raises(UserError, match=r"leave no training examples.*3 kept examples have only 1 distinct prompts"):
        prepare(params(path, val_size=1))


def test_val_and_test_larger_than_the_data_is_a_user_error(tmp_path):
    with pytest.raises(
        UserError, match=r"prepare\.val_size=3 and prepare\.test_size=2 leave no training examples out of 5"
    ):
        prepare(params(csv(tmp_path, qa(5)), val_size=3, test_size=2))


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, str(PREPARE), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | (env or {}),
    )


@pytest.fixture
def run_here(monkeypatch, capsys):
    """The same command through run_main in this process (no interpreter start-up): returns (exit code, stderr)."""

    def run(*args: str, cwd: Path) -> tuple[int, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = run_main(load_script("src/prepare.py").main, list(args))
        return code, capsys.readouterr().err

    return run


def pipeline(tmp_path, data: dict) -> Path:
    """A tmp project with its own params.yaml; returns its directory."""
    (tmp_path / "params.yaml").write_text(json.dumps({"prepare": data}, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def idioms_csv(tmp_path) -> Path:
    rows = {
        "word": [f"成语{i}" for i in range(30)],
        "pinyin": [f"chéng yǔ {i}" for i in range(30)],
        "explanation": [f"第{i}个成语的解释。" for i in range(30)],
    }
    rows["pinyin"][3] = ""  # one example dropped as empty_output
    return csv(tmp_path, rows, "idioms.csv")


@pytest.mark.integration
def test_pipeline_writes_readable_utf8_splits_dataset_info_and_stats(tmp_path):
    idioms_csv(tmp_path)
    proc = run_cli(
        cwd=pipeline(tmp_path, {"input": "idioms.csv", "templates": IDIOM_TEMPLATES, "val_size": 6, "test_size": 0.1})
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "processed"
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "test.json", "train.json", "val.json"]
    raw = (out / "train.json").read_bytes()
    assert "成语".encode() in raw and b"\\u" not in raw
    splits = {n: json.loads((out / f"{n}.json").read_text(encoding="utf-8")) for n in ("train", "val", "test")}
    assert {n: len(v) for n, v in splits.items()} == {"train": 47, "val": 6, "test": 6}
    assert all(set(e) == {"instruction", "input", "output"} for rows in splits.values() for e in rows)
    stats = json.loads((tmp_path / "reports" / "metrics" / "prepare.json").read_text(encoding="utf-8"))
    assert (stats["rows_in"], stats["examples_in"], stats["kept"], stats["dropped_total"]) == (30, 60, 59, 1)
    assert stats["dropped"]["empty_output"] == 1
    assert stats["splits"] == {"train": 47, "val": 6, "test": 6}
    assert stats["prompt_chars"]["max"] >= stats["prompt_chars"]["p50"] > 0
    assert not list(tmp_path.rglob("*.tmp"))


def test_rerun_gives_byte_identical_files(tmp_path, run_here):
    csv(tmp_path, repeated_prompts())
    project = pipeline(tmp_path, {"input": "d.csv", "val_size": 0.15, "test_size": 5, "seed": 7})
    outputs = [tmp_path / "data" / "processed" / f"{n}.json" for n in ("train", "val", "test", "dataset_info")]
    outputs.append(tmp_path / "reports" / "metrics" / "prepare.json")
    assert run_here(cwd=project)[0] == 0
    first = [p.read_bytes() for p in outputs]
    proc = run_cli(cwd=project, env={"PYTHONHASHSEED": "12345"})  # another process, another str hash seed
    assert proc.returncode == 0, proc.stderr
    assert [p.read_bytes() for p in outputs] == first


def test_legacy_command_writes_train_and_val_files(tmp_path, run_here):
    csv(tmp_path, qa(20))
    assert run_here("--input", "d.csv", "--output", "data/processed_data.json", "--split", cwd=tmp_path)[0] == 0
    written = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert written == ["processed_data_train.json", "processed_data_val.json"]
    train = json.loads((tmp_path / "data" / "processed_data_train.json").read_text(encoding="utf-8"))
    val = json.loads((tmp_path / "data" / "processed_data_val.json").read_text(encoding="utf-8"))
    assert (len(train), len(val)) == (18, 2)
    assert "问题".encode() in (tmp_path / "data" / "processed_data_val.json").read_bytes()


def test_legacy_command_without_split_writes_every_example_in_input_order(tmp_path, run_here):
    csv(tmp_path, qa(5))
    assert run_here("--input", "d.csv", "--output", "out.json", cwd=tmp_path)[0] == 0
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == [
        {"instruction": f"问题{i}", "input": "", "output": f"答案{i}"} for i in range(5)
    ]
    assert not (tmp_path / "data").exists()


def test_legacy_val_size_count_and_bad_value(tmp_path, run_here):
    csv(tmp_path, qa(20))
    assert run_here("--input", "d.csv", "--output", "o.json", "--split", "--val-size", "3", cwd=tmp_path)[0] == 0
    assert len(json.loads((tmp_path / "o_val.json").read_text(encoding="utf-8"))) == 3
    code, err = run_here("--input", "d.csv", "--output", "bad.json", "--split", "--val-size", "0", cwd=tmp_path)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("error: ") and "val_size = 0.0 is not allowed" in err
    assert not list(tmp_path.glob("bad*"))


@pytest.fixture(scope="module")
def llamafactory_load():
    """Load every split the way `llamafactory-cli train` does: dataset_info.json -> file -> aligned messages."""
    from llamafactory.data.loader import _load_single_dataset
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.hparams import DataArguments

    def load(dataset_dir: Path, cache: Path) -> dict[str, list[dict]]:
        names = list(json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8")))
        data_args = DataArguments(dataset_dir=str(dataset_dir))
        model_args = SimpleNamespace(cache_dir=str(cache), hf_hub_token=None)
        training_args = SimpleNamespace(local_process_index=0, dataloader_num_workers=0)
        return {
            attr.dataset_name: list(_load_single_dataset(attr, model_args, data_args, training_args))
            for attr in get_dataset_list(names, str(dataset_dir))
        }

    return load


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def test_llamafactory_loads_alpaca_output_with_system_and_history(tmp_path, llamafactory_load, run_here):
    rows = {
        "instruction": [f"问题{i}" for i in range(8)],
        "input": ["", "补充"] * 4,
        "output": [f"答案{i}" for i in range(8)],
        "system": ["你是老师"] * 8,
        "history": [json.dumps([["前问", "前答"]], ensure_ascii=False), ""] * 4,
    }
    csv(tmp_path, rows)
    assert run_here(cwd=pipeline(tmp_path, {"input": "d.csv", "val_size": 2}))[0] == 0
    out = tmp_path / "data" / "processed"
    loaded = llamafactory_load(out, tmp_path / "hf")
    assert {n: len(v) for n, v in loaded.items()} == {"train.json": 6, "val.json": 2}
    for name, aligned in loaded.items():
        ours = json.loads((out / name).read_text(encoding="utf-8"))
        for ex, got in zip(ours, aligned, strict=True):
            history = [m for q, a in ex["history"] for m in (user(q), assistant(a))]
            asked = ex["instruction"] + ("\n" + ex["input"] if ex["input"] else "")
            assert got["_prompt"] == history + [user(asked)]
            assert got["_response"] == [assistant(ex["output"])]
            assert got["_system"] == "你是老师"


@pytest.mark.parametrize("style", ["from", "role"])
def test_llamafactory_loads_sharegpt_output(tmp_path, llamafactory_load, run_here, style):
    convs = [conversation(f"问{i}", f"答{i}", style) + conversation(f"再问{i}", f"再答{i}", style) for i in range(6)]
    role, content = ("from", "value") if style == "from" else ("role", "content")
    convs[0] = [{role: "system", content: "你是助手"}] + convs[0]
    jsonl(tmp_path, [{"conversations" if style == "from" else "messages": c} for c in convs])
    assert run_here(cwd=pipeline(tmp_path, {"input": "d.jsonl", "val_size": 2}))[0] == 0
    loaded = llamafactory_load(tmp_path / "data" / "processed", tmp_path / "hf")
    aligned = [row for rows in loaded.values() for row in rows]
    assert len(aligned) == 6
    for row in aligned:
        i = row["_prompt"][0]["content"].removeprefix("问")
        assert row["_prompt"] == [user(f"问{i}"), assistant(f"答{i}"), user(f"再问{i}")]
        assert row["_response"] == [assistant(f"再答{i}")]
        assert row["_system"] == ("你是助手" if i == "0" else "")


def _binary(tmp_path):
    (tmp_path / "d.csv").write_bytes(bytes(range(256)) * 8)
    return {"input": "d.csv"}


def _unknown_format(tmp_path):
    (tmp_path / "d.dat").write_text("instruction,output\na,b\n", encoding="utf-8")
    return {"input": "d.dat"}


def _empty(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"")
    return {"input": "d.csv"}


def _unmappable(tmp_path):
    csv(tmp_path, {"标题": ["t"], "正文": ["b"]})
    return {"input": "d.csv"}


def _bad_json_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n', encoding="utf-8"
    )
    return {"input": "d.jsonl"}


def _template_missing_column(tmp_path):
    csv(tmp_path, {"word": ["马"], "explanation": ["一种动物"]})
    return {"input": "d.csv", "templates": IDIOM_TEMPLATES}


def _all_dropped(tmp_path):
    csv(tmp_path, {"instruction": ["q", "", "q3"], "output": ["", "a", "x" * 20]})
    return {"input": "d.csv", "max_output_chars": 10}


def _no_train_left(tmp_path):
    csv(tmp_path, qa(3))
    return {"input": "d.csv", "val_size": 2, "test_size": 1}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp_path: {"input": "missing.csv"}, "missing.csv: file not found; set prepare.input in params.yaml"),
        (_empty, "d.csv: file is empty"),
        (_binary, "d.csv: looks like a binary file"),
        (_unknown_format, "d.dat: unknown format (extension '.dat'); set prepare.format"),
        (_unmappable, "columns found: 标题, 正文; aliases tried: instruction <- instruction/prompt"),
        (_bad_json_line, "d.jsonl: line 2 is not valid JSON"),
        (_template_missing_column, "prepare.templates[2].output uses column {pinyin}, which is not in the table"),
        (_all_dropped, "d.csv: all 3 examples were dropped (empty_instruction=1, empty_output=1, output_too_long=1)"),
        (_no_train_left, "prepare.val_size=2 and prepare.test_size=1 leave no training examples out of 3 kept"),
    ],
    ids=[
        "missing",
        "empty",
        "binary",
        "unknown_format",
        "unmappable",
        "bad_json_line",
        "template_column",
        "all_dropped",
        "no_train_left",
    ],
)
def test_bad_input_fails_with_one_line_and_leaves_no_outputs(tmp_path, make, expected):
    project = pipeline(tmp_path, make(tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    start = time.monotonic()
    proc = run_cli(cwd=project)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no data/, reports/ or *.tmp left behind
    assert time.monotonic() - start < 10


def test_failed_run_leaves_the_previous_outputs_untouched(tmp_path, run_here):
    csv(tmp_path, qa(10))
    assert run_here(cwd=pipeline(tmp_path, {"input": "d.csv", "val_size": 2}))[0] == 0
    out = [*sorted((tmp_path / "data" / "processed").iterdir()), tmp_path / "reports" / "metrics" / "prepare.json"]
    before = {p: p.read_bytes() for p in out}
    pipeline(tmp_path, {"input": "d.csv", "val_size": 2, "templates": [{"instruction": "{nope}", "output": "x"}]})
    code, err = run_here(cwd=tmp_path)
    assert code == 2 and "{nope}" in err
    assert {p: p.read_bytes() for p in out} == before
    assert sorted((tmp_path / "data" / "processed").iterdir()) == out[:-1]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.integration
def test_bad_params_file_fails_before_reading_data(tmp_path):
    csv(tmp_path, qa(10))
    (tmp_path / "params.yaml").write_text("prepare:\n  input: d.csv\n  val_size: 1.5\n", encoding="utf-8")
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: prepare.val_size = 1.5 is not allowed: a split ratio must be between 0 and 1 (exclusive), "
        "or an integer count >= 1; got 1.5"
    ]
    assert not (tmp_path / "data").exists()


# ---------- several tables: prepare.sources ----------

IDENTITY = [
    {"instruction": "你是谁？", "input": "", "output": "我是 {{name}}，由 {{author}} 开发的助手。"},
    {"instruction": "Who are you?", "input": "", "output": "I am {{ name }}, made by {{author}}."},
    {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}."},
] + [{"instruction": f"问题{i}", "input": "", "output": f"我是 {{{{name}}}}，第{i}个回答。"} for i in range(27)]


def two_sources(tmp_path, **identity) -> dict:
    idioms = idioms_csv(tmp_path)
    (tmp_path / "identity.json").write_text(json.dumps(IDENTITY, ensure_ascii=False), encoding="utf-8")
    return {
        "sources": [
            {"path": str(idioms), "templates": IDIOM_TEMPLATES, "max_rows": 20},
            {"path": str(tmp_path / "identity.json"), "name": "me"} | identity,
        ],
        "variables": {"name": "Lumi", "author": "Acme"},
        "val_size": 10,
    }


def test_sources_are_read_counted_and_mixed_with_variables_filled(tmp_path):
    splits, info, stats = prepare(PrepareParams(**two_sources(tmp_path)))
    idioms, me = stats["sources"]["idioms"], stats["sources"]["me"]
    # 30 rows, max_rows 20: 10 rows x 2 templates counted as over_max_rows; one empty pinyin in the first 20
    assert (idioms["rows_in"], idioms["examples_in"], idioms["kept"]) == (30, 60, 39)
    assert idioms["dropped"]["over_max_rows"] == 20 and idioms["dropped"]["empty_output"] == 1
    assert (me["rows_in"], me["kept"], me["dropped_total"]) == (30, 30, 0)
    for src in (idioms, me, stats):  # nothing lost, per source and in all
        assert src["examples_in"] == src["kept"] + src["dropped_total"]
    assert stats["kept"] == 69 and sum(stats["splits"].values()) == 69
    assert {name: sum(s["splits"][name] for s in (idioms, me)) for name in ("train", "val")} == stats["splits"]
    everything = [ex for rows in splits.values() for ex in rows]
    answers = [ex["output"] for ex in everything]
    assert "我是 Lumi，由 Acme 开发的助手。" in answers and "I am Lumi, made by Acme." in answers
    assert not any("{{" in a for a in answers)
    first = [
        ex["instruction"].startswith("问题") or ex["instruction"] in ("你是谁？", "Who are you?", "hi")
        for ex in splits["train"][:20]
    ]
    assert 0 < sum(first) < 20  # interleaved, not one table after the other: max_samples takes from both
    assert info["train"]["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}


def test_mixing_is_deterministic_and_depends_on_the_seed(tmp_path):
    data = two_sources(tmp_path)
    a, _, _ = prepare(PrepareParams(**data))
    b, _, _ = prepare(PrepareParams(**data))
    c, _, _ = prepare(PrepareParams(**data | {"seed": 7}))
    assert a == b and a["train"] != c["train"]


def test_a_source_variable_wins_and_a_missing_one_names_the_key(tmp_path):
    splits, _, _ = prepare(PrepareParams(**two_sources(tmp_path, variables={"name": "Orion"})))
    answers = [ex["output"] for rows in splits.values() for ex in rows]
    assert "Hello! I am Orion." in answers and "我是 Orion，由 Acme 开发的助手。" in answers
    data = two_sources(tmp_path)
    data["variables"] = {"name": "Lumi"}
    with pytest.raises(
        UserError,
        match=r"identity.json: \{\{author\}\} has no value; set prepare.variables: "
        r"\{author: \.\.\.\} \(or prepare.sources\[2\].variables",
    ):
        prepare(PrepareParams(**data))


def test_a_duplicate_across_sources_is_dropped_in_the_later_one(tmp_path):
    data = two_sources(tmp_path)
    (tmp_path / "again.json").write_text(json.dumps(IDENTITY[:5], ensure_ascii=False), encoding="utf-8")
    data["sources"].append({"path": str(tmp_path / "again.json")})
    _, _, stats = prepare(PrepareParams(**data))
    again = stats["sources"]["again"]
    assert (again["examples_in"], again["kept"], again["dropped"]["duplicate"]) == (5, 0, 5)


def test_single_input_form_and_sources_form_give_the_same_files(tmp_path):
    csv_path = idioms_csv(tmp_path)
    single = prepare(PrepareParams(input=str(csv_path), templates=IDIOM_TEMPLATES, val_size=5))
    listed = prepare(PrepareParams(sources=[{"path": str(csv_path), "templates": IDIOM_TEMPLATES}], val_size=5))
    assert single[0] == listed[0] and single[1] == listed[1]


def test_bad_sources_are_one_line_errors(tmp_path):
    data = two_sources(tmp_path)
    with pytest.raises(UserError, match=r"prepare.sources\[1\].templates\[1\].output uses column \{nope\}"):
        bad = json.loads(json.dumps(data))
        bad["sources"][0]["templates"] = [{"instruction": "{word}", "output": "{nope}"}]
        prepare(PrepareParams(**bad))
    with pytest.raises(Exception, match="exactly one of them"):
        PrepareParams(input="x.csv", **data)


def test_a_table_outside_the_stage_deps_is_named(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages:\n  prepare:\n    deps: [data/raw, src/prepare.py]\n")
    inside, outside = str(tmp_path / "data/raw/a.csv"), str(tmp_path / "elsewhere/b.csv")
    from llmft.data.prepare import outside_deps

    assert outside_deps([inside, outside], tmp_path / "dvc.yaml") == [outside]
    assert outside_deps([outside], tmp_path / "missing.yaml") == []  # no pipeline here: nothing to check
