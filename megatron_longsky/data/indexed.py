"""Writing and reading Megatron indexed datasets (``<prefix>.bin`` / ``<prefix>.idx``).

Writing goes through megatron-core's ``IndexedDatasetBuilder`` (so the format is
theirs), but into temporary names: ``.bin`` and the ``.meta.json`` sidecar are
renamed into place first and the ``.idx`` last, so a dataset whose ``.idx``
exists is complete and an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
with warnings.catch_warnings():
    # megatron.core's package import warns about the absent GPU-only Transformer Engine / apex.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from megatron_longsky.data.metadata import meta_path
from megatron_longsky.utils.atomic import temp_path_for


def dataset_prefix(output_prefix: str | Path, json_key: str) -> str:
    """Megatron-LM's naming: ``<output_prefix>_<key>_document``."""
    return f"{output_prefix}_{json_key}_document"


def token_dtype(vocab_size: int) -> type[np.number]:
    """The token dtype Megatron-LM's preprocessing picks for a vocabulary."""
    return DType.optimal_dtype(vocab_size)


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def index_dtype(prefix: str | Path) -> type[np.number]:
    """The token dtype recorded in ``<prefix>.idx`` (read from its header only)."""
    path = idx_path(prefix)
    with open(path, "rb") as f:
        header = f.read(9 + 8 + 1)
    if len(header) < 18 or header[:9] != b"MMIDIDX\x00\x00":
        raise ValueError(f"{path}: not a Megatron indexed dataset index (bad header)")
    return DType.dtype_from_code(header[17])


def open_indexed(prefix: str | Path, mmap: bool = True) -> IndexedDataset:
    """megatron-core's reader, with a clear error when a file is missing."""
    for path in (idx_path(prefix), bin_path(prefix)):
        if not path.exists():
            hint = " (an interrupted run leaves only temporary files)" if path.suffix == ".idx" else ""
            raise FileNotFoundError(f"indexed dataset {prefix}: {path} does not exist{hint}")
    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(prefix: str | Path) -> list[Path]:
    """Delete temporary files of ``prefix`` left by runs that were killed (their pid is gone)."""
    removed = []
    for final in (bin_path(prefix), meta_path(prefix), idx_path(prefix)):
        for tmp in final.parent.glob(f".{final.name}.tmp-*"):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


class IndexedDatasetWriter:
    """Accumulate documents into ``prefix`` under temporary names.

    Call :meth:`finalize` with the metadata when all documents are in, then
    :func:`commit_datasets` (or :meth:`commit`) to rename; :meth:`abort` removes the
    temporary files (also safe after a commit).
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number]):
        self.prefix = str(prefix)
        self.dtype = dtype
        self.final_paths = [bin_path(prefix), meta_path(prefix), idx_path(prefix)]
        self.temp_paths = [temp_path_for(p) for p in self.final_paths]
        self.final_paths[0].parent.mkdir(parents=True, exist_ok=True)
        self.stale_removed = remove_stale_temps(prefix)
        self._builder: Optional[IndexedDatasetBuilder] = IndexedDatasetBuilder(str(self.temp_paths[0]), dtype=dtype)
        self.documents = 0
        self.sequences = 0
        self.tokens = 0
        self._finalized = False

    def add_document(self, tokens: np.ndarray, lengths: Sequence[int]) -> None:
        """One document made of ``len(lengths)`` items (sentences) of the given lengths."""
        self._builder.add_document(tokens, list(lengths))
        self.documents += 1
        self.sequences += len(lengths)
        self.tokens += int(len(tokens))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append every document of an existing dataset with the same dtype."""
        found = index_dtype(prefix)
        if found != self.dtype:
            raise ValueError(f"{idx_path(prefix)} stores {np.dtype(found).name} tokens but the output "
                             f"stores {np.dtype(self.dtype).name}")
        dataset = open_indexed(prefix)
        self.documents += len(dataset.document_indices) - 1
        self.sequences += len(dataset)
        self.tokens += int(dataset.sequence_lengths.sum(dtype=np.int64))
        del dataset
        self._builder.add_index(str(prefix))

    def finalize(self, meta: dict) -> None:
        """Close the ``.bin``, write the ``.idx`` and the sidecar (still temporary)."""
        self._builder.finalize(str(self.temp_paths[2]))
        self._builder = None
        meta = {**meta, "dtype": np.dtype(self.dtype).name, "documents": self.documents,
                "sequences": self.sequences, "tokens": self.tokens}
        with open(self.temp_paths[1], "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for tmp in self.temp_paths:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        self._finalized = True

    def commit(self) -> None:
        commit_datasets([self])

    def abort(self) -> None:
        if self._builder is not None:
            self._builder.data_file.close()
            self._builder = None
        for tmp in self.temp_paths:
            if tmp.exists():
                tmp.unlink()


def commit_datasets(writers: Sequence[IndexedDatasetWriter]) -> None:
    """Rename finalized datasets into place: every .bin and .meta.json, then the .idx files."""
    for w in writers:
        if not w._finalized:
            raise RuntimeError(f"dataset {w.prefix} was not finalized before commit")
    for w in writers:
        for tmp, final in zip(w.temp_paths[:2], w.final_paths[:2]):
            os.replace(tmp, final)
    for w in writers:
        os.replace(w.temp_paths[2], w.final_paths[2])
