// CPU paged attention (contract in ptcore/paged_attention.h). Work items are (sequence, KV head,
// block of query rows): the query heads of one GQA group and up to kRowsPerBlock rows share every
// key / value row they load. Each item walks its keys in tiles with an online softmax (running max
// m, sum l, unnormalized accumulator) in fp32 (fp64 for fp64 inputs); with 4 or more query rows
// (fp32 math) the scores and P.V of a tile are register-blocked 4-row micro-kernels over a
// transposed key tile, otherwise dot products. A single-row item (decode)
// with a long context is split into key chunks of a fixed size whose partials are merged after
// (flash-decoding), so a small batch still keeps every core busy. Splits depend only on the
// sequence's own length and each sum runs in a fixed order: a row's result does not depend on the
// thread count, nor on the batch it shares unless other sequences of the batch map a whole chunk of
// its keys to the same pages. Such a chunk (the prompt of n forks in best-of-n, the common steps of
// a search tree) is computed once for the whole group: their query rows are stacked into one item
// (so the 4-row micro-kernels apply and each key row is loaded once), each member getting its own
// partial to merge; those rows' results then differ from a solo run in the last bits only.
//
// This file: the kernel (tile loop, online softmax, merge of split partials) and its dtype
// dispatch. The argument check: paged_attention_check.cpp; which items run and which chunks are
// shared: paged_attention_plan.cpp; the fp32 micro-kernels: paged_attention_simd.h; the Python
// binding: paged_attention_bindings.cpp.
#include "ptcore/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "paged_attention_internal.h"
#include "paged_attention_simd.h"
#include "ptcore/scalar.h"

namespace ptcore {

using namespace paged_attention_detail;

namespace {

template <typename T>
struct Kernel {
  using A = typename acc<T>::type;
  static constexpr bool kDirect = std::is_same<T, A>::value;  // read cache rows in place
  static constexpr bool kFloat = std::is_same<A, float>::value;
  const PagedAttentionArgs& a;
  const int64_t G, D;
  const A cap, inv_cap;
  std::vector<int64_t> member_seq, member_part;  // the plan's shared decode chunks (see WorkPlan)

  explicit Kernel(const PagedAttentionArgs& args)
      : a(args), G(args.q_heads / args.kv_heads), D(args.head_dim), cap(A(args.softcap)),
        inv_cap(args.softcap > 0 ? A(1) / A(args.softcap) : A(0)) {}

  struct Scratch {
    std::vector<A> q, acc, m, l, s, kt, kbuf, vbuf;
    std::vector<const A*> krow, vrow;
    Scratch(int64_t rows, int64_t D)  // rows: a multiple of 4 (the micro-kernels' row block)
        : q(rows * D), acc(rows * D), m(rows), l(rows), s(rows * kKeyTile), kt(kFloat ? D * kKeyTile : 0),
          kbuf(kDirect ? 0 : kKeyTile * D), vbuf(kDirect ? 0 : kKeyTile * D), krow(kKeyTile), vrow(kKeyTile) {}
  };

  // Rows of positions [p0, p1) of sequence b, KV head g: pointers into the cache, or fp32 copies.
  void load_rows(const void* base, int64_t sp, int64_t ss, int64_t sh, const int32_t* bt, int64_t g,
                 int64_t p0, int64_t p1, A* buf, const A** rows) const {
    // Page and offset advance with p: one division per tile, not one per row.
    int64_t page = p0 / a.page_size, off = p0 % a.page_size;
    for (int64_t p = p0; p < p1; ++p) {
      const T* src = static_cast<const T*>(base) + int64_t(bt[page]) * sp + off * ss + g * sh;
      if (++off == a.page_size) {
        off = 0;
        ++page;
      }
      if constexpr (kDirect) {
        rows[p - p0] = reinterpret_cast<const A*>(src);
      } else {
        A* dst = buf + (p - p0) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = A(load(src[d]));
        rows[p - p0] = dst;
      }
    }
  }

