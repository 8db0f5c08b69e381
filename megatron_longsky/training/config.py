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

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_longsky.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from megatron_longsky.model.config import ModelConfig, model_config_from_dict
from megatron_longsky.runtime.distributed import ParallelConfig
from megatron_longsky.tokenizer.base import TokenizerConfig


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
    num_workers: int = 0
    # Refuse datasets whose <prefix>.meta.json names another tokenizer; a missing
    # sidecar is an error only when this is 'required'.
    check_tokenizer: Literal["required", "if_present", "off"] = "if_present"

    def __post_init__(self):
        if self.weights is not None and len(self.weights) != len(self.prefixes):
            raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.prefixes)} prefixes")
        if self.weights is not None and any(w < 0 for w in self.weights):
            raise ValueError("data.weights must be >= 0")
        if self.kind == "sft" and len(self.prefixes) > 1:
            raise ValueError("data.kind=sft takes one dataset prefix (merge SFT datasets first)")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")


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


@dataclass
class ScheduleConfig:
    """Learning rate: linear warmup from ``init_lr`` to ``optimizer.lr``, then decay to
    ``optimizer.min_lr`` over ``decay_iters`` (None: ``train_iters``)."""

    warmup_iters: int = 0
    decay_style: Literal["cosine", "constant", "linear"] = "cosine"
    decay_iters: Optional[int] = None
    init_lr: float = 0.0

    def __post_init__(self):
        if self.warmup_iters < 0:
            raise ValueError("schedule.warmup_iters must be >= 0")


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

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    # Peak dense TFLOP/s of one device for MFU (None: 989 on H100 bf16, otherwise MFU not reported).
    peak_tflops_per_device: Optional[float] = None
    level: str = "INFO"

    def __post_init__(self):
        if self.log_interval < 1:
            raise ValueError("logging.log_interval must be >= 1")


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
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ValueError("micro_batch_size and global_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if self.max_consecutive_nan_steps < 1:
            raise ValueError("max_consecutive_nan_steps must be >= 1")

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
    cfg = from_dict(TrainConfig, data, where)
    return dataclasses.replace(cfg, model=model_cfg)


def load_train_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Load a job YAML (optional) and apply ``key=value`` overrides (``model.num_layers=4``)."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return train_config_from_dict(data, where=str(path) if path else "config")


def train_config_to_dict(cfg: TrainConfig) -> dict:
    return to_dict(cfg)
