"""Hugging Face <-> megatron_longsky checkpoint conversion (Llama family).

    from megatron_longsky.convert import import_checkpoint, export_checkpoint
    root = import_checkpoint("hf/Skywork-13B", "ckpt/skywork", tp=4, pp=2)
    export_checkpoint("ckpt/run/latest-root", "hf/out", tokenizer_dir=None)
"""

from __future__ import annotations


def import_checkpoint(hf_dir, out_root, tp: int = 1, pp: int = 1, **kwargs):
    from megatron_longsky.convert.importer import import_checkpoint as _import

    return _import(hf_dir, out_root, tp=tp, pp=pp, **kwargs)


def export_checkpoint(ckpt_path, out_dir, tokenizer_dir=None, **kwargs):
    from megatron_longsky.convert.exporter import export_checkpoint as _export

    return _export(ckpt_path, out_dir, tokenizer_dir=tokenizer_dir, **kwargs)


__all__ = ["import_checkpoint", "export_checkpoint"]
