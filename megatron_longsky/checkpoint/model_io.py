"""Model weights in and out of megatron-core ``dist_checkpointing``.

Saved tensors are global (each shard records its offset in the full tensor), so a
checkpoint written at one TP/PP layout loads at any other.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_longsky.checkpoint.layout import MODEL, CheckpointError

log = logging.getLogger(__name__)

try:  # a BaseException (not an Exception) in torch: what a load of a truncated shard raises
    from torch.distributed.checkpoint.api import CheckpointException as _TorchCheckpointException
except ImportError:  # pragma: no cover - older torch
    class _TorchCheckpointException(Exception):
        pass


def unwrap(model):
    """The bare GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _as_list(model_chunks):
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def model_sharded_state_dict(model_chunks) -> dict:
    chunks = [unwrap(m) for m in _as_list(model_chunks)]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    return chunks[0].sharded_state_dict()


def save_model_weights(model_chunks, ckpt_dir: str | Path, sharded_strategy=None) -> Path:
    """Collective: every rank calls it. Writes ``<ckpt_dir>/model/`` (``sharded_strategy``:
    a dist_checkpointing save strategy, e.g. the fully parallel one training uses)."""
    from megatron.core import dist_checkpointing

    target = Path(ckpt_dir) / MODEL
    if torch.distributed.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks), str(target), sharded_strategy=sharded_strategy)
    return target


# Transformer Engine modules keep FP8 scaling state as ``<module>._extra_state`` (TE linears,
# TE norms; ``_extra_state<i>`` for grouped GEMMs); megatron-core's local modules have none.
_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")


def is_extra_state_key(key: str) -> bool:
    return bool(_EXTRA_STATE.search(key))


