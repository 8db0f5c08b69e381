// Chunk Interleaved Pretraining (CIP): the index-building loop and the token gather.
//
// build_cip_index turns a sampled document order into segments (document, offset,
// length) that fill each sequence with N documents cut into K chunks, emitted
// round-robin. megatron_longsky/data/cip_reference.py is the plain numpy/Python
// reference of the same algorithm; tests check that both agree exactly.
//
// gather_tokens copies the planned segments out of the memory-mapped input .bin
// files into an output buffer, several threads over disjoint sequence ranges (the
// output does not depend on the thread count).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kEqual = 0;
constexpr int kFixed = 1;
constexpr int kRandom = 2;
constexpr int64_t kPrefetchDistance = 8;  // segments ahead (gather_tokens)

// splitmix64: tiny, well mixed, and trivial to reproduce exactly in Python.
inline uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Water-filling: documents no longer than the fair share are used whole; the rest
// share what remains equally (earlier slots get the +1 remainders). sum == total.
// `idx` and `budget` are caller-owned scratch buffers (reused across sequences).
void budgets_for(const std::vector<int64_t>& sizes, int64_t total, std::vector<int64_t>& idx,
                 std::vector<int64_t>& budget) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return sizes[a] < sizes[b]; });
  budget.assign(n, 0);
  int64_t remaining = total;
  int64_t j = 0;
  for (; j < n; ++j) {
    const int64_t i = idx[j];
    const int64_t m = n - j;
    if (sizes[i] * m > remaining) break;
    budget[i] = sizes[i];
    remaining -= sizes[i];
  }
  if (j < n) {
    std::sort(idx.begin() + j, idx.end());  // the rest, in slot order
    const int64_t m = n - j;
    const int64_t q = remaining / m, r = remaining % m;
    for (int64_t p = 0; p < m; ++p) budget[idx[j + p]] = q + (p < r ? 1 : 0);
  }
}

