// Paged attention on the CPU (raw pointers, no torch headers): the new tokens of B sequences attend
// to their KV cache pages through a block table. Layout and conventions (ptcore/ops/paged_reference.py):
//   q        [tokens, q_heads, head_dim]     strides q_stride_t, q_stride_h, 1
//   k, v     [pages, page_size, kv_heads, head_dim]   strides *_stride_page/_slot/_head, 1
//   position p of sequence b is slot (block_table[b][p / page_size], p % page_size)
//   decode (cu_seqlens_q == null): token b is the last position (seq_lens[b] - 1) of sequence b;
//   extend: tokens cu[b]..cu[b+1] are the last q_len_b positions of sequence b, causal among
//     themselves, or by tree_mask[t][j] (bool, [tokens, mask_cols]) over the new tokens j of b.
//   query head h reads KV head h / (q_heads / kv_heads); s = scale q.k, then
//   softcap * tanh(s / softcap) when softcap > 0; a row that sees no key is written as zeros.
//   out      [tokens, q_heads, head_dim] contiguous, q's dtype.
// Every argument is checked (std::invalid_argument, which pybind11 raises as ValueError), the
// data too: sequence lengths against the block table, page ids of the used pages, cu_seqlens_q,
// and (given the numel of each buffer) the largest offset reachable through the sizes and strides.
#pragma once

#include <cstdint>
#include <string>

#include <pybind11/pybind11.h>

namespace ptcore {

struct PagedAttentionArgs {
  std::string dtype;  // float32, float64, bfloat16, float16 (q, k, v and out)
  const void* q = nullptr;
  int64_t tokens = 0, q_heads = 0, head_dim = 0, q_stride_t = 0, q_stride_h = 0;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t pages = 0, page_size = 0, kv_heads = 0;
  int64_t k_stride_page = 0, k_stride_slot = 0, k_stride_head = 0;
  int64_t v_stride_page = 0, v_stride_slot = 0, v_stride_head = 0;
  const int32_t* block_table = nullptr;
  int64_t batch = 0, max_pages = 0, bt_stride = 0;
  const int32_t* seq_lens = nullptr;      // [batch]
  const int32_t* cu_seqlens_q = nullptr;  // [batch + 1], or null for decode
  const bool* tree_mask = nullptr;        // [tokens, mask_cols] contiguous, or null (causal)
  int64_t mask_cols = 0;
  double scale = 1.0, softcap = 0.0;
  void* out = nullptr;
  // Elements each buffer holds (its numel): every offset the kernel can reach is checked against
  // them, so a wrong size or stride raises instead of reading out of bounds. -1: not given (C++
  // callers that guarantee the extents themselves); the Python binding always passes them.
  int64_t q_numel = -1, k_numel = -1, v_numel = -1, block_table_numel = -1, seq_lens_numel = -1,
          cu_seqlens_q_numel = -1, tree_mask_numel = -1, out_numel = -1;
};

void paged_attention(const PagedAttentionArgs& args);
void bind_paged_attention(pybind11::module_& m);

}  // namespace ptcore
