"""A sparse additive update of a linear layer's weight, trained entry by entry.

``y = x (W + scatter(delta))^T + b`` with ``delta`` holding only the ``k`` selected
entries ``(rows[n], cols[n])`` of the ``d_out x d_in`` update. It is computed as the
frozen layer's own output plus

    Delta(x)[t, i] = sum_{n : rows[n] = i} delta[n] * x[t, cols[n]]

whose gradients are

    d L / d delta[n] = sum_t g[t, rows[n]] * x[t, cols[n]]          (k numbers)
    d L / d x[t, j]  = sum_{n : cols[n] = j} g[t, rows[n]] * delta[n]

Memory and compute are O(T * k) (T = tokens), done in chunks of k so that no
temporary exceeds :data:`MAX_ELEMENTS`; nothing of size ``d_out x d_in`` is formed
and only ``x`` (already kept by the frozen linear for its own backward) is saved.
The official SPT code (``SparseGradLinearFunction``) instead forms the ``k x k``
matrix ``g[:, rows]^T @ x[:, cols]`` and keeps its diagonal: O(k^2) memory.
"""

from __future__ import annotations

import torch

#: largest temporary (elements) one chunk may allocate: 2^24 floats = 64 MiB in fp32
MAX_ELEMENTS = 1 << 24


def _step(tokens: int, k: int) -> int:
    return max(1, min(k, MAX_ELEMENTS // max(1, tokens)))


def _accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class SparseDeltaFunction(torch.autograd.Function):
    """``(x2d (T, d_in), values (k,), rows (k,), cols (k,), d_out) -> Delta(x) (T, d_out)``."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                out_features: int) -> torch.Tensor:
        tokens, k = x2d.shape[0], values.numel()
        out = x2d.new_zeros(tokens, out_features)
        v = values.to(x2d.dtype)
        step = _step(tokens, k)
        for s in range(0, k, step):
            out.index_add_(1, rows[s:s + step], x2d[:, cols[s:s + step]] * v[s:s + step])
        ctx.save_for_backward(x2d, values, rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, values, rows, cols = ctx.saved_tensors
        tokens, k = x2d.shape[0], values.numel()
        step = _step(tokens, k)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x2d)
            v = values.to(grad_out.dtype)
            for s in range(0, k, step):
                grad_x.index_add_(1, cols[s:s + step], (grad_out[:, rows[s:s + step]] * v[s:s + step]).to(x2d.dtype))
        if ctx.needs_input_grad[1]:
            acc = _accumulate_dtype(values.dtype, x2d.dtype, grad_out.dtype)
            grad_values = torch.empty(k, dtype=acc, device=values.device)
            for s in range(0, k, step):
                g = grad_out[:, rows[s:s + step]].to(acc)
                grad_values[s:s + step] = (g * x2d[:, cols[s:s + step]].to(acc)).sum(0)
            grad_values = grad_values.to(values.dtype)
        return grad_x, grad_values, None, None, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x (..., d_in) -> Delta(x) (..., out_features)`` for the entries ``index = [rows; cols]`` (2, k)."""
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    out = SparseDeltaFunction.apply(x2d, values, index[0], index[1], out_features)
    return out.reshape(*lead, out_features)


def dense_delta(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``scatter(delta)``: the ``d_out x d_in`` matrix with ``values`` at ``index`` and 0 elsewhere."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return out.index_put((index[0], index[1]), values, accumulate=True)
