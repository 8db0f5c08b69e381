"""RMSNorm for the megatron-core local layer spec, with sequence parallelism.

megatron-core 0.16.1's local spec always takes ``WrappedTorchNorm`` for RMSNorm
(``megatron/core/models/backends.py``, ``LocalSpecProvider.layer_norm``), and that wrapper
asserts ``not config.sequence_parallel`` and ``not config.persist_layer_norm``
(``megatron/core/transformer/torch_norm.py``): a GPU run without Transformer Engine, or any
run with ``parallel.sequence_parallel``, could not even build its layers.

:class:`LongSkyRMSNorm` computes what ``torch.nn.RMSNorm`` computes (``F.rms_norm``, the
same single ``weight`` parameter, so state dicts and checkpoints are unchanged) and supports
sequence parallelism the way megatron-core's own norms do (``fusions/fused_layer_norm.py``,
``FusedLayerNorm``): with ``config.sequence_parallel`` each TP rank normalises its own
slice of the sequence, so its weight gradient is partial; the weight carries
``sequence_parallel = True`` and megatron-core's ``finalize_model_grads``
(``distributed/finalize_model_grads.py``, ``_allreduce_non_tensor_model_parallel_grads``)
then sums those gradients over the TP group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LongSkyRMSNorm(torch.nn.Module):
    """``y = x / rms(x) * weight`` over the last dimension (megatron-core's norm signature)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        # persist_layer_norm selects apex's persistent kernel (FusedLayerNorm); this norm has
        # one kernel, so the flag would mean nothing here (model/build.py leaves it off for the
        # local spec). The two settings below would change the arithmetic: refuse them.
        if config.normalization != "RMSNorm":
            raise ValueError(f"LongSkyRMSNorm is an RMSNorm; the config asks for {config.normalization}")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("LongSkyRMSNorm has no zero-centred gamma (layernorm_zero_centered_gamma)")
        if config.memory_efficient_layer_norm:
            raise ValueError("LongSkyRMSNorm has no memory-efficient variant (memory_efficient_layer_norm)")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.sequence_parallel = bool(config.sequence_parallel)
        # Read by finalize_model_grads: all-reduce (sum) this gradient over the TP group.
        setattr(self.weight, "sequence_parallel", self.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel}"
