"""Megatron-LM ``torch_dist`` checkpoints <-> our checkpoint layout (weights only).

A Megatron-LM save (core_v0.16.1 megatron/training/checkpointing.py ``save_checkpoint``):

    <dir>/latest_checkpointed_iteration.txt    "N" (or "release"; read_metadata)
    <dir>/iter_000000N/                        one dist_checkpointing save of generate_state_dict():
        common.pt                              args (argparse.Namespace), checkpoint_version 3.0,
                                               iteration, opt_param_scheduler, content_metadata, ...
        *.distcp, .metadata, metadata.json     model tensors under 'model' ('model0', ... with virtual
                                               pipeline stages), optimizer, RNG state

Sharded tensors carry global keys (``decoder.layers.self_attention.linear_qkv.weight`` with a
leading layer dimension), the same as ours, so the weights cross unchanged; what differs is the
wrapping. ``from-megatron-lm`` maps ``args`` to our ModelConfig and loads the model with the
checkpoint's own content metadata; ``to-megatron-lm`` writes the state dict Megatron-LM's save
writes, with the ``args`` that ``--use-checkpoint-args`` restores, and the command-line flags
it does not restore in ``megatron_lm_flags.txt``. Optimizer state and the data position do not
cross (different scheduler units and RNG formats).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_longsky.convert.hf_config import ConversionError
from megatron_longsky.convert.megatron_lm_args import (
    megatron_args,
    model_config_from_args,
    tokenizer_from_args,
    unrestored_flags,
)
from megatron_longsky.convert.megatron_lm_cli import FLAGS_FILE, TRACKER

log = logging.getLogger(__name__)

SOURCE_ARGS_FILE = "megatron_lm_args.json"
CHECKPOINT_VERSION = 3.0  # checkpointing.py generate_state_dict
# Entries of a Megatron-LM training checkpoint that are not model weights.
NOT_WEIGHTS = ("optimizer.", "rng_state", "rerun_state_machine")
# checkpointing.py _build_sharded_state_dict_metadata, as saved (_clean_metadata_for_serialization
# drops the process group); no optimizer, so no distrib_optim_sharding_type.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def _check_output(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that exists (unless ``overwrite``) or that would replace the input."""
    out_r, src_r = out.resolve(), Path(source).resolve()
    if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
        raise ConversionError(f"--output {out} overlaps the input checkpoint {source}: choose another output")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")


def _iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"  # checkpointing.py get_checkpoint_name


