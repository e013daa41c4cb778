// Raw-pointer interface of the per-row log-prob / entropy passes (docs/kernels.md section 2,
// the RL head), shared by the CPU and CUDA kernels and their bindings. With u = softcap(z) and
// z' = u / T:  logp = z'_y - lse(z'),  H = lse(z') - mu,  mu = sum_j p_j z'_j,  p = softmax(z').
//   stats pass: reads a logits row, writes logp, lse, mu (and H).
//   grad pass:  given g_lp, g_H per row and the row's lse, mu, overwrites the row with
//     dL/dz_j = [g_lp (onehot_j - p_j) - g_H p_j (z'_j - mu)] / T * (1 - (u_j / c)^2 if softcap)
// Rows whose target is ignore_index get logp = H = 0 and a zero gradient row.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ptcore {

struct LogprobRowsArgs {
  void* logits = nullptr;  // [rows, vocab], row_stride; dtype as for cross_entropy_rows
  std::string dtype;
  int64_t rows = 0, vocab = 0, row_stride = 0;
  const int64_t* target = nullptr;  // contiguous [rows]
  int64_t ignore_index = -100;
  double softcap = 0.0, temperature = 1.0;
  // Per-row vectors, contiguous, in the accumulation type (float64 for float64 logits, else
  // float32). Stats pass writes logp, lse, mu and (if non-null) entropy; the grad pass reads
  // lse, mu and the incoming gradients g_logp, g_entropy (each may be null: zero).
  void* logp = nullptr;
  void* entropy = nullptr;
  void* lse = nullptr;
  void* mu = nullptr;
  const void* g_logp = nullptr;
  const void* g_entropy = nullptr;
  uintptr_t stream = 0;  // CUDA only
};

inline void check_logprob_rows_args(const LogprobRowsArgs& a, bool grad) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("logprob_rows: " + what); };
  if (a.rows < 0) fail("'rows' must be >= 0");
  if (a.vocab <= 0) fail("'vocab' must be > 0");
  if (a.row_stride < a.vocab) fail("'logits' row stride is smaller than the vocab");
  if (!(a.softcap >= 0.0)) fail("'softcap' must be > 0 or 0 (off)");
  if (!(a.temperature > 0.0)) fail("'temperature' must be > 0");
  if (a.rows > 0 && (!a.logits || !a.target || !a.lse || !a.mu)) fail("'logits', 'target', 'lse' and 'mu' must be non-null");
  if (a.rows > 0 && !grad && !a.logp) fail("'logp' must be non-null");
}

void logprob_rows_stats(const LogprobRowsArgs& args);
void logprob_rows_grad(const LogprobRowsArgs& args);
void logprob_rows_stats_cuda(const LogprobRowsArgs& args);
void logprob_rows_grad_cuda(const LogprobRowsArgs& args);

}  // namespace ptcore
