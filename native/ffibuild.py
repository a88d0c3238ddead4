"""cffi (API mode) build of the native kernels as ``vqmobile._native``.

Used by setup.py (``cffi_modules=["native/ffibuild.py:ffibuilder"]``), so
``pip install .`` / ``pip install -e .`` compile the same C sources as
native/Makefile. All sources get the same flags: ISA-specific code enables its
instruction set per function (#pragma GCC target) and is selected at run time,
so the extension never needs -march=native and runs on any CPU of the
architecture.
"""

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root (setup.py dir)
    return os.path.relpath(os.path.join(_HERE, *parts), _ROOT) if os.getcwd() == _ROOT else os.path.join(_HERE, *parts)


CDEF = """
#define VQM_OK 0
#define VQM_EINVAL -1
#define VQM_EINDEX -2
#define VQM_ENOMEM -3
#define VQM_EPATH -4
#define VQM_PATH_AUTO -1
#define VQM_PATH_REF 0
#define VQM_PATH_AVX2 1
#define VQM_PATH_AVX512 2
#define VQM_PATH_NEON 3
#define VQM_PATH_NEON_DOT 4
#define VQM_NPATHS 5
#define VQM_ACT_INT8 1

typedef struct vqm_vq_weight {
    int32_t n, k;
    int32_t d, ncent;
    int32_t rows_per_block, cols_per_block;
    const uint8_t *indices;
    const int8_t *codebook;
    const uint16_t *scale;
} vqm_vq_weight;

typedef struct vqm_int_weight {
    int32_t n, k;
    int32_t bits, group;
    const uint8_t *codes;
    const uint16_t *scales;
    const uint8_t *zeros;
} vqm_int_weight;

int vqm_vq_index_bits(int ncent);
int64_t vqm_vq_row_bytes(const vqm_vq_weight *w);
int64_t vqm_int_row_bytes(const vqm_int_weight *w);
int vqm_vq_validate(const vqm_vq_weight *w, int64_t *bad_row, int64_t *bad_pos);
int vqm_int_validate(const vqm_int_weight *w);
int vqm_vq_linear(const vqm_vq_weight *w, const float *x, int64_t batch,
                  const float *bias, float *y, int flags, int threads);
int vqm_int_linear(const vqm_int_weight *w, const float *x, int64_t batch,
                   const float *bias, float *y, int flags, int threads);
int vqm_vq_linear_path(int path, const vqm_vq_weight *w, const float *x, int64_t batch,
                       const float *bias, float *y, int flags, int threads);
int vqm_int_linear_path(int path, const vqm_int_weight *w, const float *x, int64_t batch,
                        const float *bias, float *y, int flags, int threads);
int vqm_vq_path_has_kernel(int path, const vqm_vq_weight *w);
int vqm_int_path_has_kernel(int path, const vqm_int_weight *w);
int vqm_path_available(int path);
int vqm_get_path(void);
int vqm_set_path(int path);
const char *vqm_path_name(int path);
void vqm_set_num_threads(int n);
int vqm_get_num_threads(void);
uint64_t vqm_stream_read(const void *buf, size_t bytes, int threads);
void vqm_quantize_act(const float *x, int64_t k, int64_t blk, int8_t *q, float *xs);
float vqm_fp16_to_float(uint16_t h);
"""

SOURCES = ["ref.c", "dispatch.c", "threadpool.c", "kern_avx2.c", "kern_neon.c", "kern_neon_dot.c"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vqmobile._native",
    '#include "vqmobile.h"\n',
    sources=[_rel("src", s) for s in SOURCES],
    include_dirs=[_rel("include"), _rel("src")],
    depends=[_rel("include", "vqmobile.h"), _rel("src", "internal.h")],
    extra_compile_args=["-O2", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno"],
    libraries=["m", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
