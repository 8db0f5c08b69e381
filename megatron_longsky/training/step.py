"""One forward step for megatron-core's pipeline schedules, and the per-token loss.

Loss contract (megatron-core 0.16.1, ``TransformerConfig.calculate_per_token_loss=True``):
the loss function returns ``(loss_sum, num_tokens, report)``. The schedule backpropagates
``loss_sum`` unscaled and adds up ``num_tokens`` over micro-batches; ``finalize_model_grads``
all-reduces the token count over data(+context)-parallel ranks and divides the gradients
by it. The gradient is therefore that of the mean over every loss token of the global
batch, whatever the TP/PP/DP split and micro-batching, and a rank or micro-batch holding
no loss tokens contributes 0 / 0 nowhere (no NaN). The reported loss is
``sum(loss_sum) / sum(num_tokens)`` over the same global batch (:func:`reduce_loss`).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Iterator

import torch

from megatron_longsky.training.batch import prepare_batch


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token losses [b, s] -> (sum over loss tokens, token count, {'lm loss': [sum, count]})."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model, device: torch.device | str = "cpu"):
    """The ``forward_step_func`` handed to ``get_forward_backward_func()``."""
    inputs = prepare_batch(next(data_iterator), device)
    output = model(
        inputs.tokens,
        inputs.position_ids,
        inputs.attention_mask,
        labels=inputs.labels,
        packed_seq_params=inputs.packed_seq_params,
    )
    # Looked up at call time so tests can wrap the loss (e.g. to inject non-finite values).
    return output, partial(_loss_function(), inputs.loss_mask)


def _loss_function():
    return masked_token_loss


def reduce_loss(loss_reports: list[dict]) -> tuple[float, float]:
    """(mean loss, loss tokens) of the global batch; collective over all ranks.

    Reports exist on the last pipeline stage only: they are summed over micro-batches,
    all-reduced over data(+context)-parallel ranks, then broadcast along the pipeline
    so every rank agrees (and skips a non-finite step together).
    """
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64)
    for report in loss_reports:
        total += report["lm loss"].double().cpu()
    device = _collective_device()
    total = total.to(device)
    if ps.is_pipeline_last_stage():
        torch.distributed.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    loss_sum, count = (float(x) for x in total.cpu())
    if count == 0:
        return (0.0 if loss_sum == 0 else float("nan")), 0.0
    return loss_sum / count, count


def _collective_device() -> torch.device:
    from megatron_longsky.runtime.device import current_device

    return current_device()


class TimedIterator:
    """Wraps the micro-batch iterator and adds up the time spent waiting for data."""

    def __init__(self, iterator: Iterator):
        self.iterator = iterator
        self.wait_seconds = 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.wait_seconds += time.perf_counter() - start
