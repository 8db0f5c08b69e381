"""Measure per-process memory of one training step on CPU, to validate the planner.

Method: torch's CPU allocator reports every allocation and free (with its size) to the
profiler when ``profile_memory=True``. Summing those signed sizes in time order gives the
bytes live at each moment relative to the start of a phase; its maximum is the phase's
peak and its final value what the phase left allocated. The phases are:

- build the model (net: parameters),
- wrap it in megatron-core DDP (net: the gradient buffer; with the distributed optimizer
  also the contiguous parameter buffer that replaces the parameters' own storage),
- build the optimizer and take one step (net: optimizer states, allocated lazily),
- one forward + backward of a micro batch (peak above the start: activations and the
  transient tensors of the loss and backward).

Also recorded: the bytes of distinct storages autograd saves for backward during the
forward (a ``saved_tensors_hooks`` count, parameters excluded), which is what the
per-layer activation formulas describe.

Must run inside an initialised runtime (``runtime.distributed.initialize``).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch


@dataclass
class MeasuredStep:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_peak_bytes: int  # peak of forward+backward above the memory live before it
    saved_activation_bytes: int  # distinct non-parameter storages saved for backward
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


class AllocationTrace:
    """Signed CPU allocation sizes seen by the profiler while the context is open."""

    def __init__(self):
        self.net = 0
        self.peak = 0

    @contextlib.contextmanager
    def record(self):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield self
        # Only host allocations (device_type() is a DeviceType enum).
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.net, self.peak = live, peak


def _trace(fn):
    trace = AllocationTrace()
    with trace.record():
        result = fn()
    return trace, result


@contextlib.contextmanager
def count_saved_storages(exclude: set[int], into: dict[int, int]):
    """Record (storage pointer -> bytes) of tensors autograd saves, except ``exclude``."""

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and storage.nbytes() > 0:
            into[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield into


def measure_step(model_cfg, parallel, vocab_size: int, micro_batch_size: int, seq_length: int,
                 use_distributed_optimizer: bool = False, seed: int = 0) -> MeasuredStep:
    """Build the model, DDP and Adam on this process and run one step; see module doc."""
    import gc

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_longsky.model.build import build_model, transformer_config

    gc.collect()
    built, model = _trace(lambda: build_model(model_cfg, parallel, vocab_size))
    tcfg = transformer_config(model_cfg, parallel)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer,
                                               grad_reduce_in_fp32=True)
    wrapped, model = _trace(lambda: DistributedDataParallel(tcfg, ddp_config, model))
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-4, use_distributed_optimizer=use_distributed_optimizer,
                                 bf16=tcfg.bf16, fp16=tcfg.fp16, params_dtype=tcfg.params_dtype)

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length), generator=gen)
    labels = torch.roll(tokens, -1, 1)
    position_ids = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1)
    batch = {"tokens": tokens, "labels": labels, "position_ids": position_ids}
    if ps.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch)

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def forward_backward():
        # Saved tensors are counted in the forward only (recomputation in the backward
        # saves again, transiently).
        with count_saved_storages(param_ptrs, saved):
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            loss = output.float().sum() / output.numel()
        loss.backward()
        return loss.detach()

    model.zero_grad_buffer()
    gc.collect()
    stepped, loss = _trace(forward_backward)
    # Gradient all-reduce / reduce-scatter outside the traces: its communication buffers
    # may be freed after a trace ends, which would count them as optimizer state.
    model.finish_grad_sync()
    gc.collect()
    # The optimizer's states appear at its first step; measured after the backward above
    # so the step sees real gradients.
    optimizer_trace, _ = _trace(lambda: _build_and_step(opt_config, model, get_megatron_optimizer))
    return MeasuredStep(
        params_bytes=built.net,
        grads_bytes=wrapped.net,
        optimizer_bytes=optimizer_trace.net,
        activation_peak_bytes=stepped.peak,
        saved_activation_bytes=sum(saved.values()),
        loss=float(loss),
    )


def _build_and_step(opt_config, model, get_megatron_optimizer):
    optimizer = get_megatron_optimizer(opt_config, [model])
    optimizer.step()
    # Keep the optimizer (and so its states) alive past the trace.
    model._longsky_measured_optimizer = optimizer
    return optimizer
