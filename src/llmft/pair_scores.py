"""How each model ranks held-out preference pairs: the preference accuracy and the log-likelihood margin.

    pairs = load_pairs(Path("data/pairs"), fmt)                 # [] when the prefer stage is off or its data is KTO
    logps = pair_logps(model, fmt, pairs, batch_size=16)         # [(log p(chosen), log p(rejected))] per pair
    block = preference_block({"base": ..., "sft": ..., "tuned": ...})

For a pair, a model prefers the chosen answer when it gives it the higher log-likelihood (summed over the answer's
tokens, teacher-forced, the prompt as context: what DPO's implicit reward compares). The preference accuracy is
the share of pairs it gets right, with its Wilson interval; the margin is the mean of log p(chosen) - log p(rejected)
in nats. DPO's own "reward margin" against the SFT model is beta x (the tuned margin - the SFT margin), so the paired
interval on that difference says whether preference tuning moved the model beyond noise. The pairs are prefer's
held-out val split: no pair of it was trained on.
"""

from __future__ import annotations

from pathlib import Path

from llmft.common import read_json
from llmft.stats import paired_difference, proportion_interval


def load_pairs(pairs_dir: Path | None, fmt) -> list[dict]:
    """The held-out pairs, encoded with the chat template ({prompt_ids, chosen_ids, rejected_ids}); [] when there
    are none (the stage off: an empty dataset_info.json) or they are KTO's unpaired labels."""
    if pairs_dir is None or not (pairs_dir / "val.json").exists():
        return []
    rows = read_json(pairs_dir / "val.json")
    if not rows or "chosen" not in rows[0]:
        return []
    encoded = []
    for row in rows:
        prompt = "\n".join(part for part in (row["instruction"], row.get("input", "")) if part)
        messages = [{"role": "user", "content": prompt}]
        ids = {
            side: fmt.encode([*messages, {"role": "assistant", "content": row[side]}])
            for side in ("chosen", "rejected")
        }
        encoded.append(
            {"prompt_ids": ids["chosen"][0], "chosen_ids": ids["chosen"][1], "rejected_ids": ids["rejected"][1]}
        )
    return encoded


def pair_logps(model, fmt, pairs: list[dict], batch_size: int) -> list[tuple[float, float]]:
    """(log p(chosen), log p(rejected)) of each pair under `model`, summed over the answer tokens."""
    from llmft.infer.decode import answer_nll

    out = {}
    for side in ("chosen", "rejected"):
        items: list = []
        answer_nll(model, [p["prompt_ids"] for p in pairs], [p[f"{side}_ids"] for p in pairs], fmt.pad_id,
                   batch_size, per_example=items)  # fmt: skip
        out[side] = [-loss for loss, _ in items]
    return list(zip(out["chosen"], out["rejected"]))


def preference_block(logps: dict[str, list[tuple[float, float]]]) -> dict:
    """eval.json's `preference`: each model's accuracy (with its 95% Wilson interval) and margin, and the paired
    differences of the tuned model against the SFT model (what preference tuning changed) and against the base."""
    block: dict = {"n": len(next(iter(logps.values())))}
    for name, pairs in logps.items():
        right = sum(c > r for c, r in pairs)
        low, high = proportion_interval(right, len(pairs))
        block[name] = {
            "accuracy": round(100 * right / len(pairs), 2),
            "accuracy_low": round(100 * low, 2),
            "accuracy_high": round(100 * high, 2),
            "right": right,
            "margin": round(sum(c - r for c, r in pairs) / len(pairs), 4),
        }
    margins = {name: [c - r for c, r in pairs] for name, pairs in logps.items()}
    correct = {name: [100.0 * (c > r) for c, r in pairs] for name, pairs in logps.items()}  # percent, as eval.json
    block["paired"] = {
        f"tuned_vs_{ref}": {"accuracy": paired_difference(correct[ref], correct["tuned"]),
                            "margin": paired_difference(margins[ref], margins["tuned"])}
        for ref in ("sft", "base") if ref in logps and "tuned" in logps
    }  # fmt: skip
    return block
