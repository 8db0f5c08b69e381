// Best-fit-decreasing bin packing of sample lengths into rows of a fixed capacity.
//
// Samples are placed longest first (ties: lower sample index first); each goes into
// the open row with the least remaining room that still fits it (ties: the row
// opened first), or opens a new row. "Least room that fits" is found in O(log C)
// with a segment tree over remaining-capacity values whose leaves hold min-heaps of
// row ids. megatron_longsky/data/packing.py has the numpy reference with the same
// rules; the two must return identical plans.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

class RoomIndex {
 public:
  explicit RoomIndex(int64_t capacity) : leaves_(1), heaps_(capacity + 1) {
    while (leaves_ < capacity + 1) leaves_ <<= 1;
    counts_.assign(2 * leaves_, 0);
  }

  void add(int64_t room, int64_t row) {
    auto& heap = heaps_[room];
    heap.push_back(row);
    std::push_heap(heap.begin(), heap.end(), std::greater<int64_t>());
    for (size_t i = leaves_ + room; i >= 1; i >>= 1) counts_[i] += 1;
  }

  // Remove and return the lowest row id among rows with exactly `room` left.
  int64_t pop(int64_t room) {
    auto& heap = heaps_[room];
    std::pop_heap(heap.begin(), heap.end(), std::greater<int64_t>());
    int64_t row = heap.back();
    heap.pop_back();
    for (size_t i = leaves_ + room; i >= 1; i >>= 1) counts_[i] -= 1;
    return row;
  }

  // Smallest room value >= need held by some row, or -1.
  int64_t smallest_at_least(int64_t need) const {
    size_t i = leaves_ + need;
    if (counts_[i] > 0) return need;
    bool found = false;
    while (i > 1) {
      if ((i & 1) == 0 && counts_[i + 1] > 0) {
        i += 1;
        found = true;
        break;
      }
      i >>= 1;
    }
    if (!found) return -1;
    while (i < leaves_) {
      i <<= 1;
      if (counts_[i] == 0) i += 1;
    }
    return static_cast<int64_t>(i - leaves_);
  }

 private:
  size_t leaves_;
  std::vector<int64_t> counts_;
  std::vector<std::vector<int64_t>> heaps_;
};

// Returns (row_offsets[n_rows + 1], sample_ids[n]): row r holds
// sample_ids[row_offsets[r]:row_offsets[r+1]] in placement order.
py::tuple pack_bfd(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_in,
                   int64_t capacity) {
  if (capacity < 1) throw std::invalid_argument("capacity must be >= 1, got " + std::to_string(capacity));
  if (lengths_in.ndim() != 1) throw std::invalid_argument("lengths must be a 1-D array");
  const int64_t n = lengths_in.shape(0);
  const int64_t* lengths = lengths_in.data();
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1 || lengths[i] > capacity) {
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                  ", outside [1, capacity=" + std::to_string(capacity) + "]");
    }
  }
  std::vector<int64_t> order(n);
  std::vector<int64_t> row_of(n);
  std::vector<int64_t> row_sizes;
  {
    py::gil_scoped_release release;
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [lengths](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    RoomIndex rooms(capacity);
    std::vector<int64_t> row_room;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t sample = order[k];
      const int64_t need = lengths[sample];
      int64_t room = rooms.smallest_at_least(need);
      int64_t row;
      if (room < 0) {
        row = static_cast<int64_t>(row_room.size());
        row_room.push_back(capacity);
        row_sizes.push_back(0);
      } else {
        row = rooms.pop(room);
      }
      row_room[row] -= need;
      row_sizes[row] += 1;
      row_of[sample] = row;
      if (row_room[row] > 0) rooms.add(row_room[row], row);
    }
  }
  const int64_t n_rows = static_cast<int64_t>(row_sizes.size());
  py::array_t<int64_t> offsets_out(n_rows + 1);
  py::array_t<int64_t> samples_out(n);
  int64_t* offsets = offsets_out.mutable_data();
  int64_t* samples = samples_out.mutable_data();
  {
    py::gil_scoped_release release;
    offsets[0] = 0;
    for (int64_t r = 0; r < n_rows; ++r) offsets[r + 1] = offsets[r] + row_sizes[r];
    std::vector<int64_t> cursor(offsets, offsets + n_rows);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t sample = order[k];
      samples[cursor[row_of[sample]]++] = sample;
    }
  }
  return py::make_tuple(offsets_out, samples_out);
}

}  // namespace

PYBIND11_MODULE(_ext_packing, m) {
  m.doc() = "Best-fit-decreasing packing of sample lengths into fixed-capacity rows";
  m.def("pack_bfd", &pack_bfd, py::arg("lengths"), py::arg("capacity"),
        "Pack lengths (int64, each in [1, capacity]) into rows; returns (row_offsets, sample_ids).");
}
