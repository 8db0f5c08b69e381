"""Writing and reading Megatron indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``).

The files are megatron-core's format (:mod:`megatron_longsky.data.index_format` writes
them byte for byte like its ``IndexedDatasetBuilder``, without importing megatron-core).
Every file is written under a temporary name first, while the run holds the output's
lock (:class:`~megatron_longsky.utils.output_paths.OutputLock`: a second run on the same
prefix refuses). :func:`commit_datasets` then switches the finished datasets in with a
journal (:mod:`megatron_longsky.data.switch`), so a kill at any point leaves the old
datasets or the new ones, never a mix and never neither. A dataset is complete when its
``.idx`` exists; every reader validates the ``.idx`` against its ``.bin``
(:func:`check_dataset`, :func:`~megatron_longsky.data.index_format.validate_index`).
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
    read_index,
)
from megatron_longsky.data.metadata import meta_path
from megatron_longsky.data.switch import finish_interrupted_switch, journal_path, switch_files
from megatron_longsky.utils.atomic import remove_stale_temps, temp_path_for
from megatron_longsky.utils.output_paths import OutputLock, check_outputs, check_prefix

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
    return check_pair(prefix).dtype


def check_dataset(prefix: str | Path) -> None:
    """Refuse a dataset whose files are missing or whose ``.idx`` breaks an invariant of the
    format against its ``.bin`` (:func:`~megatron_longsky.data.index_format.validate_index`)."""
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
        self._builder: Optional[BinIdxBuilder] = None
        self._lock = prepare_dataset_output(prefix, inputs, overwrite)
        self.stale_removed = remove_stale_temps([*self.final_paths, journal_path(self.final_paths[-1])])
        try:
            self._builder = BinIdxBuilder(self.temp_paths[0], self.dtype)
        except BaseException:
            self._lock.release()
            raise
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
        """Remove the temporary files (also when closing the ``.bin`` fails, e.g. a full disk)
        and release the output lock; safe after a commit and when called twice."""
        try:
            if self._builder is not None:
                builder, self._builder = self._builder, None
                builder.close()
        finally:
            try:
                if not journal_path(self.final_paths[-1]).exists():  # else a switch to finish needs them
                    for tmp in self.temp_paths:
                        tmp.unlink(missing_ok=True)
            finally:
                self._lock.release()


def prepare_dataset_output(prefix: str | Path, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                           flag: str = "--overwrite", files: Optional[Sequence[Path]] = None) -> OutputLock:
    """Lock the dataset output ``prefix``, finish a switch a killed run left there, and check
    it (:func:`~megatron_longsky.utils.output_paths.check_outputs`) under the lock, so two
    runs never both pass the check (``files``: the output's files, default ``.bin``, ``.meta.json``,
    ``.idx``). Returns the held lock (release it when done)."""
    check_prefix(prefix, "output prefix")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(prefix).acquire()
    try:
        finish_interrupted_switch(prefix)
        check_outputs(files if files is not None else dataset_files(prefix), inputs, overwrite, flag)
    except BaseException:
        lock.release()
        raise
    return lock


def commit_datasets(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Switch finalized datasets into place together (see :func:`switch_files`)."""
    for w in writers:
        if not w._finalized:
            raise RuntimeError(f"dataset {w.prefix} was not finalized before commit")
    switch_files([(w.temp_paths, w.final_paths) for w in writers])
    for w in writers:
        w._lock.release()

