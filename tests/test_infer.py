"""Inference (src/llmft/infer): LLaMA-Factory prompt encoding, merged adapters, greedy decoding with continuous
batching, the slot KV cache, MKL-prepacked and lean decode steps; on the tiny random Llama with a real LoRA adapter.
"""

from __future__ import annotations

import collections

import pytest
import torch

from eval_data import VAL
from llmft.infer import decode, kv_cache, loading, mkl


def test_prompts_match_the_tokenizer_chat_template(fmt):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "成语「冰寒于水」？"},
    ]
    prompt_ids, answer_ids = fmt.encode(messages[1:] + [{"role": "assistant", "content": "冰比水冷。"}], "Be brief.")
    text = fmt.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert fmt.tokenizer.decode(prompt_ids) == text
    assert prompt_ids == fmt.tokenizer.encode(text, add_special_tokens=False)
    assert fmt.tokenizer.decode(answer_ids) == "冰比水冷。<|im_end|>\n"  # the training target, as LLaMA-Factory has it
    assert fmt.stop_ids == [2] and fmt.pad_id == 2


def test_prompts_match_llamafactory_do_predict_encoding(fmt):
    from llamafactory.data.processor.unsupervised import UnsupervisedDatasetProcessor

    processor = UnsupervisedDatasetProcessor(
        template=fmt.template, tokenizer=fmt.tokenizer, processor=None, data_args=fmt.data_args
    )
    prompt = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "你好\n世界"},
    ]
    response = [{"role": "assistant", "content": "Hello, world!"}]
    expected = processor._encode_data_example(
        prompt=prompt, response=response, system="", tools="", images=[], videos=[], audios=[]
    )
    assert fmt.encode(prompt + response, "", "") == expected


def test_merged_model_gives_the_logits_of_base_plus_adapter(fmt, adapter_dir):
    from peft import PeftModel

    ids = torch.tensor(
        [fmt.encode([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}])[0]]
    )
    with torch.inference_mode():
        base = loading.load_model(fmt, "float32")
        base_logits = base(ids).logits
        unmerged = PeftModel.from_pretrained(loading.load_model(fmt, "float32"), str(adapter_dir)).eval()
        merged = loading.merge_adapter(loading.load_model(fmt, "float32"), adapter_dir)
        expected, got = unmerged(ids).logits, merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (expected - base_logits).abs().max() > 0.1  # the adapter really changes the model


