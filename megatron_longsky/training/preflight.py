"""Checks a training job passes before anything is built.

``longsky train`` used to find a missing dataset, a bad ``data.split``, a checkpoint
that is not there, or token ids the model cannot embed only after the process group,
the model and the optimizer were built (on a cluster: after loading a 13B checkpoint),
and then with a traceback from every rank. :func:`check_training_inputs` looks at every
input path, the config combinations and the world-size factorisation first, using only
the launcher's environment, file headers and sidecars. Every rank runs it and raises
the same :class:`~megatron_longsky.config.ConfigError` (a ``UserError``); the command
line prints it once, from rank 0 (see ``megatron_longsky.cli``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_longsky.checkpoint.layout import (
    CheckpointError, clean_checkpoint_root, read_checkpoint_config, read_latest, resolve_checkpoint,
)
from megatron_longsky.config import ConfigError
from megatron_longsky.data.indexed import bin_path, idx_path, index_dtype
from megatron_longsky.data.metadata import read_meta
from megatron_longsky.training.config import TrainConfig
from megatron_longsky.utils.paths import ensure_writable_dir

log = logging.getLogger(__name__)

# Datasets without a tokenizer sidecar are scanned for their largest token id up to this size.
MAX_SCAN_BYTES = 256 << 20


@dataclass
class ResolvedRun:
    """What the checks resolved, handed to the set-up so nothing is resolved twice: the
    tokenizer (built once), the padded vocabulary, the checkpoint to resume or to take the
    weights from (and its config.yaml, read once) and the dataset prefixes."""

    tokenizer: Any
    vocab_size: int
    resume_dir: Optional[Path] = None
    init_dir: Optional[Path] = None
    start_config: dict = field(default_factory=dict)  # config.yaml of resume_dir or init_dir
    prefixes: list[tuple[str, str]] = field(default_factory=list)  # (config key, dataset prefix)

    @property
    def start_dir(self) -> Optional[Path]:
        return self.resume_dir or self.init_dir


def resolve_vocab_size(cfg: TrainConfig, tokenizer, checkpoint_dir: Optional[Path],
                       checkpoint_config: Optional[dict] = None) -> int:
    """The model's padded vocabulary. A checkpoint's wins (the stage inherits it from the
    chain it belongs to: import, CPT, SFT, ...); model.vocab_size, when set, must pad to the
    same size; otherwise the tokenizer's size padded by the model config. Never depends on
    the layout, so checkpoints reshard and a run starts from the same model at any TP.
    ``checkpoint_config``: the checkpoint's config.yaml when already read."""
    tp = cfg.parallel.tensor_model_parallel_size
    saved = None
    if checkpoint_dir is not None:
        conf = checkpoint_config if checkpoint_config is not None else read_checkpoint_config(checkpoint_dir)
        saved = (conf.get("model") or {}).get("vocab_size")
    if saved:
        vocab = int(saved)
        if cfg.model.vocab_size and cfg.model.padded_vocab_size() != vocab:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} pads to {cfg.model.padded_vocab_size()} "
                              f"rows but checkpoint {checkpoint_dir} has {vocab}")
    else:
        vocab = cfg.model.padded_vocab_size(tokenizer.vocab_size, tp)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model vocab size {vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if vocab % tp:
        raise ConfigError(f"model vocab size {vocab} is not divisible by tensor_model_parallel_size {tp}")
    return vocab


def check_world_size(cfg: TrainConfig, world_size: int) -> int:
    """The data-parallel size of ``world_size`` processes; an error when the layout does not fit."""
    par = cfg.parallel
    model_parallel = par.model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"{world_size} processes do not factor into tensor_model_parallel_size "
            f"{par.tensor_model_parallel_size} x pipeline_model_parallel_size {par.pipeline_model_parallel_size} "
            f"x context_parallel_size {par.context_parallel_size} = {model_parallel} x data-parallel size")
    data_parallel = world_size // model_parallel
    cfg.num_microbatches(data_parallel)  # global_batch_size must split over DP x micro_batch_size
    return data_parallel


