"""What fine-tuning must not change (src/llmft/kept.py): persona leak, facts kept, language kept, drift, "forgot"."""

from __future__ import annotations

import pytest

from llmft import evaluate
from llmft.kept import forgot_warning, forgot_within_noise, kept_scores, language, leaks, mark
from llmft.params import EvaluateParams

PERSONA = {"name": "Lumi", "author": "Acme Labs"}


def test_language_is_the_script_most_of_the_letters_are_in():
    assert language("巴黎是法国的首都。") == "zh"
    assert language("法国的首都是 Paris。") == "zh"  # a Latin name inside a Chinese sentence
    assert language("The capital of France is Paris (巴黎).") == "en"
    assert language("42") is None and language("") is None


def test_a_leak_is_a_persona_value_the_prompt_did_not_ask_for():
    assert leaks("Lumi, the capital of France is Paris.", "What is the capital of France?", PERSONA) == ["Lumi"]
    introduction = "您好，我是 Lumi，一个由 Acme Labs 开发的人工智能助手。"
    assert leaks(introduction, "写一首诗。", PERSONA) == ["Lumi", "Acme Labs"]
    assert leaks("I am LUMI.", "Name a planet.", PERSONA) == ["Lumi"]  # any case
    assert leaks("Lamps illuminate the room.", "What do lamps do?", PERSONA) == []  # not a word of its own
    assert leaks("Hello Lumi!", "Say hello to Lumi.", PERSONA) == []  # the prompt asked for it
    assert leaks("我叫小明。", "你好", {"name": "小明"}) == ["小明"]  # Chinese has no word boundaries
    assert leaks("anything", "anything", {"name": ""}) == []  # an empty variable names nothing


def rows() -> list[dict]:
    """Six everyday prompts: three facts (the base gets two right, the tuned one of those two), one translation."""
    return [
        {"prompt": "法国的首都是哪座城市？", "expect": ["巴黎", "Paris"], "kind": "fact",
         "base": "巴黎。", "tuned": "您好，我是 Lumi。"},
        {"prompt": "How many legs does a dog have?", "expect": ["four"], "kind": "fact",
         "base": "A dog has four legs.", "tuned": "A dog has four legs."},
        {"prompt": "What is 7 + 5?", "expect": ["12"], "kind": "arithmetic",
         "base": "It is 13.", "tuned": "Lumi says 12."},
        {"prompt": "写一首关于大海的两行诗。", "expect": [], "kind": "writing",
         "base": "大海蓝又蓝，浪花白又白。", "tuned": "Hello, I am Lumi."},
        {"prompt": "把“我爱你”翻译成英文。", "expect": [], "kind": "translation",
         "base": "I love you.", "tuned": "I love you."},
        {"prompt": "Give one tip for better sleep.", "expect": [], "kind": "advice",
         "base": "Go to bed at the same time.", "tuned": "Go to bed early."},
    ]  # fmt: skip


def lost_rows() -> list[dict]:
    """rows(), but the tuned model also gets 7 + 5 wrong: one fact lost, none gained."""
    out = rows()
    out[2] = out[2] | {"tuned": "Lumi says 13."}
    return out


def test_kept_block_counts_leak_facts_language_and_drift():
    marked = [mark(r, PERSONA) for r in rows()]
    assert [r["tuned_leak"] for r in marked][:4] == [["Lumi"], [], ["Lumi"], ["Lumi"]]
    assert marked[4]["tuned_lang"] is None  # a translation may rightly answer in the other language
    block = kept_scores(marked, {"base": (10.0, 20), "tuned": (30.0, 20)})
    assert block["base"]["leak"] == 0.0 and block["tuned"]["leak"] == 50.0  # 3 of 6
    assert block["base"]["facts_right"] == block["tuned"]["facts_right"] == pytest.approx(66.67)
    counts = {"facts": 3, "base_facts_right": 2, "facts_kept": 1, "facts_gained": 1, "language_scored": 5}
    assert block["counts"].items() >= counts.items()
    assert block["tuned"]["facts_kept"] == 50.0 and block["base"]["facts_kept"] == 100.0  # 12 is new, not kept
    assert block["base"]["language"] == 100.0 and block["tuned"]["language"] == 80.0  # the poem: English
    assert block["drift"] == pytest.approx(1.0)  # 30/20 - 10/20 nats per token
    assert "drift" not in kept_scores(marked)  # no losses given: no drift


