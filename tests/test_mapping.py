"""Columns -> Alpaca/ShareGPT examples (src/llmft/data/mapping.py): aliases, templates, cleaning, drop counts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_builders import IDIOM_TEMPLATES, build, conversation, csv, jsonl, params, qa
from llmft.common import UserError
from llmft.data.mapping import DROP_REASONS
from llmft.data.prepare import prepare


def test_direct_columns_map_to_alpaca(tmp_path):
    built = build(csv(tmp_path, {"instruction": ["你好"], "input": ["上下文"], "output": ["您好"]}))
    assert built.kind == "alpaca"
    assert built.examples == [{"instruction": "你好", "input": "上下文", "output": "您好"}]


@pytest.mark.parametrize(
    ("prompt", "context", "answer"),
    [
        ("prompt", "context", "response"),
        ("question", "context", "answer"),
        ("query", "context", "completion"),
        ("Prompt", "Context", "Target"),
        ("问题", "上下文", "答案"),
    ],
)
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
    with pytest.raises(UserError, match=r"prepare\.columns\.output names column '答案列'.*found: instruction, output"):
        build(csv(tmp_path, qa(1)), columns={"output": "答案列"})


def test_unmappable_columns_error_lists_columns_found_and_aliases_tried(tmp_path):
    with pytest.raises(UserError) as err:
        build(csv(tmp_path, {"title": ["t"], "body": ["b"]}))
    msg = str(err.value)
    assert "columns found: title, body" in msg
    assert "instruction <- instruction/prompt/question/query" in msg
    assert "output <- output/response/answer/completion/target" in msg
    assert "set prepare.columns" in msg


def test_templates_build_one_example_per_template_per_row(tmp_path):
    path = csv(
        tmp_path,
        {
            "word": ["画蛇添足", "守株待兔"],
            "pinyin": ["huà shé tiān zú", "shǒu zhū dài tù"],
            "explanation": ["比喻多此一举。", "比喻死守经验。"],
            "example": ["", ""],
        },
    )
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
    with pytest.raises(UserError, match=r"prepare\.templates\[2\]\.output uses column \{pinyin\}.*: word, explanation"):
        build(csv(tmp_path, {"word": ["w"], "explanation": ["e"]}), templates=IDIOM_TEMPLATES)


def test_template_with_an_unbalanced_brace_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"prepare\.templates\[1\]\.instruction: bad template"):
        build(csv(tmp_path, {"word": ["w"]}), templates=[{"instruction": "解释{word", "output": "{word}"}])


def test_system_and_history_columns_pass_through(tmp_path):
    path = csv(
        tmp_path,
        {
            "instruction": ["q2", "q1", "q3"],
            "output": ["a2", "a1", "a3"],
            "system": ["s", "", "s"],
            "history": ['[["q1", "a1"]]', "", "not json"],
        },
    )
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
    assert built.examples == [
        {"conversations": convs[0], "system": "你是助手"},
        {"conversations": convs[1], "system": ""},
    ]
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
    path = jsonl(
        tmp_path,
        [
            {"instruction": "q", "output": "a"},
            {"instruction": "  ", "output": "a"},
            {"instruction": "q2", "output": ""},
            {"instruction": "q3"},
            {"output": "a"},
            {"instruction": "q4", "output": None},
        ],
    )
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
    path = csv(
        tmp_path,
        {
            "instruction": ["短", "这个问题太长了", "问", "问题"],
            "input": ["", "", "", "上下文"],
            "output": ["答", "答", "这个答案太长了", "答"],
        },
    )
    built = build(path, max_prompt_chars=4, max_output_chars=5)
    assert [e["instruction"] for e in built.examples] == ["短"]
    assert built.dropped == {"prompt_too_long": 2, "output_too_long": 1}
    assert built.prompt_chars == [1] and built.output_chars == [1]


def test_every_example_is_kept_or_counted_in_the_stats(tmp_path):
    rows = {
        "instruction": ["q1", "", "q2", "q2", "q3", "q4" * 50, "q5", "q6", "q7", "q1"],
        "output": ["a1", "a", "", "x", "x", "a", "a" * 90, "a6", "a7", "a1"],
    }
    _, _, stats = prepare(params(csv(tmp_path, rows), val_size=1, max_prompt_chars=40, max_output_chars=50))
    assert stats["rows_in"] == stats["examples_in"] == 10
    assert stats["examples_in"] == stats["kept"] + sum(stats["dropped"].values())
    assert stats["dropped"] == {r: 0 for r in DROP_REASONS} | {
        "empty_instruction": 1,
        "empty_output": 1,
        "prompt_too_long": 1,
        "output_too_long": 1,
        "duplicate": 1,
    }
    assert stats["dropped_total"] == 5 and stats["kept"] == 5
    assert sum(stats["splits"].values()) == stats["kept"]
