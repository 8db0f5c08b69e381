"""Per-GPU memory of a training job: model states and activations.

States (bytes per parameter held by a rank; ``DP`` = data-parallel size):

===========================  =========================  ================================
                             params fp32                params bf16/fp16 (mixed precision)
===========================  =========================  ================================
parameters                   4                          2
gradients (DDP main grads)   4                          4 (fp32 buffer, grad_reduce_in_fp32)
Adam states (m, v)           8 (/ DP with dist. opt.)   8 (/ DP)
fp32 master copy             0                          4 (/ DP)
===========================  =========================  ================================

FP8 training (``model.fp8``, Transformer Engine): each TE linear layer keeps its weight cast
to FP8 between micro-batches (``get_weight_workspace(cache_name="weight")`` in TE's
``module/linear.py`` / ``layernorm_linear.py`` / ``layernorm_mlp.py``), in row-wise and, for
the backward's GEMMs on Hopper, column-wise (transposed) form: 2 bytes per transformer-layer
linear weight on top of the table (the embedding and output layer stay in BF16).

megatron-core's distributed optimizer (ZeRO-1) shards only the optimizer states, over
the data-parallel group *with* context parallelism (DP x CP ranks hold the same weights);
the parameter and gradient buffers stay whole on every rank.

Checkpoints (:func:`checkpoint_memory`): the fully parallel save/load wrappers spread the
writes and reads over the DP x CP replicas. The distributed optimizer's 'dp_reshardable'
form writes each rank's own fp32 shard (param, exp_avg, exp_avg_sq) with no copy; the
'fully_reshardable' form first gathers the whole TP/PP shard's state into host memory on
every rank (three fp32 buffers) through one bucket-sized fp32 GPU buffer at a time
(``get_parameter_state_dp_zero``). An async save stages each rank's write share in host
memory.

Activations follow Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
Transformer Models", re-derived for a Llama layer (RMSNorm, GQA, RoPE, SwiGLU, no
biases, no dropout) from the tensors autograd actually saves in megatron-core's layers
(checked with ``saved_tensors_hooks``, see :mod:`megatron_longsky.plan.measure`). Per layer
and per token on a rank (``t = s / CP`` tokens, ``T`` = TP size, ``S`` = T with sequence
parallelism else 1, ``h`` hidden, ``a`` heads, ``g`` KV groups, ``d`` head dim, ``f`` FFN
size, ``B`` activation bytes):

* each RMSNorm: input, normalised input, weighted output (= next linear's input): ``6 h / S``
* SwiGLU: fc1 output ``2 f / T``; SiLU input and output, the up half, fc2 input: ``3 f / T``
  (measured: the gate/up halves are saved as separate tensors)
* attention output (``linear_proj`` input) ``h / T``; softmax log-sum-exp ``4 a / T`` bytes
* core attention, ``te`` (Transformer Engine, GPU): q and k after (fused) RoPE and v (a
  view that keeps the fused QKV output alive); its output is the ``linear_proj`` input
  above; with CP > 1 the K/V of the whole sequence (counted as all-gathered: an upper
  bound for TE's ring).
  With FP8 attention (``model.fp8_attention``, TE) q, k, v and the output are kept as FP8
  copies (1 byte) instead; ``multi_head`` also hands ``linear_proj`` an FP8 input.
* core attention, ``longsky`` (ours, no TE): megatron-core's unfused RoPE keeps cos and sin
  (``4 d``); for a short CP=1 sequence (``DENSE_MAX_TOKENS``), one SDPA call keeps q, K/V repeated to every
  head over the gathered sequence, its output and a fp32 ``t x s`` mask; otherwise the
  blockwise kernel keeps q (groups folded), the gathered K and V, its output and positions.

Selective recomputation (megatron-core's ``core_attn``) keeps only core attention's inputs
(q, k and the QKV output v views) and rebuilds the rest during the backward;
full recomputation keeps only each checkpointed block's input (``h / S`` per token) and
rebuilds one block's activations during its backward. The last pipeline stage also holds
the output layer: final norm and the cross-entropy's fp32 softmax over ``V / T`` (megatron-
core computes it in the logits' place and reuses it as their gradient). Pipeline
parallelism with 1F1B keeps ``min(PP, micro-batches)`` micro-batches in flight on the
first stage.

Peak = states + stored activations + the largest working set of the backward: either the
output layer (freed by the loss backward before any layer's backward starts) or a layer's
q/k/v and hidden-state gradients, plus with blockwise attention six fp32 block x block
score-sized temporaries per head (the layer's MLP half is already freed by then), plus
under full recomputation the rebuilt layer. The CPU validation (tests/test_plan.py,
docs/plan.md) checks these against measured allocations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional

from megatron_longsky.model.config import ModelConfig, check_parallel_layout

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


@dataclass
class PlanInput:
    """Everything the estimate depends on (``plan.cli.plan_input`` builds it from a TrainConfig)."""

    model: ModelConfig
    vocab_size: int
    micro_batch_size: int = 1
    num_microbatches: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1
    data_parallel: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # 'te': Transformer Engine's fused attention (GPU); 'longsky': our core attention
    # (CPU / no TE): one SDPA call for a short sequence (DENSE_MAX_TOKENS), else blockwise.
    attention: Literal["te", "longsky"] = "te"
    # Our attention's block size (None: its default, LongSkyCoreAttention's DEFAULT_BLOCK_SIZE).
    attention_block_size: Optional[int] = None

    def __post_init__(self):
        m = self.model
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel", "data_parallel",
                     "micro_batch_size", "num_microbatches", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_parallel_layout(m, self.tensor_parallel, self.pipeline_parallel, self.context_parallel)

    @property
    def param_bytes(self) -> int:
        return _BYTES[self.model.resolved_dtype(on_gpu=True)]  # the plan is for a GPU cluster

    @property
    def activation_bytes(self) -> int:
        return _BYTES[self.model.resolved_dtype(on_gpu=True)]  # the plan is for a GPU cluster

    @property
    def sp_divisor(self) -> int:
        return self.tensor_parallel if self.sequence_parallel and self.tensor_parallel > 1 else 1


@dataclass
class ParamCounts:
    per_layer: int
    embedding: int
    output_layer: int  # 0 when tied to the embedding
    final_norm: int


def param_counts(model: ModelConfig, vocab_size: int) -> ParamCounts:
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv = h * (h + 2 * model.kv_groups * d)
    per_layer = qkv + h * h + h * 2 * f + f * h + 2 * h
    return ParamCounts(
        per_layer=per_layer,
        embedding=vocab_size * h,
        output_layer=0 if model.tie_embeddings else vocab_size * h,
        final_norm=h,
    )


def total_params(model: ModelConfig, vocab_size: int) -> int:
    c = param_counts(model, vocab_size)
    return c.per_layer * model.num_layers + c.embedding + c.output_layer + c.final_norm


def params_on_rank(p: PlanInput, stage: Literal["first", "last"]) -> int:
    """Parameters held by one rank of the given pipeline stage (replicated norms counted whole)."""
    c = param_counts(p.model, p.vocab_size)
    T = p.tensor_parallel
    h = p.model.hidden_size
    norms_per_layer = 2 * h
    layers = p.model.num_layers // p.pipeline_parallel
    n = layers * ((c.per_layer - norms_per_layer) // T + norms_per_layer)
    single = p.pipeline_parallel == 1
    if stage == "first" or single:
        n += c.embedding // T
    if stage == "last" or single:
        n += c.final_norm
        # With tied embeddings and PP > 1 the last stage keeps its own copy of the word embedding.
        n += (c.output_layer or (c.embedding if not single else 0)) // T
    return n


def fp8_weight_copies(p: PlanInput, stage: Literal["first", "last"]) -> int:
    """Bytes of TE's cached FP8 weights (row-wise + column-wise, 1 byte each) on one rank of
    ``stage``: the transformer layers' linear weights (norms, embedding and output layer are
    not FP8). 0 without FP8 or off the TE path."""
    if not p.model.fp8 or p.attention != "te":
        return 0
    c = param_counts(p.model, p.vocab_size)
    linear = c.per_layer - 2 * p.model.hidden_size
    return 2 * (p.model.num_layers // p.pipeline_parallel) * (linear // p.tensor_parallel)


@dataclass
class StateBytes:
    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def state_bytes(p: PlanInput, n_params: int, use_distributed_optimizer: Optional[bool] = None) -> StateBytes:
    dist_opt = p.use_distributed_optimizer if use_distributed_optimizer is None else use_distributed_optimizer
    shard = p.data_parallel * p.context_parallel if dist_opt else 1
    master = 0 if p.param_bytes == 4 else 4
    return StateBytes(
        params=n_params * p.param_bytes,
        grads=n_params * 4,
        optimizer=-(-n_params * (8 + master) // shard),
    )


@dataclass
class LayerActivations:
    """Bytes saved for backward by one transformer layer for one micro-batch."""

    linear_and_norm: int
    core_attention: int
    # What selective recomputation keeps of core attention: its inputs q, k (after RoPE)
    # and the fused QKV output that v is a view of.
    core_attention_inputs: int

    @property
    def total(self) -> int:
        return self.linear_and_norm + self.core_attention


def _attention_path(p: PlanInput) -> str:
    """'te', 'dense' (ours, one SDPA call) or 'blockwise' (ours, online softmax over blocks)."""
    if p.attention == "te":
        return "te"
    # LongSkyCoreAttention: one SDPA call only for a short CP=1 sequence.
    from megatron_longsky.attention.core_attention import DENSE_MAX_TOKENS

    single = p.context_parallel == 1 and p.model.seq_length <= DENSE_MAX_TOKENS
    return "dense" if single else "blockwise"


def block_size(p: PlanInput) -> int:
    if p.attention_block_size is not None:
        return p.attention_block_size
    from megatron_longsky.attention.core_attention import DEFAULT_BLOCK_SIZE

    return DEFAULT_BLOCK_SIZE


def layer_activations(p: PlanInput) -> LayerActivations:
    m = p.model
    T, S, CP = p.tensor_parallel, p.sp_divisor, p.context_parallel
    h, f, d, a, g = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.num_attention_heads, m.kv_groups
    s = m.seq_length
    b = p.micro_batch_size
    tokens = b * s // CP
    B = p.activation_bytes
    hq, hkv = h / T, m.kv_groups_per_rank(T) * d  # query and key/value widths on a rank (TP > g: one group)
    per_token = (
        2 * 3 * h / S  # each RMSNorm: its input, the normalised input, the weighted output (linear input)
        + 5 * f / T  # SwiGLU: fc1 output (2f); the gate's SiLU input and output, the up half, fc2 input (f each)
        + hq  # attention output consumed by linear_proj
    )
    linear = tokens * (per_token * B + 2 * 4 / S)  # + the norms' fp32 inverse RMS
    path = _attention_path(p)
    fp8_attention = path == "te" and m.fp8 and m.fp8_attention != "off"
    if fp8_attention and m.fp8_attention == "multi_head":
        linear -= tokens * hq * (B - 1)  # linear_proj's input arrives in FP8
    core = tokens * (a / T) * 4  # softmax log-sum-exp (fp32)
    if fp8_attention:
        # TE's FP8 attention keeps FP8 (1-byte) q, k, v and output for its backward.
        core += tokens * (hq + 2 * hkv + hq) + tokens * (CP - 1) * 2 * hkv
    elif path == "te":
        # q, k after RoPE and v (a view keeping the fused QKV output alive); TE's output is
        # the linear_proj input counted above.
        core += tokens * B * (hq + hkv + (hq + 2 * hkv)) + tokens * (CP - 1) * 2 * hkv * B
    else:
        # megatron-core's unfused RoPE saves cos and sin (s x d) for q and for k.
        core += tokens * 4 * d * B
        if path == "dense":
            # SDPA saves q, k and v repeated to every query head (or k after RoPE and the
            # whole QKV output when a == g), its output, and the fp32 mask (t x s).
            kv = 2 * hq * CP if a > g else hkv * CP + (hq + 2 * hkv)
            core += tokens * B * (hq + kv + hq) + tokens * s * 4
        else:
            # q with the groups folded, contiguous (all-gathered) k and v, the output, and
            # int64 positions of the folded queries and of the keys.
            core += tokens * B * (hq + 2 * hkv * CP + hq) + tokens * 8 * (a // g + CP)
    inputs = tokens * B * (hq + hkv + (hq + 2 * hkv))
    return LayerActivations(linear_and_norm=int(linear), core_attention=int(core), core_attention_inputs=int(inputs))


def output_layer_activations(p: PlanInput) -> int:
    """Last stage: the final RMSNorm and the cross-entropy's fp32 softmax over the vocabulary
    (megatron-core computes it in place of the logits and reuses it as the gradient)."""
    m = p.model
    tokens = p.micro_batch_size * m.seq_length // p.context_parallel
    B = p.activation_bytes
    norm = tokens * (3 * m.hidden_size * B + 4) / p.sp_divisor
    softmax = tokens * (p.vocab_size // p.tensor_parallel) * 4
    cast = tokens * (p.vocab_size // p.tensor_parallel) * B if B != 4 else 0  # logits before .float()
    return int(norm + softmax + cast + tokens * 16)  # + labels and loss mask


@dataclass
class MemoryEstimate:
    """One rank's memory in bytes (worst pipeline stage); see the module docstring."""

    params: int
    grads: int
    optimizer: int
    optimizer_without_distributed: int
    optimizer_with_distributed: int
    activations_per_layer: int
    activations_per_layer_no_recompute: int
    layers_per_stage: int
    microbatches_in_flight: int
    activations: int  # all stored activations of the in-flight micro-batches
    transient: int  # largest backward working set above the stored activations (and output layer)
    worst_stage: str
    fp8_weights: int = 0  # TE's cached FP8 copies of the linear weights (FP8 runs)

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer + self.fp8_weights

    @property
    def peak(self) -> int:
        return self.states + self.activations + self.transient

    def to_dict(self) -> dict:
        return {**asdict(self), "states": self.states, "peak": self.peak}