// Appends the non-empty chunk sizes of `content` tokens to `out` (at least one chunk,
// possibly empty); returns how many were appended. `cuts` is scratch.
int64_t append_chunk_sizes(int64_t content, int64_t k, int policy, int64_t chunk_size, uint64_t& rng,
                           std::vector<int64_t>& out, std::vector<int64_t>& cuts) {
  const size_t before = out.size();
  auto push = [&](int64_t size) {
    if (size > 0) out.push_back(size);
  };
  if (policy == kEqual) {
    const int64_t q = content / k, r = content % k;
    for (int64_t c = 0; c < k; ++c) push(q + (c < r ? 1 : 0));
  } else if (policy == kFixed) {
    for (int64_t left = content; left > 0; left -= chunk_size) push(std::min(left, chunk_size));
  } else {
    cuts.resize(k - 1);
    for (auto& c : cuts) c = static_cast<int64_t>(splitmix64(rng) % static_cast<uint64_t>(content + 1));
    std::sort(cuts.begin(), cuts.end());
    int64_t prev = 0;
    for (int64_t c : cuts) {
      push(c - prev);
      prev = c;
    }
    push(content - prev);
  }
  if (out.size() == before) out.push_back(0);
  return static_cast<int64_t>(out.size() - before);
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

py::dict build_cip_index(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_arr,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> order_arr,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> n_arr,
                         py::array_t<int64_t, py::array::c_style | py::array::forcecast> k_arr,
                         py::array_t<uint64_t, py::array::c_style | py::array::forcecast> seed_arr,
                         int64_t seq_tokens, int64_t sep, int policy, int64_t chunk_size, bool interleave,
                         int64_t cursor) {
  const int64_t* lengths = lengths_arr.data();
  const int64_t num_docs = lengths_arr.size();
  const int64_t* order = order_arr.data();
  const int64_t order_size = order_arr.size();
  const int64_t num_seqs = n_arr.size();
  if (k_arr.size() != num_seqs || seed_arr.size() != num_seqs)
    throw std::invalid_argument("n_per_seq, k_per_seq and seq_seed must have the same length");
  if (policy < kEqual || policy > kRandom) throw std::invalid_argument("unknown chunking policy");
  if (policy == kFixed && chunk_size < 1) throw std::invalid_argument("chunk_size must be >= 1");

  std::vector<int64_t> seg_doc, seg_off, seg_len, seq_start{0}, distances;
  {
    // A cheap upper-bound guess of the output size saves most reallocations.
    int64_t guess = 0;
    for (int64_t s = 0; s < num_seqs; ++s) guess += n_arr.data()[s] * (k_arr.data()[s] + sep);
    seg_doc.reserve(guess);
    seg_off.reserve(guess);
    seg_len.reserve(guess);
    distances.reserve(guess);
    seq_start.reserve(num_seqs + 1);
  }
  int64_t cut_documents = 0, cut_tokens = 0, extra_documents = 0;
  bool exhausted = false;
  // scratch buffers reused by every sequence
  std::vector<int64_t> docs, sizes, budget, idx, cuts, chunk_len, chunk_first, chunk_count, next_offset, last_end;

  for (int64_t s = 0; s < num_seqs && !exhausted; ++s) {
    const int64_t n_target = n_arr.data()[s];
    const int64_t k = k_arr.data()[s];
    uint64_t rng = seed_arr.data()[s];
    docs.clear();
    sizes.clear();
    int64_t total = 0;
    while (static_cast<int64_t>(docs.size()) < n_target || total < seq_tokens) {
      if (cursor >= order_size) {
        exhausted = true;
        break;
      }
      const int64_t d = order[cursor++];
      if (d < 0 || d >= num_docs) throw std::out_of_range("document id out of range in order");
      docs.push_back(d);
      sizes.push_back(lengths[d] + sep);
      total += lengths[d] + sep;
    }
    if (exhausted) break;
    extra_documents += static_cast<int64_t>(docs.size()) - n_target;
    budgets_for(sizes, seq_tokens, idx, budget);

    const int64_t n = static_cast<int64_t>(docs.size());
    chunk_len.clear();
    chunk_first.resize(n);
    chunk_count.resize(n);
    int64_t max_chunks = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t content = std::max<int64_t>(budget[i] - sep, 0);
      if (budget[i] < sizes[i]) {
        ++cut_documents;
        cut_tokens += sizes[i] - budget[i];
      }
      chunk_first[i] = static_cast<int64_t>(chunk_len.size());
      chunk_count[i] = append_chunk_sizes(content, k, policy, chunk_size, rng, chunk_len, cuts);
      max_chunks = std::max(max_chunks, chunk_count[i]);
    }

    // Emission: round r takes chunk r of every document (or whole documents in turn).
    next_offset.assign(n, 0);
    last_end.assign(n, -1);
    int64_t pos = 0;
    auto emit = [&](int64_t i, int64_t c) {
      const int64_t len = chunk_len[chunk_first[i] + c];
      if (len > 0) {
        if (last_end[i] >= 0) distances.push_back(pos - last_end[i]);
        seg_doc.push_back(docs[i]);
        seg_off.push_back(next_offset[i]);
        seg_len.push_back(len);
        next_offset[i] += len;
        pos += len;
        last_end[i] = pos;
      }
      if (sep && c + 1 == chunk_count[i] && budget[i] > 0) {
        seg_doc.push_back(-1);
        seg_off.push_back(0);
        seg_len.push_back(1);
        pos += 1;
      }
    };
    if (interleave) {
      for (int64_t r = 0; r < max_chunks; ++r)
        for (int64_t i = 0; i < n; ++i)
          if (r < chunk_count[i]) emit(i, r);
    } else {
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < chunk_count[i]; ++c) emit(i, c);
    }
    if (pos != seq_tokens) throw std::logic_error("internal error: CIP sequence does not have seq_tokens tokens");
    seq_start.push_back(static_cast<int64_t>(seg_doc.size()));
  }

  py::dict out;
  out["seg_doc"] = to_array(seg_doc);
  out["seg_off"] = to_array(seg_off);
  out["seg_len"] = to_array(seg_len);
  out["seq_seg_start"] = to_array(seq_start);
  out["distances"] = to_array(distances);
  out["cursor"] = cursor;
  out["cut_documents"] = cut_documents;
  out["cut_tokens"] = cut_tokens;
  out["extra_documents"] = extra_documents;
  out["exhausted"] = exhausted;
  return out;
}

