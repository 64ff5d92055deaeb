"""What fine-tuning must not change, on held-out everyday prompts (evaluate.kept) that no training example asks.

    block = kept_scores(rows, variables, nll)   # rows: prompt, expect, kind, base, tuned (answers); nll: drift's inputs
    block["tuned"]["leak"], block["tuned"]["facts_kept"], block["drift"]

- leak: % of answers that name a prepare.variables value (the persona's name, its author) the prompt did not ask for.
  A model that learned "I am Lumi" by forgetting how to answer anything else introduces itself everywhere.
- facts_right / facts_kept: % of the prompts with `expect` answered right; of those the base got right, % the
  model still gets right. A fine-tune should not unlearn what the base knew.
- language: % of answers in the prompt's language (translation and code prompts aside: their answer may rightly
  switch). A Chinese identity set can make a model answer every Chinese question with the same Chinese sentence.
- drift: the teacher-forced loss of the base model's own answers under the tuned model minus under the base, in
  nats per token. It needs no reference answers: 0 = the tuned model would still say what the base said.

Each base-vs-tuned difference also gets a paired interval over the same prompts (`block["paired"]`, see
llmft.stats), and the "forgot" warning fires only when the change behind it is beyond noise.
"""

from __future__ import annotations

import re

from llmft.stats import min_changed, paired_difference

LANGUAGE_FREE_KINDS = {"translation", "code"}  # their answer may rightly be in another language, or code
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")


def _expected(text: str) -> re.Pattern:
    """`text` anywhere, in any case; a number only as a whole number: "12" is not in "112" nor "12.5", and "0°" is
    not in "-18.0°C"; a Latin word only as a whole word: "ice" is not in "rice", nor "seven" in "seventeen".
    Chinese has no word boundaries, so a Chinese answer matches anywhere."""

    def edge(char: str, number: str) -> str:
        return number if char.isdigit() else r"[A-Za-z]" if char.isascii() and char.isalpha() else ""

    left, right = edge(text[:1], r"[\d.\-]"), edge(text[-1:], r"\d|[.,]\d")
    return re.compile(
        (f"(?<!{left})" if left else "") + re.escape(text) + (f"(?!{right})" if right else ""), re.IGNORECASE
    )


def passes(answer: str, expect: list[str]) -> bool | None:
    """Whether an answer contains one of the expected strings (see _expected); None when nothing is expected."""
    return any(_expected(e).search(answer) for e in expect) if expect else None


def language(text: str) -> str | None:
    """zh when at least a fifth of the text's letters are Chinese characters, en when it has Latin letters but fewer
    Chinese ones, None when it has neither (an empty or numbers-only answer)."""
    cjk, latin = len(CJK.findall(text)), len(LATIN.findall(text))
    if not cjk and not latin:
        return None
    return "zh" if cjk >= 0.2 * (cjk + latin) else "en"


def prompt_language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def _mention(value: str) -> re.Pattern:
    """`value` as a whole word where it starts or ends with a Latin letter or digit ("Lumi" is not in
    "illuminate"); Chinese has no word boundaries, so a Chinese value matches anywhere."""
    left = r"(?<![A-Za-z0-9])" if value[:1].isascii() and value[:1].isalnum() else ""
    right = r"(?![A-Za-z0-9])" if value[-1:].isascii() and value[-1:].isalnum() else ""
    return re.compile(left + re.escape(value) + right, re.IGNORECASE)


def leaks(answer: str, prompt: str, variables: dict[str, str]) -> list[str]:
    """The prepare.variables values the answer names although the prompt does not."""
    return [
        value
        for value in dict.fromkeys(v.strip() for v in variables.values())
        if value and _mention(value).search(answer) and not _mention(value).search(prompt)
    ]


