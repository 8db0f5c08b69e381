"""Forward-only evaluation of our Megatron checkpoints with TP / PP / CP.

Every rank of the job runs the same evaluation loop in lockstep (prompts are
deterministic), and every rank gets the same logits back:

- the sequence is right-padded to a multiple of 2*CP (causal attention: padding at
  the end changes no earlier logit), and with CP>1 each rank keeps its two zig-zag
  chunks (megatron-core's ``get_batch_on_this_cp_rank``);
- the pipeline runs through megatron-core's schedule with ``forward_only=True``;
- the LM head runs on the wanted positions only (a pre-hook on ``output_layer``), so
  the long ``[s, vocab]`` logits are never computed; each CP rank writes the rows it
  owns into a zero tensor of the wanted rows, summed over the CP group; the
  vocabulary shards are gathered over TP, padding columns dropped, and the result is
  broadcast from the last pipeline stage.

NLL uses the model's own vocab-parallel cross entropy (``labels=``), so perplexity
at long lengths never materialises full logits either.

Greedy generation keeps a KV cache (megatron-core's ``StaticInferenceContext``: one
prefill pass, then one token per step) when the job has one pipeline stage, CP=1, no
sequence parallelism and no FP8; other layouts recompute the prefix for every new token
(exact, but about (answer tokens) x slower).

Precision: bfloat16 on a GPU and the checkpoint's ``params_dtype`` on CPU (``--dtype``
chooses), and no FP8,
whatever the training config said (``fp8: hybrid`` rides along in ``config.yaml``): FP8
GEMMs need their token count divisible by 16, which one-token decode steps and unpadded
prompts break. ``fp8=`` asks for FP8 anyway; then sequences are padded to a multiple of
16 x CP (as megatron-core's FP8 inference pads) and generation recomputes instead of
decoding one token at a time.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_longsky.config import ConfigError
from megatron_longsky.eval.backends import LogitsBackend, check_rows, greedy_decode
from megatron_longsky.runtime.device import current_device
from megatron_longsky.runtime.distributed import ParallelConfig

log = logging.getLogger(__name__)


def padded_vocab_for_checkpoint(ckpt_config: dict, model_cfg, tokenizer_vocab: Optional[int] = None) -> int:
    """The (padded) vocabulary size the checkpoint's embedding was saved with: the
    recorded ``model.vocab_size`` (our trainer and converter write it), else the
    tokenizer's size padded the way training did (by the model config, whatever the layout)."""
    if model_cfg.vocab_size:
        return int(model_cfg.vocab_size)
    vocab = tokenizer_vocab or (ckpt_config.get("tokenizer") or {}).get("vocab_size")
    if not vocab:
        raise ValueError("checkpoint config records no model.vocab_size and no tokenizer vocabulary size is known")
    return model_cfg.padded_vocab_size(int(vocab))


def evaluation_model_config(ckpt_config: dict, where: str, fp8: Optional[str] = None,
                            dtype: Optional[str] = None, on_gpu: Optional[bool] = None):
    """The checkpoint's model config for evaluation: FP8 (and FP8 attention) only when asked;
    the dtype ``dtype`` if given, else bfloat16 on a GPU (Transformer Engine's Flash and Fused
    attention take bf16/fp16 only, and a float32 checkpoint, such as an import, would have no
    attention backend at CP > 1: attention/te_rules.py) and the checkpoint's on CPU."""
    import dataclasses

    from megatron_longsky.model import model_config_from_dict
    from megatron_longsky.runtime.device import use_cuda

    model_cfg = model_config_from_dict(ckpt_config.get("model") or {}, where=where)
    on_gpu = use_cuda() if on_gpu is None else on_gpu
    chosen = dtype or ("bfloat16" if on_gpu else model_cfg.resolved_dtype(on_gpu=False))
    if chosen != model_cfg.params_dtype:
        log.info("evaluating in %s (the checkpoint holds %s%s)", chosen, model_cfg.params_dtype,
                 "" if dtype else "; pass --dtype to choose")
    if model_cfg.fp8 and not fp8:
        log.info("evaluating in %s without FP8 (the checkpoint trained with fp8=%s; pass --fp8 to keep it)",
                 chosen, model_cfg.fp8)
    return dataclasses.replace(model_cfg, fp8=fp8, fp8_attention=model_cfg.fp8_attention if fp8 else "off",
                               params_dtype=chosen)


