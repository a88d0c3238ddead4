// ExecuTorch kernels for the vqmobile custom operators (out variants):
//   vqmobile::vq_linear.out(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor? bias,
//                           int n, int k, int d, int rows_per_block, int cols_per_block, bool act_int8=False, *,
//                           Tensor(a!) out)
//   vqmobile::int_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? zeros, Tensor? bias,
//                            int n, int k, int bits, int group, bool act_int8=False, *, Tensor(a!) out)
//   vqmobile::dense_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out)
//   vqmobile::attention.out(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos,
//                           float scale, int window=0, *, Tensor(c!) out)
//   vqmobile::rms_norm.out(Tensor x, Tensor weight, float eps, float offset=0., *, Tensor(a!) out)
//   vqmobile::add_rms_norm.out(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0., *,
//                              Tensor(a!) total, Tensor(b!) out) -> (Tensor(a!), Tensor(b!))
//   vqmobile::rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out)
//   vqmobile::silu_mul.out(Tensor gate_up, *, Tensor(a!) out)
//   vqmobile::e8p_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int n, int k, bool act_int8=False,
//                            *, Tensor(a!) out)
//   vqmobile::hadamard.out(Tensor x, Tensor signs, Tensor had, int m, int p, bool transpose=False, *, Tensor(a!) out)
//   vqmobile::cvq_linear.out(Tensor x, Tensor indices, Tensor codebook, Tensor codebook_scale, Tensor col_scale,
//                            Tensor perm, Tensor? res_indices, Tensor? res_codebook, Tensor? res_scale, Tensor? bias,
//                            int n, int k, int v, int outlier_cols, int cols_per_group, bool act_int8=False, *,
//                            Tensor(a!) out)
// Each calls the native C kernels (native/include/vqmobile.h) with the activation mode recorded in the program
// (act_int8 -> VQM_ACT_INT8), the same calls the Python operators make (vqmobile/ops/), so the runtime computes
// what eager PyTorch computes.
//
// Registration: the same boxing as EXECUTORCH_LIBRARY (make_boxed_kernel + register_kernel), done once at load
// and skipped for an op the registry already has, because registering an op twice aborts the process (two copies
// of this library, or a runtime that links the kernels in statically, must not crash).
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <optional>
#include <thread>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/operator_registry.h>

#include "vqmobile.h"

namespace vqmobile_et {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

// Resize `out` to `sizes`; else log that `op` cannot and fail the call.
bool resized(KernelRuntimeContext& ctx, Tensor& out, executorch::aten::ArrayRef<SizesType> sizes, const char* op) {
  if (executorch::runtime::resize_tensor(out, sizes) == Error::Ok) return true;
  ET_LOG(Error, "%s: cannot resize the output", op);
  ctx.fail(Error::InvalidArgument);
  return false;
}

// Resize `out` to x.sizes()[:-1] + [n]; returns the batch (rows of x) or -1 on failure.
int64_t prepare(KernelRuntimeContext& ctx, const Tensor& x, int64_t n, int64_t k, Tensor& out) {
  if (x.scalar_type() != ScalarType::Float || out.scalar_type() != ScalarType::Float || x.dim() < 1 ||
      x.size(x.dim() - 1) != k) {
    ET_LOG(Error, "vqmobile: x must be float32 [..., %lld]", (long long)k);
    ctx.fail(Error::InvalidArgument);
    return -1;
  }
  SizesType sizes[executorch::runtime::kTensorDimensionLimit];
  const int64_t nd = x.dim();
  int64_t batch = 1;
  for (int64_t i = 0; i + 1 < nd; ++i) {
    sizes[i] = static_cast<SizesType>(x.size(i));
    batch *= x.size(i);
  }
  sizes[nd - 1] = static_cast<SizesType>(n);
  return resized(ctx, out, {sizes, static_cast<size_t>(nd)}, "vqmobile") ? batch : -1;
}

const float* bias_ptr(KernelRuntimeContext& ctx, const std::optional<Tensor>& bias, int64_t n, bool* ok) {
  *ok = true;
  if (!bias.has_value()) return nullptr;
  if (bias->scalar_type() != ScalarType::Float || bias->numel() != n) {
    ET_LOG(Error, "vqmobile: bias must be float32 [%lld]", (long long)n);
    ctx.fail(Error::InvalidArgument);
    *ok = false;
    return nullptr;
  }
  return bias->const_data_ptr<float>();
}

}  // namespace

