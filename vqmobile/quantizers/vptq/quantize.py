"""VPTQ's algorithm for one layer (Liu et al., 2024): codebooks from a Hessian-weighted k-means, then a GPTQ column
pass that quantizes each input column's vectors independently.

A vector is v consecutive output rows of one input column, so one column's vectors share the same Hessian weight
H_cc and are quantized independently of each other (channel-independent second-order optimization): every column is
replaced by its nearest codebook vectors (plain Euclidean distance; with a residual stage, the nearest residual vector
to what the first stage left), and its error is pushed onto the not-yet-quantized columns through the upper Cholesky
factor of H^-1, exactly as GPTQ does for one rounded column (lazy blocks of `block_size` columns).

Steps, with the decisions where the paper leaves a choice:
1. Columns are permuted by descending Hessian diagonal (the paper's column permutation; also GPTQ's act order), so
   the `outlier` fraction of columns with the largest diagonal are the first stored columns and form their own
   codebook group.
2. Each column is divided by its RMS (rounded to fp16): the paper's column normalization, which lets one codebook
   serve columns of very different magnitude. The scale stays fixed while the pass updates the column.
3. Codebook initialization, per group: k-means on the normalized column vectors of the original weights, weighted by
   the Hessian diagonal (times the squared column scale, so the weight is the error's in the original units),
   seeded by weighted k-means++ from the config's seed. The residual codebook is fitted the same way to what the
   first codebook leaves of those vectors. Both are rounded to int8 (per-group fp16 scale) before the pass, so the
   error feedback sees the stored values.
4. Linears that read one input (`shared="input"`: q/k/v, gate/up) are one stacked weight for steps 1-3 and the pass,
   each with its own column scales and weighted in the k-means by its relative error, so the codebooks and the
   permutation are stored once for all of them.
5. No codebook update after the pass: the continuous parameters (codebooks, column scales) are what the optional
   fine-tuning stage (vqmobile/finetune.py) optimizes, with the indices fixed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F

from ...formats.cvqweight import CVQGeometry, CVQWeight
from ...formats.vqweight import quantize_codebooks
from ...hessian import inverse_cholesky
from ...threads import column_pass, num_threads
from .. import codebook as cbk


def vptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg) -> tuple[CVQWeight, dict[str, Any]]:
    """Quantize one layer's float32 weight [N, K] with its Hessian [K, K]; returns the weight and statistics
    (k-means iterations, the pass's proxy loss, timings)."""
    qws, stats = vptq_quantize_readers([weight], hessian, cfg)
    return qws[0], stats


def vptq_quantize_readers(weights: list[torch.Tensor], hessian: torch.Tensor, cfg, shared: str | None = None
                          ) -> tuple[list[CVQWeight], dict[str, Any]]:
    """Quantize the weights [N_i, K] of linears that read one input (one Hessian) as one stacked weight: one column
    permutation and one codebook per group for all of them, each weight normalized by its own column scales (the
    linears of one input can differ in scale severalfold: stories260k's v_proj is 6x smaller than its q_proj). Each
    weight's rows start a new vector (each is padded to a multiple of v inside the stack, the padding weighs
    nothing), so each is stored as a CVQWeight of its own whose codebooks and permutation equal the others';
    `shared` names the set in their specs (what fine-tuning ties, the checkpoint stores once)."""
    if hessian is None:
        raise ValueError("VPTQ needs the layer's Hessian")
    v, cols = cfg.v, weights[0].shape[1]
    padded = [-(-w.shape[0] // v) * v for w in weights] if len(weights) > 1 else [weights[0].shape[0]]
    stack = torch.zeros(sum(padded), cols) if len(weights) > 1 else weights[0]
    segments, r0 = [], 0
    for w, p in zip(weights, padded):
        stack[r0:r0 + w.shape[0]] = w
        segments.append((r0, r0 + w.shape[0]))
        r0 += p
    with column_pass() as threads:
        geom, parts, stats = _quantize(stack, hessian, cfg, threads, segments)
    perm, scales, idx, cbs, ridx, rcbs = parts
    out, j0 = [], 0
    for w, p, scale in zip(weights, padded, scales):
        g = dataclasses.replace(geom, n=w.shape[0])
        j1 = j0 + -(-p // v)
        out.append(CVQWeight.from_parts(g, perm, scale, idx[j0:j1], cbs, None if ridx is None else ridx[j0:j1], rcbs,
                                        shared=shared))
        j0 = j1
    return out, stats


def column_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-column RMS rounded to fp16 (1 for an all-zero column)."""
    rms = w.pow(2).mean(0).sqrt()
    s = rms.to(torch.float16).float()
    return torch.where(s > 0, s, torch.ones_like(s))


def _fit(x: torch.Tensor, wt: torch.Tensor, k: int, cfg, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hessian-weighted k-means of x [1, M, v] with weights wt: (int8-rounded codebook [k, v], assignment [M], iters).
    Runs on the column pass's one thread: on SmolLM2's layers, EM's bincounts and sums and the Cholesky inverse ran
    3.5x slower on two threads of a loaded 2-core machine (one layer's seven linears: 53 s against 15 s)."""
    seed = cbk.kmeanspp_seed(x, wt, k, gen)
    cb, assign, iters = cbk.kmeans(x, wt, seed, cfg.kmeans_iters, cfg.kmeans_tol)
    return quantize_codebooks(cb[0], "int8")[0], assign[0], iters


def _quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg, threads, segments: list[tuple[int, int]]):
    """(geometry, (perm, [col scales of each segment], indices, codebooks, residual indices, residual codebooks),
    statistics) of weight [N, K] whose row ranges `segments` each have their own column scales; rows outside them are
    padding: zero, weightless, their error not counted."""
    t0 = time.perf_counter()
    n, cols = weight.shape
    geom: CVQGeometry = cfg.layer_geometry(n, cols)
    v, nv = geom.v, geom.vector_rows
    gen = torch.Generator().manual_seed(cfg.seed)

    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    hp = hessian[perm][:, perm]
    w, u = inverse_cholesky(weight[:, perm], hp, cfg.damp)  # w: a copy, dead columns zeroed; one thread (see _fit)
    scales = [column_scales(w[r0:r1]) for r0, r1 in segments]
    rscale = torch.ones(nv * v, cols)  # every row's column scales
    rowmask = torch.zeros(nv * v)  # components outside the segments (past N, padding) do not exist: zero weight
    # Each weight of a stack counts by its relative error: a 6x smaller v_proj would otherwise get the codebook of
    # its q_proj (on stories260k: v_proj's error 1.9x its own codebook's, 1.4x with this weighting).
    rweight = torch.zeros(nv * v, 1)
    for (r0, r1), s in zip(segments, scales):
        rscale[r0:r1] = s
        rowmask[r0:r1] = 1.0
        rweight[r0:r1] = 1.0 / float(s.pow(2).mean()) if len(segments) > 1 else 1.0
    hdiag = torch.diagonal(hp).clamp(min=0)
    live, rscale = rowmask[:n], rscale[:n]
    rowmask = rowmask.reshape(nv, v)

    # Codebooks of every group from the original (normalized) column vectors, each element weighted by its Hessian
    # diagonal times its squared column scale (the error's weight in the original units).
    vecs = F.pad(w / rscale, (0, 0, 0, nv * v - n)).reshape(nv, v, cols).permute(2, 0, 1)  # [K, NV, v]
    wts = (F.pad(rscale ** 2 * rweight[:n], (0, 0, 0, nv * v - n)).reshape(nv, v, cols).permute(2, 0, 1)
           * hdiag[:, None, None] * rowmask[None])
    cbs, rcbs, stats = [], [], {"kmeans_iters": [], "pass_loss": 0.0}
    te = time.perf_counter()
    for c0, c1 in geom.bounds():
        x = vecs[c0:c1].reshape(1, -1, v)
        wt = wts[c0:c1].reshape(1, -1, v)
        cb, assign, it = _fit(x, wt, geom.k, cfg, gen)
        cbs.append(cb)
        stats["kmeans_iters"].append(it)
        if geom.res_k:
            rcb, _, it = _fit(x - cb[assign][None], wt, geom.res_k, cfg, gen)
            rcbs.append(rcb)
            stats["kmeans_iters"].append(it)
    t_kmeans = time.perf_counter() - te
    cb_all = torch.stack(cbs)
    rcb_all = torch.stack(rcbs) if geom.res_k else None

    # The column pass.
    group = geom.group_of_column()
    idx = torch.zeros(nv, cols, dtype=torch.int64)
    ridx = torch.zeros(nv, cols, dtype=torch.int64) if geom.res_k else None
    mask = rowmask[None]
    bs = cfg.block_size
    for b0 in range(0, cols, bs):
        b1 = min(b0 + bs, cols)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            c = b0 + j
            g = int(group[c])
            col = F.pad(w1[:, j] / rscale[:, c], (0, nv * v - n)).reshape(1, nv, v)
            a = cbk.nearest(col, mask, cb_all[g][None])[0]
            q = cb_all[g][a]
            idx[:, c] = a
            if ridx is not None:
                a2 = cbk.nearest(col - q[None], mask, rcb_all[g][None])[0]
                q = q + rcb_all[g][a2]
                ridx[:, c] = a2
            qcol = q.reshape(-1)[:n] * rscale[:, c]
            e = (w1[:, j] - qcol) * live / u1[j, j]
            if j + 1 < b1 - b0:
                w1[:, j + 1:] -= e[:, None] * u1[j, j + 1:][None, :]
            err1[:, j] = e
        if b1 < cols:
            with num_threads(threads(n * (b1 - b0) * (cols - b1))):
                w[:, b1:] -= err1 @ u[b0:b1, b1:]
        stats["pass_loss"] += float((err1 ** 2).sum())
    stats.update(time_kmeans=t_kmeans, time_total=time.perf_counter() - t0, geometry=geom)
    return geom, (perm, scales, idx, cb_all, ridx, rcb_all), stats
