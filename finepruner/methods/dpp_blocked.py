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
    followed = _Followed(x, weights)
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
    """The candidates followed pick by pick within a block: their indices (ascending), residuals ``Z`` and
    residual kernel ``G`` at the block's start, current gains, and per pick its update values over them."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor) -> None:
        self.x, self.weights = x, weights
        self.members = x.new_empty(0, dtype=torch.long)
        self.residual = x.new_empty(0, x.shape[1])
        self.gram = x.new_empty(0, 0)

    def start_block(self, gains: torch.Tensor, updates: torch.Tensor, basis: torch.Tensor, active: int,
                    block: int) -> None:
        """Follow the ``active`` largest gains, ties by smaller index: a member that stays keeps its residual
        and kernel entries, a new one's residual is ``y_i - Σ_s c_i(s) w_s``; the kernel ``G = Z Zᵀ`` has the
        gains as its diagonal."""
        top = gains.topk(active)
        outside = gains.clone()
        outside[top.indices] = -math.inf
        if bool(outside.max() == top.values[-1]):  # a tie across the boundary: the smaller indices first
            top = torch.sort(gains, descending=True, stable=True)
            outside = gains.clone()
            outside[top.indices[:active]] = -math.inf
        wanted = top.indices[:active].sort().values
        value, where = outside.max(dim=0)  # the first index of the largest outside gain
        self.bound, self.bound_index = float(value), int(where)
        place = torch.full(gains.shape, -1, dtype=torch.long, device=gains.device)
        place[self.members] = torch.arange(self.members.numel(), device=gains.device)
        old = place[wanted]  # each wanted token's row among the previous members; -1: it joins now
        joins = old < 0
        stay, join = torch.nonzero(~joins)[:, 0], torch.nonzero(joins)[:, 0]
        kept = old[stay]
        staying = self.residual.index_select(0, kept)
        new = wanted[join]
        fresh = self.x[new] * self.weights[new, None]
        if basis.shape[0]:
            fresh.addmm_(updates[new], basis, alpha=-1)
        residual = self.residual.new_empty(wanted.numel(), self.x.shape[1])
        residual[stay] = staying
        residual[join] = fresh
        # G in (staying, joining) order, then rows and columns put in the members' order; a staying pair keeps
        # its entry of the previous block's kernel (moved to that block's end by ``end_block``)
        cross = staying @ fresh.T  # [staying, joining]
        gram = torch.cat([torch.cat([self.gram.index_select(0, kept).index_select(1, kept), cross], dim=1),
                          torch.cat([cross.T, fresh @ fresh.T], dim=1)])
        order = torch.cat([stay, join]).argsort()
        gram = gram.index_select(0, order).index_select(1, order)
        torch.diagonal(gram).copy_(gains[wanted])
        self.members, self.residual, self.gram, self.index = wanted, residual, gram, wanted.tolist()
        # the picks' loop on host arrays: a few NumPy operations over 256 values per pick, no device sync
        self.kernel = gram.detach().cpu().numpy()  # G0 (the same memory on the CPU)
        self.gains = self.kernel.diagonal().copy()
        self.values = np.empty((block, wanted.numel()), dtype=self.kernel.dtype)  # per pick: e over the members
        self.picks: list[int] = []  # per pick: its place among the members
        self.roots: list[float] = []  # per pick: d_j (0: exhausted)

    def pick(self) -> int | None:
        """The next pick (an index into the N tokens), or None when an outside bound could beat it. The
        pick's kernel row is formed from the block's start, ``G_j = G0_j - Σ_q e_q(j) e_q``, and
        ``e = G_j / d_j`` lowers the followed gains by ``e²``."""
        place = int(self.gains.argmax())  # the first index of the largest followed gain
        gain = float(self.gains[place])
        token = self.index[place]
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
        gains[self.members] = torch.from_numpy(self.gains).to(gains.device)
        updates[self.members] = values.T
        self.residual.addmm_(values.T, rows, alpha=-1)
        self.gram.addmm_(values.T, values, alpha=-1)
