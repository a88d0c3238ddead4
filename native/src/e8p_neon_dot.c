/* The NEON E8P kernels again, compiled for ARMv8.2-A dotprod (SDOT). Selected at run time when getauxval(AT_HWCAP)
 * has HWCAP_ASIMDDP. */
#define VQM_NEON_DOT 1
#include "e8p_neon.c"
