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
#include "ptcore/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "ptcore/scalar.h"

#if defined(__GNUC__) && !defined(__clang__)
// The 64-byte vector helpers below are internal (anonymous namespace): no ABI boundary is crossed
// when the target lacks AVX-512 (e.g. PTCORE_CPU_ARCH=x86-64-v3).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace ptcore {
namespace {

constexpr int64_t kKeyTile = 32;       // keys per online-softmax step
constexpr int64_t kRowsPerBlock = 32;  // query rows (tokens x heads of a group) per work item
constexpr int64_t kSplitKeys = 256;    // keys per chunk of a split single-row item

constexpr int64_t kMaxHeadDim = int64_t(1) << 16;  // far above any model's; bounds the scratch rows

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("paged_attention: " + what);
}

// The buffer `name` of `numel` elements is read (or written) at offsets sum_i idx_i * stride_i with
// 0 <= idx_i < n_i for the (n_i, stride_i) of dims: the largest must lie below numel. Nothing is
// reached when some n_i is 0. numel < 0: not given (C++ callers), not checked.
void check_extent(const char* name, int64_t numel, std::initializer_list<std::pair<int64_t, int64_t>> dims) {
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

int64_t q_start(const PagedAttentionArgs& a, int64_t b) { return a.cu_seqlens_q ? a.cu_seqlens_q[b] : b; }
int64_t q_len(const PagedAttentionArgs& a, int64_t b) {
  return a.cu_seqlens_q ? int64_t(a.cu_seqlens_q[b + 1]) - a.cu_seqlens_q[b] : 1;
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

struct Item {
  int64_t b, g, j0, j1, k0, k1;
  int64_t part;  // -1: writes the output; else index of its partial (m, l, acc) in the split buffers
  // A shared decode chunk: members [m0, m0 + nm) of the member lists (sequences whose block tables
  // map the chunk's keys to the same pages, e.g. forks of one prompt) are computed together, G
  // rows each; b is the first member (its block table is read). nm == 0: an ordinary item.
  int64_t m0 = 0, nm = 0;
};

// A split item's partials are merged by a Group: parts [first, first + count) of rows (b, g, j0).
struct Group { int64_t b, g, j0, first, count; };

template <typename A>
inline A dot(const A* x, const A* y, int64_t n) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

// fp32 micro-kernels for blocks of 4 query rows (GCC/Clang vector extensions keep the
// accumulators in registers: 16 floats, one AVX-512 register or two AVX2 ones).
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;
static_assert(kKeyTile == 2 * kVec, "the micro-kernels take a key tile of two vectors");
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// s[r][0:kKeyTile] = q[r] . k[:, kk] for rows r < 4 (stride D), kt transposed [D][kKeyTile].
inline void scores4(const float* q, int64_t D, const float* kt, float* s) {
  vf a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
  const float *q0 = q, *q1 = q + D, *q2 = q + 2 * D, *q3 = q + 3 * D;
  for (int64_t d = 0; d < D; ++d) {
    const vf k0 = vload(kt + d * kKeyTile), k1 = vload(kt + d * kKeyTile + kVec);
    a00 += q0[d] * k0; a01 += q0[d] * k1;
    a10 += q1[d] * k0; a11 += q1[d] * k1;
    a20 += q2[d] * k0; a21 += q2[d] * k1;
    a30 += q3[d] * k0; a31 += q3[d] * k1;
  }
  vstore(s, a00); vstore(s + kVec, a01);
  vstore(s + kKeyTile, a10); vstore(s + kKeyTile + kVec, a11);
  vstore(s + 2 * kKeyTile, a20); vstore(s + 2 * kKeyTile + kVec, a21);
  vstore(s + 3 * kKeyTile, a30); vstore(s + 3 * kKeyTile + kVec, a31);
}

// acc[r][0:D] += sum_kk p[r][kk] v[kk][0:D] for rows r < 4 (acc stride D, p stride kKeyTile).
inline void pv4(float* acc, int64_t D, const float* p, const float* const* v, int64_t nk) {
  float *o0 = acc, *o1 = acc + D, *o2 = acc + 2 * D, *o3 = acc + 3 * D;
  const float *p0 = p, *p1 = p + kKeyTile, *p2 = p + 2 * kKeyTile, *p3 = p + 3 * kKeyTile;
  int64_t d = 0;
  for (; d + kVec <= D; d += kVec) {
    vf c0 = vload(o0 + d), c1 = vload(o1 + d), c2 = vload(o2 + d), c3 = vload(o3 + d);
    for (int64_t kk = 0; kk < nk; ++kk) {
      const vf x = vload(v[kk] + d);
      c0 += p0[kk] * x; c1 += p1[kk] * x; c2 += p2[kk] * x; c3 += p3[kk] * x;
    }
    vstore(o0 + d, c0); vstore(o1 + d, c1); vstore(o2 + d, c2); vstore(o3 + d, c3);
  }
  for (; d < D; ++d)
    for (int64_t kk = 0; kk < nk; ++kk) {
      const float x = v[kk][d];
      o0[d] += p0[kk] * x; o1[d] += p1[kk] * x; o2[d] += p2[kk] * x; o3[d] += p3[kk] * x;
    }
}

// q . k for D a multiple of kVec (one vector accumulator, summed once at the end).
inline float dot_vec(const float* q, const float* k, int64_t D) {
  vf acc{};
  for (int64_t d = 0; d < D; d += kVec) acc += vload(q + d) * vload(k + d);
#if defined(__AVX512F__)
  __m512 v;
  std::memcpy(&v, &acc, sizeof(v));
  return _mm512_reduce_add_ps(v);  // a shuffle tree, not 16 dependent scalar adds
#else
  float s = 0;
  for (int64_t i = 0; i < kVec; ++i) s += acc[i];
  return s;
#endif
}

// acc[0:D] += sum_kk p[kk] v[kk][0:D] for one row: two vectors of acc held in registers across keys.
inline void pv1(float* acc, int64_t D, const float* p, const float* const* v, int64_t nk) {
  int64_t d = 0;
  for (; d + 2 * kVec <= D; d += 2 * kVec) {
    vf c0 = vload(acc + d), c1 = vload(acc + d + kVec);
    for (int64_t kk = 0; kk < nk; ++kk) {
      c0 += p[kk] * vload(v[kk] + d);
      c1 += p[kk] * vload(v[kk] + d + kVec);
    }
    vstore(acc + d, c0);
    vstore(acc + d + kVec, c1);
  }
  for (; d + kVec <= D; d += kVec) {
    vf c0 = vload(acc + d);
    for (int64_t kk = 0; kk < nk; ++kk) c0 += p[kk] * vload(v[kk] + d);
    vstore(acc + d, c0);
  }
  for (; d < D; ++d)
    for (int64_t kk = 0; kk < nk; ++kk) acc[d] += p[kk] * v[kk][d];
}

template <typename T>
struct Kernel {
  using A = typename acc<T>::type;
  static constexpr bool kDirect = std::is_same<T, A>::value;  // read cache rows in place
  static constexpr bool kFloat = std::is_same<A, float>::value;
  const PagedAttentionArgs& a;
  const int64_t G, D;
  const A cap, inv_cap;
  // Shared decode chunks (see Item): member sequences and the partial index of each member.
  std::vector<int64_t> member_seq, member_part;

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
  std::vector<std::pair<int64_t, int64_t>> shared_groups(int64_t c) const {
    const int64_t S = a.page_size, pg0 = c * kSplitKeys / S, pg1 = ((c + 1) * kSplitKeys - 1) / S + 1;
    std::vector<std::pair<uint64_t, int64_t>> keys;  // (hash of the chunk's page ids, b)
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t L = a.seq_lens[b];
      if ((c + 1) * kSplitKeys > L || L <= kSplitKeys) continue;  // a full chunk of a split row
      const int32_t* row = a.block_table + b * a.bt_stride;
      uint64_t h = 1469598103934665603ull;
      for (int64_t i = pg0; i < pg1; ++i) h = (h ^ uint32_t(row[i])) * 1099511628211ull;
      keys.push_back({h, b});
    }
    std::sort(keys.begin(), keys.end());
    std::vector<std::pair<int64_t, int64_t>> out;  // (group id, b) for shared members, by group
    std::vector<char> taken(keys.size(), 0);
    int64_t group = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      if (taken[i]) continue;
      const int32_t* lead = a.block_table + keys[i].second * a.bt_stride + pg0;
      std::vector<int64_t> members{keys[i].second};
      for (size_t k = i + 1; k < keys.size() && keys[k].first == keys[i].first; ++k) {
        const int32_t* row = a.block_table + keys[k].second * a.bt_stride + pg0;
        if (!taken[k] && std::memcmp(row, lead, sizeof(int32_t) * (pg1 - pg0)) == 0) {
          taken[k] = 1;
          members.push_back(keys[k].second);
        }
      }
      if (members.size() < 2) continue;
      std::sort(members.begin(), members.end());
      for (int64_t b : members) out.push_back({group, b});
      ++group;
    }
    return out;
  }

  void operator()() {
    const int64_t block = std::max<int64_t>(1, kRowsPerBlock / G);
    std::vector<Item> items;
    std::vector<Group> groups;
    int64_t parts = 0;
    // Decode: a chunk of keys that several sequences share (same pages: forks of one prompt, the
    // common steps of a search tree) is computed once for all of them, their query rows stacked
    // (the 4-row micro-kernels then apply), each member getting its own partial to merge.
    const bool decode = a.cu_seqlens_q == nullptr;
    int64_t max_chunks = 0;
    if (decode)
      for (int64_t b = 0; b < a.batch; ++b)
        if (int64_t(a.seq_lens[b]) > kSplitKeys) max_chunks = std::max<int64_t>(max_chunks, a.seq_lens[b] / kSplitKeys);
    std::vector<int64_t> first_part(decode ? a.batch * a.kv_heads : 0);
    std::vector<char> covered(decode ? a.batch * max_chunks : 0, 0);
    std::vector<std::vector<std::pair<int64_t, int64_t>>> chunk_groups(max_chunks);
    for (int64_t c = 0; c < max_chunks && a.batch > 1; ++c) {
      chunk_groups[c] = shared_groups(c);
      for (const auto& gb : chunk_groups[c]) covered[gb.second * max_chunks + c] = 1;
    }
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t n = q_len(a, b), L = a.seq_lens[b], prefix = L - n;
      for (int64_t j0 = 0; j0 < n; j0 += block) {
        const int64_t j1 = std::min(n, j0 + block);
        const int64_t kmax = a.tree_mask ? L : prefix + j1;  // causal: the last row sees < prefix + j1
        for (int64_t g = 0; g < a.kv_heads; ++g) {
          if (j1 - j0 == 1 && kmax > kSplitKeys) {
            const int64_t count = (kmax + kSplitKeys - 1) / kSplitKeys;
            groups.push_back({b, g, j0, parts, count});
            if (decode) first_part[b * a.kv_heads + g] = parts;
            for (int64_t i = 0; i < count; ++i, ++parts)
              if (!(decode && i < max_chunks && covered[b * max_chunks + i]))
                items.push_back({b, g, j0, j1, i * kSplitKeys, std::min(kmax, (i + 1) * kSplitKeys), parts});
          } else {
            items.push_back({b, g, j0, j1, 0, kmax, -1});
          }
        }
      }
    }
    std::vector<Item> shared_items;
    for (int64_t c = 0; c < max_chunks; ++c) {
      const auto& cg = chunk_groups[c];
      for (size_t i = 0; i < cg.size();) {
        size_t e = i;
        while (e < cg.size() && cg[e].first == cg[i].first) ++e;
        for (size_t s0 = i; s0 < e; s0 += size_t(block)) {  // at most `block` members (rows) per item
          const size_t s1 = std::min(e, s0 + size_t(block));
          for (int64_t g = 0; g < a.kv_heads; ++g) {
            Item it{cg[s0].second, g, 0, 1, c * kSplitKeys, (c + 1) * kSplitKeys, -1};
            it.m0 = int64_t(member_seq.size());
            it.nm = int64_t(s1 - s0);
            for (size_t m = s0; m < s1; ++m) {
              member_seq.push_back(cg[m].second);
              member_part.push_back(first_part[cg[m].second * a.kv_heads + g] + c);
            }
            shared_items.push_back(it);
          }
        }
        i = e;
      }
    }
    items.insert(items.begin(), shared_items.begin(), shared_items.end());  // the big ones first
    double work = 0;  // query rows x keys x head_dim actually computed (a shared chunk once)
    for (const Item& it : items)
      work += double(it.k1 - it.k0) * double(it.nm ? it.nm * G : (it.j1 - it.j0) * G) * double(D);
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
          if (n < 0) fail("the '*_numel' arguments must be >= 0");
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
