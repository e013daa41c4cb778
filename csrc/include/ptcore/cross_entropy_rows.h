// Raw-pointer interface of the per-row cross-entropy pass, shared by the CPU and CUDA kernels and
// their bindings (no torch or CUDA headers).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ptcore {

struct CrossEntropyRowsArgs {
  void* logits = nullptr;   // [rows, vocab] with row_stride, dtype below; overwritten by G if write_grad
  std::string dtype;        // float32 | bfloat16 | float16 | float64 (CPU only)
  int64_t rows = 0, vocab = 0, row_stride = 0;
  const int64_t* target = nullptr;
  int64_t target_stride = 1;
  // loss, lse and scale hold the accumulation type: float64 for float64 logits, else float32.
  void* loss = nullptr;     // [rows] per-row loss (0 for ignored rows)
  void* lse = nullptr;      // [rows] log-sum-exp of the soft-capped logits (0 for ignored rows)
  const void* scale = nullptr;  // optional gradient scale s_i; null means 1
  int64_t scale_stride = 1;     // 0 broadcasts one value over the rows
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;  // softcap 0 = off
  bool write_grad = false;
  uintptr_t stream = 0;     // CUDA only: the caller's cudaStream_t
};

// Builds the arguments from the integers Python passes (data pointers as uintptr_t).
inline CrossEntropyRowsArgs make_cross_entropy_rows_args(
    uintptr_t logits, const std::string& dtype, int64_t rows, int64_t vocab, int64_t row_stride,
    uintptr_t target, int64_t target_stride, uintptr_t loss, uintptr_t lse, uintptr_t scale,
    int64_t scale_stride, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, bool write_grad, uintptr_t stream = 0) {
  CrossEntropyRowsArgs a;
  a.logits = reinterpret_cast<void*>(logits);
  a.dtype = dtype;
  a.rows = rows;
  a.vocab = vocab;
  a.row_stride = row_stride;
  a.target = reinterpret_cast<const int64_t*>(target);
  a.target_stride = target_stride;
  a.loss = reinterpret_cast<void*>(loss);
  a.lse = reinterpret_cast<void*>(lse);
  a.scale = reinterpret_cast<const void*>(scale);
  a.scale_stride = scale_stride;
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.write_grad = write_grad;
  a.stream = stream;
  return a;
}

// The checks every backend repeats after Python's: std::invalid_argument is a Python ValueError.
inline void check_cross_entropy_rows_args(const CrossEntropyRowsArgs& a) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("cross_entropy_rows: " + what); };
  if (a.rows < 0) fail("'rows' must be >= 0");
  if (a.vocab <= 0) fail("'vocab' must be > 0");
  if (a.row_stride < a.vocab) fail("'logits' row stride is smaller than the vocab");
  if (a.rows > 0 && (!a.logits || !a.target || !a.loss || !a.lse))
    fail("'logits', 'target', 'loss' and 'lse' must be non-null");
  if (!(a.label_smoothing >= 0.0 && a.label_smoothing <= 1.0)) fail("'label_smoothing' must lie in [0, 1]");
  if (!(a.z_loss >= 0.0)) fail("'z_loss' must be >= 0");
  if (!(a.softcap >= 0.0)) fail("'softcap' must be > 0 or 0 (off)");
}

// Throw std::invalid_argument on bad arguments (the CPU version also on out-of-range targets).
void cross_entropy_rows(const CrossEntropyRowsArgs& args);
void cross_entropy_rows_cuda(const CrossEntropyRowsArgs& args);
int cuda_device_count(std::string* why_not);
int cuda_runtime_version();

}  // namespace ptcore
