"""Hugging Face Llama-family model directory -> our checkpoint layout.

    <out>/latest
    <out>/iter_0000000/config.yaml      model: (ModelConfig), tokenizer:, parallel:
    <out>/iter_0000000/model/           megatron-core dist_checkpointing (global tensors)
    <out>/iter_0000000/tokenizer/       copy of the HF tokenizer files (when present)
    <out>/iter_0000000/hf_config.json   the original config.json (export reuses its token ids)

The model is built in one process at TP=1/PP=1 and filled layer by layer from the
memory-mapped HF files; ``dist_checkpointing`` stores global tensors, so the result
loads at the requested TP/PP (validated here and recorded under ``parallel:``) or any
other valid layout. Peak memory: one full copy of the weights in the storage dtype
(``dist_checkpointing.save`` takes the whole state dict at once) plus one layer of
conversion temporaries. The output directory appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from megatron_longsky.convert.hf_config import ConversionError, model_config_from_hf, read_hf_config
from megatron_longsky.convert.hf_weights import HFWeights
from megatron_longsky.convert.mapping import (
    HF_GLOBAL,
    HF_LAYER_KEYS,
    MEGATRON_GLOBAL,
    check_hf_layer,
    layer_to_megatron,
    pad_vocab_rows,
)
from megatron_longsky.checkpoint.layout import TOKENIZER_DIR, TOKENIZER_FILES, store_tokenizer
from megatron_longsky.config import ConfigError
from megatron_longsky.model.config import ModelConfig, check_parallel_layout

log = logging.getLogger(__name__)



def validate_layout(cfg: ModelConfig, tp: int, pp: int, where: str = "layout") -> None:
    """TP must split the model the way megatron-core can (TP may exceed the KV groups when
    it is a multiple of them) and PP must divide the layers."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"{where}: tp ({tp}) and pp ({pp}) must be >= 1")
    try:
        check_parallel_layout(cfg, tp, pp)  # the rule train and plan use
    except ConfigError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def tokenizer_vocab_size(directory: Path) -> Optional[int]:
    """Vocabulary size (with added tokens) of the tokenizer in ``directory``, if any."""
    from megatron_longsky.tokenizer import TokenizerConfig, build_tokenizer

    entry = tokenizer_entry(directory)
    if entry is None:
        return None
    try:
        return build_tokenizer(TokenizerConfig(**entry)).vocab_size
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{entry['model']}: cannot load the tokenizer ({exc})") from exc


def tokenizer_entry(directory: Path) -> Optional[dict]:
    """Our ``tokenizer:`` config for the tokenizer files in ``directory``."""
    if (directory / "tokenizer.json").is_file():
        return {"type": "hf", "model": str(directory)}
    if (directory / "tokenizer.model").is_file():
        return {"type": "sentencepiece", "model": str(directory / "tokenizer.model")}
    return None


def check_tokenizer_fits(tok_vocab: Optional[int], model_vocab: int, where: str) -> None:
    if tok_vocab is not None and tok_vocab > model_vocab:
        raise ConversionError(
            f"{where}: the tokenizer has {tok_vocab} tokens but the model's vocabulary has only "
            f"{model_vocab} rows: ids >= {model_vocab} would have no embedding"
        )


def _check_shape(name: str, tensor_shape, expected, where: str) -> None:
    if tuple(tensor_shape) != tuple(expected):
        raise ConversionError(f"{where}: tensor {name!r} has shape {tuple(tensor_shape)}, expected {tuple(expected)}")


