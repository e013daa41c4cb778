// RadixCache: a compressed trie from token ids to KV-cache slots (prefix reuse across sequences).
//
// Each node holds a run of tokens, the slots holding their keys/values, a reference count (locks
// of running sequences, propagated from a node up to the root) and a last-access tick. Slots are
// page-aligned: the token at depth d sits at `slot % page_size == d % page_size`, and all depths
// of one logical page (d / page_size) sit in one physical page (slot / page_size).
//
// Page ownership (page_size > 1): the tree owns whole pages. A node owns the pages of its slots,
// except the page of its first slot when that page is its parent's last page (the two halves of
// a split page stay with the upper node). A node created by insert always brings fresh pages (a
// branch that starts inside a page brings a copy-on-write page whose lower offsets hold a copy of
// the shared part), so no page is ever owned twice; match_prefix reports, for every logical page,
// the physical page of the deepest matched token in it, so a matched path is always one physical
// page per logical page (the block table of the sequence that reuses it).
//
// No torch headers: Python passes int64 buffers; every entry point validates its input and throws
// std::invalid_argument (ValueError in Python) without changing any state.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include <pybind11/pybind11.h>

namespace ptcore {

struct RadixStats {
  int64_t match_calls = 0;      // match_prefix calls
  int64_t query_tokens = 0;     // tokens asked for by match_prefix
  int64_t hit_tokens = 0;       // tokens match_prefix found cached
  int64_t insert_calls = 0;
  int64_t inserted_tokens = 0;  // tokens insert added (not already cached)
  int64_t evicted_tokens = 0;   // tokens removed by evict and flush
  int64_t evicted_nodes = 0;
  int64_t freed_slots = 0;      // slots returned by evict and flush
};

struct RadixMatch {
  int64_t length = 0;
  std::vector<int64_t> slots;
  int64_t node = 0;
};

class RadixCache {
 public:
  // Bigger pages make no sense (and evict / owned_slots list every slot of a page).
  static constexpr int64_t kMaxPageSize = int64_t(1) << 20;
  explicit RadixCache(int64_t page_size);
  ~RadixCache();
  RadixCache(const RadixCache&) = delete;
  RadixCache& operator=(const RadixCache&) = delete;

  // Longest cached prefix of tokens[0:n]; splits the node the match ends inside.
  RadixMatch match_prefix(const int64_t* tokens, int64_t n);
  // Adds tokens[0:n] with their slots; returns how many leading tokens were already cached (the
  // caller frees its slots for those). The new pages must not already belong to the tree.
  int64_t insert(const int64_t* tokens, const int64_t* slots, int64_t n);
  void lock(int64_t node);    // +1 on the node and every ancestor up to the root
  void unlock(int64_t node);  // -1 likewise; the node itself must hold a lock (taken by lock(node))
  // Frees at least num_slots slots (whole pages) by removing unlocked leaves, least recently used
  // first (ties: lower node id); returns them. Fewer when nothing more is evictable.
  std::vector<int64_t> evict(int64_t num_slots);
  // Removes every node (none may be locked); returns all the slots the tree held.
  std::vector<int64_t> flush();

  std::vector<int64_t> owned_slots() const;  // every slot of every page the tree owns, sorted
  bool has_node(int64_t id) const;
  int64_t node_ref(int64_t id) const;    // locks on the node and below it
  int64_t node_locks(int64_t id) const;  // locks taken on the node itself
  int64_t node_depth(int64_t id) const;  // depth of the node's last token + 1 (root: 0)
  int64_t page_size() const { return page_size_; }
  int64_t cached_tokens() const { return cached_tokens_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()) - 1; }
  int64_t held_slots() const { return held_pages_ * page_size_; }
  int64_t evictable_slots() const;  // slots evict() could free now (pages of unlocked nodes)
  int64_t locks() const;            // outstanding locks (the root's reference count)
  const RadixStats& stats() const { return stats_; }

 private:
  struct Node;
  Node* find(int64_t id) const;
  Node* split(Node* node, int64_t k);
  int64_t walk(const int64_t* tokens, int64_t n, Node** last, Node** partial, int64_t* partial_len);
  void owned_pages(const Node* node, std::vector<int64_t>* out) const;
  void check_tokens(const int64_t* tokens, int64_t n) const;
  bool held(int64_t page) const;
  bool add_page(int64_t page);  // false if the tree already held it
  void remove_page(int64_t page);

  int64_t page_size_;
  int64_t clock_ = 0;
  int64_t next_id_ = 1;
  int64_t cached_tokens_ = 0;
  Node* root_;
  std::unordered_map<int64_t, std::unique_ptr<Node>> nodes_;
  // Pages the tree owns: a bitmap for ids below kBitmapPages (pools are far smaller), a hash set
  // above, so a huge id cannot make the bitmap huge.
  static constexpr int64_t kBitmapPages = int64_t(1) << 26;
  std::vector<uint8_t> page_bits_;
  std::unordered_set<int64_t> page_big_;
  int64_t held_pages_ = 0;
  std::vector<Node*> path_;      // scratch: nodes of the last walk
  std::vector<int64_t> added_;   // scratch: pages added by the current insert
  RadixStats stats_;
};

void bind_radix_cache(pybind11::module_& m);

}  // namespace ptcore
