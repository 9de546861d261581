"""Blocked greedy MAP inference of CDPruner's DPP over many tokens (spec ``methods.md`` §5, issue #13 item 5).

The kernel is ``L = Y Yᵀ`` with ``Y = diag(r) X`` (unit rows ``X`` [N, D], relevance ``r``). The fast greedy
of Chen et al. (2018) (``cdpruner.dpp_greedy``) updates every candidate's gain ``d_i²`` after every pick
through ``e = (L_j - Cᵀ c_j) / d_j``, a product with all previous update vectors: ``T² N / 2`` floats read
one pick at a time, the memory-bound part of a large selection. The same picks follow from the
Gram-Schmidt form of those vectors, ``c_i(s) = y_i · w_s``, where ``w_s = z_j / d_j`` is the pick's residual
``z_j = y_j - Σ_{s' < s} c_j(s') w_s'`` scaled to unit length (an orthonormal basis of the picked rows of Y).
A candidate's gain after a run of picks then needs only those picks' basis rows, so the picks go in blocks:

* at a block's start, the ``ACTIVE`` candidates with the largest gains (ties: the smaller index first) are
  followed pick by pick: with their residual kernel ``G = Z Zᵀ`` at the block's start, a pick's kernel row
  is ``G_j - Σ_q e_q(j) e_q`` over the block's earlier picks, its update values ``e = row / d_j`` lower the
  followed gains by ``e²``, and the pick is the first index of the largest followed gain, as ``argmax``
  (these few operations over 256 values run as NumPy operations on host arrays, a few microseconds per
  pick where PyTorch's dispatch costs ~20, and with no device synchronisation per pick);
* every other candidate's gain only falls during the block, so its gain at the block's start bounds it;
  the block ends (after at most ``BLOCK`` picks) at the first pick that an outside bound could beat (a
  larger bound, or an equal one with a smaller index), so every pick is the one-by-one greedy's;
* at the block's end its basis rows are one triangular solve, and every candidate's update values are one
  matrix product ``X Wᵀ`` (``T N D`` multiply-adds in all, at matrix-product speed).

Mathematically these are the picks of ``cdpruner.dpp_greedy`` on ``diag(r) S diag(r)``. In float32 the gains
are rounded differently (residuals instead of ``L_j - Cᵀ c_j``), so a pick decided by a rounding-level
difference of two gains can differ, as between two BLAS blockings; tests/test_selection_scaling.py compares
the kept sets (equal to the one-by-one loop's on full-rank kernels, and in float64). The exhausted-kernel
rule is ``dpp_greedy``'s: a pick whose gain is not positive contributes a zero update.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Most picks per block (the block-end product is [N, D] x [D, BLOCK]).
BLOCK = 32
#: Candidates followed pick by pick within a block.
ACTIVE = 256


def dpp_greedy_blocked(x: torch.Tensor, weights: torch.Tensor, count: int, block: int = BLOCK,
                       active: int = ACTIVE) -> torch.Tensor | None:
    """The ``count`` greedy MAP picks of the DPP ``L = diag(r) X Xᵀ diag(r)`` for one sample.

    Args:
        x: [N, D] float32 unit rows (CDPruner's normalised projected tokens).
        weights: [N] float32 relevance ``r``.
        count: picks (1..N).
        block, active: ``BLOCK`` and ``ACTIVE`` (tests use small ones).

    Returns:
        [1, count] sorted indices, or None when a value is not finite (the caller's plain loop decides).
    """
    size, width = x.shape
    gains = weights * (x * x).sum(dim=-1) * weights  # d_i², as ``cdpruner.dpp_select_projected``
    if not bool(torch.isfinite(gains).all()):
        return None
    basis = x.new_empty(count, width)  # w_s
    updates = x.new_empty(size, count)  # c_i(s)
    followed = _Followed(x, weights, min(active, size))
    chosen: list[int] = []
    step = 0
    while step < count:
        followed.start_block(gains, updates[:, :step], basis[:step], min(active, size - step), block)
        while len(chosen) < min(step + block, count):
            token = followed.pick()
            if token is None:
                break
            chosen.append(token)
        taken = len(chosen) - step
        rows = basis[step:step + taken]
        rows.copy_(followed.block_basis())
        values = torch.mm(x, rows.T).mul_(weights[:, None])  # c_i(s) = y_i · w_s, [N, taken]
        gains.sub_((values * values).sum(dim=-1))
        updates[:, step:step + taken] = values
        followed.end_block(gains, updates[:, step:step + taken], rows)
        step += taken
    if not bool(torch.isfinite(basis.sum())) and not bool(torch.isfinite(basis).all()):
        return None
    return torch.tensor(sorted(chosen), dtype=torch.long, device=x.device).view(1, count)


class _Followed:
    """The candidates followed pick by pick within a block, in ``ACTIVE`` slots that a member keeps while it
    stays (so its residual ``Z`` and kernel entries stay in place): each slot's token (-1: empty), the
    residuals and residual kernel ``G`` at the block's start, the current gains, and per pick its update
    values over the slots."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, slots: int) -> None:
        self.x, self.weights = x, weights
        self.tokens = np.full(slots, -1, dtype=np.int64)  # each slot's token, -1: empty
        self.residual = x.new_zeros(slots, x.shape[1])
        self.gram = x.new_zeros(slots, slots)

    def start_block(self, gains: torch.Tensor, updates: torch.Tensor, basis: torch.Tensor, active: int,
                    block: int) -> None:
        """Follow the ``active`` largest gains, ties by smaller index: a member that stays keeps its slot, a new
        one takes a free slot with its residual ``y_i - Σ_s c_i(s) w_s`` and its kernel entries ``z_i · Z``;
        the kernel's diagonal holds the gains (-inf on empty slots)."""
        top = gains.topk(active)
        outside = gains.clone()
        outside[top.indices] = -math.inf
        if bool(outside.max() == top.values[-1]):  # a tie across the boundary: the smaller indices first
            top = torch.sort(gains, descending=True, stable=True)
            outside = gains.clone()
            outside[top.indices[:active]] = -math.inf
        value, where = outside.max(dim=0)  # the first index of the largest outside gain
        self.bound, self.bound_index = float(value), int(where)
        wanted = top.indices[:active].cpu().numpy()
        stays = np.isin(self.tokens, wanted)  # by slot
        free = np.flatnonzero(~stays)
        new = np.setdiff1d(wanted, self.tokens[stays], assume_unique=True)
        slots = free[:new.size]
        self.tokens[free] = -1
        self.tokens[slots] = new
        device = self.x.device
        slots_t, new_t = torch.from_numpy(slots).to(device), torch.from_numpy(new).to(device)
        fresh = self.x[new_t] * self.weights[new_t, None]
        if basis.shape[0]:
            fresh.addmm_(updates[new_t], basis, alpha=-1)
        empty = torch.from_numpy(free[new.size:]).to(device)
        self.residual[empty] = 0.0
        self.residual[slots_t] = fresh
        cross = fresh @ self.residual.T  # [joining, slots]: z_i · z_s (0 on empty slots)
        self.gram[slots_t] = cross
        self.gram[:, slots_t] = cross.T
        self.gram[empty] = 0.0
        self.gram[:, empty] = 0.0
        occupied = np.flatnonzero(self.tokens >= 0)
        self.occupied = torch.from_numpy(occupied).to(device)  # the members' slots, and their tokens
        self.members = torch.from_numpy(self.tokens[occupied]).to(device)
        diagonal = torch.full((self.tokens.size,), -math.inf, dtype=gains.dtype, device=device)
        diagonal[self.occupied] = gains[self.members]
        torch.diagonal(self.gram).copy_(diagonal)
        # the picks' loop on host arrays: a few NumPy operations over 256 values per pick, no device sync
        self.kernel = self.gram.detach().cpu().numpy()  # G0 (the same memory on the CPU)
        self.gains = self.kernel.diagonal().copy()
        self.values = np.empty((block, self.tokens.size), dtype=self.kernel.dtype)  # per pick: e over the slots
        self.picks: list[int] = []  # per pick: its slot
        self.roots: list[float] = []  # per pick: d_j (0: exhausted)

    def pick(self) -> int | None:
        """The next pick (an index into the N tokens), or None when an outside bound could beat it. The
        pick's kernel row is formed from the block's start, ``G_j = G0_j - Σ_q e_q(j) e_q``, and
        ``e = G_j / d_j`` lowers the followed gains by ``e²``."""
        place = int(self.gains.argmax())
        gain = float(self.gains[place])
        if gain == -math.inf:  # every followed candidate picked: the block ends
            return None
        tied = np.flatnonzero(self.gains == gain)
        if tied.size > 1:  # equal gains: the smallest token, as ``argmax`` over the tokens
            place = int(tied[self.tokens[tied].argmin()])
        token = int(self.tokens[place])
        if not (gain > self.bound or (gain == self.bound and token < self.bound_index)):
            return None
        step = len(self.picks)
        values = self.values[step]
        row = self.kernel[place]
        if step:
            row = row - self.values[:step, place] @ self.values[:step]
        if gain > 0:
            np.divide(row, math.sqrt(gain), out=values)
            self.gains -= values * values
        else:
            values[:] = 0.0
        self.gains[place] = -np.inf
        self.picks.append(place)
        self.roots.append(math.sqrt(gain) if gain > 0 else 0.0)
        return token

    def _values(self) -> torch.Tensor:
        """The block's update values [picks, members] on the features' device."""
        return torch.from_numpy(self.values[:len(self.picks)]).to(self.x.device)

    def block_basis(self) -> torch.Tensor:
        """The block's basis rows: ``w_q = (z_{j_q} - Σ_{q' < q} e_{q'}(j_q) w_{q'}) / d_{j_q}``, one
        triangular solve (a pick with no gain left gets a zero row)."""
        values = self._values()  # [picks, members]
        picks = torch.tensor(self.picks, device=values.device)
        lower = values[:, picks].T.tril(-1)  # [q, q'] = e_{q'}(j_q)
        roots = torch.tensor(self.roots, dtype=values.dtype, device=values.device)
        exhausted = roots == 0
        lower[exhausted] = 0.0
        lower.diagonal().copy_(torch.where(exhausted, torch.ones_like(roots), roots))
        rhs = self.residual[picks].masked_fill(exhausted[:, None], 0.0)
        return torch.linalg.solve_triangular(lower, rhs, upper=False)

    def end_block(self, gains: torch.Tensor, updates: torch.Tensor, rows: torch.Tensor) -> None:
        """The members keep their own pick-by-pick gains and update values; their kernel and residuals move
        to the block's end."""
        values = self._values()
        gains[self.members] = torch.from_numpy(self.gains).to(gains.device)[self.occupied]
        updates[self.members] = values.T[self.occupied]
        self.residual.addmm_(values.T, rows, alpha=-1)
        self.gram.addmm_(values.T, values, alpha=-1)
