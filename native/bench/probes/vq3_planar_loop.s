// What VQ 3.125 (d = 2, k = 64, 6-bit codes) would cost on an arm64 big core if its codes were repacked into a
// layout the NEON path unpacks with the fewest vector µops: a hand-scheduled SDOT loop body for llvm-mca, not a
// kernel. Why it exists: the compiled kernel (kern_neon.c, `vqmobile bench cost`) models at 1.23x our int4 g32 on
// Neoverse N1, and this loop answers whether a different code layout could close that (README, "Cycle model").
//
//   llvm-mca-19 -mtriple=aarch64 -mcpu=neoverse-n1 -iterations=200 native/bench/probes/vq3_planar_loop.s
//
// One iteration: 2 rows x 64 codes (256 weights). The layout assumed: per row and 64 codes, three 16-byte planes
// (plain LD1, no LD3 de-interleave), codes 4i..4i+2 in the low 6 bits of byte i of planes 0..2, code 4i+3's three
// 2-bit parts in their top 2 bits, so unpacking is 3 AND + 2 SRI + 1 USHR. Tables: the block's 64 entries per
// dimension resident in v16-v19 and v20-v23 (4-register TBL); v30 = 0x3f; activations loaded where used.
ld1 {v24.16b, v25.16b, v26.16b}, [x0], #48
and v0.16b, v24.16b, v30.16b
and v1.16b, v25.16b, v30.16b
and v2.16b, v26.16b, v30.16b
sri v26.16b, v25.16b, #2
sri v26.16b, v24.16b, #4
ushr v3.16b, v26.16b, #2
tbl v4.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v0.16b
tbl v5.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v1.16b
tbl v6.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v2.16b
tbl v7.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v3.16b
tbl v0.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v0.16b
tbl v1.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v1.16b
tbl v2.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v2.16b
tbl v3.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v3.16b
ld1 {v24.16b, v25.16b, v26.16b}, [x1], #48
and v8.16b, v24.16b, v30.16b
and v9.16b, v25.16b, v30.16b
and v10.16b, v26.16b, v30.16b
sri v26.16b, v25.16b, #2
sri v26.16b, v24.16b, #4
ushr v11.16b, v26.16b, #2
tbl v12.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v8.16b
tbl v13.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v9.16b
tbl v14.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v10.16b
tbl v15.16b, {v16.16b, v17.16b, v18.16b, v19.16b}, v11.16b
tbl v8.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v8.16b
tbl v9.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v9.16b
tbl v10.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v10.16b
tbl v11.16b, {v20.16b, v21.16b, v22.16b, v23.16b}, v11.16b
ldr q31, [x2, #0]
sdot v27.4s, v4.16b, v31.16b
sdot v28.4s, v12.16b, v31.16b
ldr q31, [x2, #16]
sdot v27.4s, v5.16b, v31.16b
sdot v28.4s, v13.16b, v31.16b
ldr q31, [x2, #32]
sdot v27.4s, v6.16b, v31.16b
sdot v28.4s, v14.16b, v31.16b
ldr q31, [x2, #48]
sdot v27.4s, v7.16b, v31.16b
sdot v28.4s, v15.16b, v31.16b
ldr q31, [x2, #64]
sdot v27.4s, v0.16b, v31.16b
sdot v28.4s, v8.16b, v31.16b
ldr q31, [x2, #80]
sdot v27.4s, v1.16b, v31.16b
sdot v28.4s, v9.16b, v31.16b
ldr q31, [x2, #96]
sdot v27.4s, v2.16b, v31.16b
sdot v28.4s, v10.16b, v31.16b
ldr q31, [x2, #112]
sdot v27.4s, v3.16b, v31.16b
sdot v28.4s, v11.16b, v31.16b
add x2, x2, #128