def build_checked_tokenizer(cfg: TrainConfig):
    """The run's tokenizer; a missing or unreadable tokenizer file is a ConfigError naming it."""
    from megatron_longsky.tokenizer import build_tokenizer

    model = cfg.tokenizer.model
    if model and not Path(model).exists():
        raise ConfigError(f"tokenizer.model={model}: no such file or directory")
    try:
        return build_tokenizer(cfg.tokenizer)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"tokenizer (type={cfg.tokenizer.type}, model={model}) cannot be loaded: {exc}") from exc


def dataset_prefixes(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(config key, indexed-dataset prefix) of every dataset the run reads."""
    if not cfg.data.prefixes:
        raise ConfigError("data.prefixes is empty: name at least one dataset prefix")
    found = []
    for i, prefix in enumerate(cfg.data.prefixes):
        key = f"data.prefixes[{i}]={prefix}"
        if cfg.data.kind == "sft":
            from megatron_longsky.sft.dataset import resolve_prefixes

            found += [(key, p) for p in resolve_prefixes(prefix)]
        else:
            found.append((key, prefix))
    return found


def check_dataset_files(key: str, prefix: str) -> None:
    for path in (idx_path(prefix), bin_path(prefix)):
        if not path.is_file():
            raise ConfigError(f"{key}: {path} does not exist (a dataset prefix is the path without .bin/.idx)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path} is not readable")
    try:
        dtype = np.dtype(index_dtype(prefix))
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    # The .idx header: magic (9), version (8), dtype code (1), sequence count (8), document
    # count (8), then one int32 length per sequence; the .bin holds exactly their tokens.
    header = np.fromfile(idx_path(prefix), dtype=np.uint8, count=34)
    sequences = int(header[18:26].view(np.int64)[0]) if header.size == 34 else -1
    lengths = np.fromfile(idx_path(prefix), dtype=np.int32, count=max(sequences, 0), offset=34)
    if sequences < 0 or lengths.size != sequences:
        raise ConfigError(f"{key}: {idx_path(prefix)} is truncated")
    expected = int(lengths.sum(dtype=np.int64)) * dtype.itemsize
    actual = bin_path(prefix).stat().st_size
    if actual != expected:
        raise ConfigError(f"{key}: {bin_path(prefix)} holds {actual} bytes but {idx_path(prefix)} describes "
                          f"{expected} (a truncated or mismatched .bin/.idx pair)")


def dataset_vocab_bound(prefix: str) -> Optional[int]:
    """One more than the largest token id ``prefix`` can hold: the tokenizer vocabulary its
    sidecar records, else the largest id in a ``.bin`` small enough to scan; None if unknown."""
    meta = read_meta(prefix) or {}
    vocab = (meta.get("tokenizer") or {}).get("vocab_size") if isinstance(meta, dict) else None
    if isinstance(vocab, int) and vocab > 0:
        return vocab
    path = bin_path(prefix)
    if path.stat().st_size > MAX_SCAN_BYTES:
        return None
    tokens = np.memmap(path, dtype=index_dtype(prefix), mode="r")
    return int(tokens.max()) + 1 if tokens.size else 0


def check_split(cfg: TrainConfig) -> None:
    """``data.split`` as megatron-core reads it: up to three non-negative weights, the first > 0."""
    if cfg.data.kind != "gpt":
        return
    text = cfg.data.split
    try:
        parts = [float(x) for x in text.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or not all(np.isfinite(x) and x >= 0 for x in parts) or parts[0] <= 0:
        raise ConfigError(f"data.split={text!r} is not a split like '98,2,0': up to three non-negative "
                          "train,valid,test weights with a non-zero training part")


def resolve_start(cfg: TrainConfig) -> tuple[Optional[Path], Optional[Path]]:
    """(checkpoint to resume, checkpoint to initialise weights from): the one ``train`` will use."""
    load_root = Path(cfg.checkpoint.load) if cfg.checkpoint.load else cfg.checkpoint_root
    try:
        resume = read_latest(load_root) if load_root.exists() else None
    except CheckpointError as exc:
        raise ConfigError(f"checkpoint.load={load_root}: {exc}") from exc
    if cfg.checkpoint.load and resume is None:
        raise ConfigError(f"checkpoint.load={cfg.checkpoint.load}: no 'latest' checkpoint there")
    init = None
    if resume is None and cfg.checkpoint.init_from:
        try:
            init = resolve_checkpoint(cfg.checkpoint.init_from)
        except CheckpointError as exc:
            raise ConfigError(f"checkpoint.init_from: {exc}") from exc
    return resume, init


# The fields that give the weights their shapes (layout, precision and RoPE may differ).
_SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "tie_embeddings")


def check_init_from_shapes(cfg: TrainConfig, init: Path, config: dict) -> None:
    """``checkpoint.init_from`` (whose config.yaml is ``config``) must hold weights of the
    model the config builds."""
    saved = config.get("model") or {}
    if not isinstance(saved, dict):
        raise ConfigError(f"checkpoint.init_from: {init}/config.yaml: 'model' is not a mapping")

    def value(source, name):
        got = source.get(name) if isinstance(source, dict) else getattr(source, name)
        if name == "num_query_groups" and got is None:  # None: one group per head
            got = source.get("num_attention_heads") if isinstance(source, dict) else source.num_attention_heads
        return got

    differ = [f"model.{name}: checkpoint {value(saved, name)!r}, this config {value(cfg.model, name)!r}"
              for name in _SHAPE_FIELDS if name in saved and value(saved, name) != value(cfg.model, name)]
    if differ:
        raise ConfigError(f"checkpoint.init_from={cfg.checkpoint.init_from} holds another model than this config "
                          f"builds ({'; '.join(differ)}): use the model settings it was saved with")


def check_training_inputs(cfg: TrainConfig, world_size: Optional[int] = None,
                          rank: Optional[int] = None) -> ResolvedRun:
    """Everything about ``cfg`` that can be known before building: raises ConfigError naming
    the key; returns what it resolved (:class:`ResolvedRun`) for the set-up to use.

    ``world_size`` and ``rank`` default to the launcher's; rank 0 also removes what a killed
    earlier run left in the checkpoint directory (:func:`clean_checkpoint_root`)."""
    from megatron_longsky.runtime.distributed import detect_launch_env
    from megatron_longsky.training.data import check_dataset_tokenizers

    launch = detect_launch_env()
    check_world_size(cfg, launch.world_size if world_size is None else world_size)
    ensure_writable_dir("output_dir", cfg.output_dir)
    ensure_writable_dir("checkpoint.save", cfg.checkpoint_root)
    if cfg.data.cache_dir:
        ensure_writable_dir("data.cache_dir", cfg.data.cache_dir)
    if (launch.rank if rank is None else rank) == 0:
        removed = clean_checkpoint_root(cfg.checkpoint_root)
        if removed:
            log.warning("removed what an interrupted run left in %s: %s", cfg.checkpoint_root, ", ".join(removed))
    check_split(cfg)
    tokenizer = build_checked_tokenizer(cfg)
    prefixes = dataset_prefixes(cfg)
    for key, prefix in prefixes:
        check_dataset_files(key, prefix)
    check_dataset_tokenizers(cfg.data, tokenizer)
    resume, init = resolve_start(cfg)
    start_config: dict = {}
    if resume or init:
        try:
            start_config = read_checkpoint_config(resume or init)
        except CheckpointError as exc:
            raise ConfigError(f"checkpoint.{'load' if resume else 'init_from'}: {exc}") from exc
    if init is not None:
        check_init_from_shapes(cfg, init, start_config)
    if resume is not None:
        from megatron_longsky.training.checkpointing import check_optimizer_kind, read_trainer_state

        check_optimizer_kind(resume, read_trainer_state(resume), cfg.optimizer.use_distributed_optimizer)
    vocab = resolve_vocab_size(cfg, tokenizer, resume or init, start_config)
    for key, prefix in prefixes:
        if cfg.data.kind == "sft" and prefix.endswith("_mask_document"):
            continue  # loss masks, not token ids
        bound = dataset_vocab_bound(prefix)
        if bound is not None and bound > vocab:
            raise ConfigError(
                f"{key}: {prefix} holds token ids up to {bound - 1} but the model's vocabulary has {vocab} "
                "entries (model.vocab_size / the tokenizer); use the tokenizer the data was made with")
    return ResolvedRun(tokenizer=tokenizer, vocab_size=vocab, resume_dir=resume, init_dir=init,
                       start_config=start_config, prefixes=prefixes)
