"""cffi (API mode) build of the native kernels as ``vqmobile._native``.

Used by setup.py (``cffi_modules=["native/ffibuild.py:ffibuilder"]``), so
``pip install .`` / ``pip install -e .`` compile the same C sources as
native/Makefile. All sources get the same flags: ISA-specific code enables its
instruction set per function (#pragma GCC target) and is selected at run time,
so the extension never needs -march=native and runs on any CPU of the
architecture.
"""

import os
import re

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root (setup.py dir)
    return os.path.relpath(os.path.join(_HERE, *parts), _ROOT) if os.getcwd() == _ROOT else os.path.join(_HERE, *parts)


def _cdef_from_header(path: str) -> str:
    """The declarations of vqmobile.h in the form cffi's cdef accepts: comments, include guards, #include and the
    C++ linkage wrapper removed, integer #defines kept. Deriving it keeps the Python binding and the header from
    drifting apart."""
    with open(path) as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#define\s+(VQM_\w+)\s+(-?\d+)$", s)
            if m:
                out.append(f"#define {m[1]} {m[2]}")
            continue
        if s in ('extern "C" {', "}"):
            continue
        out.append(line)
    return "\n".join(out)


CDEF = _cdef_from_header(os.path.join(_HERE, "include", "vqmobile.h"))

SOURCES = ["ref.c", "dispatch.c", "threadpool.c", "attention.c", "decoder_steps.c", "kern_avx2.c", "kern_avx512.c", "kern_neon.c", "kern_neon_dot.c",
           "hadamard.c", "hadamard_ref.c", "hadamard_avx2.c", "hadamard_avx512.c", "hadamard_neon.c",
           "e8p.c", "e8p_ref.c", "e8p_avx2.c", "e8p_avx512.c", "e8p_neon.c", "e8p_neon_dot.c",
           "cvq.c", "cvq_ref.c", "cvq_avx2.c", "cvq_avx512.c", "cvq_neon.c"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vqmobile._native",
    '#include "vqmobile.h"\n',
    sources=[_rel("src", s) for s in SOURCES],
    include_dirs=[_rel("include"), _rel("src")],
    depends=[_rel("include", "vqmobile.h"), _rel("src", "internal.h"), _rel("src", "vecf.h"), _rel("src", "quip.h"),
             _rel("src", "cvq_internal.h"), _rel("src", "cvq_x86.h")],
    extra_compile_args=["-O2", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno"],
    libraries=["m", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
