"""Helpers of mmlu_subset.yaml (lm-eval imports this file by path through `!function mmlu_subset.<name>`)."""

from __future__ import annotations

from lm_eval.api.samplers import ContextSampler


def test_docs(dataset):
    """The questions to score."""
    return dataset.filter(lambda doc: doc["split"] == "test")


def dev_docs(dataset):
    """The few-shot pool: other questions of each subject (data/benchmarks/mmlu/dev.jsonl)."""
    return dataset.filter(lambda doc: doc["split"] == "dev")


class SameSubjectSampler(ContextSampler):
    """The first k pool questions of the scored question's subject, in file order: MMLU's 5-shot, per subject.

    One task holds all 57 subjects, so lm-eval's own first_n sampler would give every question the same
    (abstract algebra) examples.
    """

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        if eval_doc is None:
            raise ValueError("mmlu_subset: SameSubjectSampler needs fewshot_config.split equal to test_split")
        pool = [doc for doc in self.df if doc["subject"] == eval_doc["subject"]]
        if n > len(pool):
            raise ValueError(
                f"mmlu_subset: num_fewshot {n} but only {len(pool)} dev questions for {eval_doc['subject']}; "
                "lower benchmark.num_fewshot or rebuild with a larger --dev-per-subject"
            )
        return pool[:n]
