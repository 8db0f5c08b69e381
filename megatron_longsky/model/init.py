"""Layout-invariant weight initialisation.

megatron-core's ``use_cpu_initialization`` draws each full weight and splits it over TP,
but every pipeline stage re-seeds, so a PP=2 model differs from a PP=1 model with the
same seed. Here each parameter's FULL tensor is drawn from its own generator, seeded by
(seed, global parameter name with the global layer number), and this rank keeps its
TP shard. The same seed therefore gives the same full weights at any TP/PP layout.

Distribution (as megatron-core's defaults): normal(0, std) for weights, normal(0,
std / sqrt(2 * num_layers)) for the projections into the residual stream (attention
``linear_proj`` and MLP ``linear_fc2``), normal(0, embedding_std) for the word embedding
when given (and the output layer when tied to it), ones for norm weights, zeros for biases.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from megatron_longsky.model.parameters import MEGATRON_GLOBAL, canonical_layer_name, tp_shard

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def global_parameter_names(model) -> dict[str, str]:
    """Local parameter name -> layout-independent global name.

    ``decoder.layers.{local}.X`` becomes ``decoder.layers.{global}.X`` (TE norm names
    mapped to the local spec's), and a tied output layer takes the embedding's name so
    the first and last pipeline stages draw the same tensor.
    """
    from megatron_longsky.checkpoint.model_io import unwrap

    model = unwrap(model)
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    offsets = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    names = {}
    for name, _ in model.named_parameters():
        match = _LAYER_RE.match(name)
        if match:
            local, rest = int(match.group(1)), match.group(2)
            names[name] = f"decoder.layers.{offsets[local]}.{canonical_layer_name(rest)}"
        elif name == MEGATRON_GLOBAL["head"] and tied:
            names[name] = MEGATRON_GLOBAL["embed"]
        else:
            names[name] = name
    return names


def _generator(seed: int, name: str) -> torch.Generator:
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@torch.no_grad()
def initialize_weights(model, seed: int, std: float, num_layers: int,
                       embedding_std: float | None = None) -> None:
    """Fill every parameter of ``model`` (this rank's stage and TP shard) deterministically."""
    from megatron.core import parallel_state

    from megatron_longsky.checkpoint.model_io import unwrap

    bare = unwrap(model)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    residual_std = std / math.sqrt(2.0 * num_layers)
    names = global_parameter_names(bare)
    for local_name, param in bare.named_parameters():
        name = names[local_name]
        parallel = bool(getattr(param, "tensor_model_parallel", False))
        dim = int(getattr(param, "partition_dim", -1)) if parallel else -1
        full_shape = list(param.shape)
        if dim >= 0:
            full_shape[dim] *= tp_size
        if param.dim() == 1:
            is_norm = name.endswith("norm.weight") or name.endswith("layer_norm_weight")
            param.fill_(1.0 if is_norm else 0.0)
            continue
        scale = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else std
        if name == MEGATRON_GLOBAL["embed"] and embedding_std is not None:
            scale = embedding_std
        full = torch.randn(full_shape, generator=_generator(seed, name), dtype=torch.float32) * scale
        param.copy_(tp_shard(name, full, dim, tp_rank, tp_size).to(param.dtype))