def persona_named(rows: list[dict], variables: dict[str, str]) -> dict:
    """Of the held-out examples whose reference names a prepare.variables value (the identity rows of val), the % whose
    answer names it too, per model: what was learned, in the same words as the leak."""
    values = [v.strip() for v in variables.values() if v.strip()]
    asked = [(r, [v for v in values if _mention(v).search(r["label"])]) for r in rows]
    asked = [(r, named) for r, named in asked if named]
    out: dict = {"examples": len(asked)}
    hits = {
        name: [100.0 * any(_mention(v).search(r[name]) for v in named) for r, named in asked]
        for name in ("base", "tuned")
    }
    for name in ("base", "tuned"):
        out[name] = _pct(sum(hits[name]) / 100, len(asked))
    if asked:
        out["paired"] = paired_difference(hits["base"], hits["tuned"])
    return out


def _pct(part: float, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def paired_pct(rows: list[dict], key: str) -> dict | None:
    """The paired interval of a rate, base vs tuned, in percent: `row["<model>_<key>"]` truthy = a hit."""
    if not rows:
        return None
    return paired_difference(*([100.0 * bool(r[f"{name}_{key}"]) for r in rows] for name in ("base", "tuned")))


def paired_loss(items: dict[str, list[tuple[float, int]]]) -> dict | None:
    """The paired interval of a token-weighted loss over examples: example i scores its summed loss over the mean
    answer length, so the mean of the scores is the split's loss (nats per token) and the interval resamples whole
    examples, their lengths held fixed."""
    tokens = sum(t for _, t in items["base"])
    if not tokens:
        return None
    mean = tokens / len(items["base"])
    return paired_difference(*([s / mean for s, _ in items[name]] for name in ("base", "tuned")))


def in_prompt_language(answer: str, prompt: str, kind: str | None) -> bool | None:
    """Whether the answer is in the prompt's language; None for a kind whose answer may rightly be in another
    (translation, code)."""
    return None if kind in LANGUAGE_FREE_KINDS else language(answer) == prompt_language(prompt)


def mark(row: dict, variables: dict[str, str]) -> dict:
    """Add each model's per-answer marks to a row: <model>_pass (fact right), <model>_leak (values named),
    <model>_lang (answer in the prompt's language; None when not scored)."""
    for name in ("base", "tuned"):
        answer = row[name]
        row[f"{name}_pass"] = passes(answer, row["expect"])
        row[f"{name}_leak"] = leaks(answer, row["prompt"], variables)
        row[f"{name}_lang"] = in_prompt_language(answer, row["prompt"], row.get("kind"))
    return row


def kept_scores(
    rows: list[dict],
    nll: dict[str, tuple[float, int]] | None = None,
    nll_items: dict[str, list[tuple[float, int]]] | None = None,
) -> dict:
    """eval.json's `kept` block from rows already `mark`ed.

    `nll`: {"base": (sum, tokens), "tuned": (...)}, the teacher-forced loss of the base's answers under each model;
    `nll_items`: the same per prompt, for drift's interval.
    """
    facts = [r for r in rows if r["expect"]]
    base_right = [r for r in facts if r["base_pass"]]
    langs = [r for r in rows if r["base_lang"] is not None]
    block: dict = {}
    for name in ("base", "tuned"):
        block[name] = {
            "leak": _pct(sum(bool(r[f"{name}_leak"]) for r in rows), len(rows)),
            "facts_right": _pct(sum(bool(r[f"{name}_pass"]) for r in facts), len(facts)),
            "facts_kept": _pct(sum(bool(r[f"{name}_pass"]) for r in base_right), len(base_right)),
            "language": _pct(sum(bool(r[f"{name}_lang"]) for r in langs), len(langs)),
            "leak_by_language": {  # a persona tends to leak in one language first (the demo's: Chinese)
                lang: _pct(sum(bool(r[f"{name}_leak"]) for r in group), len(group))
                for lang in ("zh", "en")
                if (group := [r for r in rows if prompt_language(r["prompt"]) == lang])
            },
        }
        if nll:
            total, tokens = nll[name]
            block[name]["base_answers_nll"] = round(total / tokens, 6) if tokens else None
    if nll and block["base"].get("base_answers_nll") is not None:
        block["drift"] = round(block["tuned"]["base_answers_nll"] - block["base"]["base_answers_nll"], 6)
    block["counts"] = {
        "prompts": len(rows),
        "facts": len(facts),
        "base_facts_right": len(base_right),
        "facts_kept": sum(bool(r["tuned_pass"]) for r in base_right),
        "facts_gained": sum(bool(r["tuned_pass"]) and not r["base_pass"] for r in facts),
        "language_scored": len(langs),
        "drift_tokens": nll["base"][1] if nll else 0,
    }
    paired = {
        "leak": paired_pct(rows, "leak"),
        "facts_right": paired_pct(facts, "pass"),  # forgetting is judged here: see _crossings
        "language": paired_pct(langs, "lang"),
        "drift": paired_loss(nll_items) if nll_items and "drift" in block else None,
    }
    block["paired"] = {key: value for key, value in paired.items() if value is not None}
    return block


def _beyond(paired: dict | None, worse: int) -> bool:
    """Whether a change in the worse direction (+1: up is worse, -1: down is worse) is beyond noise; a block
    without intervals (an older eval.json) is taken at its word."""
    return paired is None or (paired["beyond_noise"] and worse * paired["diff"] > 0)


def _crossings(block: dict, max_leak: float, min_facts_kept: float) -> list[tuple[str, bool, str]]:
    """(what crossed evaluate.kept's threshold, whether the change is beyond noise, what would settle it)."""
    tuned, paired, counts = block["tuned"], block.get("paired"), block["counts"]
    out = []
    if tuned["leak"] is not None and tuned["leak"] > max_leak:
        out.append(
            (
                f"it names the persona in {tuned['leak']:g}% of everyday answers that did not ask "
                f"(base {block['base']['leak']:g}%; evaluate.kept.max_leak {max_leak:g}%)",
                _beyond(paired and paired.get("leak"), +1),
                f"more everyday prompts (evaluate.kept.prompts; {counts['prompts']} now)",
            )
        )
    if tuned["facts_kept"] is not None and tuned["facts_kept"] < min_facts_kept:
        # Whether facts were lost is judged on all the facts, both models paired, not on the base's right answers
        # alone: greedy answers flip both ways between close models, and picking the base's hits picks its lucky
        # flips, so a tuned model that lost 8 and gained 6 would look as if it had forgotten 16%. The paired
        # difference of all facts counts the lost against the gained (McNemar's logic).
        lost = counts["base_facts_right"] - counts["facts_kept"]
        gained = counts.get("facts_gained")
        out.append(
            (
                f"it keeps {counts['facts_kept']} of the {counts['base_facts_right']} facts the base got right "
                f"({tuned['facts_kept']:g}%; evaluate.kept.min_facts_kept {min_facts_kept:g}%)",
                _beyond(paired and paired.get("facts_right"), -1),
                (f"it lost {lost} and gained {gained} of the {counts['facts']} facts; " if gained is not None else "")
                + f"more everyday prompts with `expect` (evaluate.kept.prompts; {counts['facts']} now, at least "
                f"{min_changed()} must change, more lost than gained, to tell)",
            )
        )
    return out


def forgot_warning(block: dict, max_leak: float, min_facts_kept: float) -> str | None:
    """The verdict's "forgot" warning, naming the knobs, when leak or facts kept crosses evaluate.kept's thresholds and
    the change from the base is beyond noise (`block["paired"]`)."""
    problems = [text for text, beyond, _ in _crossings(block, max_leak, min_facts_kept) if beyond]
    if not problems:
        return None
    return (
        "the fine-tuned model forgot: "
        + "; ".join(problems)
        + ". Keep more of the base: rehearse.enabled true and a higher rehearse.share (the base model's own "
        "answers mixed into training), a lower train.learning_rate or train.num_train_epochs, or a lower "
        "train.lora_rank"
    )


def forgot_within_noise(block: dict, max_leak: float, min_facts_kept: float) -> str | None:
    """What crossed evaluate.kept's thresholds without the change being beyond noise, and what would settle it."""
    unsure = [(text, settle) for text, beyond, settle in _crossings(block, max_leak, min_facts_kept) if not beyond]
    if not unsure:
        return None
    return "within noise, n too small: " + "; ".join(f"{text}, but {settle} would settle it" for text, settle in unsure)
