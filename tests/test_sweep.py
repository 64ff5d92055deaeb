"""make sweep's polling (src/llmft/tools/sweep.py); the whole sweep runs in tests/test_experiments.py."""

from __future__ import annotations

import dvc.api
from dvc.exceptions import NotDvcRepoError

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