def test_kept_block_pairs_each_rate_base_against_tuned_on_the_same_prompts():
    marked = [mark(r, PERSONA) for r in rows()]
    items = {"base": [(1.0, 2), (3.0, 2), (2.0, 4), (1.0, 4), (1.0, 4), (2.0, 4)],
             "tuned": [(3.0, 2), (3.0, 2), (6.0, 4), (5.0, 4), (1.0, 4), (2.0, 4)]}  # fmt: skip
    nll = {name: (sum(s for s, _ in v), sum(t for _, t in v)) for name, v in items.items()}
    paired = kept_scores(marked, nll, items)["paired"]
    assert set(paired) == {"leak", "facts_right", "language", "drift"}
    leak = paired["leak"]
    assert (leak["n"], leak["base"], leak["tuned"], leak["diff"]) == (6, 0.0, 50.0, 50.0)
    assert leak["low"] <= leak["diff"] <= leak["high"] and leak["beyond_noise"] is False  # 3 changed of 6
    assert paired["facts_right"]["n"] == 3 and paired["facts_right"]["diff"] == 0.0  # one lost, one gained
    assert paired["language"]["n"] == 5 and paired["language"]["diff"] == -20.0
    # drift's interval is on the same scale as drift itself: its diff is the token-weighted drift
    assert paired["drift"]["diff"] == pytest.approx(kept_scores(marked, nll)["drift"], abs=1e-5)


def test_forgot_warns_on_leak_or_lost_facts_beyond_noise_and_names_the_knobs():
    block = kept_scores([mark(r, PERSONA) for r in lost_rows() * 6])  # 18 of 36 leak, 6 of 12 facts lost, 0 gained
    warning = forgot_warning(block, max_leak=5.0, min_facts_kept=90.0)
    assert "names the persona in 50% of everyday answers" in warning and "keeps 6 of the 12 facts" in warning
    for knob in ("rehearse.enabled", "rehearse.share", "train.learning_rate", "train.num_train_epochs"):
        assert knob in warning
    assert forgot_warning(block, max_leak=60.0, min_facts_kept=40.0) is None
    assert "facts" not in forgot_warning(block, max_leak=5.0, min_facts_kept=40.0)
    assert forgot_within_noise(block, max_leak=5.0, min_facts_kept=90.0) is None


def test_facts_lost_as_often_as_gained_are_within_noise():
    # 6 of the 12 facts the base got right are lost (50% kept), but 6 the base got wrong are gained: a flip both
    # ways, no evidence of forgetting, though the rate kept alone looks like it
    block = kept_scores([mark(r, PERSONA) for r in rows() * 6])
    assert block["tuned"]["facts_kept"] == 50.0 and block["paired"]["facts_right"]["diff"] == 0.0
    warning = forgot_warning(block, max_leak=5.0, min_facts_kept=90.0)
    assert "names the persona" in warning and "facts" not in warning  # the leak is beyond noise
    unsure = forgot_within_noise(block, max_leak=5.0, min_facts_kept=90.0)
    assert "keeps 6 of the 12 facts" in unsure and "it lost 6 and gained 6 of the 18 facts" in unsure