Tensor& vq_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& indices, const Tensor& codebook,
                      const Tensor& codebook_scale, const std::optional<Tensor>& bias, int64_t n, int64_t k,
                      int64_t d, int64_t rows_per_block, int64_t cols_per_block, bool act_int8, Tensor& out) {
  const int64_t batch = prepare(ctx, x, n, k, out);
  if (batch < 0) return out;
  bool ok;
  const float* b = bias_ptr(ctx, bias, n, &ok);
  if (!ok) return out;
  if (indices.scalar_type() != ScalarType::Byte || codebook.scalar_type() != ScalarType::Char ||
      codebook_scale.scalar_type() != ScalarType::Half || codebook.dim() != 4) {
    ET_LOG(Error, "vqmobile::vq_linear: expected uint8 indices, int8 codebook [R,C,k,d], fp16 scales");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  vqm_vq_weight w;
  w.n = (int32_t)n;
  w.k = (int32_t)k;
  w.d = (int32_t)d;
  w.ncent = (int32_t)codebook.size(2);
  w.rows_per_block = (int32_t)rows_per_block;
  w.cols_per_block = (int32_t)cols_per_block;
  w.indices = indices.const_data_ptr<uint8_t>();
  w.codebook = codebook.const_data_ptr<int8_t>();
  w.scale = static_cast<const uint16_t*>(codebook_scale.const_data_ptr());
  if (batch == 0) return out;
  int rc = vqm_vq_linear(&w, x.const_data_ptr<float>(), batch, b, out.mutable_data_ptr<float>(),
                         act_int8 ? VQM_ACT_INT8 : 0, 0);
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::vq_linear: native kernel failed (%d)", rc);
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

Tensor& int_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scales,
                       const std::optional<Tensor>& zeros, const std::optional<Tensor>& bias, int64_t n, int64_t k,
                       int64_t bits, int64_t group, bool act_int8, Tensor& out) {
  const int64_t batch = prepare(ctx, x, n, k, out);
  if (batch < 0) return out;
  bool ok;
  const float* b = bias_ptr(ctx, bias, n, &ok);
  if (!ok) return out;
  if (codes.scalar_type() != ScalarType::Byte || scales.scalar_type() != ScalarType::Half ||
      (zeros.has_value() && zeros->scalar_type() != ScalarType::Byte)) {
    ET_LOG(Error, "vqmobile::int_linear: expected uint8 codes, fp16 scales, uint8 zeros");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  vqm_int_weight w;
  w.n = (int32_t)n;
  w.k = (int32_t)k;
  w.bits = (int32_t)bits;
  w.group = (int32_t)group;
  w.codes = codes.const_data_ptr<uint8_t>();
  w.scales = static_cast<const uint16_t*>(scales.const_data_ptr());
  w.zeros = zeros.has_value() ? zeros->const_data_ptr<uint8_t>() : nullptr;
  if (batch == 0) return out;
  int rc = vqm_int_linear(&w, x.const_data_ptr<float>(), batch, b, out.mutable_data_ptr<float>(),
                          act_int8 ? VQM_ACT_INT8 : 0, 0);
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::int_linear: native kernel failed (%d)", rc);
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

namespace {

// y[b, r] = dot(x[b, :], w[r, :]) (+ bias[r]) for rows r in [r0, r1).
void dense_rows(const float* x, const float* w, const float* bias, float* y, int64_t batch, int64_t n, int64_t k,
                int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * k;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * k;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= k; c += 8)
        for (int j = 0; j < 8; ++j) acc[j] += xb[c + j] * wr[c + j];
      float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      for (; c < k; ++c) s += xb[c] * wr[c];
      y[b * n + r] = s + (bias ? bias[r] : 0.0f);
    }
  }
}

}  // namespace