def resolve_megatron_lm_checkpoint(path: str | Path) -> tuple[Path, int]:
    """A Megatron-LM save directory (with its tracker file) or one ``iter_N`` / ``release``
    directory -> (the dist checkpoint directory, its iteration)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint not found: {path}")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text(encoding="utf-8").strip()
        if text == "release":
            target, iteration = path / "release", 0
        elif re.fullmatch(r"\d+", text):
            iteration = int(text)
            target = path / _iteration_dir_name(iteration)
        else:
            raise ConversionError(f"{tracker}: neither an iteration number nor 'release': {text!r}")
        if not target.is_dir():
            raise ConversionError(f"{tracker} names {target.name}, which does not exist")
    else:
        match = re.fullmatch(r"iter_(\d+)", path.name)
        target, iteration = path, int(match.group(1)) if match else 0
    if not dist_checkpointing.check_is_distributed_checkpoint(str(target)):
        if any(p.name.startswith("mp_rank_") for p in target.iterdir()) if target.is_dir() else False:
            raise ConversionError(f"{target}: a Megatron-LM checkpoint in the legacy 'torch' format; convert it to "
                                  "torch_dist first (Megatron-LM: --ckpt-convert-format torch_dist)")
        raise ConversionError(f"{path}: neither a Megatron-LM save directory with {TRACKER} nor a torch_dist "
                              "checkpoint directory (metadata.json)")
    return target, iteration


def read_common(ckpt_dir: Path, allow_pickle: bool = False) -> dict:
    """``common.pt`` of a dist checkpoint, loaded with megatron-core's safe types only unless
    ``allow_pickle`` (only for checkpoints you trust: unpickling can run code)."""
    import megatron.core  # noqa: F401 - registers megatron-core's safe globals (Namespace, enums)

    path = ckpt_dir / "common.pt"
    if not path.is_file():
        raise ConversionError(f"{path} not found: not a torch_dist checkpoint")
    try:
        common = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL [\w.]+", str(exc))
        raise ConversionError(f"{path}: holds objects outside megatron-core's safe types "
                              f"({found.group(0) if found else 'see the torch message'}); pass --allow-pickle "
                              "if you trust this checkpoint") from None
    if not isinstance(common, dict):
        raise ConversionError(f"{path}: not a dict: {type(common).__name__}")
    return common


def _common_strategy(common: dict):
    """megatron-core's common-state loader, fed the already read ``common.pt`` minus the
    non-model entries (they are not merged into the model's state)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _Preloaded(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return {k: v for k, v in common.items() if k == "model" or re.fullmatch(r"model\d+", k)}

    return _Preloaded()


def _storage_dtype(ckpt_dir: Path, key: str) -> torch.dtype:
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    if key not in metadata:
        raise ConversionError(f"{ckpt_dir}: holds no tensor {key!r}: not a GPT model checkpoint")
    return metadata[key].dtype


def _check_finite(model, where: str) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ConversionError(f"{where}: NaN/Inf values in {name} (a corrupt or diverged checkpoint); "
                                  "nothing was written")


def _local_tokenizer(entry: Optional[dict], tmp_iter: Path, where: str) -> Optional[dict]:
    """Our ``tokenizer:`` entry: HF tokenizer files found here are copied into the checkpoint
    (recorded relative to it, like ``convert import``); other paths are kept as given."""
    from megatron_longsky.checkpoint.layout import TOKENIZER_DIR, store_tokenizer
    from megatron_longsky.convert.importer import tokenizer_entry, tokenizer_files

    if entry is None:
        return None
    model = Path(entry["model"])
    if entry["type"] == "hf" and not entry.get("merges"):
        directory = model if model.is_dir() else model.parent
        if directory.is_dir() and tokenizer_files(directory):
            store_tokenizer(tmp_iter, {"type": "hf", "model": str(directory)})
            local = tokenizer_entry(tmp_iter / TOKENIZER_DIR)
            if local:
                return {**local, "model": str(Path(local["model"]).relative_to(tmp_iter))}
    if not model.exists():
        log.warning("%s: tokenizer %s does not exist on this machine; recorded as given (pass --tokenizer-model "
                    "to point at a copy)", where, model)
    return dict(entry)


def import_megatron_lm(checkpoint: str | Path, out_root: str | Path, tokenizer_model: Optional[str] = None,
                       allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Megatron-LM torch_dist checkpoint -> our checkpoint root at ``out_root`` (weights only)."""
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_longsky.checkpoint import iteration_dir, save_model_weights, write_checkpoint_config, write_latest
    from megatron_longsky.checkpoint.model_io import load_dist_checkpoint_weights
    from megatron_longsky.config import to_dict
    from megatron_longsky.convert.importer import check_tokenizer_fits, tokenizer_vocab_size, validate_layout
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.model import build_model
    from megatron_longsky.runtime.device import dtype_name
    from megatron_longsky.runtime.distributed import ParallelConfig
    from megatron_longsky.utils.atomic import atomic_directory

    out_root = Path(out_root)
    ckpt_dir, iteration = resolve_megatron_lm_checkpoint(checkpoint)
    _check_output(out_root, Path(checkpoint), overwrite)
    where = str(ckpt_dir / "common.pt")
    common = read_common(ckpt_dir, allow_pickle)
    if "args" not in common:
        raise ConversionError(f"{where}: has no 'args': not saved by Megatron-LM's training loop")
    version = common.get("checkpoint_version", 0)
    if version < CHECKPOINT_VERSION:
        raise ConversionError(f"{where}: checkpoint_version {version} < 3.0 (pre-megatron-core QKV ordering)")
    args = common["args"]
    cfg = model_config_from_args(args, where)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
    try:
        validate_layout(cfg, tp, pp, where)
    except ConversionError as exc:
        log.warning("%s; our config records TP=1 PP=1 instead", exc)
        tp = pp = 1
    tokenizer = tokenizer_from_args(args)
    if tokenizer_model:
        tokenizer = {"type": "sentencepiece" if str(tokenizer_model).endswith(".model") else "hf",
                     "model": str(tokenizer_model)}
    if tokenizer is None:
        log.warning("%s: tokenizer_type %r has no megatron_longsky equivalent: give `tokenizer:` in the run's config",
                    where, getattr(args, "tokenizer_type", None))
    content_metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    storage = _storage_dtype(ckpt_dir, "embedding.word_embeddings.weight")

    with atomic_directory(out_root) as tmp_root:
        tmp_iter = iteration_dir(tmp_root, 0)
        with single_process_runtime():
            build_cfg = dataclasses.replace(cfg, params_dtype=dtype_name(storage), transformer_impl="local", fp8=None)
            model = build_model(build_cfg, ParallelConfig(), cfg.vocab_size, pre_process=True, post_process=True,
                                initialize=False)
            # checkpointing.py load_checkpoint: the checkpoint's content metadata plus this job's
            # data-parallel group form the model's sharded_state_dict metadata.
            metadata = dict(content_metadata or {})
            metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
            try:
                report = load_dist_checkpoint_weights(model, ckpt_dir, key="model", metadata=metadata,
                                                      common_strategy=_common_strategy(common),
                                                      not_weights=NOT_WEIGHTS)
            except KeyError as exc:
                raise ConversionError(f"{where}: the args do not describe the saved weights: {exc.args[0]}") from None
            if report.unused_checkpoint_keys:
                raise ConversionError(
                    f"{ckpt_dir}: holds tensors the model its args describe has no place for: "
                    f"{report.unused_checkpoint_keys[:4]} (an architecture variant we cannot represent)")
            _check_finite(model, str(ckpt_dir))
            log.info("from-megatron-lm: writing dist checkpoint to %s", out_root)
            save_model_weights(model, tmp_iter)
            del model
        tokenizer = _local_tokenizer(tokenizer, tmp_iter, where)
        if (tmp_iter / "tokenizer").is_dir():  # copied in: it must fit the embedding
            check_tokenizer_fits(tokenizer_vocab_size(tmp_iter / "tokenizer"), cfg.vocab_size, where)
        config = {
            "model": to_dict(cfg),
            "parallel": to_dict(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)),
        }
        if tokenizer:
            config["tokenizer"] = tokenizer
        write_checkpoint_config(tmp_iter, config)
        source = {"checkpoint": str(Path(ckpt_dir).resolve()), "iteration": iteration,
                  "checkpoint_version": version,
                  "args": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                           for k, v in sorted(vars(args).items())}}
        (tmp_iter / SOURCE_ARGS_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        write_latest(tmp_root, 0)
    log.info("from-megatron-lm: %s -> %s (padded vocabulary %d, storage %s)", ckpt_dir, out_root, cfg.vocab_size,
             dtype_name(storage))
    return out_root


def export_megatron_lm(checkpoint: str | Path, out_dir: str | Path, dtype: Optional[str] = None,
                       overwrite: bool = False) -> tuple[Path, list[str]]:
    """Our checkpoint (any layout) -> a directory Megatron-LM loads with ``--load <dir>
    --finetune --no-load-optim --no-load-rng --use-checkpoint-args`` plus the returned flags
    (also written to ``<dir>/megatron_lm_flags.txt``)."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.utils import _clean_metadata_for_serialization

    from megatron_longsky.checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
    from megatron_longsky.checkpoint.layout import store_tokenizer
    from megatron_longsky.convert.exporter import _checkpoint_tokenizer_dir, _load_tokenizer, _padded_vocab
    from megatron_longsky.convert.importer import tokenizer_entry
    from megatron_longsky.convert.megatron_lm_args import check_exportable_rope
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.model import build_model, model_config_from_dict
    from megatron_longsky.runtime.device import dtype_from_name, dtype_name
    from megatron_longsky.runtime.distributed import ParallelConfig
    from megatron_longsky.utils.atomic import atomic_directory

    out_dir = Path(out_dir)
    ckpt = resolve_checkpoint(checkpoint)
    _check_output(out_dir, Path(checkpoint), overwrite)
    conf = read_checkpoint_config(ckpt)
    where = str(ckpt / "config.yaml")
    if "model" not in conf:
        raise ConversionError(f"{where}: has no 'model:' section")
    cfg = model_config_from_dict(conf["model"], where=f"{where}: model")
    check_exportable_rope(cfg.rope, where)
    # The tokenizer is needed only to size an unset vocabulary; its reference is passed on as is
    # (it may name a path on the machine Megatron-LM runs on).
    tokenizer = _load_tokenizer(None, conf, where) if not cfg.vocab_size else None
    padded = _padded_vocab(cfg, tokenizer.vocab_size if tokenizer is not None else None, where)
    cfg = dataclasses.replace(cfg, vocab_size=padded)
    match = re.fullmatch(r"iter_(\d+)", ckpt.name)
    iteration = int(match.group(1)) if match else 0
    parallel = conf.get("parallel") or {}
    tp = int(parallel.get("tensor_model_parallel_size", 1))
    pp = int(parallel.get("pipeline_model_parallel_size", 1))
    final = out_dir.resolve()
    tok_dir = _checkpoint_tokenizer_dir(conf)
    tok_conf = conf.get("tokenizer")
    if tok_dir is not None:  # shipped with the output; Megatron-LM restores the path from args
        entry = tokenizer_entry(tok_dir)
        name = Path(entry["model"]).name if entry["type"] == "sentencepiece" else ""
        tok_conf = {"type": entry["type"], "model": str(final / "tokenizer" / name).rstrip("/")}
    elif tok_conf and tok_conf.get("model"):
        tok_conf = {**tok_conf, "model": str(Path(tok_conf["model"]).resolve())}
    args = megatron_args(cfg, padded, tp, pp, iteration, tok_conf, where)
    if args.tokenizer_type is None:
        log.warning("to-megatron-lm: the checkpoint's tokenizer %s has no Megatron-LM equivalent: give "
                    "--tokenizer-type/--tokenizer-model to Megatron-LM", (tok_conf or {}).get("type", "(none)"))
    if any(c.isspace() for c in str(final)):
        log.warning("to-megatron-lm: %s contains white space: quote --load yourself, $(cat %s) splits it", final,
                    FLAGS_FILE)
    flags = ["--load", str(final), "--use-checkpoint-args", "--finetune", "--no-load-optim", "--no-load-rng"]
    flags += [part for flag in unrestored_flags(cfg) for part in flag.split(" ")]

    with atomic_directory(out_dir) as tmp:
        iter_dir = tmp / _iteration_dir_name(iteration)
        with single_process_runtime():
            from megatron.core.dist_checkpointing import load_tensors_metadata

            stored = load_tensors_metadata(str(ckpt / "model"))["embedding.word_embeddings.weight"].dtype
            storage = dtype_from_name(dtype, "dtype") if dtype else stored
            build_cfg = dataclasses.replace(cfg, params_dtype=dtype_name(storage), transformer_impl="local", fp8=None)
            model = build_model(build_cfg, ParallelConfig(), padded, pre_process=True, post_process=True,
                                initialize=False)
            load_model_weights(model, ckpt)
            # checkpointing.py save_checkpoint -> generate_state_dict (ckpt_format torch_dist, one
            # model chunk, no optimizer, no RNG state) -> dist_checkpointing.save(..., content_metadata).
            metadata = dict(CONTENT_METADATA)
            metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
            state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                     "model": model.sharded_state_dict(metadata=metadata),
                     "num_floating_point_operations_so_far": 0}
            iter_dir.mkdir(parents=True)
            dist_checkpointing.save(state, str(iter_dir),
                                    content_metadata=_clean_metadata_for_serialization(metadata))
            del model, state
        if tok_dir is not None:
            store_tokenizer(tmp, {"type": "hf", "model": str(tok_dir)})
        (tmp / TRACKER).write_text(str(iteration), encoding="utf-8")  # as Megatron-LM writes it
        (tmp / FLAGS_FILE).write_text("\n".join(pair_flags(flags)) + "\n", encoding="utf-8")
    log.info("to-megatron-lm: %s -> %s (iteration %d, padded vocabulary %d, %s)", ckpt, out_dir, iteration, padded,
             dtype_name(storage))
    return out_dir, flags


def pair_flags(flags: list[str]) -> list[str]:
    """One flag per line, with its value: ``$(cat megatron_lm_flags.txt)`` splits them again."""
    lines: list[str] = []
    for part in flags:
        if part.startswith("--") or not lines:
            lines.append(part)
        else:
            lines[-1] += f" {part}"
    return lines