class MegatronBackend(LogitsBackend):
    """A megatron-core GPTModel (one pipeline stage per rank) as an :class:`LMBackend`.

    ``vocab_size`` is the tokenizer's real vocabulary: logits of padding entries are dropped.
    """

    def __init__(self, model, vocab_size: int):
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("initialise megatron_longsky.runtime.distributed first")
        from megatron_longsky.checkpoint.model_io import unwrap

        self.model = model.eval()  # may be wrapped (DDP, Float16Module) as in training
        self.vocab_size = vocab_size
        self.config = unwrap(model).config
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(self.config.sequence_parallel)
        self.fp8 = bool(self.config.fp8)
        self.kv_cache = (self.cp_size == 1 and not self.sequence_parallel and not self.fp8
                         and parallel_state.get_pipeline_model_parallel_world_size() == 1)
        # Inputs and collectives live where the model does (NCCL needs CUDA tensors).
        self.device = current_device()

    @classmethod
    def from_checkpoint(cls, path: str | Path, parallel: ParallelConfig,
                        vocab_size: Optional[int] = None, fp8: Optional[str] = None,
                        dtype: Optional[str] = None) -> "MegatronBackend":
        """Build the model the checkpoint describes at this job's TP/PP/CP, on this process's
        device, without FP8 (unless ``fp8`` is given), in ``dtype`` (default: bfloat16 on a GPU,
        the checkpoint's on CPU, see :func:`evaluation_model_config`), and load it."""
        from megatron_longsky.checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
        from megatron_longsky.model import build_model

        ckpt_dir = resolve_checkpoint(path)
        ckpt_config = read_checkpoint_config(ckpt_dir)
        model_cfg = evaluation_model_config(ckpt_config, f"{ckpt_dir}/config.yaml:model", fp8, dtype)
        padded = padded_vocab_for_checkpoint(ckpt_config, model_cfg, vocab_size)
        if padded % parallel.tensor_model_parallel_size:
            raise ConfigError(f"--tp {parallel.tensor_model_parallel_size}: the padded vocabulary {padded} of "
                              f"{ckpt_dir} does not divide by it")
        # No random initialisation: every weight comes from the checkpoint.
        model = build_model(model_cfg, parallel, padded, initialize=False, device=current_device())
        load_model_weights([model], ckpt_dir)
        real_vocab = vocab_size or int((ckpt_config.get("tokenizer") or {}).get("vocab_size") or padded)
        log.info("Megatron backend: %s (padded vocab %d, TP=%d PP=%d CP=%d, %s, fp8=%s, on %s)", ckpt_dir, padded,
                 parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                 parallel.context_parallel_size, model_cfg.params_dtype, model_cfg.fp8, current_device())
        return cls(model, real_vocab)

    # -- one forward pass over the pipeline -------------------------------------------

    def _padded_length(self, length: int) -> int:
        multiple = 2 * self.cp_size
        if self.fp8:  # FP8 GEMMs: each rank's token count divisible by 16
            multiple = 16 * self.cp_size
        if self.sequence_parallel:
            multiple *= self.tp_size
        return -(-length // multiple) * multiple

    def _run(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]):
        """Forward ``tokens [b, s_padded]``; the last stage's local output, else None."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_batch_on_this_cp_rank

        b, s = tokens.shape
        position_ids = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s).contiguous()
        batch = {"tokens": tokens.to(self.device), "position_ids": position_ids,
                 "labels": None if labels is None else labels.to(self.device)}
        batch = get_batch_on_this_cp_rank(batch)

        def forward_step(data_iterator, model):
            data = next(data_iterator)
            out = model(data["tokens"], data["position_ids"], None, labels=data["labels"])
            return out, lambda output, non_loss_data=True: output.detach()

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[self.model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
            collect_non_loss_data=True,
        )
        return outputs[0] if outputs else None

    def _local_positions(self, seq_len: int) -> torch.Tensor:
        """Global positions of this rank's rows of a ``seq_len`` sequence (zig-zag under CP)."""
        from megatron_longsky.attention.context_parallel import zigzag_positions

        return zigzag_positions(seq_len, self.cp_size, self.cp_rank, self.device)

    @contextlib.contextmanager
    def _output_rows_only(self, index: Optional[torch.Tensor]):
        """Run the LM head on the local rows ``index`` only (a pre-hook on ``output_layer``).

        Not with sequence parallelism: there the head's input is still sharded over TP."""
        from megatron_longsky.checkpoint.model_io import unwrap

        layer = getattr(unwrap(self.model), "output_layer", None)
        if index is None or layer is None or self.sequence_parallel:
            yield False
            return

        def keep_rows(module, args, kwargs):
            return (args[0].index_select(0, index),) + tuple(args[1:]), kwargs

        handle = layer.register_forward_pre_hook(keep_rows, with_kwargs=True)
        try:
            yield True
        finally:
            handle.remove()

    def _assemble(self, rows: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
        """``[b, n, ...]`` from this rank's ``rows`` at ``offsets``, summed over the CP group
        (each wanted row lives on exactly one CP rank; the others contribute zeros)."""
        from megatron.core import parallel_state

        rows = rows.float()
        if self.cp_size == 1:
            return rows
        out = torch.zeros((rows.shape[0], n) + tuple(rows.shape[2:]), dtype=torch.float32, device=rows.device)
        out[:, offsets] = rows
        torch.distributed.all_reduce(out, group=parallel_state.get_context_parallel_group())
        return out

    def _broadcast_from_last_stage(self, tensor: Optional[torch.Tensor], shape) -> torch.Tensor:
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            if tensor is None:
                tensor = torch.empty(shape, dtype=torch.float32, device=self.device)
            torch.distributed.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return tensor.cpu()

    @torch.no_grad()
    def logits(self, token_ids: list[list[int]], last_n: Optional[int] = None) -> torch.Tensor:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        length = check_rows(token_ids)
        n = length if last_n is None else min(last_n, length)
        s = self._padded_length(length)
        tokens = torch.zeros(len(token_ids), s, dtype=torch.long)
        tokens[:, :length] = torch.tensor(token_ids, dtype=torch.long)
        positions = self._local_positions(s)
        index = ((positions >= length - n) & (positions < length)).nonzero().squeeze(1)
        with self._output_rows_only(index) as sliced:
            local = self._run(tokens, None)  # [b, rows, vocab / TP] on the last stage
        rows = None
        if local is not None:
            local = local if sliced else local.index_select(1, index)
            rows = self._assemble(local, positions[index] - (length - n), n)
            if self.tp_size > 1:
                rows = gather_from_tensor_model_parallel_region(rows)
            rows = rows[..., : self.vocab_size].contiguous()
        return self._broadcast_from_last_stage(rows, (len(token_ids), n, self.vocab_size))

    @torch.no_grad()
    def token_nll(self, token_ids: list[int]) -> torch.Tensor:
        length = check_rows([token_ids])
        if length < 2:
            raise ValueError("token_nll needs at least two tokens")
        s = self._padded_length(length)
        tokens = torch.zeros(1, s, dtype=torch.long)
        tokens[0, :length] = torch.tensor(token_ids, dtype=torch.long)
        labels = torch.zeros(1, s, dtype=torch.long)
        labels[0, : length - 1] = tokens[0, 1:length]
        local = self._run(tokens, labels)  # [1, s_local] per-token loss, TP-reduced
        rows = None
        if local is not None:
            positions = self._local_positions(s)
            index = (positions < length - 1).nonzero().squeeze(1)
            rows = self._assemble(local.index_select(1, index), positions[index], length - 1)
        return self._broadcast_from_last_stage(rows, (1, length - 1))[0]

    # -- greedy generation -----------------------------------------------------------

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int,
                        stop_ids: Sequence[int] = (), vocab_size: Optional[int] = None) -> list[int]:
        if not self.kv_cache:
            return super().generate_greedy(prompt_ids, max_new_tokens, stop_ids, vocab_size)
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt_ids) + max_new_tokens)

        def forward(new_ids: list[int]) -> torch.Tensor:
            start = context.sequence_len_offset
            tokens = torch.tensor([new_ids], dtype=torch.long, device=self.device)
            positions = torch.arange(start, start + len(new_ids), device=self.device).unsqueeze(0)
            # Static batching: only the last position's logits, gathered over TP.
            logits = self.model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += len(new_ids)
            return logits[0, -1, : self.vocab_size]

        return greedy_decode(forward, prompt_ids, max_new_tokens, stop_ids, vocab_size)
