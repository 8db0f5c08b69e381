"""``longsky preprocess-sft``: chat jsonl -> indexed datasets of tokens and of the loss mask.

Output (both readable by megatron-core's ``IndexedDataset``, one document per sample,
documents aligned one to one)::

    <prefix>_tokens_document.{bin,idx,meta.json}     token ids
    <prefix>_loss_mask_document.{bin,idx,meta.json}  uint8, 1 on assistant tokens

The chat template is the tokenizer's own (jinja) when it has one, else the built-in
one (see :mod:`megatron_longsky.sft.template`). Over-long samples are truncated or
dropped (``--max-length``, ``--overlong``); bad records stop the run with
``file:line`` or, with ``--skip-bad-lines``, are skipped and counted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np

from megatron_longsky.data.indexed import IndexedDatasetWriter, commit_datasets, dataset_files, token_dtype
from megatron_longsky.data.jsonl import expand_inputs, iter_line_batches, total_size
from megatron_longsky.data.workers import stop_on_signals
from megatron_longsky.sft.encode import RecordEncoder, encode_batches
from megatron_longsky.sft.formats import FORMATS, SFTFormatError
from megatron_longsky.utils.output_paths import check_outputs, check_prefix

log = logging.getLogger(__name__)

TOKENS_KEY = "tokens"
LOSS_MASK_KEY = "loss_mask"


def check_sft_outputs(output_prefix: str | Path, inputs: Sequence[str | Path] = (), overwrite: bool = False,
                      flag: str = "--output-prefix") -> None:
    """Both datasets of ``output_prefix`` may be written (before any work; see ``check_outputs``)."""
    check_prefix(output_prefix, flag)
    tokens_prefix, mask_prefix = sft_prefixes(output_prefix)
    check_outputs(dataset_files(tokens_prefix) + dataset_files(mask_prefix), inputs, overwrite)


def sft_prefixes(output_prefix: str | Path) -> tuple[str, str]:
    """``(<prefix>_tokens_document, <prefix>_loss_mask_document)``."""
    return f"{output_prefix}_{TOKENS_KEY}_document", f"{output_prefix}_{LOSS_MASK_KEY}_document"


@dataclass
class SFTPreprocessConfig:
    output_prefix: str
    format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto"
    system_prompt: Optional[str] = None
    chat_template: str = "auto"  # auto | builtin | path/to/template.jinja
    max_length: Optional[int] = None  # tokens per sample; None keeps every length
    overlong: Literal["truncate", "drop"] = "truncate"
    skip_bad_lines: bool = False
    workers: int = 1
    overwrite: bool = False  # replace existing output datasets (refused otherwise)

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")


@dataclass
class SFTSummary:
    samples: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0  # truncation removed every assistant token
    bad_lines: dict = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        bad = sum(self.bad_lines.values())
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_lines.items())) or "none"
        return (f"samples={self.samples} tokens={self.tokens} assistant_tokens={self.assistant_tokens} "
                f"truncated={self.truncated} dropped_overlong={self.dropped_overlong} "
                f"dropped_no_target={self.dropped_no_target} bad_lines={bad} ({kinds}) "
                f"time={self.seconds:.1f}s")


class SFTWriter:
    """Tokenize conversations into the two aligned datasets (under temporary names)."""

    def __init__(self, cfg: SFTPreprocessConfig, tokenizer, inputs: Sequence[str | Path] = ()):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.encoder = RecordEncoder(tokenizer, cfg.chat_template, cfg.format, cfg.system_prompt)
        self.template = self.encoder.template
        self.summary = SFTSummary()
        self._bad: Counter = Counter()
        check_sft_outputs(cfg.output_prefix, inputs, cfg.overwrite)
        tokens_prefix, mask_prefix = sft_prefixes(cfg.output_prefix)
        self.tokens = IndexedDatasetWriter(tokens_prefix, token_dtype(tokenizer.vocab_size),
                                           overwrite=cfg.overwrite, inputs=inputs)
        try:
            self.masks = IndexedDatasetWriter(mask_prefix, np.uint8, overwrite=cfg.overwrite, inputs=inputs)
        except BaseException:
            self.tokens.abort()
            raise
        self._start = time.perf_counter()

    def bad_line(self, where: str, kind: str, message: str) -> None:
        if not self.cfg.skip_bad_lines:
            raise SFTFormatError(message if message.startswith(where) else f"{where}: {message}", kind)
        self._bad[kind] += 1
        if sum(self._bad.values()) <= 5:
            log.warning("skipping %s", message if message.startswith(where) else f"{where}: {message}")

    def add_record(self, record, where: str) -> bool:
        """Add one parsed JSON record; returns whether a sample was written."""
        return self.add_result(where, self.encoder.encode_record(record, where))

    def add_result(self, where: str, result) -> bool:
        """Add what :class:`RecordEncoder` made of one record (a sample or a bad line)."""
        if result[0] == "bad":
            self.bad_line(where, result[1], result[2])
            return False
        return self.add_encoded(result[1], result[2])

    def add_encoded(self, tokens: np.ndarray, mask: np.ndarray) -> bool:
        s = self.summary
        limit = self.cfg.max_length
        truncated = limit is not None and len(tokens) > limit
        if truncated:
            if self.cfg.overlong == "drop":
                s.dropped_overlong += 1
                return False
            tokens, mask = tokens[:limit], mask[:limit]
        if not mask.any():
            s.dropped_no_target += 1
            return False
        s.truncated += truncated
        self.tokens.add_document(tokens.astype(self.tokens.dtype, copy=False), [len(tokens)])
        self.masks.add_document(mask, [len(mask)])
        s.samples += 1
        s.tokens += int(len(tokens))
        s.assistant_tokens += int(mask.sum())
        return True

    def finish(self, extra_meta: Optional[dict] = None) -> SFTSummary:
        """Write the indexes and metadata and rename everything into place."""
        s = self.summary
        if s.samples == 0:
            self.abort()
            inputs = ", ".join(map(str, (extra_meta or {}).get("inputs", []))) or "the input"
            raise ValueError(f"no usable samples in {inputs} for {self.cfg.output_prefix} ({s.text()})")
        s.bad_lines = dict(self._bad)
        s.seconds = time.perf_counter() - self._start
        meta = {
            "tokenizer": self.tokenizer.metadata(),
            "sft": {"chat_template": self.template.describe(), "config": asdict(self.cfg),
                    "summary": asdict(s)},
            **(extra_meta or {}),
        }
        self.tokens.finalize({**meta, "kind": "sft_tokens"})
        self.masks.finalize({**meta, "kind": "sft_loss_mask"})
        commit_datasets([self.tokens, self.masks])
        return s

    def abort(self) -> None:
        self.tokens.abort()
        self.masks.abort()


def preprocess_records(records: Iterable[tuple[str, object]], tokenizer, cfg: SFTPreprocessConfig,
                       extra_meta: Optional[dict] = None) -> SFTSummary:
    """``records`` yields ``(where, parsed JSON record)``; used by SynL to write SFT data directly."""
    writer = SFTWriter(cfg, tokenizer)
    try:
        for where, record in records:
            writer.add_record(record, where)
        return writer.finish(extra_meta)
    except BaseException:
        writer.abort()
        raise


def preprocess_files(inputs: list[str], tokenizer, cfg: SFTPreprocessConfig, progress: bool = True,
                     tokenizer_cfg=None) -> SFTSummary:
    """Preprocess jsonl files; ``cfg.workers > 1`` encodes in spawned processes (pass the
    ``tokenizer_cfg`` they rebuild the tokenizer from)."""
    from megatron_longsky.utils.progress import progress_bar

    paths = expand_inputs(inputs)
    writer = SFTWriter(cfg, tokenizer, inputs=paths)
    bar = progress_bar(total=total_size(paths), unit="B", unit_scale=True, desc="preprocess-sft",
                       enabled=progress, file=sys.stderr)
    try:
        batches = iter_line_batches(paths, max_lines=256, progress=bar.update)
        with contextlib.closing(encode_batches(batches, writer.encoder, cfg.workers, tokenizer_cfg)) as encoded_batches:
            for encoded in encoded_batches:
                for where, result in encoded:
                    writer.add_result(where, result)
                bar.set_postfix(samples=writer.summary.samples, refresh=False)
        summary = writer.finish({"inputs": [str(p) for p in paths]})
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return summary


def build_parser() -> argparse.ArgumentParser:
    from megatron_longsky.tokenizer import add_tokenizer_args

    p = argparse.ArgumentParser(prog="longsky preprocess-sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True,
                   help="jsonl / jsonl.gz files, directories or globs (several per flag; repeatable)")
    p.add_argument("--output-prefix", required=True,
                   help="writes <P>_tokens_document and <P>_loss_mask_document (.bin/.idx/.meta.json)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="record shape: messages, sharegpt (conversations), alpaca; auto detects per record")
    p.add_argument("--system-prompt", default=None, help="system turn added to records that have none")
    p.add_argument("--chat-template", default="auto",
                   help="auto (the tokenizer's own, else built-in), builtin, or a .jinja file")
    p.add_argument("--max-length", type=int, default=None, help="maximum tokens per sample")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                   help="what to do with samples longer than --max-length")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad records instead of stopping")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace existing output datasets")
    p.add_argument("--no-progress", action="store_true")
    add_tokenizer_args(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_longsky.tokenizer import build_tokenizer, tokenizer_config_from_args
    from megatron_longsky.utils.logging import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        cfg = SFTPreprocessConfig(
            output_prefix=args.output_prefix, format=args.format, system_prompt=args.system_prompt,
            chat_template=args.chat_template, max_length=args.max_length, overlong=args.overlong,
            skip_bad_lines=args.skip_bad_lines, workers=args.workers, overwrite=args.overwrite)
        check_sft_outputs(args.output_prefix, expand_inputs(args.input), args.overwrite)  # before any work
        tokenizer_cfg = tokenizer_config_from_args(args)
        tokenizer = build_tokenizer(tokenizer_cfg)
        with stop_on_signals():  # Ctrl-C / SIGTERM unwind like an exception: temporary outputs are removed
            summary = preprocess_files(args.input, tokenizer, cfg, progress=not args.no_progress,
                                       tokenizer_cfg=tokenizer_cfg)
    except (ValueError, OSError) as exc:  # user errors (SFTFormatError, CorpusError, ...) name file/line
        print(f"preprocess-sft: error: {exc}", file=sys.stderr)
        return 2
    tokens_prefix, mask_prefix = sft_prefixes(args.output_prefix)
    print(f"wrote {tokens_prefix} and {mask_prefix}: {summary.text()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
