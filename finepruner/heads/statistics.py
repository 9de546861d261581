"""Per-head statistics of the last-prompt-token attention to the visual tokens (spec heads.md §3).

Every function works on a float tensor whose last dimension is the visual-token axis (``[..., heads, N]``)
and reduces over it, so the same code scores one sample ``[H, N]`` or a batch ``[B, H, N]``. Callers
upcast to float32 first (:func:`as_float32`): the original code computed everything in fp16, which
rounds the double-softmax statistics away (spec heads.md §3.1 item 5).

Two families of "distribution" used by the strategies:

* :func:`renormalise` -- ``Q = A / sum(A)`` over the visual tokens, our default (spec heads.md §5 item 3);
* :func:`double_softmax` -- ``P = softmax(A)``, the original code's softmax applied to probabilities
  (spec heads.md §3.1 item 1), kept only for ``definitions="original"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ORIGINAL_EPS = 1e-8  # the epsilon the original code adds everywhere (spec heads.md §3 notation)


def as_float32(attn: torch.Tensor) -> torch.Tensor:
    """Return ``attn`` as float32 (a copy only when the dtype differs)."""
    if not torch.is_floating_point(attn):
        raise ValueError(f"attention must be a floating-point tensor, got dtype {attn.dtype}")
    return attn.to(torch.float32)


def renormalise(attn: torch.Tensor) -> torch.Tensor:
    """``Q = A / sum_j A`` per head; an all-zero row becomes uniform ``1/N``."""
    total = attn.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(attn, 1.0 / attn.shape[-1])
    return torch.where(total > 0, attn / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def double_softmax(attn: torch.Tensor) -> torch.Tensor:
    """``P = softmax(A)`` over the visual tokens, as the original code (nearly uniform, spec §3.1 item 1)."""
    return torch.softmax(attn, dim=-1)


# --------------------------------------------------------------------------------------------------------
# Elementary statistics
# --------------------------------------------------------------------------------------------------------


def total(x: torch.Tensor) -> torch.Tensor:
    """``sum_j x_j``."""
    return x.sum(dim=-1)


def variance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the tokens (``torch.var`` default, as the original); 0 for a single token."""
    if x.shape[-1] < 2:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    return x.var(dim=-1)


def std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased standard deviation over the tokens; 0 for a single token."""
    return variance(x).sqrt()


def maximum(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=-1)


def value_range(x: torch.Tensor) -> torch.Tensor:
    """``max_j x - min_j x``."""
    return x.amax(dim=-1) - x.amin(dim=-1)


def top_k_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the ``min(k, N)`` largest values."""
    k = max(1, min(int(k), x.shape[-1]))
    return x.topk(k, dim=-1).values.sum(dim=-1)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``sum_j x_j^2`` (the "sparsity" of a distribution)."""
    return (x * x).sum(dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum p log p`` with ``0 log 0 = 0`` (our definition)."""
    return -torch.special.xlogy(p, p).sum(dim=-1)


def entropy_original(p: torch.Tensor) -> torch.Tensor:
    """The original ``-sum p log(p + 1e-8)``."""
    return -(p * torch.log(p + ORIGINAL_EPS)).sum(dim=-1)


def kl_uniform_to(p: torch.Tensor) -> torch.Tensor:
    """``KL(u || p) = sum u (log u - log(p + 1e-8))`` with ``u = 1/N`` (the original's ``F.kl_div`` form).

    The 1e-8 keeps tokens with ``p = 0`` finite; it is far below ``1/N`` for any realistic N.
    """
    n = p.shape[-1]
    u = 1.0 / n
    return (
        u * (torch.log(torch.tensor(u, dtype=p.dtype, device=p.device)) - torch.log(p + ORIGINAL_EPS))
    ).sum(dim=-1)


def kl_to_uniform(p: torch.Tensor) -> torch.Tensor:
    """``KL(p || u) = sum p log(N p)`` with ``0 log 0 = 0`` (our form of the fixed hierarchical metric)."""
    n = p.shape[-1]
    return torch.special.xlogy(p, p * n).sum(dim=-1)


def kl_to_uniform_original(p: torch.Tensor) -> torch.Tensor:
    """The original fixed-hierarchical ``sum p log(p / (u + 1e-8) + 1e-8)``."""
    u = 1.0 / p.shape[-1]
    return (p * torch.log(p / (u + ORIGINAL_EPS) + ORIGINAL_EPS)).sum(dim=-1)


def gini(x: torch.Tensor) -> torch.Tensor:
    """Gini coefficient ``sum_i (2i - n - 1) x_(i) / (n sum x)`` over ascending-sorted ``x`` (i from 1).

    Scale-invariant, so ``gini(A) == gini(A / sum A)``. A row summing to 0 gives 0.
    """
    n = x.shape[-1]
    xs = x.sort(dim=-1).values
    i = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    num = ((2 * i - n - 1) * xs).sum(dim=-1)
    den = n * xs.sum(dim=-1)
    return torch.where(
        den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num)
    )


def central_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Population second and fourth central moments ``E[(x - mean)^2]``, ``E[(x - mean)^4]``."""
    d = x - x.mean(dim=-1, keepdim=True)
    d2 = d * d
    return d2.mean(dim=-1), (d2 * d2).mean(dim=-1)


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Scale-free kurtosis ``m4 / m2^2``; 0 for a constant row (our definition)."""
    m2, m4 = central_moments(x)
    m2sq = m2 * m2
    return torch.where(
        m2sq > 0, m4 / torch.where(m2sq > 0, m2sq, torch.ones_like(m2sq)), torch.zeros_like(m4)
    )


def kurtosis_original(x: torch.Tensor) -> torch.Tensor:
    """The original ``m4 / (m2^2 + 1e-8)``: the 1e-8 swamps ``m2^2`` for attention-sized values."""
    m2, m4 = central_moments(x)
    return m4 / (m2 * m2 + ORIGINAL_EPS)


def fraction_above_mean(x: torch.Tensor) -> torch.Tensor:
    """``mean_j 1[x_j > mean x]``."""
    return (x > x.mean(dim=-1, keepdim=True)).to(x.dtype).mean(dim=-1)


# --------------------------------------------------------------------------------------------------------
# Across-head helpers
# --------------------------------------------------------------------------------------------------------


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the heads' rows, ``[..., H, H]`` (zero rows have similarity 0)."""
    z = F.normalize(x, p=2, dim=-1)
    return z @ z.transpose(-1, -2)


def mean_offdiagonal(sim: torch.Tensor) -> torch.Tensor:
    """Per-row mean of a square similarity matrix excluding the diagonal; 0 when there is one head."""
    h = sim.shape[-1]
    if h < 2:
        return torch.zeros(sim.shape[:-1], dtype=sim.dtype, device=sim.device)
    diag = torch.diagonal(sim, dim1=-2, dim2=-1)
    return (sim.sum(dim=-1) - diag) / (h - 1)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max scaling across heads (last dim) to [0, 1]; a constant vector maps to 0 (scale-free, ours)."""
    lo = x.amin(dim=-1, keepdim=True)
    rng = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(
        rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x)
    )


def minmax_original(x: torch.Tensor) -> torch.Tensor:
    """The original ``(x - min) / (max - min + 1e-8)``."""
    lo = x.amin(dim=-1, keepdim=True)
    return (x - lo) / (x.amax(dim=-1, keepdim=True) - lo + ORIGINAL_EPS)
