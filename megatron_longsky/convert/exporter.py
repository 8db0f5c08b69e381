"""Our checkpoint (any TP/PP layout) -> Hugging Face LlamaForCausalLM directory.

Writes ``config.json`` (RoPE base and scaling of the trained model), one safetensors
shard per decoder layer plus ``model.safetensors.index.json``, and the tokenizer files
(from ``tokenizer_dir``, else the checkpoint's own tokenizer when it is a directory of
HF files). Loads in ``transformers`` with no custom code. The checkpoint is loaded
once into a single-process model (dist_checkpointing reshards any layout to TP=1/PP=1);
each shard is written from it in turn, so the extra memory is one layer's tensors.
Padding rows megatron added to the vocabulary are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_longsky.convert.hf_config import ConversionError, hf_config_from_model
from megatron_longsky.convert.importer import check_tokenizer_fits, tokenizer_entry, tokenizer_files
from megatron_longsky.runtime.device import dtype_from_name, dtype_name
from megatron_longsky.convert.mapping import HF_GLOBAL, MEGATRON_GLOBAL, MEGATRON_LAYER_KEYS, layer_to_hf

log = logging.getLogger(__name__)



def _checkpoint_tokenizer_dir(conf: dict) -> Optional[Path]:
    tok = conf.get("tokenizer") or {}
    model = tok.get("model")
    if not model:
        return None
    path = Path(model)
    path = path if path.is_dir() else path.parent
    return path if tokenizer_files(path) else None


def _load_tokenizer(tok_dir: Optional[Path], conf: dict, where: str):
    """Our tokenizer object for ``tok_dir`` (HF files), else the checkpoint's ``tokenizer:``."""
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer

    entry = tokenizer_entry(tok_dir) if tok_dir is not None else conf.get("tokenizer")
    if not entry:
        return None
    try:
        return build_tokenizer(TokenizerConfig(**entry))
    except (TypeError, ValueError, OSError) as exc:
        raise ConversionError(f"{where if tok_dir is None else tok_dir}: tokenizer {entry} cannot be loaded ({exc})") from exc


def _padded_vocab(cfg, tok_vocab: Optional[int], where: str) -> int:
    if cfg.vocab_size:
        return int(cfg.vocab_size)
    if tok_vocab is None:
        raise ConversionError(f"{where}: model.vocab_size is unset and no tokenizer is available to size it")
    return cfg.padded_vocab_size(tok_vocab)


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Export a checkpoint root or iteration directory to ``out_dir``; returns ``out_dir``."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from megatron_longsky.checkpoint import load_model_weights, read_checkpoint_config, resolve_checkpoint
    from megatron_longsky.model import build_model, model_config_from_dict
    from megatron_longsky.runtime.distributed import ParallelConfig
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.utils.atomic import atomic_directory
    from megatron_longsky.utils.output_paths import check_outputs

    out_dir = Path(out_dir)
    # never over, around or inside the checkpoint or the tokenizer directory (any spelling)
    named = [Path(ckpt_path)] + ([Path(tokenizer_dir)] if tokenizer_dir else [])
    check_outputs([], tree_outputs=[out_dir], tree_inputs=named, overwrite=overwrite)
    ckpt = resolve_checkpoint(ckpt_path)
    conf = read_checkpoint_config(ckpt)
    where = str(ckpt / "config.yaml")
    if "model" not in conf:
        raise ConversionError(f"{where}: has no 'model:' section")
    cfg = model_config_from_dict(conf["model"], where=f"{where}: model")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _checkpoint_tokenizer_dir(conf)
    if tok_dir is not None and not tokenizer_files(tok_dir):
        raise ConversionError(f"{tok_dir}: no tokenizer files (tokenizer.json / tokenizer.model)")
    tokenizer = _load_tokenizer(tok_dir, conf, where)
    tok_vocab = tokenizer.vocab_size if tokenizer is not None else None
    if tok_dir is None and tokenizer is not None:
        log.warning("export: the checkpoint's %s tokenizer has no Hugging Face files to ship; "
                    "pass --tokenizer-dir to include one", tokenizer.type)
    padded = _padded_vocab(cfg, tok_vocab, where)
    base_path = ckpt / "hf_config.json"
    base = json.loads(base_path.read_text(encoding="utf-8")) if base_path.exists() else None
    # The real vocabulary: the imported model's, else the tokenizer's, else every row.
    vocab = int(base["vocab_size"]) if base else (tok_vocab or padded)
    if vocab > padded:
        raise ConversionError(f"{where}: vocabulary {vocab} is larger than the model's {padded} embedding rows")
    check_tokenizer_fits(tok_vocab, vocab, str(tok_dir))
    # Trained checkpoints record the dtype they ran in; 'auto' (a hand-written config) exports
    # float32, which holds any stored dtype exactly.
    out_dtype = dtype_from_name(dtype or cfg.resolved_dtype(on_gpu=False), "dtype")
    check_outputs([], tree_outputs=[out_dir], overwrite=overwrite,
                  tree_inputs=named + [ckpt] + ([tok_dir] if tok_dir is not None else []))

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        with single_process_runtime():
            build_cfg = dataclasses.replace(cfg, transformer_impl="local", fp8=None)
            model = build_model(build_cfg, ParallelConfig(), padded, pre_process=True, post_process=True,
                                initialize=False)
            load_model_weights(model, ckpt)
            params = {n: p.detach() for n, p in model.named_parameters()}
            n_shards = cfg.num_layers + 1
            weight_map: dict[str, str] = {}

            def write(shard: int, tensors: dict[str, torch.Tensor]) -> None:
                name = f"model-{shard:05d}-of-{n_shards:05d}.safetensors"
                save_file({k: v.to(out_dtype).contiguous().cpu() for k, v in tensors.items()}, str(tmp / name),
                          metadata={"format": "pt"})
                weight_map.update({k: name for k in tensors})

            for i in tqdm(range(cfg.num_layers), desc="export layers", unit="layer", disable=None):
                layer = {k: params[f"decoder.layers.{i}.{k}"] for k in MEGATRON_LAYER_KEYS}
                tensors = {f"model.layers.{i}.{k}": v for k, v in layer_to_hf(layer, cfg).items()}
                if i == 0:
                    tensors[HF_GLOBAL["embed"]] = params[MEGATRON_GLOBAL["embed"]][:vocab]
                write(i + 1, tensors)
            last = {HF_GLOBAL["norm"]: params[MEGATRON_GLOBAL["norm"]]}
            if not cfg.tie_embeddings:
                last[HF_GLOBAL["head"]] = params[MEGATRON_GLOBAL["head"]][:vocab]
            write(n_shards, last)
            del model, params
        total = sum(os.path.getsize(tmp / f) for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        hf = hf_config_from_model(cfg, vocab, base=base, torch_dtype=dtype_name(out_dtype))
        if base is None and tokenizer is not None:
            hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eod_id,
                      pad_token_id=getattr(tokenizer, "pad_id", None))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tok_dir is not None:
            for f in tokenizer_files(tok_dir):
                shutil.copy2(f, tmp / f.name)
    log.info("export: %s -> %s (vocab %d of %d rows, %s)", ckpt, out_dir, vocab, padded, dtype_name(out_dtype))
    return out_dir