  // Row r's raw scores s[0:nk] -> softcap, visibility (the prefix always; new token i when i <= j,
  // or tree_mask[t][i]), then one online-softmax step: s becomes the tile's unnormalized
  // probabilities (0 where hidden) and the row's accumulator is rescaled to the new max.
  void softmax_step(Scratch& w, int64_t r, int64_t j, const bool* mask, int64_t p0, int64_t nk, int64_t prefix) const {
    const A neg_inf = -std::numeric_limits<A>::infinity();
    A* s = w.s.data() + r * kKeyTile;
    if (cap > 0)
      for (int64_t kk = 0; kk < nk; ++kk) s[kk] = cap * std::tanh(s[kk] * inv_cap);
    if (mask) {
      for (int64_t kk = 0; kk < nk; ++kk) {
        const int64_t rel = p0 + kk - prefix;
        if (rel >= 0 && !mask[rel]) s[kk] = neg_inf;
      }
    } else {
      for (int64_t kk = std::max<int64_t>(0, prefix + j + 1 - p0); kk < nk; ++kk) s[kk] = neg_inf;
    }
    // A NaN or +inf score (a NaN query, or an overflowing scale or softcap) makes the row's
    // softmax NaN, as in the reference: the row is marked (l = NaN) and stays so; its output is
    // NaN, never zeros that look like "saw nothing".
    if (w.l[r] != w.l[r]) {
      std::fill(s, s + nk, A(0));
      return;
    }
    bool poison = false;
    for (int64_t kk = 0; kk < nk; ++kk) poison |= !(s[kk] < std::numeric_limits<A>::infinity()) && s[kk] != neg_inf;
    if (poison) {
      w.l[r] = std::numeric_limits<A>::quiet_NaN();
      std::fill(s, s + nk, A(0));
      return;
    }
    A mt = neg_inf;
#if defined(__AVX512F__)
    if constexpr (kFloat) {
      if (nk == kKeyTile) {  // a full tile: two vectors, one tree reduction (no 32-step max chain)
        const float* sf = reinterpret_cast<const float*>(s);
        mt = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_loadu_ps(sf), _mm512_loadu_ps(sf + kVec)));
      }
    }
#endif
    if (mt == neg_inf) {
#pragma omp simd reduction(max : mt)
      for (int64_t kk = 0; kk < nk; ++kk) mt = std::max(mt, s[kk]);
    }
    if (mt == neg_inf) {  // nothing visible in this tile
      std::fill(s, s + nk, A(0));
      return;
    }
    const A m_new = std::max(w.m[r], mt);
    const A alpha = w.m[r] == neg_inf ? A(0) : fast_exp(w.m[r] - m_new);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t kk = 0; kk < nk; ++kk) {
      // exp first, then select: a blend the loop vectorizes (fast_exp clamps -inf to exp(-87))
      const A x = s[kk], e = fast_exp(x - m_new);
      const A p = x == neg_inf ? A(0) : e;
      s[kk] = p;
      sum += p;
    }
    w.l[r] = w.l[r] * alpha + sum;
    w.m[r] = m_new;
    if (alpha != A(1)) {
      A* acc = w.acc.data() + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    }
  }

  void run(const Item& it, Scratch& w, A* part_m, A* part_l, A* part_acc) const {
    const int64_t t0 = q_start(a, it.b), n = q_len(a, it.b);
    // a shared chunk lies below every member's length: all its keys are visible to all rows
    const int64_t prefix = it.nm ? it.k1 - 1 : int64_t(a.seq_lens[it.b]) - n;
    const int64_t rows = it.nm ? it.nm * G : (it.j1 - it.j0) * G;
    const bool tiled = kFloat && rows >= 4;  // the micro-kernels, on rows rounded up to 4
    const int64_t rows4 = (rows + 3) / 4 * 4;
    const int32_t* bt = a.block_table + it.b * a.bt_stride;
    const A scale = A(a.scale);
    const A neg_inf = -std::numeric_limits<A>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = it.nm ? q_start(a, member_seq[it.m0 + r / G]) : t0 + it.j0 + r / G, h = it.g * G + r % G;
      const T* src = static_cast<const T*>(a.q) + t * a.q_stride_t + h * a.q_stride_h;
      A* dst = w.q.data() + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = A(load(src[d])) * scale;
      w.m[r] = neg_inf;
      w.l[r] = 0;
    }
    std::fill(w.q.begin() + rows * D, w.q.begin() + rows4 * D, A(0));  // padding rows of the last block
    std::fill(w.acc.begin(), w.acc.begin() + rows4 * D, A(0));
    for (int64_t p0 = it.k0; p0 < it.k1; p0 += kKeyTile) {
      const int64_t p1 = std::min(p0 + kKeyTile, it.k1), nk = p1 - p0;
      load_rows(a.k, a.k_stride_page, a.k_stride_slot, a.k_stride_head, bt, it.g, p0, p1, w.kbuf.data(), w.krow.data());
      load_rows(a.v, a.v_stride_page, a.v_stride_slot, a.v_stride_head, bt, it.g, p0, p1, w.vbuf.data(), w.vrow.data());
      if constexpr (kFloat) {
        if (tiled) {
          float* kt = w.kt.data();
          for (int64_t kk = 0; kk < kKeyTile; ++kk) {
            const float* k = kk < nk ? w.krow[kk] : nullptr;
            for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + kk] = k ? k[d] : 0.0f;
          }
          for (int64_t r = 0; r < rows4; r += 4) scores4(w.q.data() + r * D, D, kt, w.s.data() + r * kKeyTile);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = it.nm ? 0 : it.j0 + r / G;
        if (!tiled) {
          const A* qr = w.q.data() + r * D;
          A* s = w.s.data() + r * kKeyTile;
          // causal: keys past the row's own position are hidden anyway, so not computed
          const int64_t visible_end = a.tree_mask ? nk : std::clamp<int64_t>(prefix + j + 1 - p0, 0, nk);
          if (kFloat && D % kVec == 0) {
            for (int64_t kk = 0; kk < visible_end; ++kk)
              s[kk] = dot_vec(reinterpret_cast<const float*>(qr), reinterpret_cast<const float*>(w.krow[kk]), D);
          } else {
            for (int64_t kk = 0; kk < visible_end; ++kk) s[kk] = dot(qr, w.krow[kk], D);
          }
          for (int64_t kk = visible_end; kk < nk; ++kk) s[kk] = A(0);
        }
        softmax_step(w, r, j, a.tree_mask ? a.tree_mask + (t0 + j) * a.mask_cols : nullptr, p0, nk, prefix);
      }
      if constexpr (kFloat) {
        if (tiled) {
          std::fill(w.s.begin() + rows * kKeyTile, w.s.begin() + rows4 * kKeyTile, 0.0f);
          for (int64_t r = 0; r < rows4; r += 4)
            pv4(w.acc.data() + r * D, D, w.s.data() + r * kKeyTile, w.vrow.data(), nk);
          continue;
        }
      }
      if constexpr (kFloat) {
        for (int64_t r = 0; r < rows; ++r)
          pv1(w.acc.data() + r * D, D, w.s.data() + r * kKeyTile, w.vrow.data(), nk);
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const A* s = w.s.data() + r * kKeyTile;
        A* acc = w.acc.data() + r * D;
        for (int64_t kk = 0; kk < nk; ++kk) {
          const A p = s[kk];
          if (p == A(0)) continue;
          const A* vr = w.vrow[kk];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += p * vr[d];
        }
      }
    }
    if (it.nm) {  // each member's rows go to that member's partial of this chunk
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t k = member_part[it.m0 + r / G] * G + r % G;
        part_m[k] = w.m[r];
        part_l[k] = w.l[r];
        std::copy(w.acc.begin() + r * D, w.acc.begin() + (r + 1) * D, part_acc + k * D);
      }
    } else if (it.part < 0) {
      for (int64_t r = 0; r < rows; ++r) write_row(it.b, it.g, it.j0, r, w.acc.data() + r * D, w.l[r]);
    } else {
      const int64_t base = it.part * rows;
      std::copy(w.m.begin(), w.m.begin() + rows, part_m + base);
      std::copy(w.l.begin(), w.l.begin() + rows, part_l + base);
      std::copy(w.acc.begin(), w.acc.begin() + rows * D, part_acc + base * D);
    }
  }

  void write_row(int64_t b, int64_t g, int64_t j0, int64_t r, const A* acc, A l) const {
    const int64_t t = q_start(a, b) + j0 + r / G, h = g * G + r % G;
    T* dst = static_cast<T*>(a.out) + (t * a.q_heads + h) * D;
    // a row that saw nothing is zeros; a NaN-marked row (see softmax_step) is NaN
    const A inv = l > 0 ? A(1) / l : (l == l ? A(0) : l);
    for (int64_t d = 0; d < D; ++d) store(dst[d], acc[d] * inv);
  }

  // Merge the partials of a split item (single query row group: G rows).
  void merge(const Group& gr, const A* part_m, const A* part_l, const A* part_acc, A* acc) const {
    const A neg_inf = -std::numeric_limits<A>::infinity();
    for (int64_t r = 0; r < G; ++r) {
      A m = neg_inf;
      for (int64_t i = 0; i < gr.count; ++i) m = std::max(m, part_m[(gr.first + i) * G + r]);
      A l = 0;
      std::fill(acc, acc + D, A(0));
      for (int64_t i = 0; i < gr.count; ++i) {  // a NaN-marked partial marks the whole row
        const A pl = part_l[(gr.first + i) * G + r];
        if (pl != pl) l = pl;
      }
      if (l == l && m != neg_inf) {
        for (int64_t i = 0; i < gr.count; ++i) {
          const int64_t k = (gr.first + i) * G + r;
          if (part_m[k] == neg_inf) continue;
          const A f = fast_exp(part_m[k] - m);
          l += part_l[k] * f;
          const A* pa = part_acc + k * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += f * pa[d];
        }
      }
      write_row(gr.b, gr.g, gr.j0, r, acc, l);
    }
  }

  // Decode chunks c (keys [c * kSplitKeys, (c + 1) * kSplitKeys), below the sequence's length) that
  // several sequences map to the same pages: sorted by a hash of the page ids, equal runs checked.
  // Returns (group id, b) of the members of each group of two or more, by group.
  void operator()() {
    WorkPlan plan = plan_work(a);
    const std::vector<Item>& items = plan.items;
    const std::vector<Group>& groups = plan.groups;
    member_seq = std::move(plan.member_seq);
    member_part = std::move(plan.member_part);
    const int64_t parts = plan.parts, block = plan.block;
    const double work = plan.work;
    std::vector<A> part_m(parts * G), part_l(parts * G), part_acc(parts * G * D);
    const int64_t n_items = int64_t(items.size()), n_groups = int64_t(groups.size());
    const int64_t max_rows = (std::min<int64_t>(block, std::max<int64_t>(1, a.tokens)) * G + 3) / 4 * 4;
    const Kernel& self = *this;
    // Threads only for calls with enough work to amortize them: below that, waking the pool (and,
    // on a machine with more runnable processes than cores, waiting for a descheduled thread) costs
    // more than the split saves.
    const bool threaded = work > 4e5 && n_items > 1;
    int nthreads = 1;
#if defined(_OPENMP)
    if (threaded) nthreads = std::max(1, omp_get_max_threads());
#endif
    // Per-thread scratch allocated here, outside the parallel region: an exception (bad_alloc)
    // thrown inside one would call std::terminate.
    std::vector<Scratch> scratch;
    scratch.reserve(size_t(nthreads));
    for (int i = 0; i < nthreads; ++i) scratch.emplace_back(max_rows, D);
#pragma omp parallel if (threaded) num_threads(nthreads)
    {
#if defined(_OPENMP)
      Scratch& w = scratch[size_t(omp_get_thread_num())];
#else
      Scratch& w = scratch[0];
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < n_items; ++i) self.run(items[i], w, part_m.data(), part_l.data(), part_acc.data());
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n_groups; ++i) self.merge(groups[i], part_m.data(), part_l.data(), part_acc.data(), w.acc.data());
    }
  }
};

}  // namespace

void paged_attention(const PagedAttentionArgs& a) {
  check(a);
  if (a.tokens == 0) return;
  const std::string& dt = a.dtype;
  if (dt == "float32") Kernel<float>{a}();
  else if (dt == "float64") Kernel<double>{a}();
  else if (dt == "bfloat16") Kernel<bf16>{a}();
  else Kernel<fp16>{a}();
}

}  // namespace ptcore
