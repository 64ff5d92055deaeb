"""Text metrics of generated answers against reference answers, all in percent (0-100).

    from metrics import text_metrics, llamafactory_metrics
    text_metrics(["the cat sat"], ["the cat sat"])          # {'bleu4': 100.0, 'rouge1': 100.0, ...}

Two families, because they answer different questions:
- `text_metrics`: word-level scores, comparable across tokenizers and models. Tokens: each run of Han
  characters is segmented with jieba (default dictionary, accurate mode); other text is split into words
  (runs of letters and digits, accents and case kept, so pinyin stays whole) and single punctuation marks.
  BLEU-4 is corpus-level (Papineni 2002: clipped n-gram counts summed over the split, uniform weights,
  brevity penalty, no smoothing); ROUGE-1/2 are F1 on clipped n-gram overlap and ROUGE-L is F1 on the
  longest common subsequence, per example, averaged.
- `llamafactory_metrics`: the numbers LLaMA-Factory's do_predict prints (ComputeSimilarity in
  llamafactory/train/sft/metric.py, replicated line for line), to compare with published LLaMA-Factory results.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
# A run of Han characters, a run of other word characters (letters with accents, digits, _), or one other
# non-space character (punctuation, full-width or not).
TOKEN = re.compile(f"([{HAN}]+)|([^\\W{HAN}]+)|([^\\w\\s])")

# Stored in eval.json as one string (one column in `dvc metrics show`), so a number is never read without it.
METHOD = (
    "tokens: jieba words for Chinese, words and punctuation marks otherwise, case kept; "
    "bleu4: corpus BLEU-4, no smoothing; rouge1/2/L: F1 per example, averaged; exact_match: after "
    "collapsing whitespace; loss: nats per answer token, teacher-forced, prompt not scored; "
    "llamafactory: LLaMA-Factory do_predict scores (rouge-chinese on jieba tokens, character BLEU-4 "
    "with smoothing method3) against its decoded training targets; all scores in percent; paired: tuned - base over "
    "the same items, 95% seeded paired bootstrap (src/llmft/stats.py)"
)


def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" lines are noise in a stage log
    return jieba


def segment(text: str) -> list[str]:
    """Tokens for the word-level metrics: jieba words for Chinese, words and punctuation marks otherwise."""
    tokens: list[str] = []
    for han, word, mark in TOKEN.findall(text):
        if han:
            tokens.extend(t for t in _jieba().lcut(han) if t.strip())
        else:
            tokens.append(word or mark)
    return tokens


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 of one answer, in percent (the per-example score `make compare` ranks by)."""
    pred_tokens, ref_tokens = segment(pred), segment(ref)
    return round(100 * _f1(_lcs(pred_tokens, ref_tokens), len(pred_tokens), len(ref_tokens)), 4)


def corpus_bleu4(preds: list[list[str]], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] with one reference per prediction."""
    matched, total = [0] * 4, [0] * 4
    for pred, ref in zip(preds, refs):
        for n in range(1, 5):
            pred_grams, ref_grams = _ngrams(pred, n), _ngrams(ref, n)
            matched[n - 1] += sum((pred_grams & ref_grams).values())
            total[n - 1] += sum(pred_grams.values())
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    pred_len, ref_len = sum(map(len, preds)), sum(map(len, refs))
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def text_metrics(preds: list[str], refs: list[str]) -> dict[str, float]:
    """BLEU-4, ROUGE-1/2/L and exact match of `preds` against `refs` (same length), in percent."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need as many predictions as references, at least one; got {len(preds)} and {len(refs)}")
    pred_tokens, ref_tokens = [segment(p) for p in preds], [segment(r) for r in refs]
    rouge: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for pred, ref in zip(pred_tokens, ref_tokens):
        for n in (1, 2):
            pred_grams, ref_grams = _ngrams(pred, n), _ngrams(ref, n)
            overlap = sum((pred_grams & ref_grams).values())
            rouge[f"rouge{n}"].append(_f1(overlap, sum(pred_grams.values()), sum(ref_grams.values())))
        rouge["rougeL"].append(_f1(_lcs(pred, ref), len(pred), len(ref)))
    squash = lambda s: " ".join(s.split())
    exact = sum(squash(p) == squash(r) for p, r in zip(preds, refs)) / len(preds)
    scores = {
        "bleu4": corpus_bleu4(pred_tokens, ref_tokens),
        **{k: sum(v) / len(v) for k, v in rouge.items()},
        "exact_match": exact,
    }
    return {k: round(100 * v, 4) for k, v in scores.items()}


def llamafactory_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """LLaMA-Factory's do_predict scores, keyed as in its predict_results.json (without `predict_`)."""
    import numpy as np
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    score_dict: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels):  # from here on: ComputeSimilarity.__call__, unchanged
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))

        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            rouge = Rouge()
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
            result = scores[0]

        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))

        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: round(float(np.mean(v)), 4) for k, v in score_dict.items()}
