"""The C unit tests (native/tests/test_main.c): native build, AddressSanitizer + UBSan build, and the aarch64
cross build run under qemu-aarch64 with dotprod (-cpu max: NEON + SDOT paths) and without (-cpu cortex-a72:
NEON fallback path). Each run compares every SIMD path available on that CPU against the reference
(bit-identical with int8 activations, FLOAT_TOL with float activations) and the reference against a
double-precision dequantized product."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parent.parent / "native"
QEMU_SYSROOT = "/usr/aarch64-linux-gnu"


def _make(*args: str, build: str, timeout: int = 300) -> None:
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("make or a C compiler is not installed")
    subprocess.run(["make", "-s", "-C", str(NATIVE), f"BUILD={build}", *args], check=True, timeout=timeout,
                   capture_output=True, text=True)


def _run(cmd: list[str], timeout: int = 300) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert "OK:" in p.stdout and "0 failures" in p.stdout, p.stdout[-4000:]
    return p.stdout


@pytest.fixture(scope="module")
def host_build(tmp_path_factory):
    build = str(tmp_path_factory.mktemp("host"))
    _make("tests", "bench", "lib", "shared", build=build)
    return build


def test_c_unit_tests_native(host_build):
    """Every path this CPU runs natively (the first line of the output names them: AVX-512 only where the CPU has
    it; test_c_unit_tests_avx512_through_simde covers it elsewhere)."""
    build = host_build
    out = _run([f"{build}/vqm_test"])
    assert "SIMD kernel configurations exercised" in out and "SIMDe" not in out
    print(out.splitlines()[0])
    out = _run([f"{build}/vqm_test_quip"])  # QuIP#: Hadamard transform, E8P
    assert "SIMD kernel configurations exercised" in out


def test_c_unit_tests_asan_ubsan(tmp_path):
    build = str(tmp_path / "asan")
    flags = "-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
    try:
        _make("tests", f"CFLAGS={flags}", f"LDEXTRA={flags}", build=build)
    except subprocess.CalledProcessError as e:
        if "asan" in (e.stderr or "").lower() or "sanitizer" in (e.stderr or "").lower():
            pytest.skip(f"sanitizer runtime not available: {e.stderr[-300:]}")
        raise
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    for binary in ("vqm_test", "vqm_test_quip"):
        p = subprocess.run([f"{build}/{binary}", "--quick"], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0 and "0 failures" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


def test_c_unit_tests_avx512_through_simde(simde_build):
    """The AVX-512 kernels compiled against SIMDe: the same C tests, on any x86-64 CPU."""
    out = _run([f"{simde_build}/vqm_test"])
    assert out.splitlines()[0].startswith("paths: ref avx2 avx512") and "avx512 runs through SIMDe" in out, out[:300]
    out = _run([f"{simde_build}/vqm_test_quip"])  # the AVX-512 Hadamard transform
    assert out.splitlines()[0].startswith("paths: ref avx2 avx512"), out[:300]


@pytest.fixture(scope="module")
def aarch64_build(tmp_path_factory):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (apt-get install gcc-aarch64-linux-gnu)")
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not installed (apt-get install qemu-user)")
    build = str(tmp_path_factory.mktemp("aarch64"))
    _make("ARCH=aarch64", "tests", "bench", "lib", build=build)
    return build


@pytest.mark.parametrize("cpu,paths", [("max", "ref neon neon_dot"), ("cortex-a72", "ref neon (")],
                         ids=["dotprod", "no-dotprod"])
def test_c_unit_tests_aarch64_qemu(aarch64_build, cpu, paths):
    for binary in ("vqm_test", "vqm_test_quip"):
        out = _run(["qemu-aarch64", "-L", QEMU_SYSROOT, "-cpu", cpu, f"{aarch64_build}/{binary}"])
        assert f"paths: {paths}" in out, out.splitlines()[0]


def _steps_hash(cmd: list[str]) -> str:
    out = _run(cmd, timeout=120)
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("decoder steps hash"))


def test_decoder_steps_are_bit_identical_on_every_build(host_build, aarch64_build):
    """RMSNorm, RoPE and silu_mul are portable C built once per x86 level (target_clones) and for arm64, with no FP
    contraction: every build must give the same bits. The host build runs natively (its best clone), under
    qemu-x86_64 as a Haswell (the AVX2 clone) and as a plain x86-64 (the baseline clone), and the arm64 build under
    qemu-aarch64."""
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)")
    print(f"clones run: native ({platform.machine()}), "
          f"{'Haswell, qemu64, ' if platform.machine() in ('x86_64', 'AMD64') else ''}arm64")
    binary = f"{host_build}/vqm_test"
    hashes = {"native": _steps_hash([binary, "--steps"])}
    for cpu in ("Haswell", "qemu64") if platform.machine() in ("x86_64", "AMD64") else ():
        hashes[cpu] = _steps_hash(["qemu-x86_64", "-cpu", cpu, binary, "--steps"])
    hashes["arm64"] = _steps_hash(["qemu-aarch64", "-L", QEMU_SYSROOT, "-cpu", "max", f"{aarch64_build}/vqm_test",
                                   "--steps"])
    assert len(set(hashes.values())) == 1, hashes
