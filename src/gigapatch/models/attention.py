"""Cross-attention pooling of a set of patch embeddings, and 2-D positional encodings (IPS).

:class:`CrossAttentionPool` is the IPS aggregator: one learned query per task attends over the
patch embeddings with multi-head attention, then residual + LayerNorm, an MLP, residual +
LayerNorm. Its attention weights double as the patch scores of IPS's selection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CrossAttentionPool", "sinusoidal_2d"]


def sinusoidal_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encodings of grid positions: ``rows, cols`` (any shape S) → ``(*S, dim)``.

    The first half of the channels encodes the row, the second the column, each as
    ``sin(pos·ω_i), cos(pos·ω_i)`` with ``ω_i = 10000^(-2i/(dim/2))`` (Transformer style).
    ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"positional encodings need a dimension divisible by 4, got {dim}")
    quarter = dim // 4
    freq = torch.exp(
        torch.arange(quarter, device=rows.device, dtype=torch.float32)
        * (-math.log(10000.0) / quarter)
    )

    def enc(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.to(torch.float32)[..., None] * freq  # (*S, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (*S, dim/2)

    return torch.cat([enc(rows), enc(cols)], dim=-1)


class CrossAttentionPool(nn.Module):
    """``T`` learned queries attend over ``N`` embeddings: ``(B, N, D)`` → ``(B, T, D)``.

    ``z = LN(q + MHA(q, x, x))``, then ``out = LN(z + MLP(z))``; MLP = Linear(D, r·D), GELU,
    dropout, Linear(r·D, D).
    """

    def __init__(
        self, dim: int, heads: int, num_queries: int, mlp_ratio: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} attention heads")
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_ratio * dim, dim),
        )
        self.norm2 = nn.LayerNorm(dim)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        return self.queries.to(x.dtype).expand(x.shape[0], -1, -1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, T, N)`` of the queries over ``x`` ``(B, N, D)``, averaged
        over heads (each row sums to 1)."""
        _, weights = self.attn(self._queries(x), x, x, need_weights=True,
                               average_attn_weights=True)
        return weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, N, D)`` → pooled ``(B, T, D)`` and attention weights ``(B, T, N)``."""
        q = self._queries(x)
        attended, weights = self.attn(q, x, x, need_weights=True, average_attn_weights=True)
        z = self.norm1(q + attended)
        return self.norm2(z + self.mlp(z)), weights
