"""Writing and reading Megatron indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``).

The files are megatron-core's format (:mod:`megatron_longsky.data.index_format` writes
them byte for byte like its ``IndexedDatasetBuilder``, without importing megatron-core).
Every file is written under a temporary name first. :func:`commit_datasets` then switches
the finished datasets in one order that never shows a mix of old and new files: first
every existing ``.idx`` of the outputs is removed (an old dataset stops looking
complete), then the ``.bin`` and sidecars are renamed into place, and the ``.idx``
files last. A dataset is complete when its ``.idx`` exists, and every reader also
checks the ``.bin`` size against the ``.idx`` (:func:`check_dataset`), so an
interrupted switch is refused, never read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_longsky.data.index_format import (
    BinIdxBuilder,
    IndexedDatasetError,
    check_pair,
    optimal_dtype,
    read_header,
    read_index,
)
from megatron_longsky.data.metadata import meta_path
from megatron_longsky.utils.atomic import check_outputs, fsync_dir, temp_path_for

__all__ = ["IndexedDatasetError", "IndexedDatasetWriter", "bin_path", "check_dataset", "commit_datasets",
           "dataset_files", "dataset_prefix", "idx_path", "index_dtype", "open_indexed",
           "remove_stale_temps", "token_dtype"]


def dataset_prefix(output_prefix: str | Path, json_key: str) -> str:
    """Megatron-LM's naming: ``<output_prefix>_<key>_document``."""
    return f"{output_prefix}_{json_key}_document"


def token_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron-LM's preprocessing picks for a vocabulary."""
    return optimal_dtype(vocab_size)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def dataset_files(prefix: str | Path) -> list[Path]:
    """The files of a dataset, in the order they are switched into place (``.idx`` last)."""
    return [bin_path(prefix), meta_path(prefix), idx_path(prefix)]


def index_dtype(prefix: str | Path) -> type[np.number]:
    """The token dtype recorded in ``<prefix>.idx`` (read from its header only)."""
    return read_header(idx_path(prefix)).dtype


def check_dataset(prefix: str | Path) -> None:
    """Refuse a dataset whose files are missing or whose ``.bin`` size does not match its ``.idx``."""
    check_pair(prefix)


def open_indexed(prefix: str | Path, mmap: bool = True):
    """megatron-core's ``IndexedDataset`` reader, after :func:`check_dataset`."""
    import warnings

    check_pair(prefix)
    with warnings.catch_warnings():
        # megatron.core's package import warns about the absent GPU-only Transformer Engine / apex.
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(paths: Sequence[str | Path]) -> list[Path]:
    """Delete temporary files of ``paths`` left by runs that were killed (their pid is gone)."""
    removed = []
    for final in map(Path, paths):
        for tmp in final.parent.glob(f".{final.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


class IndexedDatasetWriter:
    """Accumulate documents into ``prefix`` under temporary names.

    An existing dataset at ``prefix`` is refused unless ``overwrite``; ``inputs`` are
    files the run reads, which the output may never replace. Call :meth:`finalize` with
    the metadata when all documents are in, then :func:`commit_datasets` (or
    :meth:`commit`); :meth:`abort` removes the temporary files (also safe after a commit).
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number], *, overwrite: bool = False,
                 inputs: Sequence[str | Path] = ()):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype).type
        self.final_paths = dataset_files(prefix)
        self.temp_paths = [temp_path_for(p) for p in self.final_paths]
        check_outputs(self.final_paths, inputs, overwrite)
        self.final_paths[0].parent.mkdir(parents=True, exist_ok=True)
        self.stale_removed = remove_stale_temps(self.final_paths)
        self._builder: Optional[BinIdxBuilder] = BinIdxBuilder(self.temp_paths[0], self.dtype)
        self.documents = 0
        self.sequences = 0
        self.tokens = 0
        self._finalized = False

    def add_document(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """One document made of ``len(lengths)`` items (sentences) of the given lengths."""
        self._builder.add_document(tokens, lengths)
        self.documents += 1
        self.sequences += len(lengths)
        self.tokens += int(len(tokens))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append every document of an existing dataset with the same dtype."""
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise IndexedDatasetError(f"{idx_path(prefix)} stores {np.dtype(index.dtype).name} tokens but the "
                                      f"output stores {np.dtype(self.dtype).name}")
        self.documents += index.num_documents
        self.sequences += len(index.sequence_lengths)
        self.tokens += index.num_tokens
        del index
        self._builder.add_index(prefix)

    def finalize(self, meta: dict) -> None:
        """Close the ``.bin``, write the ``.idx`` and the sidecar (still temporary)."""
        self._builder.finalize(self.temp_paths[2])
        self._builder = None
        meta = {**meta, "dtype": np.dtype(self.dtype).name, "documents": self.documents,
                "sequences": self.sequences, "tokens": self.tokens}
        with open(self.temp_paths[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._finalized = True

    def commit(self) -> None:
        commit_datasets([self])

    def abort(self) -> None:
        if self._builder is not None:
            self._builder.close()
            self._builder = None
        for tmp in self.temp_paths:
            tmp.unlink(missing_ok=True)


def switch_files(groups: Sequence[tuple[Sequence[Path], Sequence[Path]]]) -> None:
    """Rename ``(temporaries, finals)`` groups into place together; each group's last file
    marks it complete. Existing markers go first, so no moment shows an old marker beside
    new data (or one group new and another old, looking complete)."""
    for _, finals in groups:
        Path(finals[-1]).unlink(missing_ok=True)
    for temps, finals in groups:
        for tmp, final in zip(temps[:-1], finals[:-1]):
            os.replace(tmp, final)
    for temps, finals in groups:
        os.replace(temps[-1], finals[-1])
    for directory in {Path(finals[-1]).parent for _, finals in groups}:
        fsync_dir(directory)


def commit_datasets(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Switch finalized datasets into place together (see :func:`switch_files`)."""
    for w in writers:
        if not w._finalized:
            raise RuntimeError(f"dataset {w.prefix} was not finalized before commit")
    switch_files([(w.temp_paths, w.final_paths) for w in writers])

