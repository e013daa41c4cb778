// Raw-pointer interface of the fused backbone ops (RMSNorm with the residual add, RoPE on q and k,
// SwiGLU / GeGLU), shared by the CPU kernels (backbone.cpp), the CUDA kernels
// (csrc/cuda/backbone.cu) and their bindings (backbone_bindings.h). No torch or CUDA headers:
// Python validates the tensors (contiguous, same dtype, matching shapes) and passes pointers.
// Math: docs/kernels.md, "Fused backbone ops".
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ptcore {

// dtype: float32 | bfloat16 | float16 | float64 (float64 on the CPU only). Every tensor holds
// that dtype except rstd and dweight, which hold the accumulation type (float32; float64 for
// float64). Row-major, contiguous.

// y = (s * rstd) * (w + offset), s = x + residual (rounded to dtype, written to s_out) or x,
// rstd = 1 / sqrt(mean(s^2) + eps). residual and s_out are both set or both 0.
void rms_norm_forward(uintptr_t x, uintptr_t residual, uintptr_t s_out, uintptr_t weight,
                      uintptr_t y, uintptr_t rstd, const std::string& dtype, int64_t rows,
                      int64_t hidden, double eps, double offset, uintptr_t stream);
// ds = rstd * (g - shat * mean(g * shat)) + dres, g = dy * (w + offset), shat = s * rstd;
// dweight = sum over rows of dy * shat (skipped when dweight is 0). dres is optional (0).
void rms_norm_backward(uintptr_t dy, uintptr_t dres, uintptr_t s, uintptr_t weight, uintptr_t rstd,
                       uintptr_t ds, uintptr_t dweight, const std::string& dtype, int64_t rows,
                       int64_t hidden, double offset, uintptr_t stream);
// HF's rotate_half RoPE on q [rows, q_heads, head_dim] and k [rows, k_heads, head_dim] with cos,
// sin [cos_rows, rot_dim] (row n uses cos row n % cos_rows; rot_dim even, <= head_dim; the
// dims past rot_dim pass through, as Phi-3's partial rotary). inverse: the transpose (backward).
void rope(uintptr_t q, uintptr_t k, uintptr_t cos, uintptr_t sin, uintptr_t q_out, uintptr_t k_out,
          const std::string& dtype, int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim,
          int64_t rot_dim, int64_t cos_rows, bool inverse, uintptr_t stream);
// act: 0 = silu (SwiGLU), 1 = gelu with the tanh approximation (GeGLU). y = act(gate) * up.
void gated_act_forward(uintptr_t gate, uintptr_t up, uintptr_t y, const std::string& dtype,
                       int64_t n, int64_t act, uintptr_t stream);
void gated_act_backward(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup,
                        const std::string& dtype, int64_t n, int64_t act, uintptr_t stream);

// The CUDA versions: same arguments, stream = the caller's cudaStream_t. rms_norm_backward_cuda
// writes per-block partial weight gradients [partial_rows, hidden] to dweight (Python sums them).
void rms_norm_forward_cuda(uintptr_t x, uintptr_t residual, uintptr_t s_out, uintptr_t weight,
                           uintptr_t y, uintptr_t rstd, const std::string& dtype, int64_t rows,
                           int64_t hidden, double eps, double offset, uintptr_t stream);
void rms_norm_backward_cuda(uintptr_t dy, uintptr_t dres, uintptr_t s, uintptr_t weight,
                            uintptr_t rstd, uintptr_t ds, uintptr_t dweight, const std::string& dtype,
                            int64_t rows, int64_t hidden, double offset, uintptr_t stream);
void rope_cuda(uintptr_t q, uintptr_t k, uintptr_t cos, uintptr_t sin, uintptr_t q_out,
               uintptr_t k_out, const std::string& dtype, int64_t rows, int64_t q_heads,
               int64_t k_heads, int64_t head_dim, int64_t rot_dim, int64_t cos_rows, bool inverse,
               uintptr_t stream);
void gated_act_forward_cuda(uintptr_t gate, uintptr_t up, uintptr_t y, const std::string& dtype,
                            int64_t n, int64_t act, uintptr_t stream);
void gated_act_backward_cuda(uintptr_t dy, uintptr_t gate, uintptr_t up, uintptr_t dgate,
                             uintptr_t dup, const std::string& dtype, int64_t n, int64_t act,
                             uintptr_t stream);
// Rows of partial weight gradients rms_norm_backward_cuda writes for `rows` rows.
inline int64_t rms_norm_partial_rows_cuda(int64_t rows) { return rows < 256 ? rows : 256; }

// The checks every backend repeats after Python's: std::invalid_argument is a Python ValueError.
inline void check_backbone(const char* op, bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}
inline void check_rope_shape(int64_t rows, int64_t q_heads, int64_t k_heads, int64_t head_dim,
                             int64_t rot_dim, int64_t cos_rows) {
  check_backbone("rope", rows >= 0 && q_heads >= 0 && k_heads >= 0, "sizes must be >= 0");
  check_backbone("rope", rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_dim,
                 "'cos' last dim must be even, > 0 and <= the head dim");
  check_backbone("rope", cos_rows > 0 && rows % cos_rows == 0, "'cos' rows must divide the rows of 'q'");
}

}  // namespace ptcore
