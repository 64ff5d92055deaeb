"""The export stage's work: models/base + models/lora -> models/merged, one plain transformers checkpoint, verified.

    metrics = export(Path("models/base"), Path("models/lora"), Path("models/merged"), params.export, params.train,
                     Path("data/processed"), Path("reports/metrics/eval.json"))

The base is loaded in fp32, never quantized: a QLoRA adapter is merged into the full-precision weights, and a
quantized base checkpoint is refused. Before anything is written, base+adapter and the merged model must agree
on export.check_prompts (max |Δ logits| <= export.check_atol, identical greedy answers); the written files are
then reloaded with plain AutoModelForCausalLM and checked again. The check computes in export.check_dtype
(float64): in fp32 arithmetic, base+adapter itself is ~1e-4 away from exact on SmolLM2-135M, so only fp64
isolates the merge and the fp32 rounding of the saved weights. A failed check leaves no models/merged.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

import yaml

from llmft.common import UserError, atomic_path, get_logger, write_json
from llmft.env import git_commit
from llmft.infer.chat_format import load_chat_format
from llmft.infer.loading import check_adapter
from llmft.infer.probe import agreement, probe
from llmft.model import read_model_info
from llmft.params import ExportParams, TrainParams

log = get_logger("export")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CARD = Path(__file__).with_name("model_card.md")  # the template of models/merged/README.md


def dvc_dir_md5(path: Path) -> str | None:
    """The hash dvc.lock records for a directory (md5 of its sorted file listing), without '.dir'."""
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    entries = [{"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": rel} for rel, p in files]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() if files else None


def quantization_bit(adapter: Path, train: TrainParams) -> int | None:
    """QLoRA bits from the training config saved beside the adapter (train_config.yaml), else from params."""
    configs = [yaml.safe_load(f.read_text(encoding="utf-8")) for f in sorted(adapter.glob("*.yaml"))]
    bits = [c["quantization_bit"] for c in configs if isinstance(c, dict) and c.get("quantization_bit")]
    return int(bits[0]) if bits else train.quantization_bit


def load_base(weights: str):
    """(base in fp32, its stored dtype); quantized or custom-code checkpoints are refused."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights)
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else type(quant).__name__
        raise UserError(
            f"{weights}: the base checkpoint is quantized ({method}); merging into quantized weights "
            "loses the adapter. Point model.name_or_path at the full-precision (fp16/bf16/fp32) model, "
            "then `dvc repro export` (QLoRA adapters merge into it fine)"
        )
    if getattr(config, "auto_map", None):
        raise UserError(
            f"{weights}: the base needs custom code (auto_map); models/merged must load without it. "
            "Use `llamafactory-cli export` for such a model"
        )
    stored = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval(), stored


def compare(got: list, ref: list, atol: float, what: str, strict: bool = True) -> dict:
    """max |Δ logits| and greedy agreement of `got` with `ref`; UserError when strict and they disagree."""
    check = agreement(got, ref)
    diff, same = check["max_abs_diff"], check["greedy_same"]
    log.info("%s: max |Δ logits| = %.3g (atol %g), same greedy answers on %d/%d", what, diff, atol, same, len(ref))
    if strict and not (diff <= atol and same == len(ref)):
        raise UserError(
            f"{what} failed: max |Δ logits| = {diff:.3g} > export.check_atol = {atol:g} or greedy answers "
            f"differ ({same}/{len(ref)} identical): the merged model is not base+adapter, so nothing "
            "was written. Check that models/lora was trained on models/base, then `dvc repro export`"
        )
    return {
        "max_abs_diff": diff,
        "atol": atol,
        "greedy_match": same == len(ref),
        "prompts": len(ref),
        "tokens": sum(r[1].shape[1] for r in ref),
    }


