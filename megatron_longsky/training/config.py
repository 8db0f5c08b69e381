"""The training job config: one YAML file, ``key=value`` overrides on the command line.

    model:      {preset: tiny, seq_length: 256, rope: {base: 500000}}   (model_config_from_dict)
    parallel:   {tensor_model_parallel_size: 2, pipeline_model_parallel_size: 1}
    tokenizer:  {type: byte}
    data:       {kind: gpt, prefixes: [a_text_document, b_text_document], weights: [0.7, 0.3]}
    optimizer:  {lr: 3.0e-4, weight_decay: 0.1, clip_grad: 1.0, use_distributed_optimizer: true}
    schedule:   {warmup_iters: 100, decay_style: cosine}
    checkpoint: {save: runs/x/checkpoints, save_interval: 100, keep_last: 2, init_from: null}
    logging:    {log_interval: 10, tensorboard: true}
    train_iters: 1000
    micro_batch_size: 1
    global_batch_size: 32

``load_train_config(path, overrides)`` returns a checked :class:`TrainConfig`;
``train_config_to_dict`` gives the plain data stored as ``config.yaml`` in checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_longsky.attention.context_parallel import validate_context_parallel, validate_pad_multiple
from megatron_longsky.config import ConfigError, from_dict, merge_config_sources, name_origin, to_dict
from megatron_longsky.model.config import ModelConfig, check_parallel_layout, model_config_from_dict
from megatron_longsky.runtime.distributed import ParallelConfig
from megatron_longsky.tokenizer.base import TokenizerConfig


# A run that would read more tokens than this is a typo (train_iters=1e20): megatron-core
# would start building sample indexes for it. The largest published runs read ~2e13.
MAX_TRAIN_TOKENS = 10**15


@dataclass
class DataConfig:
    """Training data.

    ``kind: gpt``: a blend of Megatron indexed datasets (``prefixes`` with optional
    ``weights``), split into train/valid/test by ``split`` and read through
    megatron-core's ``GPTDataset`` (its shuffle index is cached in ``cache_dir``).
    ``kind: sft``: one dataset written by ``longsky preprocess-sft`` (``prefixes: [P]``),
    rows with loss masks from ``PackedSFTDataset``; ``packed: false`` puts one sample per row.
    """

    kind: Literal["gpt", "sft"] = "gpt"
    prefixes: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None
    split: str = "98,2,0"
    # Where GPTDataset caches its document/sample/shuffle indices (None: beside the data).
    cache_dir: Optional[str] = None
    # gpt: no loss on the token predicted after an EOD (document boundary).
    eod_mask_loss: bool = False
    # sft: several samples per row (needs per-document attention) or one per row.
    packed: bool = False
    # sft: each sample is padded to a multiple of this, whatever the layout, so the rows do
    # not depend on the CP size. It must be a multiple of 2 x CP (each sample splits into
    # 2 x CP chunks) and, with FP8, of 16 x CP (each rank's part a multiple of 16): 64 serves
    # BF16 up to CP=32 and FP8 up to CP=4.
    pad_to_multiple: int = 64
    num_workers: int = 0
    # Refuse datasets whose <prefix>.meta.json names another tokenizer; a missing
    # sidecar is an error only when this is 'required'.
    check_tokenizer: Literal["required", "if_present", "off"] = "if_present"

    def __post_init__(self):
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.prefixes)} prefixes")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise ValueError(f"data.weights must be >= 0, got {self.weights}")
        if self.weights is not None and self.weights and not sum(self.weights) > 0:
            raise ValueError(f"data.weights={self.weights} sum to 0: give at least one dataset a positive weight")
        if self.kind == "sft" and len(self.prefixes) > 1:
            raise ValueError("data.kind=sft takes one dataset prefix (merge SFT datasets first)")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple must be >= 1, got {self.pad_to_multiple}")

    def has_validation_split(self) -> bool:
        """gpt data with a non-zero validation share in ``split`` (sft data has none). The
        split is read as megatron-core's ``parse_and_normalize_split`` reads it."""
        shares = [float(x) for x in re.findall(r"[.0-9]+", self.split)]
        return self.kind == "gpt" and len(shares) > 1 and shares[1] > 0


