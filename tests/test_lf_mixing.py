"""The rehearsal mix (src/llmft/lf/mixing.py): the share asked, the repeat cap, and LLaMA-Factory's own draw."""

from __future__ import annotations

import collections
import json
from pathlib import Path

from llmft.lf.mixing import describe, plan_mix, write_dataset_info
from llmft.params import RehearseParams


def _dirs(tmp_path: Path, own: int, pool: int) -> tuple[Path, Path]:
    data, rehearsal = tmp_path / "processed", tmp_path / "rehearsal"
    for folder, name, rows in (
        (data, "train", [{"instruction": f"问题{i}", "input": "", "output": f"答案{i}"} for i in range(own)]),
        (rehearsal, "rehearsal", [{"instruction": f"prompt {i}", "input": "", "output": f"a{i}"} for i in range(pool)]),
    ):
        folder.mkdir()
        (folder / f"{name}.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        (folder / "dataset_info.json").write_text(json.dumps({name: {"file_name": f"{name}.json"}}))
    return data, rehearsal


def test_a_pool_big_enough_keeps_the_share_and_draws_each_answer_at_most_once(tmp_path):
    data, rehearsal = _dirs(tmp_path, own=100, pool=150)
    mix = plan_mix(data, rehearsal, RehearseParams(share=0.5), None)
    assert (mix.samples, mix.asked, mix.repeats, mix.share) == (100, 100, 1, 0.5)
    assert mix.dataset_keys("models/lora")["dataset"] == "train,rehearsal"
    assert len(describe(mix, 0.5)) == 1 and "none drawn more than once an epoch" in describe(mix, 0.5)[0]


def test_a_large_table_brings_the_share_down_to_what_the_pool_allows_and_says_so(tmp_path):
    data, rehearsal = _dirs(tmp_path, own=962, pool=105)
    mix = plan_mix(data, rehearsal, RehearseParams(share=0.5, max_repeats=2), None)
    assert (mix.asked, mix.samples, mix.repeats) == (962, 210, 2)
    assert mix.dataset_keys("models/lora")["dataset"] == "train,rehearsal,rehearsal_2"
    assert [mix.info[n]["num_samples"] for n in ("rehearsal", "rehearsal_2")] == [105, 105]
    first, down = describe(mix, 0.5)
    assert "210 of the base model's own answers (105 available, none drawn more than twice an epoch)" in first
    assert down == (
        "rehearsal share down from 50% to 18%: 0.5 of an epoch of your 962 examples asks for 962 rehearsal "
        "examples, but 105 answers drawn at most rehearse.max_repeats=2 times give 210; add prompts to "
        "rehearse.prompts (each becomes one more answer) to keep the share"
    )
    # a share that needs a part of the second draw: the last entry draws the rest
    mix = plan_mix(data, rehearsal, RehearseParams(share=0.15), None)
    assert mix.samples == 170 and [mix.info[n]["num_samples"] for n in ("rehearsal", "rehearsal_2")] == [105, 65]


def test_llamafactory_draws_no_answer_more_often_than_the_cap(tmp_path, smol_tokenizer_dir):
    from llamafactory.data.loader import _get_merged_dataset
    from llamafactory.hparams import get_train_args

    data, rehearsal = _dirs(tmp_path, own=300, pool=40)
    mix = plan_mix(data, rehearsal, RehearseParams(share=0.5, max_repeats=3), None)
    assert (mix.samples, mix.repeats) == (120, 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_dataset_info(mix.info, run_dir)
    keys = mix.dataset_keys(str(run_dir))
    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "model_name_or_path": str(smol_tokenizer_dir),
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "template": "smollm2",
            "output_dir": str(tmp_path / "out"),
            "report_to": "none",
            "use_cpu": True,
        }
        | keys
    )
    merged = _get_merged_dataset(data_args.dataset, model_args, data_args, training_args, "sft")
    answers = collections.Counter(row["_response"][0]["content"] for row in merged)
    drawn = {a: n for a, n in answers.items() if not a.startswith("答案")}
    assert sum(drawn.values()) == 120 and len(drawn) == 40 and max(drawn.values()) == 3
    assert sum(n for a, n in answers.items() if a.startswith("答案")) == 300  # every example of the user's, once
