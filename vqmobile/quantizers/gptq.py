"""GPTQ (Frantar et al., 2022): column-by-column rounding onto a group-wise integer grid, each rounding error pushed
onto the remaining columns through the upper Cholesky factor of the inverse Hessian, in lazy batches."""

from __future__ import annotations

import dataclasses

import torch

from ..formats.intweight import IntGrid, IntWeight, quantize_to_grid
from ..hessian import inverse_cholesky
from ..threads import column_pass, num_threads
from .rtn import IntConfigBase, fit_grid


@dataclasses.dataclass
class GPTQConfig(IntConfigBase):
    method = "gptq"
    needs_hessian = True

    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128

    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> IntWeight:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian")
        with column_pass() as threads:
            return self._quantize(weight, hessian, threads)

    def _quantize(self, weight: torch.Tensor, hessian: torch.Tensor, threads) -> IntWeight:
        n, k = weight.shape
        g = self.group_size(k)
        groups = range(0, k, g)

        perm = None
        static_grids: list[IntGrid] | None = None
        if self.act_order:
            # Static groups: grids come from the original weight in original column order, so the stored format keeps
            # group = column // g and kernels need no per-column group index.
            static_grids = [fit_grid(weight[:, s:s + g].float(), self.bits, self.symmetric, self.clip_search)
                            for s in groups]
            perm = torch.argsort(torch.diag(hessian), descending=True)
            weight, hessian = weight[:, perm], hessian[perm][:, perm]
        with num_threads(threads(k ** 3)):
            w, hinv = inverse_cholesky(weight, hessian, self.damp)

        q = torch.zeros_like(w)
        scale = torch.zeros(n, len(groups))
        zero = torch.zeros(n, len(groups))
        # Blocks are a multiple of the group, so a group's grid is always fitted from fully error-updated columns.
        bs = max(self.block_size, g) if g < k else self.block_size
        grid = None
        for i1 in range(0, k, bs):
            i2 = min(i1 + bs, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            h1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                orig = int(perm[col]) if perm is not None else col
                if static_grids is not None:
                    grid = static_grids[orig // g]
                elif col % g == 0:
                    grid = fit_grid(w1[:, i:i + g] if g < k else w, self.bits, self.symmetric, self.clip_search)
                    scale[:, col // g], zero[:, col // g] = grid.scale[:, 0], grid.zero[:, 0]
                wc = w1[:, i:i + 1]
                qc = quantize_to_grid(wc, grid)
                q[:, col:col + 1] = qc
                err = (wc - (qc - grid.zero) * grid.scale) / h1[i, i]
                w1[:, i:] -= err * h1[i:i + 1, i:]
                err1[:, i:i + 1] = err
            with num_threads(threads(n * (i2 - i1) * (k - i2))):
                w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

        if perm is not None:
            q = q[:, torch.argsort(perm)]
            scale = torch.cat([gr.scale for gr in static_grids], 1)
            zero = torch.cat([gr.zero for gr in static_grids], 1)
        return IntWeight.from_codes(q, scale, zero, bits=self.bits, group=g, symmetric=self.symmetric)
