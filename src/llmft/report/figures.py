"""What the report's figures draw: the train stage's DVCLive curves and the lengths of the training examples.

    from llmft.report import figures
    figures.curves("dvclive/train/plots/metrics")    # {"loss": DataFrame(step, value), "eval/loss": ..., ...}

Both read files the pipeline wrote (the curves, data/processed/train.json, the tokenizer in models/base); the
notebook draws them, render.show shows them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmft.common import read_json
from llmft.model import read_model_info


def curves(plots_dir: str | Path) -> dict[str, Any]:
    """Every DVCLive series under `plots_dir` (dvclive/train/plots/metrics), by name (loss, eval/loss, ...).

    Each is a DataFrame with columns step and value: DVCLive writes `timestamp step <name>` while training,
    train.py rewrites `step <name>` at the end; the value is the last column in both.
    """
    import pandas as pd

    root = Path(plots_dir)
    series = {}
    for tsv in sorted(root.rglob("*.tsv")):
        df = pd.read_csv(tsv, sep="\t")
        if "step" not in df.columns or len(df.columns) < 2:
            continue  # not a DVCLive series
        step, value = pd.to_numeric(df["step"], errors="coerce"), pd.to_numeric(df[df.columns[-1]], errors="coerce")
        if step.isna().any() or value.isna().any():
            raise ValueError(f"{tsv}: a step or {df.columns[-1]} value is not a number; rerun `make train`")
        series[tsv.relative_to(root).with_suffix("").as_posix()] = pd.DataFrame({"step": step, "value": value})
    return series


def example_lengths(train_file: str | Path, model_dir: str | Path) -> tuple[list[int], str]:
    """(length of each training example, unit): tokens of instruction+input+output with the base model's
    tokenizer when one is on disk (models/base, or the local directory its model_info.json points to),
    else characters. The chat template adds a few tokens more; cutoff_len counts those too."""
    rows = read_json(train_file)
    texts = [
        ("\n".join(str(r.get(k) or "") for k in ("system", "instruction", "input")), str(r.get("output") or ""))
        if isinstance(r, dict)
        else ("", "")
        for r in rows
    ]  # ShareGPT rows count as empty: rare, labelled below
    encode = _local_tokenizer(Path(model_dir))
    if encode is None:
        return [len(p) + len(o) for p, o in texts], "characters"
    return [len(p) + len(o) for p, o in zip(encode([p for p, _ in texts]), encode([o for _, o in texts]))], "tokens"


def _local_tokenizer(model_dir: Path) -> Callable[[list[str]], list[list[int]]] | None:
    """A batch encoder (no special tokens) from tokenizer.json via `tokenizers` (fast to import), else via
    transformers (slow tokenizers such as a bare SentencePiece model); None when no tokenizer is on disk."""
    candidates = [model_dir]
    if (model_dir / "model_info.json").exists():
        candidates.append(Path(read_model_info(model_dir)["path"]))
    for path in candidates:
        try:
            if (path / "tokenizer.json").exists():
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
                return lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
            if (path / "tokenizer_config.json").exists():
                from transformers import AutoTokenizer

                auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                return lambda texts: auto(texts, add_special_tokens=False)["input_ids"]
        except Exception:  # any failure means "count characters instead", and the plot says so
            return None
    return None