def model_card(
    info: dict, adapter_cfg: dict, train: dict, data_md5: str | None, evals: dict | None, metrics: dict
) -> str:
    base, check = str(info.get("source") or info.get("path") or "?"), metrics["merge_check"]
    return CARD.read_text(encoding="utf-8").format(
        base_json=json.dumps(base, ensure_ascii=False),
        base=base,
        template=info.get("template"),
        data_md5=data_md5 or "unknown",
        r=adapter_cfg.get("r"),
        alpha=adapter_cfg.get("lora_alpha"),
        dora=adapter_cfg.get("use_dora", False),
        dtype=metrics["dtype"],
        qlora=f", trained with QLoRA on a {metrics['qlora_bits']}-bit base" if metrics["qlora_bits"] else "",
        diff=check["max_abs_diff"],
        atol=check["atol"],
        tokens=check["tokens"],
        same=check["greedy_match"],
        evals=f"```json\n{json.dumps(evals, ensure_ascii=False, indent=2)}\n```"
        if evals
        else "Not evaluated yet (`make eval` writes reports/metrics/eval.json).",
        train=yaml.safe_dump(train, sort_keys=False, allow_unicode=True).strip(),
    )


def merge(model):
    """Fold the LoRA update into the base weights (a seam the tests use to corrupt the merge)."""
    return model.merge_and_unload()


def export(
    base: Path, adapter: Path, out: Path, e: ExportParams, train: TrainParams, data: Path, eval_path: Path
) -> dict:
    """Merge, verify, write `out` atomically; return the export metrics."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.time()
    adapter, info = check_adapter(adapter), read_model_info(base)  # export needs a LoRA adapter (finetuning_type lora)
    fmt = load_chat_format(base)  # the tokenizer gets LLaMA-Factory's template fixes, as `llamafactory-cli export`
    weights, tokenizer, stop_ids = fmt.path, fmt.tokenizer, fmt.stop_ids
    bits = quantization_bit(adapter, train)  # QLoRA: the adapter goes into the full-precision base all the same
    base_model, stored = load_base(weights)
    check_dtype = getattr(torch, e.check_dtype)
    try:
        model = PeftModel.from_pretrained(base_model, adapter).eval().to(check_dtype)
    except (RuntimeError, ValueError) as err:
        raise UserError(
            f"{adapter}: does not fit the base {weights}: {str(err).splitlines()[0]}; "
            "retrain it on this base (`dvc repro train`)"
        ) from None
    prompts = [
        torch.tensor([fmt.encode([{"role": "user", "content": p}, {"role": "assistant", "content": ""}])[0]])
        for p in e.check_prompts
    ]
    ref = probe(model, prompts, e.check_new_tokens, stop_ids)
    merged = merge(model)
    checks = {
        "merge_check": compare(
            probe(merged, prompts, e.check_new_tokens, stop_ids, ref), ref, e.check_atol, "merge check"
        )
    }
    dtype = DTYPES.get(e.dtype, stored)
    merged.to(torch.float32)
    eos = merged.generation_config.eos_token_id  # plain generate() must stop where the template ends a turn
    merged.generation_config.eos_token_id = sorted(set(stop_ids) | set([eos] if isinstance(eos, int) else eos or []))
    with atomic_path(out) as tmp:
        merged.to(getattr(torch, dtype)).save_pretrained(tmp, max_shard_size=e.max_shard_size)
        tokenizer.save_pretrained(tmp)
        del model, merged, base_model
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, trust_remote_code=False).eval()
        reloaded.to(check_dtype)  # the saved weights, computed at the precision of the reference
        # In fp32 this checks the files on disk; a bf16/fp16 copy only reports its rounding error.
        checks["reload_check"] = compare(
            probe(reloaded, prompts, e.check_new_tokens, stop_ids, ref),
            ref,
            e.check_atol,
            f"reload check ({dtype})",
            strict=dtype == "float32",
        )
        shards = sorted(tmp.glob("*.safetensors"))
        metrics = {
            **checks,
            "dtype": dtype,
            "check_dtype": e.check_dtype,
            "qlora_bits": bits,
            "num_shards": len(shards),
            "size_mb": round(sum(s.stat().st_size for s in shards) / 2**20, 1),
            "num_parameters": sum(p.numel() for p in reloaded.parameters()),
        }
        data_md5 = dvc_dir_md5(data) if data.is_dir() else None
        evals = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None
        adapter_cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        write_json(
            tmp / "model_info.json",
            {
                "source": info.get("source"),
                "template": info.get("template"),
                "base": str(base),
                "adapter": str(adapter),
                "data_md5": data_md5,
                "dtype": dtype,
                "git_commit": git_commit(),
                "train": train.model_dump(),
                "export": e.model_dump(),
            },
        )
        card = model_card(info, adapter_cfg, train.model_dump(), data_md5, evals, metrics)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        metrics["seconds"] = round(time.time() - start, 1)
    return metrics
