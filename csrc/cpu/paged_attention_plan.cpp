// The work plan of the CPU paged attention: which (sequence, KV head, block of query rows, key
// range) items run, which split decode rows merge their partials (flash-decoding), and which
// decode key chunks several sequences share (forks of one prompt, the common steps of a search
// tree), computed once for all of them. Splits depend only on a sequence's own length, so a
// row's result does not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "paged_attention_internal.h"

namespace ptcore {
namespace paged_attention_detail {
namespace {

// Decode chunks c (keys [c * kSplitKeys, (c + 1) * kSplitKeys), below the sequence's length) that
// several sequences map to the same pages: sorted by a hash of the page ids, equal runs checked.
// Returns (group id, b) of the members of each group of two or more, by group.
std::vector<std::pair<int64_t, int64_t>> shared_groups(const PagedAttentionArgs& a, int64_t c) {
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

}  // namespace

WorkPlan plan_work(const PagedAttentionArgs& a) {
  const int64_t G = a.q_heads / a.kv_heads, D = a.head_dim;
  WorkPlan plan;
  std::vector<Item>& items = plan.items;
  std::vector<Group>& groups = plan.groups;
  std::vector<int64_t>& member_seq = plan.member_seq;
  std::vector<int64_t>& member_part = plan.member_part;
  int64_t& parts = plan.parts;
  const int64_t block = std::max<int64_t>(1, kRowsPerBlock / G);
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
    chunk_groups[c] = shared_groups(a, c);
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
  plan.block = block;
  plan.work = work;
  return plan;
}

}  // namespace paged_attention_detail
}  // namespace ptcore
