"""Chat jsonl lines -> (tokens, loss mask) per record, in this process or in workers.

Kept apart from :mod:`megatron_longsky.sft.preprocess` (which writes the datasets) so
that spawned workers import only the tokenizer and template code, not megatron-core.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from megatron_longsky.data.jsonl import LineBatch, loads_line
from megatron_longsky.data.workers import ordered_map
from megatron_longsky.sft.formats import SFTFormatError, parse_record
from megatron_longsky.sft.template import ChatTemplate, ChatTemplateError

# ("ok", tokens, mask) or ("bad", kind, message)
Encoded = Union[tuple[str, np.ndarray, np.ndarray], tuple[str, str, str]]


class RecordEncoder:
    def __init__(self, tokenizer, chat_template: str = "auto", fmt: str = "auto",
                 system_prompt: Optional[str] = None):
        self.template = ChatTemplate(tokenizer, chat_template)
        self.template_source = chat_template
        self.fmt = fmt
        self.system_prompt = system_prompt

    def encode_record(self, record, where: str) -> Encoded:
        try:
            turns = parse_record(record, where, self.fmt, self.system_prompt)
            tokens, mask = self.template.encode(turns)
        except SFTFormatError as exc:
            return "bad", exc.kind, str(exc)
        except ChatTemplateError as exc:
            return "bad", "template_error", f"{where}: {exc}"
        return "ok", tokens, mask

    def __call__(self, batch: LineBatch) -> list[tuple[str, Encoded]]:
        out = []
        for offset, raw in enumerate(batch.lines):
            if not raw.strip():
                continue
            where = f"{batch.source}:{batch.first_line + offset}"
            try:
                record = loads_line(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                out.append((where, ("bad", "invalid_utf8", f"{where}: invalid UTF-8 at byte {exc.start}")))
                continue
            except json.JSONDecodeError as exc:
                out.append((where, ("bad", "invalid_json", f"{where}: invalid JSON: {exc.msg} at column {exc.colno}")))
                continue
            out.append((where, self.encode_record(record, where)))
        return out


_WORKER: Optional[RecordEncoder] = None


def _init_worker(tokenizer_cfg, chat_template, fmt, system_prompt) -> None:
    from megatron_longsky.tokenizer import build_tokenizer

    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER
    _WORKER = RecordEncoder(build_tokenizer(tokenizer_cfg), chat_template, fmt, system_prompt)


def _encode_in_worker(batch: LineBatch):
    return _WORKER(batch)


def encode_batches(batches: Iterable[LineBatch], encoder: RecordEncoder, workers: int = 1,
                   tokenizer_cfg=None) -> Iterator[list[tuple[str, Encoded]]]:
    """Encoded batches in input order; ``workers > 1`` needs the ``tokenizer_cfg`` to rebuild
    the tokenizer in each spawned process."""
    if workers <= 1:
        return ordered_map(encoder, batches, 1)
    if tokenizer_cfg is None:
        raise ValueError("workers > 1 needs the tokenizer config")
    init_args = (tokenizer_cfg, encoder.template_source, encoder.fmt, encoder.system_prompt)
    return ordered_map(_encode_in_worker, batches, workers, _init_worker, init_args)
