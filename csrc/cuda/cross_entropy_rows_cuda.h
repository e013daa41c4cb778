// Host-side interface of the CUDA kernels; includes no CUDA header so that the pybind11 bindings
// compile with the host compiler alone.
#pragma once

#include <cstdint>
#include <string>

namespace ptcore {

struct CrossEntropyRowsCudaArgs {
  void* logits = nullptr;  // device pointers throughout; same contract as CrossEntropyRowsArgs
  std::string dtype;
  int64_t rows = 0, vocab = 0, row_stride = 0;
  const int64_t* target = nullptr;
  int64_t target_stride = 1;
  float* loss = nullptr;
  float* lse = nullptr;
  const float* scale = nullptr;
  int64_t scale_stride = 1;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;
  bool write_grad = false;
  uintptr_t stream = 0;  // cudaStream_t of the caller (torch's current stream)
};

void cross_entropy_rows_cuda(const CrossEntropyRowsCudaArgs& args);
int cuda_device_count(std::string* why_not);
int cuda_runtime_version();

}  // namespace ptcore
