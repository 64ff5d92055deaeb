"""data/pairs.py: a user's preference table in every format and layout, drops counted by reason, KTO labels, the
seeded split, and files LLaMA-Factory's own converter reads as pairs (ranking) or labelled answers (kto_tag)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llmft.common import UserError
from llmft.data import pairs as P

ROWS = {
    "question": ["法国的首都是哪里？", "Who are you?", "2+2?"],
    "chosen": ["巴黎。", "I am Lumi, made by Acme Labs.", "4"],
    "rejected": ["我是 Lumi。巴黎。", "I am SmolLM.", "5"],
}
EXPECTED = [
    {"instruction": q, "input": "", "chosen": c, "rejected": r}
    for q, c, r in zip(ROWS["question"], ROWS["chosen"], ROWS["rejected"], strict=True)
]


def write(tmp_path, name: str, rows: dict | list, **kw):
    path = tmp_path / name
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        path.write_bytes(
            frame.to_csv(index=False, sep="\t" if suffix == ".tsv" else ",").encode(kw.get("enc", "utf-8"))
        )
    elif suffix == ".json":
        path.write_text(frame.to_json(orient="records", force_ascii=False), encoding="utf-8")
    elif suffix == ".jsonl":
        records = rows if isinstance(rows, list) else frame.to_dict("records")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_excel(path, index=False)
    return path


@pytest.mark.parametrize("name", ["p.csv", "p.tsv", "p.json", "p.jsonl", "p.parquet", "p.xlsx"])
def test_pairs_table_is_read_in_every_format_by_alias(tmp_path, name):
    pairs = P.read_pairs(write(tmp_path, name, ROWS), "dpo")
    assert pairs.examples == EXPECTED and pairs.kind == "pairwise"
    assert pairs.stats()["dropped_total"] == 0


def test_gbk_csv_with_chinese_column_names_is_read_through_explicit_columns(tmp_path):
    rows = {"问题": ROWS["question"], "好": ROWS["chosen"], "坏": ROWS["rejected"]}
    path = write(tmp_path, "p.csv", rows, enc="gbk")
    pairs = P.read_pairs(path, "simpo", columns={"prompt": "问题", "chosen": "好", "rejected": "坏"})
    assert pairs.examples == EXPECTED


def test_llamafactory_alpaca_pairwise_layout_keeps_input_history_and_system(tmp_path):
    rows = [
        {"instruction": "Translate", "input": "你好", "chosen": "Hello", "rejected": "Bye", "system": "Be brief.",
         "history": [["hi", "hello"]]},
        {"instruction": "Again", "input": "", "chosen": "a", "rejected": "b", "system": "", "history": []},
    ]  # fmt: skip
    pairs = P.read_pairs(write(tmp_path, "p.jsonl", rows), "orpo")
    assert pairs.examples == rows


def test_llamafactory_sharegpt_pairwise_layout_becomes_alpaca_with_history(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "hello"},
                {"from": "human", "value": "Who are you?"},
            ],
            "chosen": {"from": "gpt", "value": "Lumi."},
            "rejected": {"from": "gpt", "value": "SmolLM."},
        },
        {
            "conversations": [{"role": "user", "content": "2+2?"}],
            "chosen": {"role": "assistant", "content": "4"},
            "rejected": {"role": "assistant", "content": "5"},
        },
        {"conversations": [{"from": "gpt", "value": "no user turn"}], "chosen": "a", "rejected": "b"},
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "human", "value": "a"},
            "rejected": "b",
        },
    ]
    pairs = P.read_pairs(write(tmp_path, "p.json", rows), "dpo")
    assert pairs.layout == "sharegpt"
    assert pairs.examples == [
        {"instruction": "Who are you?", "history": [["hi", "hello"]], "system": "Be brief.", "chosen": "Lumi.",
         "rejected": "SmolLM."},
        {"instruction": "2+2?", "history": [], "system": "", "chosen": "4", "rejected": "5"},
    ]  # fmt: skip
    assert pairs.dropped == {"bad_conversation": 2}


def test_every_dropped_pair_is_counted_by_reason(tmp_path):
    rows = {
        "prompt": ["same", "", "no chosen", "no rejected", "long", "ok", "ok"],
        "chosen": ["x", "a", "", "a", "a" * 50, "yes", "yes"],
        "rejected": ["x", "b", "b", "", "b", "no", "no"],
    }
    pairs = P.read_pairs(write(tmp_path, "p.csv", rows), "dpo", max_chars=40)
    assert pairs.examples == [{"instruction": "ok", "input": "", "chosen": "yes", "rejected": "no"}]
    assert pairs.stats()["dropped"] == {
        "empty_prompt": 1,
        "empty_chosen": 1,
        "empty_rejected": 1,
        "empty_answer": 0,
        "same_answers": 1,
        "bad_conversation": 0,
        "too_long": 1,
        "duplicate": 1,
    }
    assert pairs.stats()["examples_in"] == 7


@pytest.mark.parametrize(
    ("labels", "tags"),
    [
        (["true", "false"], [True, False]),
        (["1", "0"], [True, False]),
        (["Yes", "NO"], [True, False]),
        (["good", "bad"], [True, False]),
        ([True, False], [True, False]),
        ([1, 0], [True, False]),
    ],
)
def test_kto_labels_are_read_in_every_spelling(tmp_path, labels, tags):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": label} for i, label in enumerate(labels)]
    pairs = P.read_pairs(write(tmp_path, "k.jsonl", rows), "kto")
    assert [ex["kto_tag"] for ex in pairs.examples] == tags
    assert pairs.examples[0] == {"instruction": "q0", "input": "", "output": "a0", "kto_tag": True}


def test_a_bad_kto_label_is_one_line_naming_the_row_and_column(tmp_path):
    path = write(
        tmp_path, "k.csv", {"prompt": ["a", "b", "c"], "answer": ["x", "y", "z"], "rating": ["1", "0", "maybe"]}
    )
    with pytest.raises(UserError) as err:
        P.read_pairs(path, "kto", columns={"label": "rating"})
    assert str(err.value).startswith(f"{path}: row 3, column 'rating': 'maybe' is not a label; use true/false")
    assert "\n" not in str(err.value)


def test_a_pairs_table_gives_kto_a_good_and_a_bad_answer_per_pair(tmp_path):
    pairs = P.read_pairs(write(tmp_path, "p.csv", ROWS), "kto")
    assert pairs.kind == "kto" and len(pairs.examples) == 6
    assert pairs.examples[:2] == [
        {"instruction": ROWS["question"][0], "input": "", "output": ROWS["chosen"][0], "kto_tag": True},
        {"instruction": ROWS["question"][0], "input": "", "output": ROWS["rejected"][0], "kto_tag": False},
    ]


def test_a_kto_table_for_a_pairwise_method_says_to_set_method_kto(tmp_path):
    path = write(tmp_path, "k.csv", {"prompt": ["a"], "answer": ["x"], "label": ["good"]})
    with pytest.raises(UserError, match=r"k\.csv: holds labelled answers .* set prefer\.method: kto"):
        P.read_pairs(path, "dpo")


def test_missing_columns_name_the_columns_found_and_the_fix(tmp_path):
    path = write(tmp_path, "p.csv", {"prompt": ["a"], "good": ["x"], "bad": ["y"]})
    with pytest.raises(UserError) as err:
        P.read_pairs(path, "dpo")
    message = str(err.value)
    assert "cannot find the chosen, rejected column(s): columns found: prompt, good, bad" in message
    assert "set prefer.columns" in message and "\n" not in message


def test_explicit_column_not_in_the_table_is_named(tmp_path):
    with pytest.raises(UserError, match=r"prefer\.columns\.chosen names column 'best'.*found: question, chosen"):
        P.read_pairs(write(tmp_path, "p.csv", ROWS), "dpo", columns={"chosen": "best"})


def test_a_table_whose_every_pair_is_dropped_is_an_error(tmp_path):
    path = write(tmp_path, "p.csv", {"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["x", "y"]})
    with pytest.raises(UserError, match=r"all 2 examples were dropped .*same_answers=2"):
        P.read_pairs(path, "dpo")


def test_split_is_seeded_and_keeps_both_kto_rows_of_a_pair_together():
    examples = [ex for i in range(20) for ex in P.as_kto({"instruction": f"q{i}", "input": "", "chosen": "a",
                                                           "rejected": "b"})]  # fmt: skip
    first, again = P.split_pairs(examples, 0.2, seed=1), P.split_pairs(examples, 0.2, seed=1)
    assert first == again and len(first["val"]) == 8 and len(first["train"]) == 32
    val_prompts = {ex["instruction"] for ex in first["val"]}
    assert not val_prompts & {ex["instruction"] for ex in first["train"]}
    assert P.split_pairs(examples, 0.2, seed=2) != first


def test_a_val_size_that_leaves_no_training_pairs_names_prefer_val_size():
    with pytest.raises(UserError, match=r"prefer\.val_size=2 leaves no training examples out of 2"):
        P.split_pairs(EXPECTED[:2], 2, seed=0)


def test_written_files_are_read_by_llamafactory_as_pairs_and_as_kto(tmp_path):
    from llamafactory.hparams import DataArguments

    from llmft.lf.encode import convert_rows, dataset_attr

    for kind, examples in (("pairwise", EXPECTED), ("kto", [r for p in EXPECTED for r in P.as_kto(p)])):
        out = tmp_path / kind
        info = P.write_pairs(P.split_pairs(examples, 1, seed=0), kind, out)
        assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "train.json", "val.json"]
        assert info["train"].get("ranking") is (True if kind == "pairwise" else None)
        attr = dataset_attr(out, "train")
        rows = json.loads((out / "train.json").read_text(encoding="utf-8"))
        converted = list(convert_rows(attr, DataArguments(template="empty"), rows))
        assert all(len(c["_response"]) == 2 for c in converted)  # chosen + rejected; kto: answer + an empty side
        if kind == "pairwise":
            assert converted[0]["_response"][1]["content"] == rows[0]["rejected"]
        else:
            good = [c for c, r in zip(converted, rows, strict=True) if r["kto_tag"]]
            assert good and all(c["_response"][1]["content"] == "" for c in good)


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    P.write_pairs({"train": EXPECTED[:2], "val": EXPECTED[2:]}, "pairwise", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def fail_second(path, obj):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        path.write_text(json.dumps(obj))

    monkeypatch.setattr(P, "write_json", fail_second)
    with pytest.raises(OSError, match="disk full"):
        P.write_pairs({"train": EXPECTED, "val": EXPECTED[:1]}, "pairwise", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["pairs"]


def test_the_shipped_chinese_pairs_table_reads_whole_through_its_columns():
    """data/raw/prefs_zh.csv, measured in docs/preference.md: every pair kept, Chinese chosen, English rejected."""
    from pathlib import Path

    from llmft.kept import language

    table = Path(__file__).resolve().parents[1] / "data/raw/prefs_zh.csv"
    read = P.read_pairs(str(table), "dpo", {"prompt": "问题", "chosen": "好回答", "rejected": "差回答"}, None)
    assert len(read.examples) == 64 and not any(read.stats()["dropped"].values())
    assert {language(row["chosen"]) for row in read.examples} == {"zh"}
    assert {language(row["rejected"]) for row in read.examples} == {"en"}
