"""Two models side by side on the same prompts: greedy answers and logits (probe), and how far apart (agreement).

The export stage checks the merged model against base+adapter with them, the gguf stage each GGUF file against
the merged model; each says in its own words what a failure means.
"""

from __future__ import annotations


def probe(
    model, prompts: list, new_tokens: int, stop_ids: list[int], ref: list | None = None, dtype: str = "double"
) -> list:
    """(greedy sequence, logits as `dtype`) per prompt; with `ref`, logits are taken on ref's sequences so they line up.

    The merge check (llmft.export) compares in float64; the GGUF check (llmft.gguf) in float32.
    """
    import torch

    out = []
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            seq = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=stop_ids[0],
            )
            out.append((seq, getattr(model(ref[i][0] if ref else seq).logits, dtype)()))
    return out


def agreement(got: list, ref: list, prompt_lens: list[int] | None = None) -> dict:
    """How `got` (probe's output) departs from `ref`: the largest |Δ logit| (NaN propagates, so it fails any
    atol), how many greedy answers are the same, and with `prompt_lens` how many answer tokens agree before the
    first difference."""
    import torch

    out = {
        "max_abs_diff": torch.stack([(g[1] - r[1]).abs().max() for g, r in zip(got, ref)]).max().item(),
        "greedy_same": sum(g[0].shape == r[0].shape and bool((g[0] == r[0]).all()) for g, r in zip(got, ref)),
    }
    if prompt_lens is not None:
        agree = total = 0
        for (g, _), (r, _), n in zip(got, ref, prompt_lens):
            a, b = g[0, n:].tolist(), r[0, n:].tolist()
            total += len(b)
            agree += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out |= {"greedy_tokens_agree": agree, "greedy_tokens": total}
    return out