@dataclass
class OptimizerSettings:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    # Decoupled (AdamW) weight decay; norms and biases get none (megatron-core's rule).
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    # Clip the global gradient norm to this value (0: no clipping).
    clip_grad: float = 1.0
    # ZeRO-1: optimizer state sharded over data-parallel ranks.
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optimizer: need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})")
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        if self.weight_decay < 0 or self.adam_eps <= 0:
            raise ValueError(f"optimizer: need weight_decay >= 0 and adam_eps > 0 "
                             f"(weight_decay={self.weight_decay}, adam_eps={self.adam_eps})")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optimizer.{key} must be in [0, 1), got {getattr(self, key)}")


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup from ``init_lr`` to ``optimizer.lr``, then decay to
    ``optimizer.min_lr`` over ``decay_iters`` (None: ``train_iters``)."""

    warmup_iters: int = 0
    decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    decay_iters: Optional[int] = None
    init_lr: float = 0.0
    # A resume whose lr/min_lr/warmup/decay/weight decay differ from the checkpoint's:
    # "check" refuses; "use_config" continues with this config's schedule (Megatron-LM's
    # --override-opt_param-scheduler, e.g. to extend train_iters); "use_checkpoint" keeps
    # the checkpoint's (--use-checkpoint-opt_param-scheduler).
    on_resume: Literal["check", "use_config", "use_checkpoint"] = "check"

    def __post_init__(self):
        if self.warmup_iters < 0:
            raise ValueError("schedule.warmup_iters must be >= 0")
        if self.decay_iters is not None and self.decay_iters < 1:
            raise ValueError(f"schedule.decay_iters must be >= 1, got {self.decay_iters}")
        if self.init_lr < 0:
            raise ValueError(f"schedule.init_lr must be >= 0, got {self.init_lr}")


@dataclass
class CheckpointConfig:
    """``save``: checkpoint root (None: ``<output_dir>/checkpoints``). A run resumes from
    ``load`` (None: ``save``) when it holds a ``latest`` checkpoint; otherwise it starts
    from ``init_from`` (weights only: fresh optimizer, schedule and data) or from scratch."""

    save: Optional[str] = None
    save_interval: int = 0  # 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2  # 0 keeps all
    load: Optional[str] = None
    init_from: Optional[str] = None
    save_at_end: bool = True
    # Async writes (GPU only; on CPU saves are synchronous).
    async_save: bool = False
    # Distributed-optimizer state form: 'auto' = 'dp_reshardable' (each rank writes its own
    # shard; resumes at any DP/CP size, same TP/PP); 'fully_reshardable' gathers it per
    # parameter (more memory at save) and resumes at any TP/PP: set it for the save before a
    # TP/PP change. The form and layout are recorded and checked on resume.
    optimizer_format: Literal["auto", "dp_reshardable", "fully_reshardable"] = "auto"
    # Resume even when the checkpoint was saved for other data, model or tokenizer settings.
    allow_mismatch: bool = False

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    # Peak dense TFLOP/s of one device for MFU/HFU (None: the detected GPU's datasheet peak at
    # the run's GEMM precision, see plan/flops.py DEVICE_PEAK_TFLOPS; unknown devices: not reported).
    peak_tflops_per_device: Optional[float] = None
    level: str = "INFO"

    def __post_init__(self):
        if self.log_interval < 1:
            raise ValueError("logging.log_interval must be >= 1")
        from megatron_longsky.utils.logging import LOG_LEVELS

        if not isinstance(self.level, str) or self.level.upper() not in LOG_LEVELS:
            raise ValueError(f"logging.level={self.level!r} is not one of {', '.join(LOG_LEVELS)}")
        self.level = self.level.upper()
        if self.peak_tflops_per_device is not None and self.peak_tflops_per_device <= 0:
            raise ValueError(f"logging.peak_tflops_per_device must be > 0, got {self.peak_tflops_per_device}")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # metrics.jsonl, TensorBoard events and (by default) checkpoints go here.
    output_dir: str = "runs/train"
    seed: int = 1234
    train_iters: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # Held-out loss on the valid split every eval_interval iterations (0: never).
    eval_interval: int = 0
    eval_iters: int = 1
    # Non-finite losses skip their step; this many in a row stop the run.
    max_consecutive_nan_steps: int = 5

    def __post_init__(self):
        if self.train_iters < 1:
            raise ValueError(f"train_iters must be >= 1, got {self.train_iters}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must be in [0, 2**32) (the range numpy and torch seeds take)")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("micro_batch_size and global_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.max_consecutive_nan_steps < 1:
            raise ValueError("max_consecutive_nan_steps must be >= 1")
        if self.eval_interval < 0 or self.eval_iters < 1:
            raise ValueError(f"need eval_interval >= 0 and eval_iters >= 1 "
                             f"(eval_interval={self.eval_interval}, eval_iters={self.eval_iters})")
        if not self.output_dir:
            raise ValueError("output_dir is empty")
        par = self.parallel
        if (self.data.kind == "sft" and self.data.packed and par.pipeline_model_parallel_size > 1
                and self.micro_batch_size > 1):
            raise ValueError("data.packed=true with pipeline parallelism needs micro_batch_size=1 (a packed "
                             "micro-batch travels between stages as one [1, b*s] sequence)")
        tokens = self.train_iters * self.global_batch_size * self.model.seq_length
        if tokens > MAX_TRAIN_TOKENS:
            raise ValueError(f"train_iters={self.train_iters} x global_batch_size={self.global_batch_size} x "
                             f"seq_length={self.model.seq_length} = {tokens:.3g} tokens, more than "
                             f"{MAX_TRAIN_TOKENS:.0e} (the data indexes would not fit in memory); check train_iters")
        check_parallel_layout(self.model, par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                              par.context_parallel_size)
        # CP communication, FP8 shard and FP8-attention rules, before anything is built.
        validate_context_parallel(self.model, self.parallel, self.data.kind == "sft" and self.data.packed,
                                  self.micro_batch_size)
        self._check_settings_take_effect()

    def _check_settings_take_effect(self) -> None:
        """Settings that would otherwise be silently ignored, or change the data with the layout."""
        tp, cp = self.parallel.tensor_model_parallel_size, self.parallel.context_parallel_size
        if self.eval_interval and not self.data.has_validation_split():
            raise ValueError(
                f"eval_interval={self.eval_interval} but there is no validation data "
                + ("(data.kind=sft has no validation split)" if self.data.kind == "sft"
                   else f"(data.split={self.data.split!r} gives the validation part 0)")
                + "; set eval_interval=0 (held-out perplexity of a checkpoint: `longsky eval ppl`)"
                + ("" if self.data.kind == "sft" else " or give data.split a validation part, e.g. 98,2,0"))
        if self.parallel.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1 "
                             "(it shards activations over the TP group); set it to false")
        if self.data.kind == "sft":
            m = self.data.pad_to_multiple
            if self.model.seq_length % m:
                raise ValueError(f"model.seq_length {self.model.seq_length} is not a multiple of "
                                 f"data.pad_to_multiple {m}")
            # Each sample splits into 2*CP chunks, and with FP8 each rank's part is a multiple of 16.
            validate_pad_multiple(m, cp, self.model.fp8, where="data.pad_to_multiple")
        num_layers = self.model.recompute_num_layers
        per_stage = self.model.num_layers // self.parallel.pipeline_model_parallel_size
        if num_layers is not None and not 1 <= num_layers <= per_stage:
            raise ValueError(f"model.recompute_num_layers={num_layers} must be between 1 and the layers per "
                             f"pipeline stage ({per_stage})")

    @property
    def seq_length(self) -> int:
        return self.model.seq_length

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint.save) if self.checkpoint.save else Path(self.output_dir) / "checkpoints"

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Micro-batches per step on each data-parallel rank (gradient accumulation)."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible by micro_batch_size "
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size}"
            )
        return self.global_batch_size // per_step


def train_config_from_dict(data: dict, where: str = "config") -> TrainConfig:
    """A TrainConfig from plain data; ``model`` accepts ``preset:`` (see model_config_from_dict)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    data = dict(data)
    model = data.pop("model", None) or {}
    if isinstance(model, ModelConfig):
        model_cfg = model
    elif isinstance(model, dict):
        model_cfg = model_config_from_dict(model, where=f"{where}.model")
    else:
        raise ConfigError(f"{where}.model: expected a mapping, got {model!r}")
    # The model goes in with the rest, so the checks across sections see the real one.
    return from_dict(TrainConfig, {**data, "model": model_cfg}, where)


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load a job YAML (optional) and apply ``key=value`` overrides (``model.num_layers=4``)."""
    origins: dict[str, str] = {}
    data = merge_config_sources(path, overrides=list(overrides), origins=origins)
    where = str(path) if path else "config"
    try:
        return train_config_from_dict(data, where=where)
    except ConfigError as exc:
        raise name_origin(exc, where, origins, from_file=bool(path)) from None


def train_config_to_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)