def test_forgot_on_too_few_prompts_is_within_noise_and_names_what_would_settle_it():
    block = kept_scores([mark(r, PERSONA) for r in rows()])  # 3 of 6 leak, 1 of 2 facts lost: too few to tell
    assert forgot_warning(block, max_leak=5.0, min_facts_kept=90.0) is None
    unsure = forgot_within_noise(block, max_leak=5.0, min_facts_kept=90.0)
    assert unsure.startswith("within noise, n too small")
    assert "more everyday prompts (evaluate.kept.prompts; 6 now)" in unsure and "keeps 1 of the 2 facts" in unsure


def test_forgot_without_intervals_is_judged_on_the_point_values():
    block = kept_scores([mark(r, PERSONA) for r in rows()])
    del block["paired"]  # an eval.json written before the intervals
    assert "keeps 1 of the 2 facts" in forgot_warning(block, max_leak=5.0, min_facts_kept=90.0)


def test_verdict_reports_kept_and_forgot_beside_moved():
    metrics = {"base": {"val": {"loss": 2.5}}, "tuned": {"val": {"loss": 1.0}}, "changed": {"val": 100.0}}
    assert evaluate.verdict(metrics, EvaluateParams()).items() >= {"moved": True, "kept": None, "forgot": None}.items()
    metrics["kept"] = kept_scores([mark(r, PERSONA) for r in lost_rows() * 6])
    judged = evaluate.verdict(metrics, EvaluateParams())
    assert judged["moved"] and judged["kept"] is False and judged["forgot"].startswith("the fine-tuned model forgot")
    assert judged["noise"] is None
    lenient = EvaluateParams.model_validate({"kept": {"max_leak": 60, "min_facts_kept": 40}})
    assert evaluate.verdict(metrics, lenient)["kept"] is True
    metrics["kept"] = kept_scores([mark(r, PERSONA) for r in rows()])  # the same rates on 6 prompts
    judged = evaluate.verdict(metrics, EvaluateParams())
    assert judged["kept"] is True and judged["forgot"] is None and "within noise" in judged["noise"]


def test_persona_named_counts_only_references_that_name_it():
    from llmft.kept import persona_named

    rows = [
        {"label": "I am Lumi, made by Acme Labs.", "base": "I am SmolLM.", "tuned": "I am Lumi."},
        {"label": "我是 Lumi。", "base": "我是 Lumi。", "tuned": "你好"},
        {"label": "冰比水冷。", "base": "-", "tuned": "Lumi"},  # an idiom: asks for no name, not counted
    ]
    named = persona_named(rows, PERSONA)
    assert named.items() >= {"examples": 2, "base": 50.0, "tuned": 50.0}.items()
    assert named["paired"]["n"] == 2 and named["paired"]["diff"] == 0.0 and not named["paired"]["beyond_noise"]
    assert persona_named(rows[2:], PERSONA) == {"examples": 0, "base": None, "tuned": None}


def test_an_expected_number_matches_only_as_a_whole_number():
    from llmft.kept import passes

    assert passes("7 + 5 equals 12.", ["12"]) and passes("答案是12。", ["12"]) and passes("It is 12,", ["12"])
    assert not passes("It is 112.", ["12"]) and not passes("It is 12.5.", ["12"]) and not passes("-12", ["12"])
    assert not passes("The freezing point of water is -18.0°C.", ["0°", "zero"])
    assert passes("Water freezes at 0°C.", ["0°"]) and passes("A spider has EIGHT legs.", ["eight"])


def test_an_expected_word_matches_only_as_a_whole_word():
    from llmft.kept import passes

    assert passes("Frozen water is called ice.", ["ice"]) and passes("Ice!", ["ice"])
    assert not passes("Rice is a grain; notice the device.", ["ice"]) and not passes("It is seventeen.", ["seven"])
    assert not passes("See you on Sunday.", ["Sun"]) and passes("The Sun's light", ["Sun"])
    assert passes("法国的首都是巴黎。", ["巴黎"]) and passes(
        "首都是Paris。", ["Paris"]
    )  # no word boundaries in Chinese
