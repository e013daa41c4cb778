// The CPU paged attention's argument check: every size, stride and pointer, the sequence lengths
// against the block table, the page ids of the used pages, cu_seqlens_q, and (given each buffer's
// numel) the largest offset reachable through the sizes and strides, before any buffer is read.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

#include "paged_attention_internal.h"

namespace ptcore {
namespace paged_attention_detail {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("paged_attention: " + what);
}

// The buffer `name` of `numel` elements is read (or written) at offsets sum_i idx_i * stride_i with
// 0 <= idx_i < n_i for the (n_i, stride_i) of dims: the largest must lie below numel. Nothing is
// reached when some n_i is 0. numel < 0: not given (C++ callers), not checked.
static void check_extent(const char* name, int64_t numel, std::initializer_list<std::pair<int64_t, int64_t>> dims) {
  if (numel < 0) return;
  __int128 hi = 0;
  for (const auto& d : dims) {
    if (d.first <= 0) return;
    if (d.second < 0) fail(std::string("'") + name + "' has a negative stride " + std::to_string(d.second));
    hi += __int128(d.first - 1) * d.second;
  }
  if (hi >= __int128(numel))
    fail(std::string("'") + name + "' holds " + std::to_string(numel) +
         " elements, fewer than its sizes and strides reach (offset " +
         (hi > __int128(std::numeric_limits<int64_t>::max()) ? std::string("> 2^63")
                                                             : std::to_string(int64_t(hi))) + ")");
}

void check(const PagedAttentionArgs& a) {
  const std::string& dt = a.dtype;
  if (dt != "float32" && dt != "float64" && dt != "bfloat16" && dt != "float16")
    fail("'q' dtype '" + dt + "' is not one of float32, float64, bfloat16, float16");
  if (a.tokens < 0 || a.batch < 0 || a.pages < 0 || a.max_pages < 0)
    fail("'tokens', 'batch', 'pages' and 'max_pages' must be >= 0");
  if (a.head_dim <= 0 || a.head_dim > kMaxHeadDim)
    fail("'head_dim' must be in [1, " + std::to_string(kMaxHeadDim) + "], got " + std::to_string(a.head_dim));
  if (a.page_size <= 0) fail("'page_size' must be > 0, got " + std::to_string(a.page_size));
  if (a.kv_heads <= 0 || a.q_heads <= 0 || a.q_heads % a.kv_heads != 0)
    fail("'q' has " + std::to_string(a.q_heads) + " heads, not a positive multiple of the " +
         std::to_string(a.kv_heads) + " KV heads of 'k_cache'");
  if (!std::isfinite(a.scale)) fail("'scale' must be finite");
  if (!(a.softcap >= 0.0) || !std::isfinite(a.softcap)) fail("'softcap' must be > 0, or 0 (off)");
  if (!a.cu_seqlens_q && a.tokens != a.batch)
    fail("decode: 'q' has " + std::to_string(a.tokens) + " tokens but 'seq_lens' has " +
         std::to_string(a.batch) + " sequences");
  if (a.batch > 0 && !a.seq_lens) fail("'seq_lens' must be non-null");
  if (a.batch > 0 && a.max_pages > 0 && !a.block_table) fail("'block_table' must be non-null");
  if (a.cu_seqlens_q == nullptr && a.tree_mask) fail("'tree_mask' needs 'cu_seqlens_q' (extend)");
  if (a.tokens > 0 && (!a.q || !a.out)) fail("'q' and 'out' must be non-null");
  if (a.bt_stride < a.max_pages) fail("'block_table' row stride is smaller than its width");
  if (a.mask_cols < 0) fail("'tree_mask' has a negative number of columns");
  // Every offset the kernel can reach, against each buffer's numel (before any buffer is read).
  for (auto st : {a.q_stride_t, a.q_stride_h, a.k_stride_page, a.k_stride_slot, a.k_stride_head, a.v_stride_page,
                  a.v_stride_slot, a.v_stride_head, a.bt_stride})
    if (st < 0) fail("strides must be >= 0, got " + std::to_string(st) + " (q, k_cache, v_cache or block_table)");
  check_extent("seq_lens", a.seq_lens_numel, {{a.batch, 1}});
  if (a.cu_seqlens_q) check_extent("cu_seqlens_q", a.cu_seqlens_q_numel, {{a.batch + 1, 1}});
  check_extent("block_table", a.block_table_numel, {{a.batch, a.bt_stride}, {a.max_pages, 1}});
  check_extent("q", a.q_numel, {{a.tokens, a.q_stride_t}, {a.q_heads, a.q_stride_h}, {a.head_dim, 1}});
  if (a.q_heads > std::numeric_limits<int64_t>::max() / a.head_dim) fail("'q_heads' x 'head_dim' overflows");
  check_extent("out", a.out_numel, {{a.tokens, a.q_heads * a.head_dim}, {a.q_heads, a.head_dim}, {a.head_dim, 1}});
  if (a.tree_mask) check_extent("tree_mask", a.tree_mask_numel, {{a.tokens, a.mask_cols}, {a.mask_cols, 1}});
  check_extent("k_cache", a.k_numel, {{a.pages, a.k_stride_page}, {a.page_size, a.k_stride_slot},
                                      {a.kv_heads, a.k_stride_head}, {a.head_dim, 1}});
  check_extent("v_cache", a.v_numel, {{a.pages, a.v_stride_page}, {a.page_size, a.v_stride_slot},
                                      {a.kv_heads, a.v_stride_head}, {a.head_dim, 1}});
  if (a.cu_seqlens_q) {
    const int32_t* cu = a.cu_seqlens_q;
    if (cu[0] != 0) fail("'cu_seqlens_q'[0] must be 0, got " + std::to_string(cu[0]));
    for (int64_t b = 0; b < a.batch; ++b)
      if (cu[b + 1] < cu[b]) fail("'cu_seqlens_q' decreases at index " + std::to_string(b + 1));
    if (cu[a.batch] != a.tokens)
      fail("'cu_seqlens_q'[-1] = " + std::to_string(cu[a.batch]) + " must equal the number of tokens " +
           std::to_string(a.tokens));
  } else if (a.batch == 0 && a.tokens != 0) {
    fail("'q' has tokens but there are no sequences");
  }
  const int64_t capacity = int64_t(std::min<__int128>(__int128(a.max_pages) * a.page_size,
                                                       std::numeric_limits<int64_t>::max()));
  int64_t max_q = 0;
  bool any_page = false;
  for (int64_t b = 0; b < a.batch; ++b) {
    const int64_t L = a.seq_lens[b], n = q_len(a, b);
    max_q = std::max(max_q, n);
    if (L < n || L < (a.cu_seqlens_q ? 0 : 1))
      fail("'seq_lens'[" + std::to_string(b) + "] = " + std::to_string(L) + " must be at least " +
           (a.cu_seqlens_q ? "its " + std::to_string(n) + " new token(s)" : std::string("1 (the new token)")));
    if (L > capacity)
      fail("'seq_lens'[" + std::to_string(b) + "] = " + std::to_string(L) + " exceeds the block table's capacity " +
           std::to_string(a.max_pages) + " pages x " + std::to_string(a.page_size) + " = " + std::to_string(capacity));
    const int32_t* row = a.block_table + b * a.bt_stride;
    for (int64_t i = 0; i < (L + a.page_size - 1) / a.page_size; ++i) {
      any_page = true;
      if (row[i] < 0 || row[i] >= a.pages)
        fail("'block_table'[" + std::to_string(b) + ", " + std::to_string(i) + "] = " + std::to_string(row[i]) +
             " is not a page id in [0, " + std::to_string(a.pages) + ")");
    }
  }
  if (a.tree_mask && a.mask_cols < max_q)
    fail("'tree_mask' has " + std::to_string(a.mask_cols) + " columns, fewer than the longest q_len " +
         std::to_string(max_q));
  if (any_page && (!a.k || !a.v)) fail("'k_cache' and 'v_cache' must be non-null");
}

}  // namespace paged_attention_detail
}  // namespace ptcore