def _recomputed_layer_bytes(p: PlanInput, full: LayerActivations) -> tuple[int, int]:
    """(stored bytes per layer, extra bytes while one checkpointed block is rebuilt)."""
    m = p.model
    tokens = p.micro_batch_size * m.seq_length // p.context_parallel
    if m.recompute_granularity == "selective":
        return full.linear_and_norm + full.core_attention_inputs, full.core_attention
    if m.recompute_granularity == "full":
        group = m.recompute_num_layers or 1
        layers = m.num_layers // p.pipeline_parallel
        block_input = tokens * m.hidden_size * p.activation_bytes / p.sp_divisor
        if m.recompute_method == "block":
            # The first `group` layers of the stage are checkpointed, the rest keep everything.
            kept = max(layers - group, 0)
            stored = (group * block_input + kept * full.total) / layers
            return int(stored), full.total
        # uniform: one input per block of `group` layers, and a block's worth rebuilt at once.
        return int(block_input / group), group * full.total
    return full.total, 0


def backward_working_set(p: PlanInput) -> tuple[int, int]:
    """(gradient buffers of a layer's backward, extra working set of its attention backward)."""
    m = p.model
    T, CP = p.tensor_parallel, p.context_parallel
    tokens = p.micro_batch_size * m.seq_length // CP
    hq, hkv = m.hidden_size / T, m.kv_groups_per_rank(T) * m.head_dim
    # Gradients of q, k, v (fp32 accumulators, k/v over the gathered sequence) and of the
    # hidden state flowing back through the layer.
    grads = tokens * 4 * (2 * hq + 2 * hkv * CP + 2 * m.hidden_size / p.sp_divisor)
    attention = 0
    if _attention_path(p) == "blockwise":
        # Backward of one masked block pair: scores, masked scores, probabilities, dP, dS and
        # the scaled dS feeding dQ/dK, each [b, a/T, block, block] in fp32.
        # Blocks follow the runs of contiguous positions. Under CP the worst rank is the
        # last: its two zig-zag chunks (CP-1 and CP, s / 2CP each) are adjacent, one run of
        # 2s / 2CP queries, and the gathered keys hold that same run.
        from megatron_longsky.attention.blockwise import longest_block

        run = m.seq_length if CP == 1 else 2 * (m.seq_length // (2 * CP))
        bq = bk = longest_block(run, block_size(p))
        attention = 6 * p.micro_batch_size * (m.num_attention_heads // T) * bq * bk * 4
    return int(grads), int(attention)


def estimate_memory(p: PlanInput) -> MemoryEstimate:
    full = layer_activations(p)
    per_layer, rebuilt = _recomputed_layer_bytes(p, full)
    layers = p.model.num_layers // p.pipeline_parallel
    in_flight = min(p.pipeline_parallel, p.num_microbatches)
    output = output_layer_activations(p)
    # The output layer's activations are freed by the loss backward, before any layer's
    # backward (and its recomputation) starts: the peak is whichever of the two is larger.
    # Attention's backward runs after the layer's MLP backward has freed the MLP half's
    # activations; under full recomputation the whole rebuilt layer is alive at once.
    m = p.model
    tokens = p.micro_batch_size * m.seq_length // p.context_parallel
    mlp_half = tokens * p.activation_bytes * (3 * m.hidden_size / p.sp_divisor + 5 * m.ffn_hidden_size
                                              / p.tensor_parallel)
    grads, attention_work = backward_working_set(p)
    at_layer_start = grads + (rebuilt if m.recompute_granularity == "full" else 0)
    at_attention = grads + attention_work + rebuilt - int(mlp_half)
    layer_backward = max(at_layer_start, at_attention, 0)
    stages = {}
    for stage in ("first", "last") if p.pipeline_parallel > 1 else ("first",):
        n = params_on_rank(p, stage)
        states = state_bytes(p, n)
        fp8 = fp8_weight_copies(p, stage)
        flight = in_flight if stage == "first" else 1
        out = output if stage == "last" or p.pipeline_parallel == 1 else 0
        acts = flight * per_layer * layers + out
        transient = max(layer_backward - out, 0)
        stages[stage] = (states.total + fp8 + acts + transient, n, states, acts, flight, transient, fp8)
    worst = max(stages, key=lambda k: stages[k][0])
    _, n, states, acts, flight, transient, fp8 = stages[worst]
    return MemoryEstimate(
        params=states.params,
        grads=states.grads,
        optimizer=states.optimizer,
        optimizer_without_distributed=state_bytes(p, n, False).optimizer,
        optimizer_with_distributed=state_bytes(p, n, True).optimizer,
        activations_per_layer=per_layer,
        activations_per_layer_no_recompute=full.total,
        layers_per_stage=layers,
        microbatches_in_flight=flight,
        activations=acts,
        transient=transient,
        worst_stage=worst if p.pipeline_parallel > 1 else "only",
        fp8_weights=fp8,
    )


@dataclass
class CheckpointMemory:
    """One checkpoint save/resume, in bytes (worst pipeline stage for the per-rank figures)."""

    optimizer_format: str  # 'dp_reshardable', 'fully_reshardable' or 'per_parameter' (no distributed optimizer)
    total_size: int  # the whole checkpoint on disk (weights + optimizer state)
    written_per_rank: int  # with the fully parallel wrapper: this rank's share of the writes
    save_gpu_transient: int  # extra device memory while the save is prepared
    save_host_per_rank: int  # host memory per rank during the save (gathered state, async staging)
    save_host_per_node: int
    read_per_resume: int  # bytes read from storage by all ranks together on a resume

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_memory(p: PlanInput, world_size: int, gpus_per_node: int, optimizer_format: str = "auto",
                      async_save: bool = False, bucket_size: Optional[int] = None) -> CheckpointMemory:
    """What a checkpoint costs, as training/checkpointing.py writes it (see the module notes).
    ``bucket_size``: the DDP bucket (elements) with overlapped gradient reduction, None: one
    bucket per buffer."""
    stage = "first"
    if p.pipeline_parallel > 1:
        stage = max(("first", "last"), key=lambda s: params_on_rank(p, s))
    n = params_on_rank(p, stage)
    replicas = p.data_parallel * p.context_parallel
    # The distributed optimizer stores its fp32 param with Adam's m and v; a plain one m, v
    # and (mixed precision) the fp32 master copy.
    optimizer_bytes_per_param = 12 if p.use_distributed_optimizer else 8 + (4 if p.param_bytes != 4 else 0)
    weights_total = total_params(p.model, p.vocab_size) * p.param_bytes
    optimizer_total = total_params(p.model, p.vocab_size) * optimizer_bytes_per_param
    own_weights = n * p.param_bytes // replicas
    own_optimizer = -(-n * optimizer_bytes_per_param // replicas)
    written = own_weights + own_optimizer
    if not p.use_distributed_optimizer:
        fmt = "per_parameter"
        gpu, host = 0, 0
    else:
        fmt = "dp_reshardable" if optimizer_format == "auto" else optimizer_format
        if fmt == "dp_reshardable":
            gpu, host = 0, 0
        else:
            bucket = min(bucket_size or n, n)
            gpu = 4 * bucket  # one key's all-gather receive buffer, one bucket at a time
            host = n * optimizer_bytes_per_param + own_optimizer  # gathered world tensors + local shards
    if async_save:
        host += written
    total = weights_total + optimizer_total
    return CheckpointMemory(
        optimizer_format=fmt,
        total_size=total,
        written_per_rank=written,
        save_gpu_transient=gpu,
        save_host_per_rank=host,
        save_host_per_node=host * min(gpus_per_node, world_size),
        read_per_resume=total,
    )
