// The Python binding of the CPU paged attention (raw pointers, sizes, strides and each buffer's
// numel; ptcore/ops/paged_attention.py validates the tensors and passes them).
#include <cstdint>
#include <string>

#include "paged_attention_internal.h"
#include "ptcore/paged_attention.h"

namespace ptcore {

void bind_paged_attention(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "paged_attention",
      [](const std::string& dtype, uintptr_t q, int64_t tokens, int64_t q_heads, int64_t head_dim,
         int64_t q_stride_t, int64_t q_stride_h, uintptr_t k, uintptr_t v, int64_t pages, int64_t page_size,
         int64_t kv_heads, int64_t k_stride_page, int64_t k_stride_slot, int64_t k_stride_head,
         int64_t v_stride_page, int64_t v_stride_slot, int64_t v_stride_head, uintptr_t block_table,
         int64_t batch, int64_t max_pages, int64_t bt_stride, uintptr_t seq_lens, uintptr_t cu_seqlens_q,
         uintptr_t tree_mask, int64_t mask_cols, double scale, double softcap, uintptr_t out, int64_t q_numel,
         int64_t k_numel, int64_t v_numel, int64_t block_table_numel, int64_t seq_lens_numel,
         int64_t cu_seqlens_q_numel, int64_t tree_mask_numel, int64_t out_numel) {
        for (auto n : {q_numel, k_numel, v_numel, block_table_numel, seq_lens_numel, cu_seqlens_q_numel,
                       tree_mask_numel, out_numel})
          if (n < 0) paged_attention_detail::fail("the '*_numel' arguments must be >= 0");
        PagedAttentionArgs a;
        a.q_numel = q_numel; a.k_numel = k_numel; a.v_numel = v_numel;
        a.block_table_numel = block_table_numel; a.seq_lens_numel = seq_lens_numel;
        a.cu_seqlens_q_numel = cu_seqlens_q_numel; a.tree_mask_numel = tree_mask_numel; a.out_numel = out_numel;
        a.dtype = dtype;
        a.q = reinterpret_cast<const void*>(q);
        a.tokens = tokens; a.q_heads = q_heads; a.head_dim = head_dim;
        a.q_stride_t = q_stride_t; a.q_stride_h = q_stride_h;
        a.k = reinterpret_cast<const void*>(k);
        a.v = reinterpret_cast<const void*>(v);
        a.pages = pages; a.page_size = page_size; a.kv_heads = kv_heads;
        a.k_stride_page = k_stride_page; a.k_stride_slot = k_stride_slot; a.k_stride_head = k_stride_head;
        a.v_stride_page = v_stride_page; a.v_stride_slot = v_stride_slot; a.v_stride_head = v_stride_head;
        a.block_table = reinterpret_cast<const int32_t*>(block_table);
        a.batch = batch; a.max_pages = max_pages; a.bt_stride = bt_stride;
        a.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
        a.cu_seqlens_q = reinterpret_cast<const int32_t*>(cu_seqlens_q);
        a.tree_mask = reinterpret_cast<const bool*>(tree_mask);
        a.mask_cols = mask_cols;
        a.scale = scale; a.softcap = softcap;
        a.out = reinterpret_cast<void*>(out);
        py::gil_scoped_release no_gil;
        paged_attention(a);
      },
      py::arg("dtype"), py::arg("q"), py::arg("tokens"), py::arg("q_heads"), py::arg("head_dim"),
      py::arg("q_stride_t"), py::arg("q_stride_h"), py::arg("k"), py::arg("v"), py::arg("pages"),
      py::arg("page_size"), py::arg("kv_heads"), py::arg("k_stride_page"), py::arg("k_stride_slot"),
      py::arg("k_stride_head"), py::arg("v_stride_page"), py::arg("v_stride_slot"), py::arg("v_stride_head"),
      py::arg("block_table"), py::arg("batch"), py::arg("max_pages"), py::arg("bt_stride"), py::arg("seq_lens"),
      py::arg("cu_seqlens_q"), py::arg("tree_mask"), py::arg("mask_cols"), py::arg("scale"), py::arg("softcap"),
      py::arg("out"), py::arg("q_numel"), py::arg("k_numel"), py::arg("v_numel"), py::arg("block_table_numel"),
      py::arg("seq_lens_numel"), py::arg("cu_seqlens_q_numel"), py::arg("tree_mask_numel"), py::arg("out_numel"),
      "Paged attention of packed query tokens over a block-table KV cache (decode when cu_seqlens_q is 0). "
      "The *_numel arguments are the elements each buffer holds: every reachable offset is checked against them.");
}

}  // namespace ptcore
