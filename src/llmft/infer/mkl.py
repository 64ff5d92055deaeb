"""MKL-prepacked weights for the few rows of a CPU decode step."""

from __future__ import annotations

import contextlib
import functools

from llmft.env import available_memory


@contextlib.contextmanager
def mkl_packed(model, rows: int):
    """On CPU in fp32, let every nn.Linear multiply inputs of exactly `rows` rows with MKL-prepacked weights.

    Plain sgemm repacks the weight matrix at every call; for the few rows of a decode step that costs more
    than the multiplication (measured: 2.5x slower at 16 rows). Results differ only by float rounding (sums
    in another order, ~1e-6 relative). The packed copies double the weights' memory while decoding, so a
    model that would not fit twice is left alone.
    Yields whether the weights were packed.
    """
    import torch

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    free = available_memory()  # 0 where unknown: then nothing is packed
    if (
        model.device.type != "cpu"
        or model.dtype != torch.float32
        or not torch.backends.mkl.is_available()
        or 1.5 * size > free
    ):
        yield False
        return

    def packed_forward(linear, packed, x):
        if x.numel() != rows * x.shape[-1]:
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        return torch.ops.mkl._mkl_linear(x, packed, linear.weight, linear.bias, rows)

    for linear in linears:
        linear.forward = functools.partial(
            packed_forward, linear, torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)
        )
    try:
        yield True
    finally:
        for linear in linears:
            del linear.forward  # back to nn.Linear.forward (weights may change, e.g. when an adapter is merged)
