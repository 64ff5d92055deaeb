"""Stage `prepare`: column mapping, cleaning, split, outputs, and the CLI on bad input.

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

from common import UserError, run_main
from mapping import DROP_REASONS, build_examples
from params import DataParams
from prepare_data import main, prepare
from tables import read_table

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "src" / "prepare_data.py"
IDIOM_TEMPLATES = [
    {"instruction": "解释成语「{word}」的意思。", "output": "{explanation}"},
    {"instruction": "成语「{word}」怎么读？请给出拼音。", "output": "{pinyin}"},
]


def params(path, **data) -> DataParams:
    return DataParams(input=str(path), **data)


def csv(tmp_path, frame: dict | pd.DataFrame, name: str = "d.csv") -> Path:
    pd.DataFrame(frame).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def jsonl(tmp_path, records: list[dict], name: str = "d.jsonl") -> Path:
    (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return tmp_path / name


def build(path, **data):
    return build_examples(read_table(path).columns, params(path, **data))


def qa(n: int, prefix: str = "问题") -> dict[str, list[str]]:
    return {"instruction": [f"{prefix}{i}" for i in range(n)], "output": [f"答案{i}" for i in range(n)]}


def conversation(question: str, answer: str, style: str = "from") -> list[dict]:
    if style == "from":
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def prompt_of(example: dict) -> tuple[str, str]:
    return example["instruction"], example["input"]


# --- mapping --------------------------------------------------------------------------------------------------


def test_direct_columns_map_to_alpaca(tmp_path):
    built = build(csv(tmp_path, {"instruction": ["你好"], "input": ["上下文"], "output": ["您好"]}))
    assert built.kind == "alpaca"
    assert built.examples == [{"instruction": "你好", "input": "上下文", "output": "您好"}]


@pytest.mark.parametrize(("prompt", "context", "answer"), [
    ("prompt", "context", "response"),
    ("question", "context", "answer"),
    ("query", "context", "completion"),
    ("Prompt", "Context", "Target"),
    ("问题", "上下文", "答案"),
])
def test_alias_columns_map_to_instruction_input_output(tmp_path, prompt, context, answer):
    built = build(csv(tmp_path, {prompt: ["q"], context: ["c"], answer: ["a"], "other": ["x"]}))
    assert built.examples == [{"instruction": "q", "input": "c", "output": "a"}]


def test_explicit_columns_win_over_aliases(tmp_path):
    path = csv(tmp_path, {"问": ["q"], "答": ["a"], "question": ["wrong"], "answer": ["wrong"]})
    built = build(path, columns={"instruction": "问", "output": "答"})
    assert built.examples == [{"instruction": "q", "input": "", "output": "a"}]


def test_a_column_named_in_params_is_not_taken_again_by_an_alias(tmp_path):
    path = csv(tmp_path, {"question": ["the answer"], "query": ["the question"]})
    built = build(path, columns={"output": "question"})
    assert built.examples == [{"instruction": "the question", "input": "", "output": "the answer"}]


def test_explicit_column_missing_from_the_table_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data\.columns\.output names column '答案列'.*found: instruction, output"):
        build(csv(tmp_path, qa(1)), columns={"output": "答案列"})


def test_unmappable_columns_error_lists_columns_found_and_aliases_tried(tmp_path):
    with pytest.raises(UserError) as err:
        build(csv(tmp_path, {"title": ["t"], "body": ["b"]}))
    msg = str(err.value)
    assert "columns found: title, body" in msg
    assert "instruction <- instruction/prompt/question/query" in msg
    assert "output <- output/response/answer/completion/target" in msg
    assert "set data.columns" in msg


def test_templates_build_one_example_per_template_per_row(tmp_path):
    path = csv(tmp_path, {"word": ["画蛇添足", "守株待兔"], "pinyin": ["huà shé tiān zú", "shǒu zhū dài tù"],
                          "explanation": ["比喻多此一举。", "比喻死守经验。"], "example": ["", ""]})
    built = build(path, templates=IDIOM_TEMPLATES)
    assert built.examples_in == 4
    assert built.examples == [
        {"instruction": "解释成语「画蛇添足」的意思。", "input": "", "output": "比喻多此一举。"},
        {"instruction": "成语「画蛇添足」怎么读？请给出拼音。", "input": "", "output": "huà shé tiān zú"},
        {"instruction": "解释成语「守株待兔」的意思。", "input": "", "output": "比喻死守经验。"},
        {"instruction": "成语「守株待兔」怎么读？请给出拼音。", "input": "", "output": "shǒu zhū dài tù"},
    ]


def test_templates_may_combine_columns_and_fill_input_and_system(tmp_path):
    path = csv(tmp_path, {"a": ["1"], "b": ["2"], "role": ["老师"]})
    template = {"instruction": "{a} 加 {b}", "input": "用中文", "output": "{a}+{b}", "system": "你是{role}"}
    built = build(path, templates=[template])
    assert built.examples == [{"instruction": "1 加 2", "input": "用中文", "output": "1+2", "system": "你是老师"}]
    assert built.fields == {"system"}


def test_template_whose_columns_are_all_empty_gives_an_empty_field(tmp_path):
    path = csv(tmp_path, {"word": ["", "马"], "explanation": ["没有成语的解释", ""]})
    built = build(path, templates=[{"instruction": "解释成语「{word}」的意思。", "output": "{explanation}"}])
    assert built.examples == []
    assert built.dropped == {"empty_instruction": 1, "empty_output": 1}


def test_template_naming_a_missing_column_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data\.templates\[2\]\.output uses column \{pinyin\}.*: word, explanation"):
        build(csv(tmp_path, {"word": ["w"], "explanation": ["e"]}), templates=IDIOM_TEMPLATES)


def test_template_with_an_unbalanced_brace_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data\.templates\[1\]\.instruction: bad template"):
        build(csv(tmp_path, {"word": ["w"]}), templates=[{"instruction": "解释{word", "output": "{word}"}])


def test_system_and_history_columns_pass_through(tmp_path):
    path = csv(tmp_path, {"instruction": ["q2", "q1", "q3"], "output": ["a2", "a1", "a3"], "system": ["s", "", "s"],
                          "history": ['[["q1", "a1"]]', "", "not json"]})
    built = build(path)
    assert built.fields == {"system", "history"}
    assert built.examples == [
        {"instruction": "q2", "input": "", "output": "a2", "system": "s", "history": [["q1", "a1"]]},
        {"instruction": "q1", "input": "", "output": "a1", "system": "", "history": []},
    ]
    assert built.dropped == {"bad_history": 1}


def test_sharegpt_jsonl_passes_through_with_from_value_tags(tmp_path):
    convs = [conversation("你好", "您好"), conversation("一加一", "二") + conversation("再加一", "三")]
    built = build(jsonl(tmp_path, [{"conversations": c} for c in convs]))
    assert built.kind == "sharegpt"
    assert built.examples == [{"conversations": c} for c in convs]
    assert (built.tags["role_tag"], built.tags["user_tag"], built.tags["assistant_tag"]) == ("from", "human", "gpt")


def test_sharegpt_messages_as_json_text_in_csv_cells_pass_through(tmp_path):
    convs = [conversation("你好", "您好", "role"), conversation("谢谢", "不客气", "role")]
    path = csv(tmp_path, {"messages": [json.dumps(c, ensure_ascii=False) for c in convs], "system": ["你是助手", ""]})
    built = build(path)
    assert built.kind == "sharegpt"
    assert built.examples == [{"conversations": convs[0], "system": "你是助手"},
                              {"conversations": convs[1], "system": ""}]
    assert (built.tags["role_tag"], built.tags["content_tag"], built.tags["user_tag"]) == ("role", "content", "user")
    assert built.fields == {"system"}


def test_sharegpt_parquet_list_column_passes_through(tmp_path):
    convs = [conversation("你好", "您好"), conversation("谢谢", "不客气")]
    pd.DataFrame({"conversations": convs}).to_parquet(tmp_path / "d.parquet")
    built = build(tmp_path / "d.parquet")
    assert built.examples == [{"conversations": c} for c in convs]


def test_explicit_messages_column_selects_sharegpt_even_beside_qa_columns(tmp_path):
    path = jsonl(tmp_path, [{"dialog": conversation("q", "a"), "question": "x", "answer": "y"}])
    assert build(path).kind == "alpaca"
    built = build(path, columns={"messages": "dialog"})
    assert built.kind == "sharegpt"
    assert built.examples == [{"conversations": conversation("q", "a")}]


def test_bad_conversations_are_counted_by_reason(tmp_path):
    good = conversation("q", "a")
    rows = [
        good,
        "not json",
        "5",  # a JSON scalar in a CSV cell
        json.dumps({"from": "human", "value": "q"}),  # an object, not a list
        [],
        [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],  # unknown role
        good + [{"from": "human", "value": "and then?"}],  # ends on the user: no answer to learn
        [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],  # answer first
        conversation("q2", "a", style="role"),  # other tag style than the first conversation
        [{"from": "human", "value": "q3", "extra": 1}, {"value": "a"}],  # turn without a role
        conversation("q4", ""),
        conversation(" ", "a"),
        [{"from": "system", "value": "s"}] + conversation("q5", "a5"),
    ]
    path = csv(tmp_path, {"conversations": [r if isinstance(r, str) else json.dumps(r) for r in rows]})
    built = build(path)
    assert built.examples == [{"conversations": good}, {"conversations": rows[-1]}]
    assert built.dropped == {"bad_conversation": 9, "empty_output": 1, "empty_instruction": 1}


@pytest.mark.parametrize("encoding", ["auto", "gbk"])
def test_gbk_csv_from_excel_goes_through_templates(tmp_path, encoding):
    text = "word,pinyin,explanation\n画蛇添足,huà shé tiān zú,比喻多此一举。\n守株待兔,shǒu zhū dài tù,比喻死守经验。\n"
    (tmp_path / "idioms.csv").write_bytes(text.replace("\n", "\r\n").encode("gbk"))
    p = params(tmp_path / "idioms.csv", encoding=encoding, templates=IDIOM_TEMPLATES, val_size=1)
    splits, _, stats = prepare(p)
    examples = [e for rows in splits.values() for e in rows]
    assert {e["output"] for e in examples} == {"huà shé tiān zú", "比喻多此一举。", "shǒu zhū dài tù", "比喻死守经验。"}
    assert "解释成语「守株待兔」的意思。" in {e["instruction"] for e in examples}
    assert stats["kept"] == 4


def test_sharegpt_tags_come_from_the_first_conversation_kept(tmp_path):
    rows = [[{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], conversation("q", "a")]
    built = build(jsonl(tmp_path, [{"conversations": c} for c in rows]))
    assert built.examples == [{"conversations": rows[1]}]
    assert built.tags["role_tag"] == "from" and built.dropped == {"bad_conversation": 1}


def test_whitespace_is_trimmed(tmp_path):
    built = build(jsonl(tmp_path, [{"instruction": "  你好\n", "input": "\t", "output": " 您好 ", "system": " s "}]))
    assert built.examples == [{"instruction": "你好", "input": "", "output": "您好", "system": "s"}]


def test_rows_with_empty_instruction_or_output_are_dropped_and_counted(tmp_path):
    path = jsonl(tmp_path, [{"instruction": "q", "output": "a"}, {"instruction": "  ", "output": "a"},
                            {"instruction": "q2", "output": ""}, {"instruction": "q3"}, {"output": "a"},
                            {"instruction": "q4", "output": None}])
    built = build(path)
    assert built.examples == [{"instruction": "q", "input": "", "output": "a"}]
    assert built.dropped == {"empty_instruction": 2, "empty_output": 3}


def test_exact_duplicates_are_dropped_but_same_prompt_with_other_output_is_kept(tmp_path):
    path = csv(tmp_path, {"instruction": ["q", "q ", "q", "q"], "output": ["a", "a", "b", "a"]})
    built = build(path)
    assert [e["output"] for e in built.examples] == ["a", "b"]
    assert built.dropped == {"duplicate": 2}
    assert len(build(path, dedup=False).examples) == 4


def test_length_limits_drop_and_count(tmp_path):
    path = csv(tmp_path, {"instruction": ["短", "这个问题太长了", "问", "问题"], "input": ["", "", "", "上下文"],
                          "output": ["答", "答", "这个答案太长了", "答"]})
    built = build(path, max_prompt_chars=4, max_output_chars=5)
    assert [e["instruction"] for e in built.examples] == ["短"]
    assert built.dropped == {"prompt_too_long": 2, "output_too_long": 1}
    assert built.prompt_chars == [1] and built.output_chars == [1]


def test_every_example_is_kept_or_counted_in_the_stats(tmp_path):
    rows = {"instruction": ["q1", "", "q2", "q2", "q3", "q4" * 50, "q5", "q6", "q7", "q1"],
            "output": ["a1", "a", "", "x", "x", "a", "a" * 90, "a6", "a7", "a1"]}
    _, _, stats = prepare(params(csv(tmp_path, rows), val_size=1, max_prompt_chars=40, max_output_chars=50))
    assert stats["rows_in"] == stats["examples_in"] == 10
    assert stats["examples_in"] == stats["kept"] + sum(stats["dropped"].values())
    assert stats["dropped"] == {r: 0 for r in DROP_REASONS} | {
        "empty_instruction": 1, "empty_output": 1, "prompt_too_long": 1, "output_too_long": 1, "duplicate": 1}
    assert stats["dropped_total"] == 5 and stats["kept"] == 5
    assert sum(stats["splits"].values()) == stats["kept"]


# --- split ----------------------------------------------------------------------------------------------------


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
        for b in names[i + 1:]:
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
    with pytest.raises(UserError, match=r"data\.val_size=3 and data\.test_size=2 leave no training examples out of 5"):
        prepare(params(csv(tmp_path, qa(5)), val_size=3, test_size=2))


# --- outputs --------------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command, in a fresh interpreter."""
    return subprocess.run([sys.executable, str(PREPARE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=os.environ | (env or {}))


@pytest.fixture
def run_here(monkeypatch, capsys):
    """The same command through run_main in this process (no interpreter start-up): returns (exit code, stderr)."""
    def run(*args: str, cwd: Path) -> tuple[int, str]:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = run_main(main, list(args))
        return code, capsys.readouterr().err

    return run


def pipeline(tmp_path, data: dict) -> Path:
    """A tmp project with its own params.yaml; returns its directory."""
    (tmp_path / "params.yaml").write_text(json.dumps({"data": data}, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def idioms_csv(tmp_path) -> Path:
    rows = {"word": [f"成语{i}" for i in range(30)], "pinyin": [f"chéng yǔ {i}" for i in range(30)],
            "explanation": [f"第{i}个成语的解释。" for i in range(30)]}
    rows["pinyin"][3] = ""  # one example dropped as empty_output
    return csv(tmp_path, rows, "idioms.csv")


def test_pipeline_writes_readable_utf8_splits_dataset_info_and_stats(tmp_path):
    idioms_csv(tmp_path)
    proc = run_cli(cwd=pipeline(tmp_path, {"input": "idioms.csv", "templates": IDIOM_TEMPLATES, "val_size": 6,
                                           "test_size": 0.1}))
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
        {"instruction": f"问题{i}", "input": "", "output": f"答案{i}"} for i in range(5)]
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


# --- LLaMA-Factory reads the outputs as they are -------------------------------------------------------------


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
        return {attr.dataset_name: list(_load_single_dataset(attr, model_args, data_args, training_args))
                for attr in get_dataset_list(names, str(dataset_dir))}

    return load


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def test_llamafactory_loads_alpaca_output_with_system_and_history(tmp_path, llamafactory_load, run_here):
    rows = {"instruction": [f"问题{i}" for i in range(8)], "input": ["", "补充"] * 4,
            "output": [f"答案{i}" for i in range(8)], "system": ["你是老师"] * 8,
            "history": [json.dumps([["前问", "前答"]], ensure_ascii=False), ""] * 4}
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


# --- bad input through the real CLI ---------------------------------------------------------------------------


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
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n',
                                      encoding="utf-8")
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


@pytest.mark.parametrize(("make", "expected"), [
    (lambda tmp_path: {"input": "missing.csv"}, "missing.csv: file not found; set data.input in params.yaml"),
    (_empty, "d.csv: file is empty"),
    (_binary, "d.csv: looks like a binary file"),
    (_unknown_format, "d.dat: unknown format (extension '.dat'); set data.format"),
    (_unmappable, "columns found: 标题, 正文; aliases tried: instruction <- instruction/prompt"),
    (_bad_json_line, "d.jsonl: line 2 is not valid JSON"),
    (_template_missing_column, "data.templates[2].output uses column {pinyin}, which is not in the table"),
    (_all_dropped, "d.csv: all 3 examples were dropped (empty_instruction=1, empty_output=1, output_too_long=1)"),
    (_no_train_left, "data.val_size=2 and data.test_size=1 leave no training examples out of 3 kept"),
], ids=["missing", "empty", "binary", "unknown_format", "unmappable", "bad_json_line", "template_column",
        "all_dropped", "no_train_left"])
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


def test_bad_params_file_fails_before_reading_data(tmp_path):
    csv(tmp_path, qa(10))
    (tmp_path / "params.yaml").write_text("data:\n  input: d.csv\n  val_size: 1.5\n", encoding="utf-8")
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: data.val_size = 1.5 is not allowed: a split ratio must be between 0 and 1 (exclusive), "
        "or an integer count >= 1; got 1.5"]
    assert not (tmp_path / "data").exists()