void gather_tokens(py::array_t<uint8_t, py::array::c_style> out_arr, py::list sources, int64_t itemsize,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_src_arr,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> doc_start_arr,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> seg_doc_arr,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> seg_off_arr,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> seg_len_arr,
                   py::array_t<int64_t, py::array::c_style | py::array::forcecast> seq_start_arr,
                   int64_t seq_begin, int64_t seq_end, int64_t seq_tokens, py::bytes separator, int threads) {
  std::vector<const uint8_t*> src_ptr;
  std::vector<int64_t> src_bytes;
  for (auto item : sources) {
    auto a = py::cast<py::array_t<uint8_t, py::array::c_style>>(item);
    src_ptr.push_back(a.data());
    src_bytes.push_back(a.size());
  }
  const std::string sep = separator;
  if (static_cast<int64_t>(sep.size()) != itemsize) throw std::invalid_argument("separator must be one token");
  const int64_t num_docs = doc_src_arr.size();
  const int64_t* doc_src = doc_src_arr.data();
  const int64_t* doc_start = doc_start_arr.data();
  const int64_t* seg_doc = seg_doc_arr.data();
  const int64_t* seg_off = seg_off_arr.data();
  const int64_t* seg_len = seg_len_arr.data();
  const int64_t* seq_start = seq_start_arr.data();
  const int64_t num_segs = seg_doc_arr.size();
  if (seq_begin < 0 || seq_end < seq_begin || seq_end + 1 > seq_start_arr.size())
    throw std::out_of_range("sequence range out of bounds");
  const int64_t seq_bytes = seq_tokens * itemsize;
  if (out_arr.size() < (seq_end - seq_begin) * seq_bytes) throw std::invalid_argument("output buffer too small");
  uint8_t* out = out_arr.mutable_data();

  std::vector<std::string> errors(std::max(threads, 1));
  auto work = [&](int64_t first, int64_t last, std::string& error) {
    for (int64_t q = first; q < last; ++q) {
      uint8_t* dst = out + (q - seq_begin) * seq_bytes;
      const int64_t g0 = seq_start[q], g1 = seq_start[q + 1];
      if (g0 < 0 || g1 < g0 || g1 > num_segs) {
        error = "segment index out of range";
        return;
      }
      int64_t written = 0;
      for (int64_t g = g0; g < g1; ++g) {
        // Segments start at random places of the input: ask for a later one's first
        // cache lines now so its DRAM/TLB miss overlaps this copy.
        const int64_t ahead = g + kPrefetchDistance;
        if (ahead < g1 && seg_doc[ahead] >= 0 && seg_doc[ahead] < num_docs) {
          const int64_t d = seg_doc[ahead];
          const int64_t src = doc_src[d];
          const int64_t begin = (doc_start[d] + seg_off[ahead]) * itemsize;
          if (src >= 0 && src < static_cast<int64_t>(src_ptr.size()) && begin >= 0 && begin + 256 <= src_bytes[src]) {
            for (int line = 0; line < 4; ++line) __builtin_prefetch(src_ptr[src] + begin + 64 * line);
          }
        }
        const int64_t bytes = seg_len[g] * itemsize;
        if (bytes < 0 || written + bytes > seq_bytes) {
          error = "segments of sequence " + std::to_string(q) + " exceed seq_tokens";
          return;
        }
        if (seg_doc[g] < 0) {
          for (int64_t t = 0; t < seg_len[g]; ++t) std::memcpy(dst + written + t * itemsize, sep.data(), itemsize);
        } else {
          const int64_t d = seg_doc[g];
          const int64_t src = d < num_docs ? doc_src[d] : -1;
          const int64_t begin = d < num_docs ? (doc_start[d] + seg_off[g]) * itemsize : -1;
          if (src < 0 || src >= static_cast<int64_t>(src_ptr.size()) || begin < 0 || begin + bytes > src_bytes[src]) {
            error = "segment reads outside its source file";
            return;
          }
          std::memcpy(dst + written, src_ptr[src] + begin, bytes);
        }
        written += bytes;
      }
      if (written != seq_bytes) {
        error = "sequence " + std::to_string(q) + " has the wrong number of tokens";
        return;
      }
    }
  };

  {
    py::gil_scoped_release release;
    const int64_t count = seq_end - seq_begin;
    const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, count)));
    if (nthreads == 1) {
      work(seq_begin, seq_end, errors[0]);
    } else {
      std::vector<std::thread> pool;
      for (int t = 0; t < nthreads; ++t) {
        const int64_t first = seq_begin + count * t / nthreads;
        const int64_t last = seq_begin + count * (t + 1) / nthreads;
        pool.emplace_back(work, first, last, std::ref(errors[t]));
      }
      for (auto& th : pool) th.join();
    }
  }
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error("gather_tokens: " + e);
}

}  // namespace

PYBIND11_MODULE(_ext_cip_index, m) {
  m.doc() = "CIP index building and token gathering (see megatron_longsky/data/cip.py)";
  m.def("build_cip_index", &build_cip_index, py::arg("lengths"), py::arg("order"), py::arg("n_per_seq"),
        py::arg("k_per_seq"), py::arg("seq_seed"), py::arg("seq_tokens"), py::arg("sep"), py::arg("policy"),
        py::arg("chunk_size"), py::arg("interleave"), py::arg("cursor"));
  m.def("gather_tokens", &gather_tokens, py::arg("out"), py::arg("sources"), py::arg("itemsize"),
        py::arg("doc_src"), py::arg("doc_start"), py::arg("seg_doc"), py::arg("seg_off"), py::arg("seg_len"),
        py::arg("seq_seg_start"), py::arg("seq_begin"), py::arg("seq_end"), py::arg("seq_tokens"),
        py::arg("separator"), py::arg("threads"));
}
