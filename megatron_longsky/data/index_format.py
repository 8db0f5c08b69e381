"""megatron-core's indexed dataset files (``.bin`` / ``.idx``), read and written with numpy only.

The data commands (preprocess, merge-datasets, build-cip, preprocess-sft) only need the
file format, and importing megatron-core (torch, its optimizers, ...) costs seconds and
warnings before any work. The format is megatron-core's ``IndexedDatasetBuilder`` /
``_IndexWriter`` (0.16.1), byte for byte (tests compare both writers' files)::

    .idx: b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 sequence count S
          | u64 document count D | int32 lengths[S] | int64 byte pointers[S] | int64 doc_idx[D]
    .bin: the tokens of every sequence, back to back, in the dtype

Training and evaluation read the files with megatron-core's ``IndexedDataset`` itself.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_longsky.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
_FIXED = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence and document counts
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class IndexedDatasetError(UserError, ValueError):
    """A dataset's files are missing, malformed or do not belong together; names the file."""


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype megatron-core's ``DType.optimal_dtype`` picks for a vocabulary."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


@dataclass(frozen=True)
class IndexHeader:
    path: Path
    dtype: type[np.number]
    sequences: int
    documents: int  # entries of doc_idx: documents + 1

    @property
    def expected_size(self) -> int:
        return _FIXED + self.sequences * (4 + 8) + self.documents * 8


