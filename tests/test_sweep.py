"""make sweep's polling and seed table (src/llmft/tools/sweep.py); the whole sweep: tests/test_experiments.py."""

from __future__ import annotations

import dvc.api
import pytest
from dvc.exceptions import NotDvcRepoError

from llmft.common import UserError
from llmft.tools import sweep


def test_a_queue_dvc_cannot_read_yet_is_asked_again_not_taken_as_done(monkeypatch):
    """Right after `dvc queue start`, exp_show can fail on an executor whose temporary repo does not exist yet."""

    def not_yet(**_):
        raise NotDvcRepoError("directory '.dvc/tmp/exps/tmpa3om4lqu/.dvc' does not exist")

    monkeypatch.setattr(dvc.api, "exp_show", not_yet)
    assert sweep.states({"conic-book"}, "HEAD") is None
    rows = [{"Experiment": "conic-book", "State": "Running"}, {"Experiment": "other", "State": None}]
    monkeypatch.setattr(dvc.api, "exp_show", lambda **_: rows)
    assert sweep.states({"conic-book", "dolce-kiwi"}, "HEAD") == {"conic-book": "Running", "dolce-kiwi": "Queued"}


def test_seed_table_shows_each_point_as_mean_and_spread_over_its_seeds():
    rows = [
        {"Experiment": "a1", "train.lora_rank": 4, "train.seed": 42, "eval.json:tuned.val.loss": 2.0, "train_loss": 1},
        {"Experiment": "a2", "train.lora_rank": 4, "train.seed": 43, "eval.json:tuned.val.loss": 2.2, "train_loss": 1},
        {"Experiment": "a3", "train.lora_rank": 4, "train.seed": 44, "eval.json:tuned.val.loss": 2.4, "train_loss": 1},
        {"Experiment": "b1", "train.lora_rank": 16, "train.seed": 42, "eval.json:tuned.val.loss": 1.5, "train_loss": 1},
        {
            "Experiment": "b2",
            "train.lora_rank": 16,
            "train.seed": 43,
            "eval.json:tuned.val.loss": None,
            "train_loss": 1,
        },
    ]
    lines = sweep.seed_table(rows, ["train.lora_rank"], ["tuned.val.loss", "train_loss", "kept.drift"])
    assert lines[0].split("\t") == ["train.lora_rank", "seeds", "tuned.val.loss", "train_loss"]  # no drift column
    assert lines[1].split("\t") == ["4", "3", "2.2 ± 0.2", "1 ± 0"]  # sample standard deviation of 2.0, 2.2, 2.4
    assert lines[2].split("\t") == ["16", "2", "1.5", "1 ± 0"]  # one seed with a loss: its value, no spread
    assert len(lines) == 3


def test_seeds_count_up_from_the_params_seed(tmp_path):
    (tmp_path / "params.yaml").write_text("prepare:\n  input: unused.csv\ntrain:\n  seed: 7\n")
    assert sweep.seed_values(3, str(tmp_path / "params.yaml")) == [7, 8, 9]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-S", "train.seed=1,2", "--seeds", "3"], "both set the seed"),
        (["-S", "train.lora_rank=4,8", "--seeds", "0"], "at least 1"),
    ],
)
def test_bad_seeds_are_refused_before_anything_is_queued(monkeypatch, argv, message):
    monkeypatch.setattr(sweep, "dvc", lambda *a: pytest.fail("nothing may be queued"))
    with pytest.raises(UserError, match=message):
        sweep.main(argv)
