"""VQ codebooks (GPTVQ, VPTQ): initialization (Mahalanobis or k-means++ seeds, Hessian-weighted EM), the codebook update after the column
pass (exact least squares, or the paper's Adam steps), integer codebook quantization and SVD compression.

Conventions: a batch of B codebooks is a float tensor [B, k, d]; the vectors they are fitted to are x [B, M, d] with
per-component weights w broadcastable to [B, M, d] (zero weight = the component does not exist or the row is padding).
The weighted distance of vector x to centroid c is sum_t w_t (x_t - c_t)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..formats.vqweight import VQGeometry, expand, expand_adjoint, quantize_codebooks  # noqa: F401 (re-export)

# ------------------------------------------------------------------------------------------------ initialization
def mahalanobis_seed(x: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Seed k centroids per batch: sort the valid vectors by Mahalanobis distance to their mean, take k evenly
    spaced ones (van Baalen et al., 2024). x [B, M, d]; valid bool [B, M] (at least one valid vector per batch)."""
    b, m, d = x.shape
    vf = valid.to(x.dtype)[..., None]
    count = vf.sum(1, keepdim=True).clamp(min=1)
    mu = (x * vf).sum(1, keepdim=True) / count
    xc = (x - mu) * vf
    sigma = xc.transpose(1, 2) @ xc / count  # [B, d, d]
    ridge = 1e-6 * sigma.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
    sigma = sigma + ridge[:, None, None] * torch.eye(d, dtype=x.dtype)
    dist = ((xc @ torch.linalg.inv(sigma)) * xc).sum(-1)
    dist = torch.where(valid, dist, torch.full_like(dist, float("inf")))
    order = torch.argsort(dist, dim=1, stable=True)  # invalid vectors sort last
    nvalid = valid.sum(1)  # [B]
    pos = torch.round(torch.linspace(0, 1, k, dtype=torch.float64)[None, :] * (nvalid[:, None] - 1).double()).long()
    pick = torch.gather(order, 1, pos.clamp(min=0))
    return torch.gather(x, 1, pick[..., None].expand(-1, -1, d)).clone()


SEED_POOL_PER_CENTROID = 32  # k-means++ draws its seeds from at most this many candidate vectors per centroid


