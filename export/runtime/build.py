"""Build the ExecuTorch adapter library (vq_linear_out.cpp + the native kernels) and the benchmark runner
(android_demo/runner/vqm_runner.cpp) for the host or for arm64.

    build_adapter("x86_64") -> Path to libvqmobile_executorch.so (host; links the executorch wheel's libexecutorch.so)
    build_adapter("arm64")  -> the same, cross-compiled with aarch64-linux-gnu-g++ against the aarch64 executorch
                               wheel's libexecutorch.so (downloaded once from the package registry with pip)
    build_runner(target)    -> Path to vqm_runner, linked to that adapter and the wheel's runtime libraries
                               (RUNTIME_LIBS), looking for them in ../lib beside itself (the bundle's layout)

The native kernels are built with their own Makefile (``make -C native lib ARCH=... BUILD=...``, output outside
native/) and linked in statically with their symbols hidden, so the adapter never binds to another copy of them
(e.g. the cffi module's). Results are cached in ~/.cache/vqmobile/build/<target>-<hash of the sources>.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vqmobile.errors import UserError

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "vq_linear_out.cpp"]
RUNNER_SOURCE = HERE.parents[1] / "android_demo" / "runner" / "vqm_runner.cpp"
LIB_NAME = "libvqmobile_executorch.so"
RUNNER_NAME = "vqm_runner"
# what a program with XNNPACK delegates and portable ops needs from the executorch wheel, outside Python
RUNTIME_LIBS = ("libexecutorch.so", "libexecutorch_kernels_optimized.so", "libexecutorch_backend_xnnpack.so",
                "libexecutorch_threadpool.so")
EXECUTORCH_VERSION = "1.5.1"
TARGETS = ("x86_64", "arm64")


def repo_root() -> Path:
    return HERE.parents[1]


def native_dir() -> Path:
    return repo_root() / "native"


def executorch_dir() -> Path:
    import executorch

    return Path(list(executorch.__path__)[0])


def host_target() -> str:
    m = platform.machine().lower()
    return "arm64" if m in ("aarch64", "arm64") else "x86_64"


def cache_root() -> Path:
    return Path(os.environ.get("VQMOBILE_CACHE", Path.home() / ".cache" / "vqmobile"))


def _compilers(target: str) -> tuple[str, str, str]:
    """(C compiler, C++ compiler, native Makefile ARCH) for a target; UserError naming the package if missing."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    if target == host_target():
        cc, cxx, arch = "gcc", "g++", "host"
        pkg = "gcc g++"
    else:
        prefix = "aarch64-linux-gnu" if target == "arm64" else "x86-64-linux-gnu"
        cc, cxx, arch = f"{prefix}-gcc", f"{prefix}-g++", "aarch64" if target == "arm64" else "host"
        pkg = f"gcc-{prefix} g++-{prefix}"
        if target != "arm64":
            raise UserError(f"cross-compiling for {target} from this machine is not supported; build on {target}")
    for tool in (cc, cxx):
        if shutil.which(tool) is None:
            raise UserError(f"the compiler {tool} for target {target} is not installed: "
                            f"install it with `apt-get install {pkg}`")
    return cc, cxx, arch


def _native_sources() -> list[Path]:
    nd = native_dir()
    return sorted([*nd.glob("src/*.c"), *nd.glob("src/*.h"), *nd.glob("include/*.h"), nd / "Makefile"])