@torch.no_grad()
def _fill_model(model, weights: HFWeights, cfg: ModelConfig, hf_vocab: int, padded: int, where: str) -> None:
    from tqdm import tqdm

    params = dict(model.named_parameters())
    used: set[str] = set()

    def copy(meg_name: str, tensor: torch.Tensor) -> None:
        target = params[meg_name]
        _check_shape(meg_name, tensor.shape, target.shape, where)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(f"{where}: {bad} NaN/Inf values in the weights of {meg_name} "
                                  "(a corrupt or diverged checkpoint); nothing was written")
        target.copy_(tensor.to(target.dtype))

    h = cfg.hidden_size
    _check_shape(HF_GLOBAL["embed"], weights.shape(HF_GLOBAL["embed"]), (hf_vocab, h), where)
    copy(MEGATRON_GLOBAL["embed"], pad_vocab_rows(weights.get(HF_GLOBAL["embed"]), padded))
    used.add(HF_GLOBAL["embed"])
    for i in tqdm(range(cfg.num_layers), desc="import layers", unit="layer", disable=None):
        prefix = f"model.layers.{i}."
        hf = {key: weights.get(prefix + key) for key in HF_LAYER_KEYS if prefix + key in weights}
        check_hf_layer(hf, cfg, f"{where} layer {i}")
        for key, tensor in layer_to_megatron(hf, cfg).items():
            copy(f"decoder.layers.{i}.{key}", tensor)
        used.update(prefix + key for key in HF_LAYER_KEYS)
    _check_shape(HF_GLOBAL["norm"], weights.shape(HF_GLOBAL["norm"]), (h,), where)
    copy(MEGATRON_GLOBAL["norm"], weights.get(HF_GLOBAL["norm"]))
    used.add(HF_GLOBAL["norm"])
    if cfg.tie_embeddings:
        used.add(HF_GLOBAL["head"])  # a tied lm_head, if stored at all, is the embedding
    else:
        _check_shape(HF_GLOBAL["head"], weights.shape(HF_GLOBAL["head"]), (hf_vocab, h), where)
        copy(MEGATRON_GLOBAL["head"], pad_vocab_rows(weights.get(HF_GLOBAL["head"]), padded))
        used.add(HF_GLOBAL["head"])
    unexpected = sorted(n for n in weights.names() if n not in used and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ConversionError(
            f"{where}: tensors the Llama layout does not have (unsupported architecture variant?): "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


def import_checkpoint(
    hf_dir: str | Path,
    out_root: str | Path,
    tp: int = 1,
    pp: int = 1,
    allow_pickle: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Convert ``hf_dir`` into a checkpoint root at ``out_root``; returns ``out_root``."""
    from megatron_longsky.checkpoint import iteration_dir, save_model_weights, write_checkpoint_config, write_latest
    from megatron_longsky.config import to_dict
    from megatron_longsky.model import build_model
    from megatron_longsky.runtime.device import DTYPES
    from megatron_longsky.runtime.distributed import ParallelConfig
    from megatron_longsky.convert.session import single_process_runtime
    from megatron_longsky.utils.atomic import atomic_directory
    from megatron_longsky.utils.output_paths import check_outputs

    hf_dir, out_root = Path(hf_dir), Path(out_root)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    # never over, around or inside the HF directory (any spelling), nor over a device or a file
    check_outputs([], tree_outputs=[out_root], tree_inputs=[hf_dir], overwrite=overwrite)
    hf = read_hf_config(hf_dir)
    where = str(hf_dir / "config.json")
    cfg = model_config_from_hf(hf, where, params_dtype=dtype)
    validate_layout(cfg, tp, pp, where)
    hf_vocab = cfg.vocab_size
    check_tokenizer_fits(tokenizer_vocab_size(hf_dir), hf_vocab, str(hf_dir))
    padded = cfg.padded_vocab_size(tensor_parallel=tp)
    saved_cfg = dataclasses.replace(cfg, vocab_size=padded)
    weights = HFWeights(hf_dir, allow_pickle=allow_pickle)

    with atomic_directory(out_root, overwrite=overwrite) as tmp_root:
        tmp_iter = iteration_dir(tmp_root, 0)
        with single_process_runtime():
            build_cfg = dataclasses.replace(saved_cfg, transformer_impl="local", fp8=None)
            model = build_model(build_cfg, ParallelConfig(), padded, pre_process=True, post_process=True,
                                initialize=False)
            _fill_model(model, weights, cfg, hf_vocab, padded, str(hf_dir))
            log.info("import: writing dist checkpoint to %s", out_root)
            save_model_weights(model, tmp_iter)
            del model
        tokenizer = None
        if tokenizer_files(hf_dir):
            store_tokenizer(tmp_iter, {"type": "hf", "model": str(hf_dir)})
            tokenizer = tokenizer_entry(tmp_iter / TOKENIZER_DIR)
            if tokenizer:  # relative to the checkpoint: it stays valid when the checkpoint is moved
                tokenizer["model"] = str(Path(tokenizer["model"]).relative_to(tmp_iter))
        config = {
            "model": to_dict(saved_cfg),
            "parallel": to_dict(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)),
        }
        if tokenizer:
            config["tokenizer"] = tokenizer
        write_checkpoint_config(tmp_iter, config)
        (tmp_iter / "hf_config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
        write_latest(tmp_root, 0)
    log.info("import: %s -> %s (vocab %d padded to %d, TP=%d PP=%d)", hf_dir, out_root, hf_vocab, padded, tp, pp)
    return out_root
