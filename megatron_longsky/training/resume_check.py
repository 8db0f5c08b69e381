"""What a resume must agree on with the checkpoint it resumes.

A resume continues one run: the same data, model and tokenizer, and the same learning-rate
schedule. A checkpoint root left over from another run (another dataset, another model)
or a config whose schedule was edited must not be continued silently:

- :func:`check_same_run`: data, model architecture, tokenizer and ``seed`` (it sets the
  data order and the dropout/initialisation streams) must match the checkpoint's
  ``config.yaml``; ``checkpoint.allow_mismatch=true`` resumes anyway.
- :func:`check_schedule`: ``optimizer.lr``/``min_lr``, ``schedule.warmup_iters``,
  ``decay_iters`` (``train_iters`` when unset), ``decay_style`` and the weight decay must
  match the checkpoint's scheduler, unless ``schedule.on_resume`` says which side wins:
  ``use_config`` (Megatron-LM's ``--override-opt_param-scheduler``) or ``use_checkpoint``
  (``--use-checkpoint-opt_param-scheduler``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_longsky.config import ConfigError

# Model fields that define the parameters and what they compute (layout, precision and
# recomputation may change between runs; the weights reshard).
_MODEL_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "vocab_size", "tie_embeddings", "seq_length", "rope")
_DATA_FIELDS = ("kind", "prefixes", "weights", "split")
_TOKENIZER_FIELDS = ("type", "model")
_PATH_FIELDS = {"data.prefixes", "tokenizer.model"}
# Top-level fields: the seed shuffles the data (a changed seed changes the order silently).
_TOP_FIELDS = ("seed",)

# scheduler state key -> the config field(s) that set it
SCHEDULE_FIELDS = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "schedule.warmup_iters",
    "lr_decay_steps": "schedule.decay_iters (train_iters when unset)",
    "lr_decay_style": "schedule.decay_style",
    "start_wd": "optimizer.weight_decay",
    "end_wd": "optimizer.weight_decay",
}


def _normalise(name: str, value: Any) -> Any:
    if name in _PATH_FIELDS and value is not None:
        paths = value if isinstance(value, list) else [value]
        resolved = [os.path.abspath(os.path.expanduser(str(p))) for p in paths]
        return resolved if isinstance(value, list) else resolved[0]
    return value


def run_differences(saved: dict, current: dict) -> list[str]:
    """``section.field: checkpoint X, this run Y`` for every identity field that differs."""
    out = [f"{name}: checkpoint {saved[name]!r}, this run {current.get(name)!r}"
           for name in _TOP_FIELDS if name in saved and saved[name] != current.get(name)]
    # Checkpoints keep a copy of their tokenizer and record its fingerprint: the same tokenizer
    # read from another path (the copy, a moved file) is the same run.
    fingerprints = saved.get("tokenizer_fingerprint"), current.get("tokenizer_fingerprint")
    by_content = None not in fingerprints
    if by_content and fingerprints[0] != fingerprints[1]:
        out.append(f"tokenizer: checkpoint fingerprint {fingerprints[0]}, this run {fingerprints[1]}")
    for section, names in (("data", _DATA_FIELDS), ("model", _MODEL_FIELDS), ("tokenizer", _TOKENIZER_FIELDS)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for name in names:
            if name not in old:  # an older checkpoint that did not record it
                continue
            if by_content and section == "tokenizer" and name == "model":
                continue
            key = f"{section}.{name}"
            if _normalise(key, old.get(name)) != _normalise(key, new.get(name)):
                out.append(f"{key}: checkpoint {old.get(name)!r}, this run {new.get(name)!r}")
    return out


def check_same_run(saved: dict, current: dict, ckpt_dir: str | Path, allow_mismatch: bool = False) -> list[str]:
    """Refuse to resume ``ckpt_dir`` (saved with config ``saved``) with another data/model/tokenizer."""
    diffs = run_differences(saved, current)
    if diffs and not allow_mismatch:
        raise ConfigError(
            f"will not resume {ckpt_dir}: it was saved by a run with other data, model, tokenizer or seed "
            "settings:\n  "
            + "\n  ".join(diffs)
            + "\nA new run needs its own checkpoint.save (or output_dir); to start from these weights use "
              "checkpoint.init_from; to resume anyway set checkpoint.allow_mismatch=true")
    return diffs


def schedule_differences(saved: dict, scheduler) -> list[str]:
    out = []
    for key, field_name in SCHEDULE_FIELDS.items():
        if key in saved and saved[key] != getattr(scheduler, key):
            out.append(f"{field_name}: checkpoint {saved[key]!r} ({key}), this run {getattr(scheduler, key)!r}")
    return out


def check_schedule(saved: dict, scheduler, policy: str, ckpt_dir: str | Path) -> list[str]:
    """Decide whose schedule a resume uses; set megatron-core's scheduler flags to match.

    ``policy``: ``check`` (differences are an error), ``use_config``, ``use_checkpoint``."""
    diffs = schedule_differences(saved, scheduler)
    if diffs and policy == "check":
        raise ConfigError(
            f"will not resume {ckpt_dir} silently with another learning-rate schedule:\n  " + "\n  ".join(diffs)
            + "\nSet schedule.on_resume=use_config to continue with this config's schedule from iteration "
              f"{saved.get('num_steps')} (Megatron-LM's --override-opt_param-scheduler; e.g. when extending a "
              "run), or schedule.on_resume=use_checkpoint to keep the checkpoint's "
              "(--use-checkpoint-opt_param-scheduler)")
    scheduler.override_opt_param_scheduler = policy == "use_config"
    scheduler.use_checkpoint_opt_param_scheduler = policy != "use_config"
    return diffs
