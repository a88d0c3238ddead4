"""Native kernels through the Python boundary (vqmobile.kernels).

- every SIMD path available here against the reference path: bit-identical with int8 activations (same integer
  block sums, same float operation order), within FLOAT_TOL (relative to sum |w*x| + |bias|) with float
  activations;
- the reference against numpy products of the dequantized weights (our decoder and the checkpoint classes'
  dequantize()), including the int8 activation quantization re-derived in numpy;
- awkward shapes (K=172, K not a multiple of d / group / SIMD width, odd N, partial codebook blocks), batch 1..8 and
  > 8, threads 1 and 2;
- validation and boundary errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqmobile import kernels as K

FLOAT_TOL = 2e-5  # documented in native/README.md
SIMD_PATHS = [p for p in K.available_paths() if p != "ref"]


@pytest.fixture(params=["native", "simde"])
def simd_paths(request, monkeypatch) -> list[str]:
    """The SIMD paths a test compares with the reference, from one of two builds: "native" (the installed
    vqmobile._native: every path this CPU runs) or "simde" (the test-only build whose AVX-512 path runs through
    SIMDe on any x86-64 CPU; vqmobile.kernels calls into it for the test's duration)."""
    if request.param == "native":
        return SIMD_PATHS
    ffi, lib = request.getfixturevalue("simde_library")
    monkeypatch.setattr(K, "ffi", ffi)
    monkeypatch.setattr(K, "lib", lib)
    return ["avx512"]

VQ_CONFIGS = [  # d, ncent, R, C
    (1, 4, 1, 256), (2, 16, 8, 256), (4, 256, 256, 256), (2, 16, 4, 256), (4, 256, 128, 256), (2, 64, 32, 256),
    (1, 16, 3, 64), (1, 64, 2, 96), (1, 256, 1, 128), (2, 256, 2, 64), (4, 16, 5, 128), (4, 64, 4, 256),
    (2, 16, 3, 6), (1, 4, 2, 14), (2, 5, 2, 10), (8, 16, 2, 256),
]
SHAPES = [(7, 172), (33, 256), (5, 517), (9, 1000)]
INT_CONFIGS = [(4, 32, False), (4, 32, True), (4, 128, False), (4, 128, True), (4, 17, True), (3, 32, True),
               (8, 64, False)]


def _cdiv(a, b):
    return -(-a // b)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[rows, count] codes -> little-endian bitstream [rows, ceil(count*bits/8)]."""
    rows, count = codes.shape
    b = ((codes[:, :, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(rows, count * bits)
    return np.packbits(b, axis=1, bitorder="little")


def make_vq(rng, n, k, d, ncent, R, C):
    bits = K.vq_index_bits(ncent)
    idx = rng.integers(0, ncent, size=(n, _cdiv(k, d)))
    packed = pack(idx, bits)
    assert packed.shape[1] == K.vq_row_bytes(k, d, ncent)
    cb = rng.integers(-128, 128, size=(_cdiv(n, R), _cdiv(k, C), ncent, d), dtype=np.int8)
    sc = (rng.uniform(0.001, 0.02, size=(_cdiv(n, R), _cdiv(k, C)))).astype(np.float16)
    return dict(indices=packed, codebook=cb, codebook_scale=sc), dict(n=n, k=k, d=d, rows_per_block=R,
                                                                          cols_per_block=C), idx


def make_int(rng, n, k, bits, group, asym):
    ng = _cdiv(k, group)
    q = rng.integers(0, 1 << bits, size=(n, k))
    codes = pack(q, bits)
    sc = rng.uniform(0.001, 0.02, size=(n, ng)).astype(np.float16)
    z = rng.integers(0, 1 << bits, size=(n, ng), dtype=np.uint8) if asym else None
    return dict(codes=codes, scales=sc, zeros=z), dict(n=n, k=k, bits=bits, group=group), q


def rand_x(rng, batch, k):
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[:, ::7] *= 8  # outliers, as in LLM activations
    return x


def np_quant(x: np.ndarray, block: int):
    """numpy re-derivation of the int8 activation quantization (float32 arithmetic, round half to even)."""
    q = np.zeros(x.shape, np.int8)
    xs = np.zeros((_cdiv(x.shape[0], block),), np.float32)
    for i, c0 in enumerate(range(0, x.shape[0], block)):
        blk = x[c0:c0 + block].astype(np.float32)
        amax = np.float32(np.abs(blk).max())
        if amax == 0:
            continue
        inv = np.float32(127.0) / amax
        xs[i] = amax / np.float32(127.0)
        q[c0:c0 + block] = np.clip(np.rint(blk * inv), -127, 127).astype(np.int8)
    return q, xs


def expected(W: np.ndarray, x: np.ndarray, bias, act_int8: bool, block: int):
    """float64 y and the magnitude sum|w*x| + |bias| used for tolerances."""
    xx = x.astype(np.float64)
    if act_int8:
        rows = []
        for r in x:
            q, xs = np_quant(r, block)
            ck, cs = K.quantize_act(r, block)
            np.testing.assert_array_equal(q, ck)  # the C quantizer is the documented one
            np.testing.assert_array_equal(xs, cs)
            rows.append(q.astype(np.float64) * np.repeat(xs.astype(np.float64), block)[: r.shape[0]])
        xx = np.stack(rows)
    y = xx @ W.T
    mag = np.abs(xx) @ np.abs(W).T
    if bias is not None:
        y = y + bias.astype(np.float64)
        mag = mag + np.abs(bias.astype(np.float64))
    return y, mag


def assert_close(y, want, mag, tol=FLOAT_TOL, what=""):
    err = np.abs(np.asarray(y, np.float64) - want)
    bad = err > tol * mag + 1e-6
    assert not bad.any(), f"{what}: max err {err.max():.3g} at {np.argwhere(bad)[0]} (mag {mag.max():.3g})"


@pytest.mark.parametrize("cfg", VQ_CONFIGS, ids=lambda c: "d%d_k%d_R%d_C%d" % c)
def test_vq_paths_match_reference(cfg, simd_paths):
    d, ncent, R, C = cfg
    rng = np.random.default_rng(hash(cfg) & 0xffff)
    for si, (n, k) in enumerate(SHAPES):
        arrs, geo, _ = make_vq(rng, n, k, d, ncent, R, C)
        K.validate_vq(**arrs, **geo)
        batch = [1, 3, 8, 5][si]
        x = rand_x(rng, batch, k)
        bias = rng.standard_normal(n).astype(np.float32) if si % 2 else None
        W = K.dequantize_vq(**arrs, **geo)
        for act_int8 in (False, True):
            ref = K.vq_linear(x, **arrs, **geo, bias=bias, act_int8=act_int8, path="ref", threads=1)
            want, mag = expected(W, x, bias, act_int8, C)
            assert_close(ref, want, mag, what=f"ref {cfg} {n}x{k} int8={act_int8}")
            for path in simd_paths:
                for threads in (1, 2):
                    y = K.vq_linear(x, **arrs, **geo, bias=bias, act_int8=act_int8, path=path, threads=threads)
                    what = f"{path} {cfg} {n}x{k} b={batch} int8={act_int8} t={threads}"
                    if act_int8:
                        np.testing.assert_array_equal(y, ref, err_msg=what)
                    else:
                        assert_close(y, want, mag, what=what)


@pytest.mark.parametrize("cfg", INT_CONFIGS, ids=lambda c: "b%d_g%d_%s" % (c[0], c[1], "asym" if c[2] else "sym"))
def test_int_paths_match_reference(cfg, simd_paths):
    bits, group, asym = cfg
    rng = np.random.default_rng(bits * 1000 + group + asym)
    for si, (n, k) in enumerate(SHAPES):
        arrs, geo, _ = make_int(rng, n, k, bits, group, asym)
        K.validate_int(**arrs, **geo)
        batch = [1, 2, 7, 8][si]
        x = rand_x(rng, batch, k)
        bias = rng.standard_normal(n).astype(np.float32) if si % 2 == 0 else None
        W = K.dequantize_int(**arrs, **geo)
        for act_int8 in (False, True):
            ref = K.int_linear(x, **arrs, **geo, bias=bias, act_int8=act_int8, path="ref", threads=1)
            want, mag = expected(W, x, bias, act_int8, group)
            assert_close(ref, want, mag, what=f"ref {cfg} {n}x{k} int8={act_int8}")
            for path in simd_paths:
                for threads in (1, 2):
                    y = K.int_linear(x, **arrs, **geo, bias=bias, act_int8=act_int8, path=path, threads=threads)
                    what = f"{path} {cfg} {n}x{k} b={batch} int8={act_int8} t={threads}"
                    if act_int8:
                        np.testing.assert_array_equal(y, ref, err_msg=what)
                    else:
                        assert_close(y, want, mag, what=what)


def test_simd_kernels_cover_the_required_configs(simd_paths):
    for path in simd_paths:
        for d, ncent in [(1, 4), (1, 16), (2, 16), (4, 16), (1, 64), (2, 64), (4, 64), (1, 256), (2, 256), (4, 256)]:
            assert K.has_kernel(path, vq=dict(d=d, ncent=ncent, rows_per_block=4, cols_per_block=256)), (path, d, ncent)
        for g in (32, 128):
            assert K.has_kernel(path, int_=dict(bits=4, group=g)), (path, g)


def test_large_shapes_batches_and_torch_io():
    rng = np.random.default_rng(5)
    arrs, geo, _ = make_vq(rng, 64, 4096, 2, 64, 32, 256)
    W = K.dequantize_vq(**arrs, **geo)
    x = rand_x(rng, 11, 4096).reshape(1, 11, 4096)  # batch > 8 runs in passes of 8, leading dims kept
    t = {k: torch.from_numpy(v) for k, v in arrs.items()}
    for act_int8 in (False, True):
        y = K.vq_linear(torch.from_numpy(x), **t, **geo, act_int8=act_int8)
        assert isinstance(y, torch.Tensor) and y.shape == (1, 11, 64) and y.dtype == torch.float32
        want, mag = expected(W, x.reshape(11, 4096), None, act_int8, 256)
        assert_close(y.numpy().reshape(11, 64), want, mag)
        ref = K.vq_linear(x, **arrs, **geo, act_int8=act_int8, path="ref")
        if act_int8:
            np.testing.assert_array_equal(y.numpy(), ref)
    ia, ig, _ = make_int(rng, 40, 4096, 4, 32, False)
    Wi = K.dequantize_int(**ia, **ig)
    xi = rand_x(rng, 1, 4096)
    y = K.int_linear(xi[0], **ia, **ig, act_int8=True)  # 1-D x -> 1-D y
    assert y.shape == (40,)
    want, mag = expected(Wi, xi, None, True, 32)
    assert_close(y[None], want, mag)


def test_matches_checkpoint_classes_dequantize():
    vqw = pytest.importorskip("vqmobile.formats.vqweight")
    intw = pytest.importorskip("vqmobile.formats.intweight")
    rng = np.random.default_rng(11)
    n, k, d, ncent, R, C = 24, 172, 2, 64, 8, 64
    geom = vqw.VQGeometry(n, k, d, ncent, R, C)
    idx = torch.from_numpy(rng.integers(0, ncent, size=(n, _cdiv(k, d))))
    ints = torch.from_numpy(rng.integers(-127, 128, size=(_cdiv(n, R), _cdiv(k, C), ncent, d)))
    scale = torch.from_numpy(rng.uniform(0.001, 0.01, size=(_cdiv(n, R), _cdiv(k, C))).astype(np.float16))
    w = vqw.VQWeight.from_parts(geom, idx, codebook_kind="int8", codebook_ints=ints, codebook_scale=scale)
    W = w.dequantize().double().numpy()
    x = rand_x(rng, 2, k)
    y = K.vq_linear(torch.from_numpy(x), w.indices, w.codebook, w.codebook_scale, n=n, k=k, d=d,
                    rows_per_block=R, cols_per_block=C)
    want, mag = expected(W, x, None, False, C)
    assert_close(y.numpy(), want, mag, tol=1e-5)

    q = torch.from_numpy(rng.integers(0, 16, size=(n, k)))
    s = torch.from_numpy(rng.uniform(0.001, 0.01, size=(n, _cdiv(k, 32))).astype(np.float32))
    z = torch.from_numpy(rng.integers(0, 16, size=(n, _cdiv(k, 32))).astype(np.float32))
    iw = intw.IntWeight.from_codes(q, s, z, bits=4, group=32, symmetric=False)
    Wi = iw.dequantize().double().numpy()
    yi = K.int_linear(torch.from_numpy(x), iw.codes, iw.scales, iw.zeros, n=n, k=k, bits=4, group=32)
    want, mag = expected(Wi, x, None, False, 32)
    assert_close(yi.numpy(), want, mag, tol=1e-5)


def test_validation_errors():
    rng = np.random.default_rng(3)
    arrs, geo, idx = make_vq(rng, 6, 40, 2, 5, 2, 10)  # 5 centroids, 3-bit indices: 5..7 are invalid
    K.validate_vq(**arrs, **geo)
    bad = idx.copy()
    bad[4, 7] = 6
    arrs_bad = dict(arrs, indices=pack(bad, 3))
    with pytest.raises(ValueError, match="row 4, vector 7"):
        K.validate_vq(**arrs_bad, **geo)
    # the kernels never read outside the codebook even for unvalidated data (indices are clamped)
    K.vq_linear(np.ones(40, np.float32), **arrs_bad, **geo)

    with pytest.raises(ValueError, match="indices must have dtype uint8"):
        K.validate_vq(**dict(arrs, indices=arrs["indices"].astype(np.int8)), **geo)
    with pytest.raises(ValueError, match="indices must have shape"):
        K.validate_vq(**dict(arrs, indices=arrs["indices"][:, :-1].copy()), **geo)
    with pytest.raises(ValueError, match="codebook must have shape"):
        K.validate_vq(**dict(arrs, codebook=arrs["codebook"][:, :, :, :1].copy()), **geo)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.validate_vq(**dict(arrs, codebook_scale=np.asfortranarray(np.ones((3, 4), np.float16))), **geo)
    with pytest.raises(ValueError, match="multiple of d"):
        K.validate_vq(**arrs, **dict(geo, cols_per_block=9))
    with pytest.raises(ValueError, match="x must be float32"):
        K.vq_linear(np.ones(40, np.float64), **arrs, **geo)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 40\]"):
        K.vq_linear(np.ones(41, np.float32), **arrs, **geo)
    with pytest.raises(ValueError, match="bias must have shape"):
        K.vq_linear(np.ones(40, np.float32), **arrs, **geo, bias=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        K.vq_linear(np.ones((40, 2), np.float32).T, **arrs, **geo)
    with pytest.raises(ValueError, match="torch.Tensor or numpy"):
        K.vq_linear([1.0] * 40, **arrs, **geo)

    ia, ig, _ = make_int(rng, 4, 64, 4, 32, True)
    K.validate_int(**ia, **ig)
    with pytest.raises(ValueError, match="zeros must have shape"):
        K.validate_int(**dict(ia, zeros=ia["zeros"][:, :1].copy()), **ig)
    with pytest.raises(ValueError, match="scales must have dtype"):
        K.validate_int(**dict(ia, scales=ia["scales"].astype(np.float32)), **ig)
    with pytest.raises(ValueError, match="bits must be in"):
        K.validate_int(**ia, **dict(ig, bits=9))


def test_paths_and_threads_controls():
    paths = K.available_paths()
    assert paths[0] == "ref" and K.active_path() in paths
    before = K.active_path()
    with K.force_path("ref"):
        assert K.active_path() == "ref"
    assert K.active_path() == before
    with pytest.raises(ValueError, match="unknown kernel path"):
        K.set_path("sse9")
    with pytest.raises(ValueError, match="not available"):
        K.set_path("neon" if "avx2" in paths else "avx2")
    n0 = K.get_num_threads()
    K.set_num_threads(1)
    assert K.get_num_threads() == 1
    K.set_num_threads(n0)
    with pytest.raises(ValueError, match="threads must be"):
        K.vq_linear(np.ones(40, np.float32), np.zeros((2, 10), np.uint8), np.zeros((1, 1, 16, 2), np.int8),
                    np.ones((1, 1), np.float16), n=2, k=40, d=2, rows_per_block=2, cols_per_block=40, threads=0)


@pytest.mark.parametrize("d,k", [(1, 4), (2, 16), (2, 64), (3, 10), (4, 256), (8, 16)])
def test_nearest_is_the_first_weighted_argmin_on_every_path(d, k, simd_paths):
    g = torch.Generator().manual_seed(d * 1000 + k)
    b, m = 3, 700
    # values on a coarse grid, repeated centroids and zero weights: ties are common and must go to the first index
    x = torch.randint(-8, 9, (b, m, d), generator=g).float() * 0.25
    w = torch.randint(0, 4, (b, m, d), generator=g).float() * 0.5
    c = torch.randint(-4, 5, (b, k, d), generator=g).float() * 0.5
    c[:, k // 2:] = c[:, : k - k // 2]
    dist = torch.zeros(b, m, k)
    for t in range(d):  # the kernels' summation order
        df = x[:, :, None, t] - c[:, None, :, t]
        dist = dist + w[:, :, None, t] * (df * df)
    expect = dist.argmin(-1)
    for path in ["ref", *simd_paths]:
        for threads in (1, 2):
            assert torch.equal(K.nearest(x, w, c, threads=threads, path=path), expect), (path, threads)
    with pytest.raises(ValueError, match="nearest failed"):
        K.nearest(torch.zeros(1, 2, 9), torch.ones(1, 1, 9), torch.zeros(1, 3, 9))


def test_env_path_that_this_cpu_lacks_is_one_line_error():
    import subprocess
    import sys

    missing = next(p for p in ("neon", "avx512", "avx2") if p not in K.available_paths())
    for value, says in ((missing, "is not available on this CPU"), ("sse9", "is not a kernel path")):
        res = subprocess.run([sys.executable, "-m", "vqmobile.cli", "eval", "nowhere"], capture_output=True,
                             text=True, env={**__import__("os").environ, "VQMOBILE_PATH": value}, timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.strip().splitlines() == [next(ln for ln in res.stderr.splitlines() if says in ln)], res.stderr


def test_stream_read_checksum():
    buf = np.arange(1 << 16, dtype=np.uint64)
    assert K.stream_read(buf, threads=2) == int(buf.sum())


def test_bench_kernels_quick_smoke(tmp_path):
    import json

    from vqmobile.bench import kernels as bench

    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--threads", "1", "--kernels", "vq2.25,int4-g32,ort-int4-b32",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    recs = data["records"]
    assert {r["kernel"] for r in recs} == {"vq2.25", "int4-g32", "ort-int4-b32"}
    for r in recs:
        assert {"kernel", "bpv", "shape", "threads", "us", "gbps", "ratio_vs_ort"} <= set(r)
        assert r["us"] > 0 and r["shape"] == [1024, 1024] and r["threads"] == 1
    assert abs(next(r for r in recs if r["kernel"] == "vq2.25")["bpv"] - 2.2656) < 1e-3


def test_bench_kernels_times_several_paths_in_one_run(tmp_path):
    import json

    from vqmobile.bench import kernels as bench

    paths = ["ref"] + [p for p in K.available_paths() if p != "ref"][-1:]
    out = tmp_path / "k.json"
    assert bench.main(["--quick", "--threads", "1", "--kernels", "vq3.125,ort-int4-b32", "--paths", ",".join(paths),
                       "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    names = {r["kernel"]: r["path"] for r in recs}
    want = {f"vq3.125@{p}": p for p in paths} if len(paths) > 1 else {"vq3.125": "ref"}
    assert names == {**want, "ort-int4-b32": None}
    assert bench.main(["--quick", "--kernels", "vq3.125", "--paths", "nosuchpath", "--json", str(out)]) == 2
