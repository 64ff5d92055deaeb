"""What every arm of perf/perf_train.py trains on: the tokenizer, a random-init Llama of the chosen shape, and
seeded data in blocks whose token lengths, as LLaMA-Factory counts them, fill one pack exactly."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # hidden, layers, intermediate, heads, kv heads
    "llama2-7b": (4096, 32, 11008, 32, 32),
    "smollm2-135m": (576, 30, 1536, 9, 3),  # the embedded model's shape: what a CPU user trains
    "tiny": (64, 2, 128, 4, 2),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TEMPLATE = "smollm2"


def tokenizer_dir(arg: str | None, work: Path) -> Path:
    """--tokenizer, else models/base's tokenizer, else the embedded SmolLM2 one (converted from GGUF, ~20 s)."""
    if arg:
        if not (Path(arg) / "tokenizer.json").exists():
            sys.exit(
                f"--tokenizer {arg}: no tokenizer.json there; make one with --export-tokenizer {arg} on a "
                "machine with the venv"
            )
        return Path(arg)
    if (ROOT / "models/base/tokenizer.json").exists():
        return ROOT / "models/base"
    from llmft.model import embedded_gguf, load_embedded_tokenizer

    out = work / "tokenizer"
    load_embedded_tokenizer(embedded_gguf()).save_pretrained(out)
    return out


def export_tokenizer(tokenizer: str | None, dest: Path) -> None:
    """Copy the tokenizer files (--tokenizer, else models/base's, else the embedded one) into `dest`."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizer_dir(tokenizer, Path(tmp))
        dest.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tok / name).exists():
                shutil.copy(tok / name, dest / name)


def model_shape(args, vocab: int) -> dict:
    hidden, layers, inter, heads, kv = SHAPES[args.shape]
    hidden, layers, inter = args.hidden or hidden, args.layers or layers, args.intermediate or inter
    heads, kv = args.heads or heads, args.kv_heads or args.heads or kv
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
    }


def build_model(shape: dict, tok_dir: Path, out: Path, cuda: bool) -> None:
    """A random-init Llama (bf16 on CUDA, fp32 on CPU), the tokenizer, and a model_info.json like models/base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in shape.items() if k != "model_type"}))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    del model
    if cuda:
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    (out / "model_info.json").write_text(
        json.dumps(
            {
                "source": "random-init",
                "path": str(out),
                "template": TEMPLATE,
                "model_type": "llama",
                "weights_written": True,
            }
        )
    )


class Encoder:
    """Exact token lengths as LLaMA-Factory's supervised processor counts them (prompt + answer, template in)."""

    def __init__(self, tok_dir: Path, cutoff_len: int):
        from llamafactory.data.template import get_template_and_fix_tokenizer
        from llamafactory.hparams import DataArguments
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.template = get_template_and_fix_tokenizer(
            self.tokenizer, DataArguments(template=TEMPLATE, cutoff_len=cutoff_len)
        )
        self.overhead = self.length("x", "y") - 2

    def length(self, prompt: str, answer: str) -> int:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        p, a = self.template.encode_oneturn(self.tokenizer, messages, None, None)
        return len(p) + len(a) + int(self.template.efficient_eos)


class TextMaker:
    """Example text of an exact token length, from Zipf-distributed single-token English words."""

    def __init__(self, enc: Encoder, rng: random.Random):
        vocab = sorted(t for t in enc.tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{3,9}", t))
        self.words = [w[1:] for w in rng.sample(vocab, min(3000, len(vocab)))]
        self.weights = [1 / (rank + 1) for rank in range(len(self.words))]
        self.enc, self.rng = enc, rng

    def text(self, n: int) -> list[str]:
        return self.rng.choices(self.words, self.weights, k=max(1, n))

    def example(self, length: int) -> tuple[str, str] | None:
        """(prompt, answer) of exactly `length` tokens, or None when word boundaries don't allow it."""
        content = length - self.enc.overhead
        n_prompt = max(1, round(content * self.rng.uniform(0.2, 0.6)))
        prompt, answer = self.text(n_prompt), self.text(content - n_prompt)
        for _ in range(8):
            diff = length - self.enc.length(" ".join(prompt), " ".join(answer))
            if diff == 0:
                return " ".join(prompt), " ".join(answer)
            answer = answer + self.text(diff) if diff > 0 else answer[:diff]
            if not answer:
                return None
        return None


def make_data(
    enc: Encoder,
    out: Path,
    *,
    steps: int,
    per_step: int,
    per_pack: int,
    cutoff_len: int,
    seed: int,
    val_examples: int = 32,
) -> list[int]:
    """train.json in blocks of `per_pack` examples that fill one pack (cutoff_len - 1 tokens) exactly; val.json;
    dataset_info.json. Lengths are log-normal, from the template's overhead + 8 to 3/4 of the pack.
    Returns the exact token length of each train example, in order."""
    rng = random.Random(seed)
    maker = TextMaker(enc, rng)
    room = cutoff_len - 1  # LLaMA-Factory packs into cutoff_len - 1 tokens
    lo, hi = enc.overhead + 8, room * 3 // 4
    sigma = 0.8
    median = room / per_pack / math.exp(sigma**2 / 2)
    if per_pack * lo > room:
        sys.exit(f"--cutoff-len {cutoff_len} is too short for {per_pack} examples of at least {lo} tokens per pack")
    rows, lengths = [], []
    for _ in range(steps * per_step // per_pack):
        while True:
            draw = [min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(per_pack - 1)]
            draw.append(room - sum(draw))
            if not lo <= draw[-1] <= hi:
                continue
            rng.shuffle(draw)
            block = [maker.example(n) for n in draw]
            if all(block):
                break
        rows += [{"instruction": p, "input": "", "output": a} for p, a in block]
        lengths += draw
    val = []
    while len(val) < val_examples:
        if ex := maker.example(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))):
            val.append({"instruction": ex[0], "input": "", "output": ex[1]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    (out / "val.json").write_text(json.dumps(val, ensure_ascii=False))
    cols = {"prompt": "instruction", "query": "input", "response": "output"}
    (out / "dataset_info.json").write_text(
        json.dumps({n: {"file_name": f"{n}.json", "columns": cols} for n in ("train", "val")})
    )
    return lengths
