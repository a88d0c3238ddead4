/* aarch64 NEON E8P kernels (placeholder: the reference runs). */
#if defined(__aarch64__)
#include "quip.h"
#ifdef VQM_NEON_DOT
#define OPS_NAME vqm_e8p_neon_dot
#else
#define OPS_NAME vqm_e8p_neon
#endif
static int neon_plan(const vqm_e8p_weight *w, int flags, int *chunk_order)
{
    (void)w; (void)flags; *chunk_order = 0;
    return 0;
}
const vqm_e8p_ops OPS_NAME = { neon_plan, NULL };
#endif