def test_cpu_attention_gives_the_logits_of_hf_sdpa_on_a_padded_batch(fmt):
    from transformers import AutoModelForCausalLM

    ours = loading.load_model(fmt, "float32")
    assert ours.config._attn_implementation == "sdpa_gqa"
    stock = AutoModelForCausalLM.from_pretrained(fmt.path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids, mask = decode._left_pad([[5, 6, 7, 8, 9], [10, 11]], fmt.pad_id, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        got = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        expected = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=0)


def test_mkl_packed_weights_give_the_same_logits_and_are_unpacked_after(fmt):
    model = loading.load_model(fmt, "float32")
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
    with torch.inference_mode():
        expected = model(ids[:, :1]).logits  # 4 rows of one token: the packed path
        with mkl.mkl_packed(model, rows=4) as packed:
            got, prefill = model(ids[:, :1]).logits, model(ids).logits  # 12 rows: the plain path
        assert packed  # CPU, fp32, MKL: a setting where the decode path is packed
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # sums in another order: ~1e-7 here
        assert torch.equal(prefill, model(ids).logits)
    assert all("forward" not in vars(m) for m in model.modules())


def test_batched_greedy_equals_one_by_one_and_hf_generate(fmt, adapter_dir):
    model = loading.merge_adapter(loading.load_model(fmt, "float32"), adapter_dir)
    prompts = [
        fmt.encode([{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ""}])[0]
        for ex in VAL
    ]
    assert len({len(p) for p in prompts}) > 2  # different lengths: left padding is exercised
    batched = decode.greedy_generate(model, prompts, [2], 2, max_new_tokens=8, batch_size=3)
    single = [decode.greedy_generate(model, [p], [2], 2, max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    with torch.inference_mode():
        hf = [
            model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=2)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    assert single == hf


def test_continuous_batching_refills_finished_rows_and_matches_one_by_one(fmt, adapter_dir, monkeypatch):
    model = loading.merge_adapter(loading.load_model(fmt, "float32"), adapter_dir)
    prompts = [
        fmt.encode(
            [{"role": "user", "content": f"{ex['instruction']} {'!' * n}"}, {"role": "assistant", "content": ""}]
        )[0]
        for n in range(6)
        for ex in VAL
    ]
    free = [decode.greedy_generate(model, [p], [-1], 2, max_new_tokens=6)[0] for p in prompts]  # -1 never comes

    def cut(answer, stops):
        return next((answer[: i + 1] for i, t in enumerate(answer) if t in stops), answer)

    # Stop at a token the model really produces, chosen so that rows finish after different numbers of steps.
    stops = [max(sorted({t for a in free for t in a}), key=lambda t: len({len(cut(a, [t])) for a in free}))]
    calls = collections.Counter()

    def spy(name):
        original = getattr(kv_cache.SlotLayer, name)

        def counted(self, *args):
            calls[name] += 1
            return original(self, *args)

        return counted

    for name in ("keep_rows", "drop_columns"):
        monkeypatch.setattr(kv_cache.SlotLayer, name, spy(name))
    got = decode.greedy_generate(model, prompts, stops, 2, max_new_tokens=6, batch_size=4)
    assert got == [cut(a, stops) for a in free]
    assert len({len(a) for a in got}) > 2  # rows finished at different steps; new prompts took their rows
    assert calls["keep_rows"] > 0 and calls["drop_columns"] > 0  # dead columns were dropped on the way


def tiny_qwen2():
    """A random 2-layer Qwen2 (q/k/v biases, another rope base): the lean path's other code branches."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.data.normal_(0, 0.5)  # biases start at zero, which would hide a dropped bias
    return model


def lean_against_hf(model, prompts, lean) -> list[tuple]:
    """(lean step logits, HF's forward logits on the whole text so far, without a cache) for 3 decode steps."""
    seen, step = [], lean.step
    lean.step = lambda *args: seen.append(step(*args)) or seen[-1]
    pairs = []
    with torch.inference_mode():
        decoder = decode._Decoder(
            model, prompts, [-1], 0, max_new_tokens=4, batch_size=len(prompts), full_rows=True, lean=lean
        )
        decoder.refill(list(range(len(prompts))))
        for _ in range(3):  # the later steps attend to keys and values the lean path wrote
            decoder.step()
        for i, logits in enumerate(seen):
            ids, mask = decode._left_pad([p + a[: i + 1] for p, a in zip(prompts, decoder.answers)], 0, "cpu")
            expected = model(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1
            ).logits[:, -1]
            pairs.append((logits, expected))
    assert len(pairs) == 3
    return pairs


def val_prompts(fmt) -> list[list[int]]:
    return [
        fmt.encode([{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ""}])[0]
        for ex in VAL
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_decode_steps_give_the_logits_of_hf_forward(fmt, adapter_dir, arch):
    from llmft.infer.fast_decode import LeanDecoder

    if arch == "llama":
        model, prompts = loading.merge_adapter(loading.load_model(fmt, "float32"), adapter_dir), val_prompts(fmt)
    else:
        model, prompts = tiny_qwen2(), [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18, 19, 20]]
    lean = LeanDecoder.build(model, rows=len(prompts))
    assert lean is not None
    for logits, expected in lean_against_hf(model, prompts, lean):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_lean_decode_steps_in_bf16_give_the_logits_of_hf_forward_in_bf16(fmt, adapter_dir):
    """A CPU with a bf16 unit decodes in bf16 (evaluate.dtype auto): the lean step follows HF's bf16 forward to bf16
    rounding (fp32 softmax and norms, as HF computes them)."""
    from llmft.infer.fast_decode import LeanDecoder

    model, prompts = loading.merge_adapter(loading.load_model(fmt, "bfloat16"), adapter_dir), val_prompts(fmt)
    lean = LeanDecoder.build(model, rows=len(prompts))
    assert lean is not None and lean.layers[0].qkv.packed is None  # oneDNN's bf16 linear, no MKL packing
    for logits, expected in lean_against_hf(model, prompts, lean):
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), expected.float(), atol=0.1, rtol=0.02)
        assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75  # greedy picks mostly agree


def test_greedy_with_the_lean_path_equals_hf_generate(fmt, adapter_dir, monkeypatch):
    from llmft.infer.fast_decode import LeanDecoder

    model = loading.merge_adapter(loading.load_model(fmt, "float32"), adapter_dir)
    prompts = [
        fmt.encode(
            [{"role": "user", "content": f"{ex['instruction']} {'?' * n}"}, {"role": "assistant", "content": ""}]
        )[0]
        for n in range(2)
        for ex in VAL
    ]
    steps = collections.Counter()
    step = LeanDecoder.step
    monkeypatch.setattr(LeanDecoder, "step", lambda self, *args: steps.update(["lean"]) or step(self, *args))
    lean = decode.greedy_generate(model, prompts, [2], 2, max_new_tokens=10, batch_size=4)
    assert steps["lean"] > 0
    assert lean == decode.greedy_generate(model, prompts, [2], 2, max_new_tokens=10, batch_size=4, use_lean=False)
    with torch.inference_mode():
        hf = [
            model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=2)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    assert lean == hf


def test_unsupported_models_fall_back_to_hf_forward(monkeypatch):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from llmft.infer.fast_decode import LeanDecoder, unsupported_reason

    torch.manual_seed(3)
    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    ).eval()
    assert "model_type 'qwen3'" in unsupported_reason(qwen3)  # q/k norms: not the llama layer
    assert "CPU, fp32" in unsupported_reason(tiny_qwen2().double())
    monkeypatch.setattr(LeanDecoder, "step", lambda *args: pytest.fail("the lean path ran on an unsupported model"))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    got = decode.greedy_generate(qwen3, prompts, [-1], 0, max_new_tokens=5, batch_size=2)
    with torch.inference_mode():
        hf = [
            qwen3.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
    assert got == hf


def test_answer_nll_scores_only_the_answer_tokens(fmt, adapter_dir):
    model = loading.load_model(fmt, "float32")
    pairs = [
        fmt.encode([{"role": "user", "content": ex["instruction"]}, {"role": "assistant", "content": ex["output"]}])
        for ex in VAL
    ]
    total, count = decode.answer_nll(model, [p for p, _ in pairs], [a for _, a in pairs], fmt.pad_id, batch_size=2)
    expected_total = 0.0
    with torch.inference_mode():
        for prompt, answer in pairs:
            labels = torch.tensor([[-100] * len(prompt) + answer])
            expected_total += float(model(torch.tensor([prompt + answer]), labels=labels).loss) * len(answer)
    assert count == sum(len(a) for _, a in pairs)
    assert total == pytest.approx(expected_total, rel=1e-4)
    one_by_one = decode.answer_nll(model, [p for p, _ in pairs], [a for _, a in pairs], fmt.pad_id, max_logits=1)
    assert one_by_one == (pytest.approx(total, rel=1e-5), count)  # the logits budget only splits batches
