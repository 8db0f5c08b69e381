"""Test helpers run inside gloo ranks: full logits and full weights of a GPTModel at any TP/PP.

Kept deliberately plain (explicit send/recv between two pipeline stages, all-gather over
TP) so the tests compare megatron-core's model itself, not another harness.
"""

from __future__ import annotations

import torch


def switch_layout(tp: int, pp: int, seed: int = 1):
    """(Re)initialise megatron-core's parallel groups for this layout in a running job."""
    from megatron.core import parallel_state as ps

    from megatron_longsky.runtime.distributed import ParallelConfig, initialize

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    return initialize(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), seed=seed)


def current_layout():
    from megatron.core import parallel_state as ps

    from megatron_longsky.runtime.distributed import ParallelConfig

    return ParallelConfig(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                          pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size())


def load_checkpoint_model(root):
    """Build the model a checkpoint describes at the current layout and load its weights."""
    from megatron_longsky.checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
    from megatron_longsky.model import build_model, model_config_from_dict

    ckpt = resolve_checkpoint(root)
    cfg = model_config_from_dict(read_checkpoint_config(ckpt)["model"])
    model = build_model(cfg, current_layout(), cfg.vocab_size, initialize=False)
    load_model_weights(model, ckpt)
    return model.eval()


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor):
    """[b, s, padded vocab] logits on the last pipeline stage (None on other stages)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, position_ids, None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out.float().clone()


@torch.no_grad()
def full_weights(model) -> dict[str, torch.Tensor]:
    """This stage's parameters as FULL tensors keyed by global name (TP shards gathered)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_longsky.convert.mapping import is_gated_fc1
    from megatron_longsky.model.init import global_parameter_names

    tp = ps.get_tensor_model_parallel_world_size()
    names = global_parameter_names(model)
    out = {}
    for local, param in model.named_parameters():
        t = param.detach()
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            if is_gated_fc1(local):
                halves = [p.chunk(2, dim=0) for p in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                t = torch.cat(parts, dim=dim)
        out[names[local]] = t.clone()
    return out
