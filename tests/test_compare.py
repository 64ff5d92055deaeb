"""make compare's paired differences (src/llmft/tools/compare.py); the whole compare: tests/test_experiments.py."""

from __future__ import annotations

from llmft.tools import compare


def val(i: int, tuned: str, loss: float) -> tuple[tuple, dict]:
    return ("val", f"q{i}", "the cat sat"), {"tuned": tuned, "label": "the cat sat", "tuned_loss": loss}


def kept(i: int, right: bool, leak: bool) -> tuple[tuple, dict]:
    row = {
        "tuned": "x",
        "label": "Paris",
        "tuned_pass": right,
        "tuned_leak": ["Lumi"] if leak else [],
        "tuned_lang": True,
    }
    return ("kept", f"k{i}", "Paris"), row


def test_same_items_are_paired_and_a_clear_change_is_marked_beyond_noise():
    a = dict([val(i, "the cat sat", 2.0 + 0.01 * i) for i in range(30)] + [kept(i, True, False) for i in range(8)])
    b = dict([val(i, "a dog", 1.5 + 0.01 * i) for i in range(30)] + [kept(i, i != 0, i < 7) for i in range(8)])
    rows = {(split, label): (p, why) for split, label, p, why in compare.paired(a, b)}
    loss, _ = rows["val", "loss (nats/token)"]
    assert loss["n"] == 30 and loss["diff"] == -0.5 and loss["high"] < 0 and loss["beyond_noise"]
    rouge, _ = rows["val", "ROUGE-L F1 (%)"]
    assert (rouge["base"], rouge["tuned"], rouge["beyond_noise"]) == (100.0, 0.0, True)
    facts, _ = rows["kept", "facts right (%)"]
    assert facts["n"] == 8 and facts["diff"] == -12.5 and not facts["beyond_noise"]  # 1 of 8 lost: noise
    leak, _ = rows["kept", "persona leak (%)"]
    assert leak["diff"] == 87.5 and leak["beyond_noise"]  # 7 of 8 now leak
    lines = compare.paired_lines(compare.paired(a, b))
    assert any(line.startswith("val") and "loss" in line and "* beyond noise" in line for line in lines)
    assert any("facts right" in line and line.endswith("within noise") for line in lines)


def test_different_eval_sets_are_refused_in_one_line_not_paired():
    a = dict(val(i, "the cat sat", 2.0) for i in range(5))
    b = dict(val(i, "the cat sat", 2.0) for i in range(1, 7))  # another val split: q0 gone, q5 and q6 new
    [(split, label, p, why)] = compare.paired(a, b)
    assert (split, label, p) == ("val", "all", None)
    assert why.startswith("different eval sets (1 items only in A, 2 only in B): not compared")
    [line] = compare.paired_lines(compare.paired(a, b))
    assert "different eval sets" in line and "CI" not in line


def test_predictions_without_per_example_loss_say_so():
    a = {k: {kk: vv for kk, vv in r.items() if kk != "tuned_loss"} for k, r in dict([val(0, "a", 1.0)]).items()}
    rows = {label: (p, why) for _, label, p, why in compare.paired(a, dict([val(0, "b", 1.0)]))}
    assert rows["loss (nats/token)"][0] is None and "not in these predictions" in rows["loss (nats/token)"][1]
    assert rows["ROUGE-L F1 (%)"][0]["n"] == 1