def kmeanspp_seed(x: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Seed k centroids per batch by weighted k-means++ (Arthur & Vassilvitskii, 2007): each next seed is a vector
    drawn with probability proportional to its weighted squared distance to the nearest seed so far (the first one
    proportional to its weight). x [B, M, d], w broadcastable to [B, M, d]; deterministic for a given generator.

    The seeds come from a pool of at most SEED_POOL_PER_CENTROID * k vectors drawn (without replacement) in
    proportion to their weight: k-means++ costs k passes over its candidates, and over all of a large layer's vectors
    those passes took most of the quantization time, while EM refines the seeds on every vector anyway. When fewer
    than k distinct vectors carry weight, the remaining seeds repeat drawn vectors (EM leaves them empty)."""
    b, m, d = x.shape
    w = w.expand(b, m, d)
    out = torch.empty(b, k, d, dtype=x.dtype)
    for p in range(b):
        xp, wp = x[p], w[p]
        mass = wp.sum(1).double()
        if not bool((mass > 0).any()):
            mass = torch.ones(m, dtype=torch.float64)
        pool = SEED_POOL_PER_CENTROID * k
        if m > pool:
            take = torch.multinomial(mass, min(pool, int((mass > 0).sum())), replacement=False, generator=generator)
            xp, wp, mass = xp[take], wp[take], mass[take]
        dist = torch.full((xp.shape[0],), float("inf"), dtype=torch.float64)
        prob = mass
        for j in range(k):
            cdf = torch.cumsum(prob, 0)
            if not float(cdf[-1]) > 0:  # every weighted vector is already a seed
                cdf = torch.cumsum(mass, 0)
            u = torch.rand((), generator=generator, dtype=torch.float64) * cdf[-1]
            i = min(int(torch.searchsorted(cdf, u, right=True)), xp.shape[0] - 1)
            out[p, j] = xp[i]
            dist = torch.minimum(dist, (wp * (xp - xp[i]) ** 2).sum(1).double())
            prob = dist
    return out


def nearest(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid under the weighted distance (first one among equal distances). x [B, M, d],
    w broadcastable, centroids [B, k, d] -> int64 [B, M]. Runs in the native kernels on torch's thread count:
    EM spends nearly all its time here, and a direct loop over centroids held in registers is an order of magnitude
    faster than any formulation through torch's [B, M, k] distance tensors."""
    return kernels.nearest(x, w, centroids, threads=torch.get_num_threads())


def kmeans(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, iters: int, tol: float = 1e-3
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hessian-weighted EM (Lloyd) from the given centroids [B, k, d]. Stops after `iters` iterations or once at most
    a fraction `tol` of the assignments changed in an iteration. Empty clusters keep their centroid.
    Returns (centroids, assignments [B, M], iterations run)."""
    b, m, d = x.shape
    k = centroids.shape[1]
    w = w.expand(b, m, d)
    # The M step's weighted sums per cluster, one bincount per column: several times faster than index_add_ rows.
    wx = torch.cat([w * x, w], dim=-1).reshape(b * m, 2 * d).t().contiguous()
    base = (torch.arange(b) * k)[:, None]
    c = centroids.clone()
    assign = None
    it = 0
    for it in range(1, iters + 1):
        new = nearest(x, w, c)
        changed = m * b if assign is None else int((new != assign).sum())
        assign = new
        flat = (assign + base).reshape(-1)
        sums = torch.stack([torch.bincount(flat, weights=col, minlength=b * k) for col in wx], dim=1).to(x.dtype)
        num, den = sums[:, :d].reshape(b, k, d), sums[:, d:].reshape(b, k, d)
        c = torch.where(den > 0, num / den.clamp(min=1e-30), c)
        if changed <= tol * b * m:
            break
    return c, assign, it


# --------------------------------------------------------------------------------------- integer codebooks
def quantize_symmetric_rows(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 symmetric quantization with one fp16 scale per slice along `dim` (reduced over the other dim of a 2-D
    tensor). Returns (int8 values, fp16-exact scales as float32)."""
    amax = t.abs().amax(dim=1 - dim)
    scale = (amax / 127).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))
    s = scale[:, None] if dim == 0 else scale[None, :]
    return torch.clamp(torch.round(t / s), -127, 127), scale


# ------------------------------------------------------------------------------------------ codebook update
@dataclass
class Objective:
    """f(c) = tr((W - Q) H (W - Q)^T) with Q = scales * expand(P(theta)): the layer's output error on the
    calibration set (H = 2 X^T X / tokens), as a function of the codebook parameters theta."""

    w: torch.Tensor  # [N, K] target weights
    h: torch.Tensor  # [K, K]
    idx: torch.Tensor  # [N, V]
    geom: VQGeometry
    scales: torch.Tensor | None = None  # [N, K] blockwise-normalization multipliers or None
    basis: torch.Tensor | None = None  # SVD: codebooks = theta [G, r] @ basis [r, k]; None: theta = codebooks

    def __post_init__(self) -> None:
        self.offsets = self.geom.code_offsets()

    def codebooks(self, theta: torch.Tensor) -> torch.Tensor:
        g = self.geom
        if self.basis is None:
            return theta
        return (theta @ self.basis).reshape(g.row_blocks, g.col_blocks, g.k, 1)

    def q(self, theta: torch.Tensor) -> torch.Tensor:
        q = expand(self.codebooks(theta), self.idx, self.geom, self.offsets)
        return q if self.scales is None else q * self.scales

    def adjoint(self, grad_q: torch.Tensor) -> torch.Tensor:
        """Pull a gradient w.r.t. Q [N, K] back to theta."""
        if self.scales is not None:
            grad_q = grad_q * self.scales
        gc = expand_adjoint(grad_q, self.idx, self.geom, self.offsets)
        if self.basis is None:
            return gc
        return gc.reshape(self.geom.groups, self.geom.k) @ self.basis.T

    def loss(self, theta: torch.Tensor) -> float:
        e = self.w - self.q(theta)
        return float(((e @ self.h) * e).sum())

    def diag(self) -> torch.Tensor:
        """Diagonal of the normal matrix (Jacobi preconditioner; exact for theta = codebooks)."""
        hd = self.h.diagonal()[None, :].expand(self.geom.n, -1)
        if self.scales is not None:
            hd = hd * self.scales * self.scales
        dc = expand_adjoint(hd.contiguous(), self.idx, self.geom, self.offsets)
        if self.basis is None:
            return dc
        return dc.reshape(self.geom.groups, self.geom.k) @ (self.basis * self.basis).T


