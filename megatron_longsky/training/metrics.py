"""Training metrics: console, ``metrics.jsonl`` and TensorBoard.

FLOPs and device peaks come from :mod:`megatron_longsky.plan.flops` (the one FLOP model,
shared with ``longsky plan``). Each step records ``tflops_per_device`` (model FLOPs per
second per process), ``mfu`` (model FLOPs / peak) and ``hfu`` (hardware FLOPs, i.e. with
activation recomputation, / peak). The peak is ``logging.peak_tflops_per_device`` or the
datasheet figure of the detected GPU at the run's GEMM precision (FP8 when ``model.fp8``);
when neither is known, MFU and HFU are shown as "unknown peak".

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU, the process's peak RSS
(``ru_maxrss``) on CPU.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Optional

import torch

from megatron_longsky.errors import UserError
from megatron_longsky.model.config import ModelConfig
from megatron_longsky.runtime.device import use_cuda

log = logging.getLogger(__name__)

def peak_memory_gib() -> float:
    if use_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resolve_peak_tflops(explicit: Optional[float], model: ModelConfig) -> tuple[Optional[float], str]:
    """(peak TFLOP/s per device or None, what it is): the configured peak, else the detected
    GPU's datasheet peak at this run's GEMM precision."""
    from megatron_longsky.plan.flops import UnknownPeakError, device_peak_tflops, gemm_precision

    precision = gemm_precision(model, on_gpu=use_cuda())
    if explicit:
        return explicit, f"logging.peak_tflops_per_device={explicit:g}"
    device = torch.cuda.get_device_name() if use_cuda() else "cpu"
    try:
        peak = device_peak_tflops(device, precision)
    except UnknownPeakError:
        return None, (f"unknown peak for {device} at {precision}: MFU/HFU not computed "
                      "(set logging.peak_tflops_per_device)")
    return peak, f"{device} {precision} peak {peak:g} TFLOP/s"


class MetricsLogger:
    """Writes one JSON line per step to ``metrics.jsonl`` and, every ``log_interval`` steps,
    a console line and TensorBoard scalars. Only the writing rank (global rank 0) writes."""

    def __init__(self, output_dir: str | Path, log_interval: int, tensorboard: bool, enabled: bool,
                 resume_iteration: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.log_interval = log_interval
        self.enabled = enabled
        self.writer = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_iteration)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                        purge_step=resume_iteration + 1 if resume_iteration else None)

    def _truncate_after(self, iteration: int) -> None:
        """Drop records of steps a resumed run will redo (they were lost with the process)."""
        if not self.path.exists():
            return
        from megatron_longsky.utils.atomic import atomic_write_text

        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("iteration", 0) <= iteration:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        it = record["iteration"]
        if it % self.log_interval:
            return
        if self.writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, it)
            self.writer.flush()
        log.info(format_record(record))

    def log_eval(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"iteration": iteration, "valid_loss": loss}) + "\n")
        self._file.flush()
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, iteration)
        log.info("iteration %d: valid loss %.4f", iteration, loss)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def format_record(r: dict) -> str:
    parts = [f"iter {r['iteration']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}",
             f"grad_norm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "grad_norm -",
             f"{r['tokens_per_s']:.0f} tok/s", f"{r['tflops_per_device']:.3f} TFLOP/s/dev"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}% HFU {100 * r['hfu']:.1f}%")
    else:
        parts.append("MFU/HFU unknown peak")
    parts += [f"mem {r['peak_memory_gib']:.2f} GiB", f"data wait {100 * r['data_wait_fraction']:.1f}%"]
    if r.get("skipped"):
        parts.append("SKIPPED (non-finite loss)")
    return " | ".join(parts)


class MetricsFileError(UserError, ValueError):
    """A metrics.jsonl that is not what ``longsky train`` writes; names the file and line."""


def read_metric_records(path: str | Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order. A line torn by a killed run is
    skipped; anything else that is not a record (or holds a non-number loss) is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsFileError(f"{path}: not a metrics.jsonl (not UTF-8 text at byte {exc.start})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        except RecursionError:
            raise MetricsFileError(f"{path}:{number}: JSON nested too deeply (not a metrics record)") from None
        iteration = record.get("iteration") if isinstance(record, dict) else None
        if not isinstance(iteration, int) or isinstance(iteration, bool):
            raise MetricsFileError(f"{path}:{number}: not a training metrics record (needs an integer 'iteration')")
        for key in ("loss", "valid_loss"):
            value = record.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise MetricsFileError(f"{path}:{number}: {key!r} must be a number, got {value!r}")
        records.append(record)
    return records


def read_metrics(path: str | Path) -> list[dict]:
    """Training records of a metrics.jsonl (the last record of each iteration wins)."""
    by_iter = {r["iteration"]: r for r in read_metric_records(path) if "loss" in r}
    return [by_iter[k] for k in sorted(by_iter)]
