"""src/metrics.py on strings whose scores were worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmft.metrics import corpus_bleu4, llamafactory_metrics, segment, text_metrics


def test_english_is_split_into_words_and_punctuation_case_and_accents_kept():
    assert segment("Hello, world!") == ["Hello", ",", "world", "!"]
    assert segment("bǎn bǎn liù shí sì") == ["bǎn", "bǎn", "liù", "shí", "sì"]  # jieba would cut b/ǎ/n apart
    assert segment("  ") == []


def test_chinese_is_segmented_with_jieba_and_mixed_text_keeps_english_words():
    assert segment("冰比水冷。指后来居上。") == ["冰比", "水冷", "。", "指", "后来居上", "。"]
    assert segment("比喻学生胜过老师。") == ["比喻", "学生", "胜过", "老师", "。"]
    assert segment("用Python写3个程序") == ["用", "Python", "写", "3", "个", "程序"]


def test_english_scores_match_hand_computed_values():
    # pred "the cat sat on the mat" vs ref "the cat sat on a mat", 6 tokens each:
    #   1-grams: the(clip 1) cat sat on mat = 5/6   2-grams: the-cat cat-sat sat-on = 3/5
    #   3-grams: the-cat-sat cat-sat-on = 2/4       4-grams: the-cat-sat-on = 1/3
    #   ROUGE-1 F1 = 5/6, ROUGE-2 F1 = 3/5, LCS "the cat sat on mat" = 5 -> ROUGE-L F1 = 5/6
    # pred "Hello, world!" == ref: 4 tokens, every n-gram matches (4, 3, 2, 1 of them), all F1 = 1.
    # Corpus BLEU: p1 = 9/10, p2 = 6/8, p3 = 4/6, p4 = 2/4; lengths 10 = 10 -> BP = 1
    #   BLEU = (0.9 * 0.75 * 2/3 * 0.5) ** 0.25 = 0.225 ** 0.25 = 0.688725
    got = text_metrics(["the cat sat on the mat", "Hello, world!"], ["the cat sat on a mat", "Hello,  world! "])
    assert got == pytest.approx(
        {
            "bleu4": 68.8725,
            "rouge1": (500 / 6 + 100) / 2,
            "rouge2": (60 + 100) / 2,
            "rougeL": (500 / 6 + 100) / 2,
            "exact_match": 50.0,
        },
        abs=1e-4,
    )


def test_bleu_brevity_penalty_and_zero_matches():
    # 4 candidate tokens, all n-grams match, reference has 8: BP = exp(1 - 8/4) = exp(-1) = 0.367879
    assert corpus_bleu4([list("abcd")], [list("abcdefgh")]) == pytest.approx(math.exp(-1))
    # no 4-gram can match in a 3-token answer: BLEU-4 without smoothing is 0
    assert corpus_bleu4([list("abc")], [list("abc")]) == 0.0
    assert text_metrics([""], ["something"])["rouge1"] == 0.0


def test_chinese_scores_match_hand_computed_values():
    # pred 冰比|水冷|。|后来居上|。 (5) vs ref 冰比|水冷|。|指|后来居上|。 (6)
    #   1-grams 5/5; 2-grams 冰比-水冷 水冷-。 后来居上-。 = 3/4; 3-grams 冰比-水冷-。 = 1/3; 4-grams 0/2
    #   ROUGE-1 F1 = 2*1*(5/6)/(1+5/6) = 10/11; ROUGE-2 P 3/4, R 3/5 -> F1 = 2/3; LCS = 5 -> ROUGE-L = 10/11
    # pred 比喻|学生|胜过|老师|。 == ref: 5, 4, 3, 2 n-grams all match; F1 = 1
    # Corpus BLEU: p1 = 10/10, p2 = 7/8, p3 = 4/6, p4 = 2/4; lengths 10 vs 11 -> BP = exp(1 - 11/10)
    #   BLEU = exp(-0.1) * (7/24) ** 0.25 = 0.904837 * 0.734889 = 0.664955
    got = text_metrics(["冰比水冷。后来居上。", "比喻学生胜过老师。"], ["冰比水冷。指后来居上。", "比喻学生胜过老师。"])
    assert got == pytest.approx(
        {
            "bleu4": 66.4955,
            "rouge1": (1000 / 11 + 100) / 2,
            "rouge2": (200 / 3 + 100) / 2,
            "rougeL": (1000 / 11 + 100) / 2,
            "exact_match": 50.0,
        },
        abs=1e-4,
    )


class CharTokenizer:
    """Just enough of a tokenizer for LLaMA-Factory's ComputeSimilarity: one id per character, 0 = pad."""

    pad_token_id = 0

    def __init__(self, texts):
        self.chars = ["<pad>"] + sorted({c for t in texts for c in t})

    def encode(self, text, width):
        ids = [self.chars.index(c) for c in text]
        return ids + [-100] * (width - len(ids))  # IGNORE_INDEX padding, as the trainer hands it over

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.chars[i] for i in row if i != self.pad_token_id) for row in rows]


def test_llamafactory_scores_equal_llamafactory_compute_similarity():
    from llamafactory.train.sft.metric import ComputeSimilarity
    from transformers import EvalPrediction

    preds = ["冰比水冷。", "The capital of France is Paris.", "bǎn bǎn liù", "", "犹并驾齐驱。"]
    labels = ["冰比水冷。指后来居上。\n", "Paris.\n", "bǎn bǎn liù shí sì\n", "空\n", "犹并驾齐驱。\n"]
    tok = CharTokenizer(preds + labels)
    width = max(map(len, preds + labels))
    encode = lambda texts: np.array([tok.encode(t, width) for t in texts])
    expected = ComputeSimilarity(tok)(EvalPrediction(predictions=encode(preds), label_ids=encode(labels)))
    assert llamafactory_metrics(preds, labels) == pytest.approx(expected, abs=1e-4)


def test_llamafactory_char_bleu_of_an_exact_answer_is_100():
    # nltk sentence BLEU on characters; identical strings of >= 4 characters score 1.0, ROUGE F1 also 1.0
    assert llamafactory_metrics(["比喻学生胜过老师。"], ["比喻学生胜过老师。"]) == pytest.approx(
        {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}, abs=1e-3
    )