// vqmobile::dense_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out): float32 y = x W^T + b with
// W [n, k] read in place (used for an lm_head tied to the embedding, so the program stores W once).
Tensor& dense_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight,
                         const std::optional<Tensor>& bias, Tensor& out) {
  if (weight.scalar_type() != ScalarType::Float || weight.dim() != 2) {
    ET_LOG(Error, "vqmobile::dense_linear: weight must be float32 [n, k]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t batch = prepare(ctx, x, n, k, out);
  if (batch < 0) return out;
  bool ok;
  const float* b = bias_ptr(ctx, bias, n, &ok);
  if (!ok || batch == 0) return out;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = weight.const_data_ptr<float>();
  float* yp = out.mutable_data_ptr<float>();
  int64_t threads = vqm_get_num_threads();
  const int64_t work = batch * n * k;
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, work / (1 << 20)));
  if (threads <= 1) {
    dense_rows(xp, wp, b, yp, batch, n, k, 0, n);
    return out;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t r0 = t * chunk, r1 = std::min(n, r0 + chunk);
    if (r0 < r1) pool.emplace_back(dense_rows, xp, wp, b, yp, batch, n, k, r0, r1);
  }
  dense_rows(xp, wp, b, yp, batch, n, k, 0, std::min(n, chunk));
  for (auto& th : pool) th.join();
  return out;
}

