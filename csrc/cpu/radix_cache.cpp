// RadixCache (see ptcore/radix_cache.h): the trie, its page accounting and its pybind11 class.
#include "ptcore/radix_cache.h"

#include <algorithm>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <tuple>

#include <pybind11/stl.h>

namespace ptcore {

struct RadixCache::Node {
  int64_t id = 0;
  Node* parent = nullptr;
  int64_t depth = 0;  // depth of tokens[0] in every sequence through this node
  std::vector<int64_t> tokens;
  std::vector<int64_t> slots;
  std::unordered_map<int64_t, Node*> children;  // first token of the child's run -> child
  int64_t ref = 0;   // locks on this node and on its descendants (what protects it from evict)
  int64_t own = 0;   // locks taken on this very node: only those may be unlocked through it
  int64_t tick = 0;
};

namespace {

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

RadixCache::RadixCache(int64_t page_size) : page_size_(page_size) {
  if (page_size < 1 || page_size > kMaxPageSize)
    throw std::invalid_argument("page_size must be in [1, " + str(kMaxPageSize) + "], got " + str(page_size));
  auto root = std::make_unique<Node>();
  root_ = root.get();
  nodes_.emplace(0, std::move(root));
}

RadixCache::~RadixCache() = default;

RadixCache::Node* RadixCache::find(int64_t id) const {
  auto it = nodes_.find(id);
  if (it == nodes_.end())
    throw std::invalid_argument("node " + str(id) +
                                " is not in the cache (never returned by match_prefix, or evicted)");
  return it->second.get();
}

bool RadixCache::has_node(int64_t id) const { return nodes_.count(id) != 0; }
int64_t RadixCache::node_ref(int64_t id) const { return find(id)->ref; }
int64_t RadixCache::node_locks(int64_t id) const { return find(id)->own; }

int64_t RadixCache::node_depth(int64_t id) const {
  const Node* x = find(id);
  return x->depth + static_cast<int64_t>(x->tokens.size());
}

int64_t RadixCache::locks() const { return root_->ref; }

bool RadixCache::held(int64_t page) const {
  if (page < kBitmapPages) return page < static_cast<int64_t>(page_bits_.size()) && page_bits_[page];
  return page_big_.count(page) != 0;
}

bool RadixCache::add_page(int64_t page) {
  if (page < kBitmapPages) {
    if (page >= static_cast<int64_t>(page_bits_.size()))
      page_bits_.resize(std::min(kBitmapPages, std::max<int64_t>(2 * page + 64, page_bits_.size())), 0);
    if (page_bits_[page]) return false;
    page_bits_[page] = 1;
  } else if (!page_big_.insert(page).second) {
    return false;
  }
  ++held_pages_;
  return true;
}

void RadixCache::remove_page(int64_t page) {
  if (page < kBitmapPages) {
    page_bits_[page] = 0;
  } else {
    page_big_.erase(page);
  }
  --held_pages_;
}

void RadixCache::check_tokens(const int64_t* tokens, int64_t n) const {
  if (n < 0) throw std::invalid_argument("tokens: negative length " + str(n));
  if (n > 0 && tokens == nullptr) throw std::invalid_argument("tokens: null pointer");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0)
      throw std::invalid_argument("tokens[" + str(i) + "] = " + str(tokens[i]) +
                                  ": token ids must be >= 0");
}

// Splits `node` after its first k tokens (0 < k < size): a new upper node takes node's place
// under the parent and keeps the first k tokens; `node` keeps its id (locks held on it still mean
// the same path) and the rest, its own locks included. Only slot indices move.
RadixCache::Node* RadixCache::split(Node* node, int64_t k) {
  auto upper = std::make_unique<Node>();
  Node* u = upper.get();
  u->id = next_id_++;
  u->parent = node->parent;
  u->depth = node->depth;
  u->tokens.assign(node->tokens.begin(), node->tokens.begin() + k);
  u->slots.assign(node->slots.begin(), node->slots.begin() + k);
  u->ref = node->ref;
  u->tick = node->tick;
  node->tokens.erase(node->tokens.begin(), node->tokens.begin() + k);
  node->slots.erase(node->slots.begin(), node->slots.begin() + k);
  node->depth += k;
  node->parent = u;
  u->children.emplace(node->tokens[0], node);
  u->parent->children[u->tokens[0]] = u;
  nodes_.emplace(u->id, std::move(upper));
  return u;
}

// Read-only descent: returns the matched length; `last` = deepest node matched to its end, and
// `partial` / `partial_len` = the child matched only partly (nullptr if none). path_ gets the
// nodes matched to their end, root first.
int64_t RadixCache::walk(const int64_t* tokens, int64_t n, Node** last, Node** partial,
                         int64_t* partial_len) {
  path_.clear();
  path_.push_back(root_);
  Node* node = root_;
  int64_t i = 0;
  *partial = nullptr;
  *partial_len = 0;
  while (i < n) {
    auto it = node->children.find(tokens[i]);
    if (it == node->children.end()) break;
    Node* c = it->second;
    const int64_t len = static_cast<int64_t>(c->tokens.size());
    const int64_t lim = std::min(len, n - i);
    int64_t k = 1;  // tokens[i] matched through the children key
    while (k < lim && c->tokens[k] == tokens[i + k]) ++k;
    i += k;
    if (k < len) {
      *partial = c;
      *partial_len = k;
      break;
    }
    node = c;
    path_.push_back(c);
  }
  *last = node;
  return i;
}

RadixMatch RadixCache::match_prefix(const int64_t* tokens, int64_t n) {
  check_tokens(tokens, n);
  ++clock_;
  Node *last, *partial;
  int64_t k;
  RadixMatch out;
  out.length = walk(tokens, n, &last, &partial, &k);
  for (Node* x : path_) x->tick = clock_;
  if (partial != nullptr) {
    last = split(partial, k);
    last->tick = clock_;
  }
  out.node = last->id;
  out.slots.resize(out.length);
  for (Node* x = last; x != root_; x = x->parent)
    std::copy(x->slots.begin(), x->slots.end(), out.slots.begin() + x->depth);
  if (page_size_ > 1) {
    // One physical page per logical page: that of the deepest matched token in it (a branch's
    // copy-on-write page holds a copy of the shared lower offsets).
    const int64_t P = page_size_;
    for (int64_t start = 0; start < out.length; start += P) {
      const int64_t end = std::min(start + P, out.length);
      const int64_t page = out.slots[end - 1] / P;
      for (int64_t d = start; d < end; ++d) out.slots[d] = page * P + d % P;
    }
  }
  stats_.match_calls += 1;
  stats_.query_tokens += n;
  stats_.hit_tokens += out.length;
  return out;
}

int64_t RadixCache::insert(const int64_t* tokens, const int64_t* slots, int64_t n) {
  check_tokens(tokens, n);
  if (n > 0 && slots == nullptr) throw std::invalid_argument("slots: null pointer");
  const int64_t P = page_size_;
  for (int64_t d = 0; d < n; ++d) {
    const int64_t s = slots[d];
    if (s < 0) throw std::invalid_argument("slots[" + str(d) + "] = " + str(s) + " is negative");
    // Every slot of the page must be an int64 (evict / owned_slots list them all).
    if (s / P > (std::numeric_limits<int64_t>::max() - (P - 1)) / P)
      throw std::invalid_argument("slots[" + str(d) + "] = " + str(s) + " lies in a page whose last slot is past "
                                  "2**63 - 1 (page_size " + str(P) + ": slots must be <= " +
                                  str(((std::numeric_limits<int64_t>::max() - (P - 1)) / P) * P + P - 1) + ")");
    if (s % P != d % P)
      throw std::invalid_argument("slots[" + str(d) + "] = " + str(s) + " is not page-aligned: slot % page_size = " +
                                  str(s % P) + " but position % page_size = " + str(d % P) +
                                  " (page_size " + str(P) + ")");
    if (d % P != 0 && s / P != slots[d - 1] / P)
      throw std::invalid_argument("slots[" + str(d - 1) + "] and slots[" + str(d) + "] (" + str(slots[d - 1]) +
                                  ", " + str(s) + ") lie in different pages but positions " + str(d - 1) +
                                  " and " + str(d) + " share a logical page (page_size " + str(P) + ")");
  }
  Node *last, *partial;
  int64_t k;
  const int64_t cached = walk(tokens, n, &last, &partial, &k);
  // The new run takes whole pages: none may belong to the tree, nor appear twice. They are
  // registered as they are checked, and unregistered if one fails.
  added_.clear();
  for (int64_t d = cached; d < n; ++d) {
    if (d != cached && d % P != 0) continue;
    const int64_t page = slots[d] / P;
    if (!add_page(page)) {
      for (int64_t p : added_) remove_page(p);
      if (held(page))
        throw std::invalid_argument("slots[" + str(d) + "] = " + str(slots[d]) + " lies in page " + str(page) +
                                    ", which the cache already holds (the first " + str(cached) +
                                    " tokens are cached; new tokens need pages of their own)");
      throw std::invalid_argument("slots[" + str(d) + "] = " + str(slots[d]) + ": page " + str(page) +
                                  " is used for two different logical pages");
    }
    added_.push_back(page);
  }
  // Validated: from here on nothing throws but allocation failure.
  ++clock_;
  for (Node* x : path_) x->tick = clock_;
  if (partial != nullptr) {
    if (cached < n) {
      last = split(partial, k);
    } else {
      last = partial;  // fully cached, ends inside a node: no structural change
    }
    last->tick = clock_;
  }
  if (cached < n) {
    auto leaf = std::make_unique<Node>();
    Node* x = leaf.get();
    x->id = next_id_++;
    x->parent = last;
    x->depth = cached;
    x->tokens.assign(tokens + cached, tokens + n);
    x->slots.assign(slots + cached, slots + n);
    x->tick = clock_;
    last->children.emplace(x->tokens[0], x);
    nodes_.emplace(x->id, std::move(leaf));
    cached_tokens_ += n - cached;
  }
  stats_.insert_calls += 1;
  stats_.inserted_tokens += n - cached;
  return cached;
}

void RadixCache::lock(int64_t id) {
  Node* node = find(id);
  node->own += 1;
  for (Node* x = node; x != nullptr; x = x->parent) x->ref += 1;
}

// Checks the node's own locks, not `ref`: a lock on a descendant must not be released through an
// ancestor (that would leave counts below zero on the path and make locked nodes evictable).
void RadixCache::unlock(int64_t id) {
  Node* node = find(id);
  if (node->own <= 0)
    throw std::invalid_argument("node " + str(id) + " is not locked" +
                                (node->ref > 0 ? " (only nodes below it are: unlock those handles)" : ""));
  node->own -= 1;
  for (Node* x = node; x != nullptr; x = x->parent) x->ref -= 1;
}

void RadixCache::owned_pages(const Node* node, std::vector<int64_t>* out) const {
  out->clear();
  const int64_t P = page_size_;
  const int64_t shared = (node->parent != root_) ? node->parent->slots.back() / P : -1;
  const int64_t n = static_cast<int64_t>(node->slots.size());
  for (int64_t j = 0; j < n; ++j) {
    if (j != 0 && (node->depth + j) % P != 0) continue;
    const int64_t page = node->slots[j] / P;
    if (j == 0 && page == shared) continue;
    out->push_back(page);
  }
}

std::vector<int64_t> RadixCache::evict(int64_t num_slots) {
  if (num_slots < 0) throw std::invalid_argument("num_slots must be >= 0, got " + str(num_slots));
  std::vector<int64_t> freed;
  if (num_slots == 0) return freed;
  using Item = std::tuple<int64_t, int64_t, Node*>;  // (tick, id): least recently used first
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
  for (auto& kv : nodes_) {
    Node* x = kv.second.get();
    if (x != root_ && x->children.empty() && x->ref == 0) heap.emplace(x->tick, x->id, x);
  }
  std::vector<int64_t> pages;
  const int64_t P = page_size_;
  while (static_cast<int64_t>(freed.size()) < num_slots && !heap.empty()) {
    Node* x = std::get<2>(heap.top());
    heap.pop();
    owned_pages(x, &pages);
    for (int64_t page : pages) {
      remove_page(page);
      for (int64_t o = 0; o < P; ++o) freed.push_back(page * P + o);
    }
    Node* parent = x->parent;
    parent->children.erase(x->tokens[0]);
    cached_tokens_ -= static_cast<int64_t>(x->tokens.size());
    stats_.evicted_tokens += static_cast<int64_t>(x->tokens.size());
    stats_.evicted_nodes += 1;
    nodes_.erase(x->id);
    if (parent != root_ && parent->children.empty() && parent->ref == 0)
      heap.emplace(parent->tick, parent->id, parent);
  }
  stats_.freed_slots += static_cast<int64_t>(freed.size());
  return freed;
}

std::vector<int64_t> RadixCache::flush() {
  if (root_->ref > 0)
    throw std::runtime_error("cannot flush the radix cache: " + str(root_->ref) +
                             " lock(s) are held by running sequences (unlock them first)");
  std::vector<int64_t> freed = owned_slots();
  stats_.evicted_tokens += cached_tokens_;
  stats_.evicted_nodes += num_nodes();
  stats_.freed_slots += static_cast<int64_t>(freed.size());
  root_->children.clear();
  auto root = std::move(nodes_.at(0));
  nodes_.clear();
  nodes_.emplace(0, std::move(root));
  page_bits_.assign(page_bits_.size(), 0);
  page_big_.clear();
  held_pages_ = 0;
  cached_tokens_ = 0;
  return freed;
}

std::vector<int64_t> RadixCache::owned_slots() const {
  std::vector<int64_t> pages;
  for (int64_t p = 0; p < static_cast<int64_t>(page_bits_.size()); ++p)
    if (page_bits_[p]) pages.push_back(p);
  std::vector<int64_t> big(page_big_.begin(), page_big_.end());
  std::sort(big.begin(), big.end());
  pages.insert(pages.end(), big.begin(), big.end());
  std::vector<int64_t> out;
  out.reserve(pages.size() * page_size_);
  for (int64_t page : pages)
    for (int64_t o = 0; o < page_size_; ++o) out.push_back(page * page_size_ + o);
  return out;
}

int64_t RadixCache::evictable_slots() const {
  // A node with no lock has no locked descendant (locks count up to the root), so every
  // unlocked node is eventually evictable.
  int64_t total = 0;
  std::vector<int64_t> pages;
  for (auto& kv : nodes_) {
    const Node* x = kv.second.get();
    if (x == root_ || x->ref > 0) continue;
    owned_pages(x, &pages);
    total += static_cast<int64_t>(pages.size()) * page_size_;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------
// Python binding: token / slot arrays come as 1-D int64 buffers (array('q'), numpy), checked here.

namespace {

namespace py = pybind11;

struct Int64View {
  const int64_t* data = nullptr;
  int64_t size = 0;
  std::vector<int64_t> copy;  // used when the buffer is strided
};

Int64View int64_view(const py::buffer& buf, const char* name) {
  py::buffer_info info = buf.request();
  Int64View v;
  // int64, or uint64 (array('Q')): reinterpreted, values >= 2^63 then read as negative and rejected.
  std::string f = info.format;
  if (f.size() == 2 && (f[0] == '<' || f[0] == '=' || f[0] == '@')) f = f.substr(1);
  const bool int64 = info.itemsize == 8 && (f == "q" || f == "l" || f == "Q" || f == "L");
  if (!int64)
    throw std::invalid_argument(std::string(name) + " must be a buffer of int64, got format '" + info.format +
                                "' with item size " + str(info.itemsize));
  if (info.ndim != 1)
    throw std::invalid_argument(std::string(name) + " must be 1-D, got " + str(info.ndim) + " dimensions");
  v.size = info.shape[0];
  if (info.strides[0] == 8 || v.size <= 1) {
    v.data = static_cast<const int64_t*>(info.ptr);
  } else {
    v.copy.resize(v.size);
    const char* p = static_cast<const char*>(info.ptr);
    for (int64_t i = 0; i < v.size; ++i) v.copy[i] = *reinterpret_cast<const int64_t*>(p + i * info.strides[0]);
    v.data = v.copy.data();
  }
  return v;
}

}  // namespace

void bind_radix_cache(py::module_& m) {
  py::class_<RadixCache>(m, "RadixCache",
                         "Compressed trie from token ids to KV slots (C++); use ptcore.cache.RadixCache.")
      .def(py::init<int64_t>(), py::arg("page_size") = 1)
      .def(
          "match_prefix",
          [](RadixCache& c, const py::buffer& tokens) {
            Int64View t = int64_view(tokens, "tokens");
            RadixMatch r = c.match_prefix(t.data, t.size);
            return py::make_tuple(r.length, py::cast(r.slots), r.node);
          },
          py::arg("tokens"), "(length, slots, node) of the longest cached prefix; splits the node it ends in.")
      .def(
          "insert",
          [](RadixCache& c, const py::buffer& tokens, const py::buffer& slots) {
            Int64View t = int64_view(tokens, "tokens");
            Int64View s = int64_view(slots, "slots");
            if (t.size != s.size)
              throw std::invalid_argument("tokens and slots must have the same length, got " + str(t.size) +
                                          " and " + str(s.size));
            return c.insert(t.data, s.data, t.size);
          },
          py::arg("tokens"), py::arg("slots"), "Adds the sequence; returns how many leading tokens were cached.")
      .def("lock", &RadixCache::lock, py::arg("node"))
      .def("unlock", &RadixCache::unlock, py::arg("node"))
      .def("evict", &RadixCache::evict, py::arg("num_slots"))
      .def("flush", &RadixCache::flush)
      .def("owned_slots", &RadixCache::owned_slots)
      .def("has_node", &RadixCache::has_node, py::arg("node"))
      .def("node_ref", &RadixCache::node_ref, py::arg("node"))
      .def("node_locks", &RadixCache::node_locks, py::arg("node"))
      .def("node_depth", &RadixCache::node_depth, py::arg("node"))
      .def_property_readonly("page_size", &RadixCache::page_size)
      .def_property_readonly("cached_tokens", &RadixCache::cached_tokens)
      .def_property_readonly("num_nodes", &RadixCache::num_nodes)
      .def_property_readonly("held_slots", &RadixCache::held_slots)
      .def_property_readonly("evictable_slots", &RadixCache::evictable_slots)
      .def_property_readonly("locks", &RadixCache::locks)
      .def_property_readonly("stats", [](const RadixCache& c) {
        const RadixStats& s = c.stats();
        py::dict d;
        d["match_calls"] = s.match_calls;
        d["query_tokens"] = s.query_tokens;
        d["hit_tokens"] = s.hit_tokens;
        d["insert_calls"] = s.insert_calls;
        d["inserted_tokens"] = s.inserted_tokens;
        d["evicted_tokens"] = s.evicted_tokens;
        d["evicted_nodes"] = s.evicted_nodes;
        d["freed_slots"] = s.freed_slots;
        return d;
      });
}

}  // namespace ptcore
