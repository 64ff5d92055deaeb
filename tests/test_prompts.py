"""Prompt lists (src/llmft/data/prompts.py): the shipped rehearsal and held-out everyday sets, and bad files."""

from __future__ import annotations

import collections

import pytest

from llmft.common import UserError
from llmft.data.prompts import normalized, overlap, read_prompts
from llmft.kept import prompt_language
from llmft.params import load_params
from scripts import ROOT

KINDS = {"fact", "arithmetic", "writing", "advice", "code", "translation"}
IDENTITY = ("who are you", "your name", "introduce yourself", "who made you")
IDENTITY += ("你是谁", "你的名字", "介绍一下你", "谁开发")


@pytest.fixture(scope="module")
def shipped():
    params = load_params(ROOT / "params.yaml")
    return (
        read_prompts(ROOT / params.rehearse.prompts, "rehearse.prompts"),
        read_prompts(ROOT / params.evaluate.kept.prompts, "evaluate.kept.prompts"),
    )


def test_the_held_out_everyday_set_is_bilingual_varied_and_checkable(shipped):
    _, everyday = shipped
    assert len(everyday) >= 60
    languages = collections.Counter(prompt_language(r["prompt"]) for r in everyday)
    assert languages["zh"] >= 30 and languages["en"] >= 30
    assert {r["kind"] for r in everyday} == KINDS
    assert sum(bool(r["expect"]) for r in everyday) >= 90  # facts kept needs ~40 the base gets right: it gets ~half
    assert all(r["expect"] for r in everyday if r["kind"] in {"fact", "arithmetic"}), "a fact needs its answer"
    assert len({normalized(r["prompt"]) for r in everyday}) == len(everyday)  # no prompt twice


def test_rehearsal_prompts_share_nothing_with_the_held_out_set(shipped):
    rehearsal, everyday = shipped
    assert overlap(rehearsal, everyday) == []
    assert len({normalized(r["prompt"]) for r in rehearsal}) == len(rehearsal)  # no prompt twice either
    # nor ask who the model is: the base's answer ("I am SmolLM") would fight the persona being taught
    for row in rehearsal + everyday:
        assert not any(phrase in row["prompt"].casefold() for phrase in IDENTITY), row["prompt"]


def test_overlap_ignores_case_spacing_and_punctuation():
    assert normalized("What is 7 + 5 ?") == normalized("what is 7+5?")
    assert overlap([{"prompt": "法国的首都是哪里？"}], [{"prompt": "法国的首都是哪里"}]) == ["法国的首都是哪里？"]


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "evaluate.kept.prompts: {path} not found"),
        ("\n\n", "holds no prompts"),
        ('{"prompt": "ok"}\n{oops\n', "line 2 is not JSON"),
        ('{"prompt": "ok"}\n{"expect": ["x"]}\n', 'line 2 has no "prompt" text'),
        ('{"prompt": "ok", "expect": [1]}\n', '"expect" must be a string or a list of strings'),
    ],
)
def test_a_bad_prompt_file_is_one_error_naming_the_key_and_line(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_prompts(path, "evaluate.kept.prompts")
    assert message.format(path=path) in str(err.value)


def test_expect_may_be_one_string_and_kind_is_optional(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": " Hi "}\n{"prompt": "2+2?", "expect": "4", "kind": "arithmetic"}\n', encoding="utf-8")
    assert read_prompts(path, "k") == [
        {"prompt": "Hi", "expect": [], "kind": ""},
        {"prompt": "2+2?", "expect": ["4"], "kind": "arithmetic"},
    ]
