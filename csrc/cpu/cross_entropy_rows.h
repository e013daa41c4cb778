// Raw-pointer interface of the CPU per-row cross-entropy pass (no torch headers).
#pragma once

#include <cstdint>
#include <string>

namespace ptcore {

struct CrossEntropyRowsArgs {
  void* logits = nullptr;   // [rows, vocab] with row_stride, dtype below; overwritten by G if write_grad
  std::string dtype;        // float32 | bfloat16 | float16 | float64
  int64_t rows = 0, vocab = 0, row_stride = 0;
  const int64_t* target = nullptr;
  int64_t target_stride = 1;
  // loss, lse and scale hold the accumulation type: float64 for float64 logits, else float32.
  void* loss = nullptr;     // [rows] per-row loss (0 for ignored rows)
  int64_t loss_stride = 1;
  void* lse = nullptr;      // [rows] log-sum-exp of the soft-capped logits (0 for ignored rows)
  int64_t lse_stride = 1;
  const void* scale = nullptr;  // optional per-row gradient scale s_i; null means 1
  int64_t scale_stride = 1;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;  // softcap 0 = off
  bool write_grad = false;
};

// Throws std::invalid_argument (a Python ValueError) on bad arguments or out-of-range targets.
void cross_entropy_rows(const CrossEntropyRowsArgs& args);

}  // namespace ptcore