def update_lstsq(obj: Objective, theta: torch.Tensor, iters: int = 50, rtol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Exact least-squares codebook update with the indices fixed: Q is linear in theta, so the minimizer of f solves
    the normal equations P^T (Q(theta) H) = P^T (W H). Solved matrix-free by Jacobi-preconditioned conjugate gradients
    started from the current codebooks: every iterate lowers f, and it converges to the exact solution (to relative
    residual rtol) without forming the normal matrix (which couples all codebooks of a row block)."""
    b = obj.adjoint(obj.w @ obj.h)
    x = theta.clone()
    r = b - obj.adjoint(obj.q(x) @ obj.h)
    dinv = obj.diag()
    dinv = torch.where(dinv > 0, 1.0 / dinv.clamp(min=1e-30), torch.zeros_like(dinv))
    z = dinv * r
    p = z.clone()
    rz = float((r * z).sum())
    bnorm = float(b.norm()) or 1.0
    it = 0
    for it in range(1, iters + 1):
        if float(r.norm()) <= rtol * bnorm or rz <= 0:
            it -= 1
            break
        ap = obj.adjoint(obj.q(p) @ obj.h)
        pap = float((p * ap).sum())
        if pap <= 0:
            break
        alpha = rz / pap
        x = x + alpha * p
        r = r - alpha * ap
        z = dinv * r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it


def update_adam(obj: Objective, theta: torch.Tensor, steps: int = 25, lr: float = 1e-3) -> torch.Tensor:
    """The paper's codebook update: `steps` Adam steps on f from the current codebooks, restarting with a 10x smaller
    learning rate whenever a step increases the loss (as the public GPTVQ code does). Kept for comparison only: the
    least-squares update reaches a lower loss in similar time (see the report in quantizers/gptvq.py)."""
    start_loss = obj.loss(theta)
    while True:
        x = theta.clone()
        m = torch.zeros_like(x)
        v = torch.zeros_like(x)
        b1, b2, eps = 0.9, 0.999, 1e-8
        ok = True
        for t in range(1, steps + 1):
            e = obj.w - obj.q(x)
            loss = float(((e @ obj.h) * e).sum())
            if loss > start_loss or loss != loss:
                ok = False
                break
            g = -2 * obj.adjoint(e @ obj.h)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        if ok and obj.loss(x) <= start_loss:
            return x
        lr *= 0.1
        if lr < 1e-9:
            return theta


# ------------------------------------------------------------------------------------------ SVD compression
def sort_codebooks(codebooks: torch.Tensor, idx: torch.Tensor, geom: VQGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """1D: sort every codebook ascending and remap the indices so the decoded weight is unchanged."""
    flat = codebooks.reshape(geom.groups, geom.k)
    sorted_c, order = torch.sort(flat, dim=1, stable=True)
    rank = torch.argsort(order, dim=1)  # old position -> new position
    offsets = geom.code_offsets() // geom.k  # group of each vector
    new_idx = rank[offsets, idx]
    return sorted_c.reshape(codebooks.shape), new_idx


def svd_factors(codebooks: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of the G x k matrix of (sorted) 1D codebooks: returns (A [G, r], B [r, k]) with A @ B ~ C."""
    g = codebooks.shape[0] * codebooks.shape[1]
    mat = codebooks.reshape(g, -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float(), vh[:r].float()