def _hash_sources(target: str) -> str:
    h = hashlib.sha256(target.encode())
    for p in [*SOURCES, RUNNER_SOURCE, Path(__file__), *_native_sources()]:  # build.py: its flags matter too
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def runtime_lib_dir(target: str, progress=None) -> Path:
    """The folder holding RUNTIME_LIBS for target: the installed wheel's for the host, the aarch64 wheel's for arm64
    (same version as the host's, fetched once with pip)."""
    if target == host_target():
        return executorch_dir() / "lib"
    dest = cache_root() / f"executorch-{EXECUTORCH_VERSION}-aarch64"
    if all((dest / "lib" / name).is_file() for name in RUNTIME_LIBS):
        return dest / "lib"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".et-aarch64-") as tmp:
        wheels = list(Path(tmp).glob("*.whl"))
        local = os.environ.get("VQMOBILE_EXECUTORCH_AARCH64_WHEEL")
        if local:
            wheels = [Path(local)]
        else:
            if progress:
                progress(f"downloading the aarch64 executorch=={EXECUTORCH_VERSION} wheel (about 18 MB) ...")
            res = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--platform",
                 "manylinux_2_28_aarch64", "--only-binary=:all:", f"executorch=={EXECUTORCH_VERSION}", "-d", tmp],
                capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                last = (res.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"could not download the aarch64 executorch wheel with pip ({last}); "
                                "set VQMOBILE_EXECUTORCH_AARCH64_WHEEL to a local copy")
        out = Path(tmp) / "x"
        (dest / "lib").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in RUNTIME_LIBS:
                zf.extract(f"executorch/lib/{name}", out)
                os.replace(out / "executorch" / "lib" / name, dest / "lib" / name)
    return dest / "lib"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed: {' '.join(cmd)}\n{tail}")


def build_adapter(target: str | None = None, *, progress=None, force: bool = False) -> Path:
    """Build (or reuse from the cache) the adapter library for `target`; returns its path."""
    target = target or host_target()
    cc, cxx, arch = _compilers(target)
    out_dir = cache_root() / "build" / f"{target}-{_hash_sources(target)}"
    lib = out_dir / LIB_NAME
    if lib.is_file() and not force:
        return lib
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    et = executorch_dir()
    inc = et / "include"
    et_lib_dir = runtime_lib_dir(target, progress)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{target}-") as tmp:
        tmp = Path(tmp)
        nbuild = tmp / "native"
        _run(["make", "-s", "-C", str(native_dir()), "lib", f"ARCH={arch}", f"BUILD={nbuild}", f"CC={cc}",
              "CFLAGS=-O2"], "building the native kernels")
        so = tmp / LIB_NAME
        cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
               "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{inc}",
               f"-I{inc / 'executorch/runtime/core/portable_type/c10'}", f"-I{native_dir() / 'include'}",
               *map(str, SOURCES), str(nbuild / "libvqmobile.a"), f"-L{et_lib_dir}", "-lexecutorch",
               "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic", "-Wl,--no-undefined", "-lpthread", "-lm",
               "-o", str(so)]
        if target == host_target():
            cmd.insert(-2, f"-Wl,-rpath,{et_lib_dir}")
        _run(cmd, f"building the ExecuTorch adapter for {target}")
        out_dir.mkdir(parents=True, exist_ok=True)
        os.replace(so, lib)
    return lib


def build_runner(target: str | None = None, *, progress=None) -> Path:
    """Build (or reuse from the cache) the benchmark runner for `target`, linked to build_adapter(target)."""
    target = target or host_target()
    lib = build_adapter(target, progress=progress)
    _, cxx, _ = _compilers(target)
    runner = lib.parent / RUNNER_NAME
    if runner.is_file():
        return runner
    inc = executorch_dir() / "include"
    et_lib_dir = runtime_lib_dir(target, progress)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".runner-") as tmp:
        exe = Path(tmp) / RUNNER_NAME
        # the adapter is NEEDED (--no-as-needed): loading it is what registers our kernels
        cmd = [cxx, "-std=c++17", "-O2", "-DC10_USING_CUSTOM_GENERATED_MACROS", f"-I{inc}",
               f"-I{inc / 'executorch/runtime/core/portable_type/c10'}", str(RUNNER_SOURCE),
               f"-L{lib.parent}", f"-L{et_lib_dir}", "-Wl,--no-as-needed", "-lvqmobile_executorch",
               *[f"-l{name[3:-3]}" for name in RUNTIME_LIBS], "-Wl,--as-needed", "-lpthread",
               "-Wl,-rpath,$ORIGIN/../lib:$ORIGIN", "-o", str(exe)]
        if target == host_target():
            cmd.insert(-2, f"-Wl,-rpath,{et_lib_dir}")
        else:  # the runtime libraries' own NEEDED entries are resolved at link time from the same folder
            cmd.insert(-2, f"-Wl,-rpath-link,{et_lib_dir}")
        _run(cmd, f"building the benchmark runner for {target}")
        os.replace(exe, runner)
    return runner