// vqmobile::attention.out(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos,
// float scale, int window=0, *, Tensor(c!) out): the new keys and values into the decoder's static KV cache (float32
// or float16), then the attention over it, read in place (vqm_kv_write, vqm_attention, vqm_attention_f16). The caches
// come as const references, as WrapUnboxedIntoFunctor takes one mutable tensor (the output); their data is written.
Tensor& attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& k_cache, const Tensor& v_cache, const Tensor& input_pos, double scale,
                      int64_t window, Tensor& out) {
  const ScalarType kv = k_cache.scalar_type();
  if (q.scalar_type() != ScalarType::Float || k.scalar_type() != ScalarType::Float ||
      v.scalar_type() != ScalarType::Float || (kv != ScalarType::Float && kv != ScalarType::Half) ||
      v_cache.scalar_type() != kv || out.scalar_type() != ScalarType::Float || q.dim() != 3 || k.dim() != 3 ||
      v.dim() != 3 || k_cache.dim() != 3 || v_cache.dim() != 3 || input_pos.scalar_type() != ScalarType::Long ||
      input_pos.numel() != 1 || v_cache.size(0) != k_cache.size(0) || v_cache.size(1) != k_cache.size(2) ||
      v_cache.size(2) != q.size(2) || k_cache.size(1) != q.size(2) || k.size(0) != q.size(0) ||
      k.size(1) != k_cache.size(0) || k.size(2) != q.size(2) || v.size(0) != k.size(0) || v.size(1) != k.size(1) ||
      v.size(2) != k.size(2)) {
    ET_LOG(Error, "vqmobile::attention: expected float32 q [T,H,D], k and v [T,Hkv,D], k_cache [Hkv,D,S] and "
                  "v_cache [Hkv,S,D] both float32 or both float16, int64 input_pos [1]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resized(ctx, out, q.sizes(), "vqmobile::attention")) return out;
  const int heads = (int)q.size(1), kv_heads = (int)k_cache.size(0), t = (int)q.size(0), d = (int)q.size(2);
  const int max_seq = (int)k_cache.size(2);
  const int64_t pos = input_pos.const_data_ptr<int64_t>()[0];
  int rc = vqm_kv_write(k.const_data_ptr<float>(), v.const_data_ptr<float>(), k_cache.mutable_data_ptr(),
                        v_cache.mutable_data_ptr(), kv == ScalarType::Half, kv_heads, t, d, max_seq, pos);
  if (rc == VQM_OK) {
    rc = kv == ScalarType::Float
        ? vqm_attention(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(),
                        heads, kv_heads, t, d, max_seq, pos, (float)scale, (int)window, out.mutable_data_ptr<float>(),
                        0)
        : vqm_attention_f16(q.const_data_ptr<float>(), static_cast<const uint16_t*>(k_cache.const_data_ptr()),
                            static_cast<const uint16_t*>(v_cache.const_data_ptr()), heads, kv_heads, t, d, max_seq,
                            pos, (float)scale, (int)window, out.mutable_data_ptr<float>(), 0);
  }
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::attention: position %lld + %lld queries outside the %lld-position cache",
           (long long)pos, (long long)q.size(0), (long long)k_cache.size(2));
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::rms_norm.out(Tensor x, Tensor weight, float eps, float offset=0., *, Tensor(a!) out): RMSNorm over the
// last dimension (vqm_rms_norm).
Tensor& rms_norm_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, double eps, double offset,
                     Tensor& out) {
  const int64_t d = x.dim() >= 1 ? x.size(x.dim() - 1) : 0;
  if (x.scalar_type() != ScalarType::Float || weight.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || d < 1 || weight.numel() != d) {
    ET_LOG(Error, "vqmobile::rms_norm: expected float32 x [..., d] and weight [d]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resized(ctx, out, x.sizes(), "vqmobile::rms_norm")) return out;
  if (vqm_rms_norm(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), x.numel() / d, d, (float)eps,
                   (float)offset, out.mutable_data_ptr<float>()) != VQM_OK) {
    ET_LOG(Error, "vqmobile::rms_norm: native kernel failed");
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::add_rms_norm.out(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0., *,
// Tensor(a!) total, Tensor(b!) out): total = x + residual and its RMSNorm (vqm_add_rms_norm). Two outputs, which
// WrapUnboxedIntoFunctor does not take: boxed by hand. The emitter passes the schema's arguments in order, then one
// list of the outputs.
void add_rms_norm_boxed(KernelRuntimeContext& ctx, executorch::runtime::Span<executorch::runtime::EValue*> stack) {
  if (stack.size() < 7 || !stack[0]->isTensor() || !stack[1]->isTensor() || !stack[2]->isTensor() ||
      !stack[3]->isDouble() || !stack[4]->isDouble() || !stack[5]->isTensor() || !stack[6]->isTensor()) {
    ET_LOG(Error, "vqmobile::add_rms_norm: unexpected arguments");
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const Tensor& x = stack[0]->toTensor();
  const Tensor& residual = stack[1]->toTensor();
  const Tensor& weight = stack[2]->toTensor();
  Tensor& total = stack[5]->toTensor();
  Tensor& out = stack[6]->toTensor();
  const int64_t d = x.dim() >= 1 ? x.size(x.dim() - 1) : 0;
  if (x.scalar_type() != ScalarType::Float || residual.scalar_type() != ScalarType::Float ||
      weight.scalar_type() != ScalarType::Float || total.scalar_type() != ScalarType::Float ||
      out.scalar_type() != ScalarType::Float || d < 1 || weight.numel() != d || residual.numel() != x.numel()) {
    ET_LOG(Error, "vqmobile::add_rms_norm: expected float32 x and residual [..., d] alike, weight [d]");
    ctx.fail(Error::InvalidArgument);
    return;
  }
  if (!resized(ctx, total, x.sizes(), "vqmobile::add_rms_norm") ||
      !resized(ctx, out, x.sizes(), "vqmobile::add_rms_norm")) {
    return;
  }
  if (vqm_add_rms_norm(x.const_data_ptr<float>(), residual.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                       x.numel() / d, d, (float)stack[3]->toDouble(), (float)stack[4]->toDouble(),
                       total.mutable_data_ptr<float>(), out.mutable_data_ptr<float>()) != VQM_OK) {
    ET_LOG(Error, "vqmobile::add_rms_norm: native kernel failed");
    ctx.fail(Error::InvalidArgument);
  }
}

// vqmobile::rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out): rotary embedding of x [T, H, D] with cos,
// sin [.., T, R] into out [T, H, D] (vqm_rope).
Tensor& rope_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  const int64_t rot = cos.dim() >= 1 ? cos.size(cos.dim() - 1) : 0;
  if (x.scalar_type() != ScalarType::Float || cos.scalar_type() != ScalarType::Float ||
      sin.scalar_type() != ScalarType::Float || out.scalar_type() != ScalarType::Float || x.dim() != 3 ||
      cos.numel() != x.size(0) * rot || sin.numel() != cos.numel() || rot > x.size(2) || rot % 2) {
    ET_LOG(Error, "vqmobile::rope: expected float32 x [T, H, D] and cos, sin [T, R] (R even, R <= D)");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (!resized(ctx, out, x.sizes(), "vqmobile::rope")) return out;
  if (vqm_rope(x.const_data_ptr<float>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), x.size(0),
               x.size(1), x.size(2), rot, out.mutable_data_ptr<float>()) != VQM_OK) {
    ET_LOG(Error, "vqmobile::rope: native kernel failed");
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::silu_mul.out(Tensor gate_up, *, Tensor(a!) out): silu(gate) * up of [..., 2n] rows [gate | up] into
// [..., n] (vqm_silu_mul).
Tensor& silu_mul_out(KernelRuntimeContext& ctx, const Tensor& gate_up, Tensor& out) {
  const int64_t w = gate_up.dim() >= 1 ? gate_up.size(gate_up.dim() - 1) : 0;
  if (w < 2 || w % 2) {
    ET_LOG(Error, "vqmobile::silu_mul: expected gate_up [..., 2n]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  const int64_t rows = prepare(ctx, gate_up, w / 2, w, out);
  if (rows < 0) return out;
  if (vqm_silu_mul(gate_up.const_data_ptr<float>(), rows, w / 2, out.mutable_data_ptr<float>()) != VQM_OK) {
    ET_LOG(Error, "vqmobile::silu_mul: native kernel failed");
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::e8p_linear.out(Tensor x, Tensor codes, Tensor scales, Tensor? bias, int n, int k, bool act_int8=False, *,
// Tensor(a!) out): an E8P lattice-codebook weight (QuIP#), codes uint8 [n, bits, ceil(k/8)], scales float32 [stages].
Tensor& e8p_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& codes, const Tensor& scales,
                       const std::optional<Tensor>& bias, int64_t n, int64_t k, bool act_int8, Tensor& out) {
  const int64_t batch = prepare(ctx, x, n, k, out);
  if (batch < 0) return out;
  bool ok;
  const float* b = bias_ptr(ctx, bias, n, &ok);
  if (!ok) return out;
  const int64_t bits = codes.dim() == 3 ? codes.size(1) : 0;
  if (codes.scalar_type() != ScalarType::Byte || scales.scalar_type() != ScalarType::Float || bits < 2 || bits > 4 ||
      codes.size(0) != n || codes.size(2) != (k + 7) / 8 || scales.numel() != (bits == 2 ? 1 : 2)) {
    ET_LOG(Error, "vqmobile::e8p_linear: expected uint8 codes [n, 2..4, ceil(k/8)], float32 scales [stages]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  vqm_e8p_weight w;
  w.n = (int32_t)n;
  w.k = (int32_t)k;
  w.bits = (int32_t)bits;
  w.codes = codes.const_data_ptr<uint8_t>();
  w.scales = scales.const_data_ptr<float>();
  if (batch == 0) return out;
  int rc = vqm_e8p_linear(&w, x.const_data_ptr<float>(), batch, b, out.mutable_data_ptr<float>(),
                          act_int8 ? VQM_ACT_INT8 : 0, 0);
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::e8p_linear: native kernel failed (%d)", rc);
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::hadamard.out(Tensor x, Tensor signs, Tensor had, int m, int p, bool transpose=False, *, Tensor(a!) out):
// one block of the random Hadamard transform of an incoherent weight (vqm_hadamard), over the last dimension.
Tensor& hadamard_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& signs, const Tensor& had, int64_t m,
                     int64_t p, bool transpose, Tensor& out) {
  const int64_t n = m * p;
  const int64_t batch = prepare(ctx, x, n, n, out);
  if (batch < 0) return out;
  if (signs.scalar_type() != ScalarType::Byte || signs.numel() != (n + 7) / 8 || had.scalar_type() != ScalarType::Char ||
      had.numel() != m * m) {
    ET_LOG(Error, "vqmobile::hadamard: expected uint8 signs [ceil(m p / 8)] and int8 had [m, m]");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  if (batch == 0) return out;
  int rc = vqm_hadamard(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), batch, (int)m, (int)p,
                        had.const_data_ptr<int8_t>(), signs.const_data_ptr<uint8_t>(), transpose ? VQM_HAD_TRANSPOSE : 0);
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::hadamard: native kernel failed (%d)", rc);
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

// vqmobile::cvq_linear.out: the column-vector VQ (VPTQ) format, vqm_cvq_linear.
Tensor& cvq_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& indices, const Tensor& codebook,
                       const Tensor& codebook_scale, const Tensor& col_scale, const Tensor& perm,
                       const std::optional<Tensor>& res_indices, const std::optional<Tensor>& res_codebook,
                       const std::optional<Tensor>& res_scale, const std::optional<Tensor>& bias, int64_t n, int64_t k,
                       int64_t v, int64_t outlier_cols, int64_t cols_per_group, bool act_int8, Tensor& out) {
  const int64_t batch = prepare(ctx, x, n, k, out);
  if (batch < 0) return out;
  bool ok;
  const float* b = bias_ptr(ctx, bias, n, &ok);
  if (!ok) return out;
  const bool res = res_codebook.has_value();
  if (indices.scalar_type() != ScalarType::Byte || codebook.scalar_type() != ScalarType::Char || codebook.dim() != 3 ||
      codebook_scale.scalar_type() != ScalarType::Half || col_scale.scalar_type() != ScalarType::Half ||
      perm.scalar_type() != ScalarType::Short || res != res_indices.has_value() || res != res_scale.has_value() ||
      (res && (res_indices->scalar_type() != ScalarType::Byte || res_codebook->scalar_type() != ScalarType::Char ||
               res_codebook->dim() != 3 || res_scale->scalar_type() != ScalarType::Half))) {
    ET_LOG(Error, "vqmobile::cvq_linear: expected uint8 indices, int8 codebooks [G,k,v], fp16 scales, int16 perm");
    ctx.fail(Error::InvalidArgument);
    return out;
  }
  vqm_cvq_weight w;
  w.n = (int32_t)n;
  w.k = (int32_t)k;
  w.v = (int32_t)v;
  w.ncent = (int32_t)codebook.size(1);
  w.res_ncent = res ? (int32_t)res_codebook->size(1) : 0;
  w.outlier_cols = (int32_t)outlier_cols;
  w.cols_per_group = (int32_t)cols_per_group;
  w.indices = indices.const_data_ptr<uint8_t>();
  w.codebook = codebook.const_data_ptr<int8_t>();
  w.scale = static_cast<const uint16_t*>(codebook_scale.const_data_ptr());
  w.res_indices = res ? res_indices->const_data_ptr<uint8_t>() : nullptr;
  w.res_codebook = res ? res_codebook->const_data_ptr<int8_t>() : nullptr;
  w.res_scale = res ? static_cast<const uint16_t*>(res_scale->const_data_ptr()) : nullptr;
  w.col_scale = static_cast<const uint16_t*>(col_scale.const_data_ptr());
  w.perm = perm.const_data_ptr<int16_t>();
  if (batch == 0) return out;
  int rc = vqm_cvq_linear(&w, x.const_data_ptr<float>(), batch, b, out.mutable_data_ptr<float>(),
                          act_int8 ? VQM_ACT_INT8 : 0, 0);
  if (rc != VQM_OK) {
    ET_LOG(Error, "vqmobile::cvq_linear: native kernel failed (%d)", rc);
    ctx.fail(Error::InvalidArgument);
  }
  return out;
}

namespace {

constexpr char kAttentionName[] = "vqmobile::attention.out";
constexpr char kDenseName[] = "vqmobile::dense_linear.out";
constexpr char kVqName[] = "vqmobile::vq_linear.out";
constexpr char kIntName[] = "vqmobile::int_linear.out";
constexpr char kE8pName[] = "vqmobile::e8p_linear.out";
constexpr char kHadName[] = "vqmobile::hadamard.out";
constexpr char kCvqName[] = "vqmobile::cvq_linear.out";
constexpr char kNormName[] = "vqmobile::rms_norm.out";
constexpr char kRopeName[] = "vqmobile::rope.out";
constexpr char kAddNormName[] = "vqmobile::add_rms_norm.out";
constexpr char kSiluName[] = "vqmobile::silu_mul.out";

// registry_has_op_function logs an error for every op it does not find, which would print three alarming lines
// on each start; scanning the registered kernels says the same silently.
bool registered_already(const char* name) {
  for (const auto& k : executorch::runtime::get_registered_kernels()) {
    if (std::strcmp(k.name_, name) == 0) return true;
  }
  return false;
}

int register_once() {
  using executorch::extension::make_boxed_kernel;
  if (!registered_already(kVqName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kVqName, EXECUTORCH_FN(vq_linear_out, kVqName)));
  }
  if (!registered_already(kIntName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kIntName, EXECUTORCH_FN(int_linear_out, kIntName)));
  }
  if (!registered_already(kDenseName)) {
    (void)executorch::runtime::register_kernel(
        make_boxed_kernel(kDenseName, EXECUTORCH_FN(dense_linear_out, kDenseName)));
  }
  if (!registered_already(kAttentionName)) {
    (void)executorch::runtime::register_kernel(
        make_boxed_kernel(kAttentionName, EXECUTORCH_FN(attention_out, kAttentionName)));
  }
  if (!registered_already(kE8pName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kE8pName, EXECUTORCH_FN(e8p_linear_out, kE8pName)));
  }
  if (!registered_already(kHadName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kHadName, EXECUTORCH_FN(hadamard_out, kHadName)));
  }
  if (!registered_already(kCvqName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kCvqName, EXECUTORCH_FN(cvq_linear_out, kCvqName)));
  }
  if (!registered_already(kNormName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kNormName, EXECUTORCH_FN(rms_norm_out, kNormName)));
  }
  if (!registered_already(kAddNormName)) {
    (void)executorch::runtime::register_kernel(executorch::runtime::Kernel(kAddNormName, add_rms_norm_boxed));
  }
  if (!registered_already(kSiluName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kSiluName, EXECUTORCH_FN(silu_mul_out, kSiluName)));
  }
  if (!registered_already(kRopeName)) {
    (void)executorch::runtime::register_kernel(make_boxed_kernel(kRopeName, EXECUTORCH_FN(rope_out, kRopeName)));
  }
  return 0;
}

static const int registered = register_once();

}  // namespace
}  // namespace vqmobile_et

// C entry points: lets a host program (or ctypes) force registration and query the library.
extern "C" __attribute__((visibility("default"))) int vqmobile_et_register(void) { return vqmobile_et::register_once(); }
extern "C" __attribute__((visibility("default"))) const char* vqmobile_et_version(void) { return "vqmobile-executorch-adapter 1"; }
// The adapter links its own copy of the native kernels: their thread count is set here (VQMOBILE_NUM_THREADS in
// the environment also works, read at start-up).
extern "C" __attribute__((visibility("default"))) void vqmobile_et_set_num_threads(int n) { vqm_set_num_threads(n); }
extern "C" __attribute__((visibility("default"))) int vqmobile_et_get_num_threads(void) { return vqm_get_num_threads(); }
// The kernel path this copy picked ("ref", "avx2", "avx512", "neon", "neon_dot"); the cffi module's may differ.
extern "C" __attribute__((visibility("default"))) const char* vqmobile_et_kernel_path(void) {
  return vqm_path_name(vqm_get_path());
}
