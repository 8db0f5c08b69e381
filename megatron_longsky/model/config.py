"""Model configuration: a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no biases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from megatron_longsky.config import ConfigError, from_dict


@dataclass
class RopeConfig:
    """Rotary embedding and its long-context extensions.

    - ``base``: RoPE base (theta). Raising it is ABF (adjusted base frequency).
    - ``scaling``: ``none``; ``linear`` (position interpolation by ``factor``);
      ``llama3`` (Llama-3.1 frequency-band scaling); ``yarn``.
    - ``original_max_position_embeddings``: the pretraining context the scaling refers to.
    """

    base: float = 10000.0
    scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 0.0  # yarn

    def __post_init__(self):
        if self.base <= 0:
            raise ValueError(f"rope.base must be > 0, got {self.base}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"rope.original_max_position_embeddings must be >= 1, "
                             f"got {self.original_max_position_embeddings}")
        if self.scaling != "none" and self.factor <= 0:
            raise ValueError(f"rope.factor must be > 0 for scaling={self.scaling}")


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # Number of KV heads (GQA); None means multi-head attention.
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 176
    # The vocabulary (None: the tokenizer's). The embedding has it rounded up to a multiple
    # of make_vocab_size_divisible_by, whatever the layout; the TP size must divide that.
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    # The word embedding's std (None: init_method_std). A larger one (e.g. 1.0, PyTorch's
    # nn.Embedding default) keeps token identity dominant in the residual stream, which is what
    # copying from the context matches on (benchmarks/RESULTS.md, "Retrieval formation").
    embedding_init_std: Optional[float] = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    # 'auto': bfloat16 on a GPU, float32 on CPU (resolved_dtype). An explicit float32 on a GPU
    # with Transformer Engine has attention backends only at CP=1 (attention/te_rules.py).
    params_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 'auto': Transformer Engine when TE and CUDA are present, else megatron-core local modules.
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # FP8 through Transformer Engine (GPU only); requesting it without TE is an error.
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    # FP8 attention (TE, needs fp8): 'dot_product' runs the core attention (QK^T, softmax, .V)
    # in FP8 (TransformerConfig.fp8_dot_product_attention); 'multi_head' also keeps the QKV and
    # output projections' activations in FP8 between them (fp8_multi_head_attention).
    fp8_attention: Literal["off", "dot_product", "multi_head"] = "off"
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "vocab_size", "make_vocab_size_divisible_by", "seq_length", "max_position_embeddings",
                    "recompute_num_layers"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"model.embedding_init_std must be > 0, got {self.embedding_init_std}")
        if self.norm_epsilon <= 0 or self.init_method_std <= 0:
            raise ValueError(f"model.norm_epsilon and model.init_method_std must be > 0 "
                             f"(got {self.norm_epsilon}, {self.init_method_std})")
        if self.fp8_attention != "off":
            if not self.fp8:
                raise ValueError(f"fp8_attention={self.fp8_attention!r} needs model.fp8 (e4m3 or hybrid): "
                                 "FP8 attention runs inside Transformer Engine's FP8 autocast")
            # megatron-core 0.16.1 (fp8_utils.get_fp8_recipe) hands the FP8-attention switches to
            # TE only for these recipes; with the others they would be dropped silently.
            supported = {"dot_product": ("delayed", "tensorwise"), "multi_head": ("delayed",)}[self.fp8_attention]
            if self.fp8_recipe not in supported:
                raise ValueError(f"fp8_attention={self.fp8_attention!r} works with fp8_recipe "
                                 f"{' or '.join(supported)} (megatron-core passes it to Transformer Engine "
                                 f"only for those), not {self.fp8_recipe!r}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.make_vocab_size_divisible_by < 1:
            raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {self.make_vocab_size_divisible_by}")
        if self.recompute_granularity != "full":
            for key in ("recompute_method", "recompute_num_layers"):
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key}={getattr(self, key)!r} only applies to "
                                     f"recompute_granularity='full' (it is {self.recompute_granularity!r})")
        elif self.recompute_method is None or self.recompute_num_layers is None:
            raise ValueError("model.recompute_granularity='full' needs model.recompute_method (uniform or block) "
                             "and model.recompute_num_layers")
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups {groups}"
            )

    def resolved_dtype(self, on_gpu: bool) -> str:
        """The parameter dtype a run uses: ``params_dtype``, with ``auto`` as bfloat16 on a GPU
        and float32 on CPU."""
        if self.params_dtype != "auto":
            return self.params_dtype
        return "bfloat16" if on_gpu else "float32"

    def padded_vocab_size(self, tokenizer_vocab: Optional[int] = None, tensor_parallel: int = 1) -> int:
        """Embedding rows: ``vocab_size`` (else ``tokenizer_vocab``) rounded up to a multiple of
        ``make_vocab_size_divisible_by``; a property of the model, not of the layout."""
        from megatron_longsky.tokenizer.base import pad_vocab_size

        vocab = self.vocab_size or tokenizer_vocab
        if not vocab:
            raise ConfigError("model.vocab_size is not set and no tokenizer vocabulary is known")
        padded = pad_vocab_size(int(vocab), self.make_vocab_size_divisible_by)
        if padded % tensor_parallel:
            raise ConfigError(
                f"the model's vocabulary of {padded} rows ({vocab} padded to a multiple of "
                f"model.make_vocab_size_divisible_by={self.make_vocab_size_divisible_by}) is not divisible by "
                f"tensor_model_parallel_size {tensor_parallel}; make model.make_vocab_size_divisible_by "
                f"a multiple of {tensor_parallel}")
        return padded

    def tensor_parallel_error(self, tp: int) -> Optional[str]:
        """Why megatron-core 0.16.1 cannot split this model over ``tp`` ranks (None: it can).

        TP larger than the KV groups is allowed when it is a multiple of them (MQA/GQA): each
        rank all-gathers the QKV projection and keeps its group, as megatron-core does."""
        g, d = self.kv_groups, self.head_dim
        if self.num_attention_heads % tp:
            return f"TP={tp} does not divide the {self.num_attention_heads} attention heads"
        if g % tp and tp % g:
            return (f"TP={tp} is neither a divisor nor a multiple of the {g} KV groups (num_query_groups); "
                    f"choose TP from {[t for t in range(1, self.num_attention_heads + 1) if self.num_attention_heads % t == 0 and (g % t == 0 or t % g == 0)]}")
        if (self.num_attention_heads + 2 * g) * d % tp:
            return f"TP={tp} does not divide the {(self.num_attention_heads + 2 * g) * d} QKV projection rows"
        if self.ffn_hidden_size % tp:
            return f"TP={tp} does not divide ffn_hidden_size {self.ffn_hidden_size}"
        return None

    def kv_groups_per_rank(self, tp: int) -> int:
        """KV groups a TP rank attends with: its share, or one when TP exceeds the groups."""
        return max(1, self.kv_groups // tp)

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def check_parallel_layout(model: ModelConfig, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                          context_parallel: int = 1) -> None:
    """The one rule for which TP/PP/CP sizes a model can be split into (``train``, ``plan``,
    the importer and evaluation all ask here); raises :class:`ConfigError` naming the sizes."""
    problem = model.tensor_parallel_error(tensor_parallel)
    if problem:
        raise ConfigError(f"tensor_model_parallel_size: {problem}")
    if model.num_layers % pipeline_parallel:
        raise ConfigError(f"model.num_layers {model.num_layers} is not divisible by "
                          f"pipeline_model_parallel_size {pipeline_parallel}")
    if context_parallel > 1 and model.seq_length % (2 * context_parallel):
        raise ConfigError(f"model.seq_length {model.seq_length} is not divisible by 2 x context_parallel_size "
                          f"= {2 * context_parallel}")


PRESETS: dict[str, dict] = {
    # A model small enough to train on 2 CPU cores in minutes.
    "tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=176, seq_length=256, rope=dict(base=10000.0),
    ),
    # Meta-Llama-3-8B: RoPE base 500000, 8K context, no scaling.
    "llama3-8b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, seq_length=8192, norm_epsilon=1e-5,
        rope=dict(base=500000.0, original_max_position_embeddings=8192),
        params_dtype="bfloat16",
    ),
    # Llama-3.1-8B: the same network with llama3 frequency scaling (x8 over 8K).
    "llama3.1-8b": dict(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=14336, vocab_size=128256, seq_length=8192, max_position_embeddings=131072,
        norm_epsilon=1e-5,
        rope=dict(base=500000.0, scaling="llama3", factor=8.0, original_max_position_embeddings=8192),
        params_dtype="bfloat16",
    ),
    # Skywork-13B (its config.json): 52 layers, hidden 4608, 36 heads (MHA), FFN 12288,
    # vocab 65519, RMSNorm eps 1e-6, RoPE base 10000, 4K pretraining context.
    "skywork-13b": dict(
        num_layers=52, hidden_size=4608, num_attention_heads=36, num_query_groups=None,
        ffn_hidden_size=12288, vocab_size=65519, seq_length=4096, norm_epsilon=1e-6,
        rope=dict(base=10000.0, original_max_position_embeddings=4096), params_dtype="bfloat16",
    ),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}


def model_config_from_dict(data: dict, where: str = "model") -> ModelConfig:
    """``{'preset': 'tiny', 'num_layers': 4}``: the preset's values, then the given keys."""
    data = dict(data or {})
    name = data.pop("preset", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.preset: expected a preset name, got {name!r}")
    base = preset(name) if name else {}
    given = data.pop("rope", None) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{where}.rope: expected a mapping such as {{base: {given!r}}}, got {given!r}")
    rope = {**base.get("rope", {}), **given}
    merged = {**base, **data, "rope": rope}
    if merged.get("fp8_attention") is False:  # YAML 1.1 reads a bare `off` as false
        merged["fp8_attention"] = "off"
    return from_dict(ModelConfig, merged, where)

