"""Stage bookkeeping for the quickstart: timing, results on disk, resumable runs.

Each stage's results are stored in ``<run>/state.json`` as soon as it finishes, so
an interrupted quickstart resumes after its last finished stage and the report is
always rebuilt from what really ran.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_longsky.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class StageRecord:
    name: str
    seconds: float
    results: dict = field(default_factory=dict)
    # CPU seconds of this process and its children (the stage's subprocesses): on a
    # shared machine, wall time is inflated and CPU time / cores is the idle estimate.
    cpu_seconds: float = 0.0


class StageRunner:
    def __init__(self, run_dir: Path, fingerprint: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.run_dir / "state.json"
        self.fingerprint = fingerprint
        self.records: dict[str, StageRecord] = {}
        self._load()

    def _load(self) -> None:
        if not self.state_path.exists():
            return
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != self.fingerprint:
            log.info("quickstart settings changed since the last run in %s: starting over", self.run_dir)
            return
        for name, rec in state.get("stages", {}).items():
            self.records[name] = StageRecord(name, rec["seconds"], rec["results"], rec.get("cpu_seconds", 0.0))

    def _save(self) -> None:
        atomic_write_json(
            self.state_path,
            {
                "fingerprint": self.fingerprint,
                "stages": {n: {"seconds": r.seconds, "cpu_seconds": r.cpu_seconds, "results": r.results}
                           for n, r in self.records.items()},
            },
        )

    def run(self, name: str, fn: Callable[[], dict]) -> dict:
        if name in self.records:
            log.info("stage %s: done in an earlier run, reusing its results", name)
            return self.records[name].results
        log.info("stage %s: starting", name)
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        results = fn() or {}
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        self.records[name] = StageRecord(name, seconds, results, cpu)
        self._save()
        log.info("stage %s: finished in %.1fs (%.1f CPU seconds)", name, seconds, cpu)
        return results

    def results(self, name: str) -> dict:
        return self.records[name].results if name in self.records else {}

    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records.values())

    def total_cpu_seconds(self) -> float:
        return sum(r.cpu_seconds for r in self.records.values())


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