def read_header(idx: str | Path) -> IndexHeader:
    """The header of an ``.idx`` file, checked against the file's size."""
    idx = Path(idx)
    try:
        with open(idx, "rb") as f:
            head = f.read(_FIXED)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise IndexedDatasetError(f"{idx} does not exist") from None
    if len(head) < _FIXED or head[: len(INDEX_HEADER)] != INDEX_HEADER:
        raise IndexedDatasetError(f"{idx}: not a Megatron indexed dataset index (bad header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
    if version != 1 or code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{idx}: unsupported index (version {version}, dtype code {code})")
    header = IndexHeader(idx, CODE_DTYPES[code], sequences, documents)
    if size != header.expected_size:
        raise IndexedDatasetError(f"{idx}: {size} bytes, but its header ({sequences} sequences, "
                                  f"{documents} document indices) needs {header.expected_size}: the file is "
                                  "truncated or corrupt")
    return header


def check_pair(prefix: str | Path) -> IndexHeader:
    """Both files exist and the ``.idx`` passes :func:`validate_index` against its ``.bin``.

    The one validator every reader goes through (merge-datasets, build-cip, train's dataset
    checks, eval, preflight); the result is cached per (path, size, mtime, inode)."""
    from megatron_longsky.data.switch import finish_interrupted_switch

    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    finish_interrupted_switch(prefix)
    if not idx.exists():
        hint = " (an interrupted run leaves only hidden temporary files)" if bin_.exists() else ""
        raise IndexedDatasetError(f"indexed dataset {prefix}: {idx} does not exist{hint}")
    try:
        bin_stat = bin_.stat()
    except FileNotFoundError:
        raise IndexedDatasetError(f"indexed dataset {prefix}: {bin_} does not exist") from None
    if not stat.S_ISREG(bin_stat.st_mode):
        raise IndexedDatasetError(f"indexed dataset {prefix}: {bin_} is not a regular file")
    idx_stat = idx.stat()
    key = (os.path.abspath(idx), idx_stat.st_size, idx_stat.st_mtime_ns, idx_stat.st_ino,
           bin_stat.st_size, bin_stat.st_mtime_ns, bin_stat.st_ino)
    header = _VALID.get(key)
    if header is None:
        header = validate_index(idx, bin_stat.st_size, bin_)
        if len(_VALID) > 256:
            _VALID.clear()
        _VALID[key] = header
    return header


_VALID: dict = {}


def validate_index(idx: str | Path, bin_size: int | None = None, bin_: str | Path | None = None) -> IndexHeader:
    """Every invariant of megatron-core's index format, or an :class:`IndexedDatasetError`
    naming the file and the first broken one: the header, version and dtype code
    (:func:`read_header`), the file size, sequence lengths >= 0, byte pointers starting at 0
    and each one the previous plus its length times the dtype size, the last sequence
    ending exactly at the ``.bin``'s size, and ``doc_idx`` non-empty, sorted, starting at 0
    and ending at the sequence count."""
    header = read_header(idx)
    idx = header.path
    n, d = header.sequences, header.documents
    itemsize = np.dtype(header.dtype).itemsize
    if d < 1:
        raise IndexedDatasetError(f"{idx}: corrupt index: no document index entries (doc_idx must start at 0)")
    data = np.memmap(idx, dtype=np.uint8, mode="r") if header.expected_size > _FIXED else np.zeros(0, np.uint8)
    lengths = data[_FIXED:_FIXED + 4 * n].view(np.int32)
    pointers = data[_FIXED + 4 * n:_FIXED + 12 * n].view(np.int64)
    docs = data[_FIXED + 12 * n:_FIXED + 12 * n + 8 * d].view(np.int64)

    def bad(what: str):
        raise IndexedDatasetError(f"{idx}: corrupt index: {what}")

    if n:
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            bad(f"sequence {int(negative[0])} has length {int(lengths[negative[0]])} (< 0)")
        if pointers[0] != 0:
            bad(f"the first sequence starts at byte {int(pointers[0])}, not 0")
        ends = pointers.astype(np.int64) + lengths.astype(np.int64) * itemsize
        broken = np.flatnonzero(pointers[1:] != ends[:-1])
        if broken.size:
            k = int(broken[0]) + 1
            bad(f"sequence {k} starts at byte {int(pointers[k])} but sequence {k - 1} ends at {int(ends[k - 1])} "
                "(pointers must follow the lengths)")
        expected = int(ends[-1])
    else:
        expected = 0
    if int(docs[0]) != 0:
        bad(f"doc_idx starts at {int(docs[0])}, not 0")
    if d > 1:
        down = np.flatnonzero(docs[1:] < docs[:-1])
        if down.size:
            k = int(down[0]) + 1
            bad(f"doc_idx decreases at entry {k} ({int(docs[k - 1])} -> {int(docs[k])})")
    if int(docs[-1]) != n:
        bad(f"doc_idx ends at {int(docs[-1])}, not at the sequence count {n}")
    del data
    if bin_size is not None and bin_size != expected:
        where = Path(bin_) if bin_ is not None else Path(str(idx)[: -len(".idx")] + ".bin")
        raise IndexedDatasetError(
            f"{where}: {bin_size:,} bytes, but {idx.name} describes {expected:,} bytes "
            f"({expected // itemsize:,} {np.dtype(header.dtype).name} tokens): the .bin is "
            f"{'truncated' if bin_size < expected else 'longer than its index'} or belongs to another .idx")
    return header


@dataclass
class IndexArrays:
    dtype: type[np.number]
    sequence_lengths: np.ndarray  # int32
    sequence_pointers: np.ndarray  # int64, bytes
    document_indices: np.ndarray  # int64, documents + 1 entries

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(prefix: str | Path) -> IndexArrays:
    """The arrays of ``<prefix>.idx`` (memory-mapped) after :func:`check_pair`."""
    header = check_pair(prefix)
    n, d = header.sequences, header.documents
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    lengths = data[_FIXED:_FIXED + 4 * n].view(np.int32)
    pointers = data[_FIXED + 4 * n:_FIXED + 12 * n].view(np.int64)
    docs = data[_FIXED + 12 * n:_FIXED + 12 * n + 8 * d].view(np.int64)
    return IndexArrays(header.dtype, lengths, pointers, docs)


class BinIdxBuilder:
    """Writes ``.bin`` as documents arrive and the ``.idx`` at :meth:`finalize`
    (the files megatron-core's ``IndexedDatasetBuilder`` writes)."""

    def __init__(self, bin_path: str | Path, dtype: type[np.number]):
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {np.dtype(dtype).name} is not one megatron-core can store")
        self.data_file = open(bin_path, "wb")
        self.sequence_lengths = array("q")
        self.document_indices = array("q", [0])

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        self.data_file.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def record_sequences(self, lengths: Sequence[int]) -> None:
        """Index one-sequence documents whose tokens the caller wrote to ``data_file`` itself."""
        start = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(range(start + 1, len(self.sequence_lengths) + 1))

    def add_index(self, prefix: str | Path) -> None:
        """Append every document of an existing dataset of the same dtype."""
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise IndexedDatasetError(f"{prefix}.idx stores {np.dtype(index.dtype).name} tokens, "
                                      f"not {np.dtype(self.dtype).name}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(index.sequence_lengths.astype(np.int64).tobytes())
        self.document_indices.frombytes((offset + index.document_indices[1:]).astype(np.int64).tobytes())
        with open(f"{prefix}.bin", "rb") as f:
            shutil.copyfileobj(f, self.data_file, 16 << 20)

    def finalize(self, idx_path: str | Path) -> None:
        self.data_file.flush()
        os.fsync(self.data_file.fileno())
        self.data_file.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths):
            np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<QBQQ", 1, DTYPE_CODES[self.dtype], len(lengths), len(self.document_indices)))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if not self.data_file.closed:
            self.data_file.close()
