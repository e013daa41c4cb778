// What the CPU paged-attention files share (internal: not part of ptcore/paged_attention.h):
// the tile sizes, the argument check (paged_attention_check.cpp), the work plan
// (paged_attention_plan.cpp) that the kernel (paged_attention.cpp) executes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ptcore/paged_attention.h"

namespace ptcore {
namespace paged_attention_detail {

constexpr int64_t kKeyTile = 32;       // keys per online-softmax step
constexpr int64_t kRowsPerBlock = 32;  // query rows (tokens x heads of a group) per work item
constexpr int64_t kSplitKeys = 256;    // keys per chunk of a split single-row item

constexpr int64_t kMaxHeadDim = int64_t(1) << 16;  // far above any model's; bounds the scratch rows

[[noreturn]] void fail(const std::string& what);

// Every argument and the data it points to (std::invalid_argument naming the argument); the
// kernel reads nothing before this passed.
void check(const PagedAttentionArgs& a);

inline int64_t q_start(const PagedAttentionArgs& a, int64_t b) { return a.cu_seqlens_q ? a.cu_seqlens_q[b] : b; }
inline int64_t q_len(const PagedAttentionArgs& a, int64_t b) {
  return a.cu_seqlens_q ? int64_t(a.cu_seqlens_q[b + 1]) - a.cu_seqlens_q[b] : 1;
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

// The work of one call: items (computed in any order, by any thread), then the groups that merge
// split items' partials. A single-row item with more than kSplitKeys keys is split into key
// chunks (flash-decoding); in decode, a chunk that several sequences map to the same pages is
// one shared item for all of them (their rows stacked), each member getting its own partial.
struct WorkPlan {
  std::vector<Item> items;  // shared chunks first (the big ones)
  std::vector<Group> groups;
  // Shared decode chunks (see Item): member sequences and the partial index of each member.
  std::vector<int64_t> member_seq, member_part;
  int64_t parts = 0;   // partials (m, l, acc) of G rows each
  int64_t block = 1;   // query tokens per item (kRowsPerBlock / G rows, at least one token)
  double work = 0;     // query rows x keys x head_dim actually computed (a shared chunk once)
};

WorkPlan plan_work(const PagedAttentionArgs& a);

}  // namespace paged_attention_detail
}  // namespace ptcore