def check_weight_shapes(sharded_state_dict: dict, source: Path) -> None:
    """Every weight this model needs has the same global shape in the checkpoint at
    ``source`` (``<ckpt>/model``): a checkpoint of another model (``init_from`` of another
    size, a ``config.yaml`` edited to disagree with its weights) is a one-line error naming
    the tensor and both shapes, not a traceback from inside the load."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(source))
    for value in nested_values(sharded_state_dict):
        if not isinstance(value, ShardedTensor) or value.key not in saved:
            continue
        want, have = tuple(value.global_shape), tuple(saved[value.key].global_shape)
        if want != have:
            raise CheckpointError(
                f"{source.parent}: weight {value.key!r} has shape {have} but the model built from the config "
                f"needs {want}: the checkpoint holds another model (its config.yaml or the run's model: "
                "settings do not match its weights)")


@dataclass
class LoadReport:
    """What a load left out: TE ``_extra_state`` the checkpoint lacked (this model starts those
    FP8 scales fresh) or held for modules this model does not have, and other checkpoint
    entries this model has no place for."""

    extra_state_not_in_checkpoint: list[str] = field(default_factory=list)
    extra_state_not_in_model: list[str] = field(default_factory=list)
    unused_checkpoint_keys: list[str] = field(default_factory=list)


@contextlib.contextmanager
def reading_checkpoint(source: Path, what: str):
    """Errors of reading a ``dist_checkpointing`` directory (a truncated or corrupt shard) as
    one :class:`CheckpointError` naming it."""
    try:
        yield
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, _TorchCheckpointException) as exc:
        if isinstance(exc, OSError) and exc.filename is not None or isinstance(exc, CheckpointError):
            raise  # already names its file
        # torch's CheckpointException carries each rank's traceback: its last line is the cause
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[-1].strip()[:300]
        raise CheckpointError(f"{source}: {what} cannot be read ({type(exc).__name__}: {cause}): a truncated "
                              "or corrupt checkpoint, or one written for another model") from exc


def load_model_weights(model_chunks, ckpt_dir: str | Path, sharded_strategy=None) -> LoadReport:
    """Collective: load ``<ckpt_dir>/model/`` into the model, resharding to this layout.

    Checkpoints written with the local layer spec (CPU runs, ``longsky convert import``)
    load into the Transformer Engine spec and the other way round: TE's ``_extra_state``
    entries (FP8 scaling metadata, no weights) missing on either side are left out and
    logged (megatron-core's ``StrictHandling.RETURN_ALL`` reports the mismatch). A weight
    the model needs and the checkpoint lacks is an error. ``sharded_strategy``: e.g. the
    fully parallel load wrapper (training/checkpointing.py).
    """
    source = Path(ckpt_dir) / MODEL
    if not source.is_dir():
        raise FileNotFoundError(f"{source} not found: not a checkpoint with model weights")
    return load_dist_checkpoint_weights(model_chunks, source, sharded_strategy=sharded_strategy)


def load_dist_checkpoint_weights(model_chunks, source: str | Path, sharded_strategy=None, key: str | None = None,
                                 metadata: dict | None = None, common_strategy=None,
                                 not_weights: tuple[str, ...] = ()) -> LoadReport:
    """Collective: load the model from the dist checkpoint directory ``source``.

    ``key``: the entry the model's state sits under in that checkpoint (Megatron-LM saves it
    under ``'model'``, beside its args and optimizer); ``metadata``: the checkpoint's content
    metadata, handed to ``sharded_state_dict`` as the saver did. Entries of ``common.pt``
    that are not the model's (args, iteration, ...) are never put into the model.
    ``not_weights``: key prefixes of checkpoint entries known not to be model weights (e.g.
    the optimizer state of a training checkpoint), left out of ``unused_checkpoint_keys``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    source = Path(source)
    chunks = [unwrap(m) for m in _as_list(model_chunks)]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline stages (several model chunks) are not supported")
    requested = chunks[0].sharded_state_dict(metadata=metadata) if metadata is not None \
        else model_sharded_state_dict(chunks)
    names = set(requested)
    # missing: in the checkpoint, asked by no rank; unexpected: asked here, not in the checkpoint
    # (megatron-core has already dropped those from what it loads).
    with reading_checkpoint(source, "the weights"):
        check_weight_shapes(requested, source)
        state, missing, unexpected = dist_checkpointing.load(
            {key: requested} if key else requested, str(source), sharded_strategy=sharded_strategy,
            common_strategy=common_strategy, strict=StrictHandling.RETURN_ALL)
    if key:
        state = state.get(key, {})
    # dist_checkpointing.load merges the checkpoint's common.pt into what it returns.
    state = {k: v for k, v in state.items() if k in names}
    lacking = sorted(k for k in unexpected if not is_extra_state_key(k))
    if lacking:
        raise CheckpointError(f"{source} lacks {len(lacking)} weight(s) this model needs, e.g. {lacking[:4]}: "
                              "it was written for another model (layers, sizes or tied embeddings differ)")
    report = LoadReport(
        extra_state_not_in_checkpoint=sorted(unexpected),
        extra_state_not_in_model=sorted(k for k in missing if is_extra_state_key(k)),
        unused_checkpoint_keys=sorted(k for k in missing if not is_extra_state_key(k)
                                      and not k.startswith(not_weights)),
    )
    result = chunks[0].load_state_dict(state, strict=False)
    wrong = [k for k in list(result.missing_keys) + list(result.unexpected_keys) if not is_extra_state_key(k)]
    if wrong:
        raise KeyError(f"loading {source}: state-dict keys do not match the model: {wrong[:4]}")
    if report.extra_state_not_in_checkpoint:
        log.info("%s: no Transformer Engine extra state for %d module(s) (a checkpoint from the local layer "
                 "spec): their FP8 scaling state starts fresh", source, len(report.extra_state_not_in_checkpoint))
    if report.extra_state_not_in_model:
        log.info("%s: ignored Transformer Engine extra state of %d module(s) this model (local layer spec) "
                 "does not have", source, len(report.extra_state_not_in_model))
    if report.unused_checkpoint_keys:
        log.warning("%s: %d checkpoint entr%s not used by this model: %s", source,
                    len(report.unused_checkpoint_keys), "y" if len(report.unused_checkpoint_keys) == 1 else "ies",
                    report.unused_checkpoint_keys[:4])
    return report
