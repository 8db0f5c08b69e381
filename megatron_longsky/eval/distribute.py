"""Spread evaluation cases over data-parallel replicas of a Megatron job.

With world size > TP*PP*CP there are several model replicas; each takes every
``dp_size``-th case (all ranks of a replica take the same ones, so their collectives
match), and the results are all-gathered over the data-parallel group so every rank
ends with all of them, in the original order. Without megatron-core's parallel state
(HF backend, tests) everything runs locally.

Long sweeps are resumable: with a :class:`SweepJournal`, every finished item is appended
(one JSON line, flushed) to ``<output>/<name>.partial.jsonl`` as soon as it is done, and
a rerun of the same sweep (same config and model, e.g. a requeued Slurm job) takes the
finished items from it and computes only the rest. The journal is removed once the
report is written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def data_parallel_layout():
    """``(rank, size, group)`` of this process's data-parallel group, or None."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return None
    return parallel_state.get_data_parallel_rank(), size, parallel_state.get_data_parallel_group()


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class SweepJournal:
    """Finished items of one sweep, kept in ``path`` (JSON lines) across restarts.

    ``identity`` (the sweep's config, the model, ...) is the first line: a journal written
    for another sweep is set aside (renamed ``.stale``), never mixed in. ``key(item)`` names
    an item; ``encode``/``decode`` turn a result into JSON data and back."""

    path: Path
    identity: dict
    key: Callable[[Any], str]
    encode: Callable[[Any], Any] = lambda r: r
    decode: Callable[[Any], Any] = lambda d: d

    def __post_init__(self):
        self.path = Path(self.path)
        self._identity_line = json.dumps({"identity": self.identity}, sort_keys=True, default=str)

    def load(self) -> dict[str, Any]:
        """Finished results by key (decoded); the same on every rank (rank 0 reads)."""
        import torch.distributed as dist

        found: dict[str, Any] = {}
        if _is_writer():
            found = self._read()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [found]
            dist.broadcast_object_list(box, src=0)
            found = box[0]
        return {k: self.decode(v) for k, v in found.items()}

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != self._identity_line:
            stale = self.path.with_name(self.path.name + ".stale")
            os.replace(self.path, stale)
            log.warning("%s belongs to another sweep (other config or model): moved to %s, starting afresh",
                        self.path, stale)
            return {}
        found = {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the job was stopped
                continue
            found[entry["key"]] = entry["result"]
        return found

    def record(self, items: list[tuple[Any, Any]]) -> None:
        """Append finished ``(item, result)`` pairs (rank 0 only), on disk before returning."""
        if not items or not _is_writer():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(self._identity_line + "\n")
            for item, result in items:
                f.write(json.dumps({"key": self.key(item), "result": self.encode(result)}, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def sweep_journal(directory, name: str, config: dict, model: str, tokenizer, **kwargs) -> SweepJournal:
    """The journal of sweep ``name`` in report directory ``directory``, tied to its config,
    model and tokenizer."""
    identity = {"sweep": name, "config": config, "model": model,
                "tokenizer": getattr(tokenizer, "fingerprint", None)}
    return SweepJournal(Path(directory) / f"{name}.partial.jsonl", identity, **kwargs)


def finish_sweep(directory, name: str) -> None:
    """Call once the sweep's report is written: its journal is no longer needed."""
    if _is_writer():
        (Path(directory) / f"{name}.partial.jsonl").unlink(missing_ok=True)


def sharded_map(items: Sequence[T], fn: Callable[[T], R], progress=None,
                journal: Optional[SweepJournal] = None) -> list[R]:
    """``[fn(x) for x in items]``, computed across data-parallel replicas when there are several;
    with a ``journal``, items it already holds are not computed again and new ones are added
    to it as they finish."""
    results: dict[int, R] = {}
    if journal is not None:
        done = journal.load()
        for index, item in enumerate(items):
            if journal.key(item) in done:
                results[index] = done[journal.key(item)]
        if results:
            log.info("resuming: %d of %d items already done (%s)", len(results), len(items), journal.path)
            if progress is not None:
                progress.update(len(results))
    pending = [i for i in range(len(items)) if i not in results]
    layout = data_parallel_layout()
    if layout is None:
        for index in pending:
            results[index] = fn(items[index])
            if journal is not None:
                journal.record([(items[index], results[index])])
            if progress is not None:
                progress.update(1)
        return [results[i] for i in range(len(items))]
    import torch.distributed as dist

    rank, size, group = layout
    # One item per replica per round, gathered after each round so that finished items
    # reach the journal while the sweep goes on.
    for start in range(0, len(pending), size):
        batch = pending[start:start + size]
        mine = [(batch[rank], fn(items[batch[rank]]))] if rank < len(batch) else []
        gathered: list = [None] * size
        dist.all_gather_object(gathered, mine, group=group)
        finished = [pair for part in gathered for pair in part]
        for index, value in finished:
            results[index] = value
        if journal is not None:
            journal.record([(items[index], value) for index, value in finished])
        if progress is not None:
            progress.update(len(finished))
    return [results[i] for i in range(len(items))]
