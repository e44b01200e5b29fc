"""SPT's structured modules and the update functions the sites run (bound with ``functools.partial``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .._sparse import dense_delta, sparse_delta


class SPTLoRAModule(nn.Module):
    """``DropPath(B A Dropout(x))`` with ``A`` (r, d_in) Kaiming-uniform, ``B`` (d_out, r) zero."""

    def __init__(self, d_in: int, d_out: int, r: int, dropout: float, drop_path: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(F.linear(F.linear(self.dropout(x), self.A), self.B))

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A


class SPTAdapterModule(nn.Module):
    """``DropPath(U GELU(D Dropout(h)))``; ``D`` as ``nn.Linear`` inits it, ``U`` zero."""

    def __init__(self, d: int, r: int, dropout: float, drop_path: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(d)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.up(self.act(self.down(self.dropout(h)))))


# --- update functions (bound with functools.partial to tensor names; read the host at call time) ---
def vector(host: nn.Module, name: str, size: int) -> torch.Tensor:
    """A vector delta: the whole ``name`` or ``name_delta`` scattered at ``name_index``."""
    full = host._parameters.get(name)
    if full is not None:
        return full
    values = host._parameters[f"{name}_delta"]
    zeros = torch.zeros(size, dtype=values.dtype, device=values.device)
    return zeros.index_add(0, host._buffers[f"{name}_index"], values)


def vector_branch(name: str, size: int, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bias delta as a branch: ``y + db`` whatever ``x``."""
    return vector(host, name, size)


def vector_delta(name: str, size: int, host: nn.Module) -> torch.Tensor:
    return vector(host, name, size)


def norm_weight_branch(name: str, size: int, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm weight delta: ``(w + dw) xhat + b = y + dw xhat``."""
    return F.layer_norm(x, host.normalized_shape, None, None, host.eps) * vector(host, name, size)


def sparse_branch(name: str, out_features: int, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return sparse_delta(x, host._parameters[f"{name}_delta"], host._buffers[f"{name}_index"], out_features)


def sparse_dense(name: str, shape: tuple[int, int], host: nn.Module) -> torch.Tensor:
    return dense_delta(host._parameters[f"{name}_delta"], host._buffers[f"{name}_index"], shape)


def lora_down(name: str, host: nn.Module) -> torch.Tensor:
    return host._modules[name].A


def lora_up(name: str, host: nn.Module) -> torch.Tensor:
    return host._modules[name].B


def lora_input(name: str, host: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``DropPath(Dropout(x))``: DropPath's per-sample factor commutes with the linear ``B A``, so
    ``DropPath(B A Dropout(x)) = B A DropPath(Dropout(x))``; ``x`` itself when both are idle."""
    m = host._modules[name]
    if not m.training:
        return x
    if m.dropout.p > 0:
        x = m.dropout(x)
    if m.drop_path.drop_prob > 0:
        x = m.drop_path(x)
    return x


def module_delta(name: str, host: nn.Module) -> torch.Tensor:
    return host._modules[name].delta_weight()


def module_exact(name: str, host: nn.Module) -> bool:
    m = host._modules[name]
    return not m.training or (m.dropout.p == 0 and m.drop_path.drop_prob == 0)


def module_map(name: str, host: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Sequential adapter on the matrix output: ``h + adapter(h)``."""
    return h + host._modules[name](h)


def cls_hook(prefix: str, module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    delta = module._parameters[f"{prefix}cls_token"]
    return (torch.cat([x[:, :1] + delta, x[:, 1:]], dim=1),) + tuple(args[1:])
