/* AVX2 E8P kernels (placeholder: the reference runs). */
#include "quip.h"
#if defined(__x86_64__)
static int avx2_plan(const vqm_e8p_weight *w, int flags, int *chunk_order)
{
    (void)w; (void)flags; *chunk_order = 0;
    return 0;
}
const vqm_e8p_ops vqm_e8p_avx2 = { avx2_plan, NULL };
#endif
