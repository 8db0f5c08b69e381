"""jsonl corpora -> Megatron indexed datasets (``longsky preprocess``, tools/preprocess_data.py).

The main process reads raw lines in batches and writes the output; ``--workers``
processes decode, check and tokenize the batches (one tokenizer thread each; with
``--workers 1`` everything runs in this process and HF tokenizers may use Rust threads). Results are consumed in input
order whatever the worker count, so the output is byte-identical for any
``--workers``. Each ``--json-keys`` key gives ``<prefix>_<key>_document.{bin,idx}``
plus a ``.meta.json`` sidecar recording the tokenizer; all appear only when complete.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Optional

import numpy as np

from megatron_longsky.data.jsonl import (
    BadLine,
    CorpusError,
    LineBatch,
    expand_inputs,
    iter_line_batches,
    parse_batch,
    total_size,
)
from megatron_longsky.data.workers import ordered_map, stop_on_signals
from megatron_longsky.utils.logging import LOG_LEVELS
from megatron_longsky.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    add_tokenizer_args,
    build_tokenizer,
    tokenizer_config_from_args,
)

log = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    append_eod: bool = False
    workers: int = 1
    split_sentences: bool = False
    skip_bad_lines: bool = False
    batch_lines: int = 512  # lines per task sent to a worker
    sentence_sample_chars: int = 2_000_000  # Punkt training sample when no model is installed
    language: str = "english"
    progress: bool = True
    overwrite: bool = False  # replace existing outputs (refused otherwise)
    # "bad": a document that is empty or encodes to no token is a bad line (stop, or skip with
    # skip_bad_lines); "keep": Megatron-LM's treatment, stored as a document with no items
    empty_documents: Literal["bad", "keep"] = "bad"
    log_interval: Optional[int] = None  # a progress line every N documents (Megatron-LM's --log-interval)

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("at least one input is needed")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"json_keys must be non-empty and distinct, got {self.json_keys}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.batch_lines < 1:
            raise ValueError(f"batch_lines must be >= 1, got {self.batch_lines}")
        if self.empty_documents not in ("bad", "keep"):
            raise ValueError(f"empty_documents must be 'bad' or 'keep', got {self.empty_documents!r}")
        if self.log_interval is not None and self.log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {self.log_interval}")
        from megatron_longsky.data.sentences import PUNKT_LANGUAGES

        if self.language not in PUNKT_LANGUAGES:
            raise ValueError(f"--lang {self.language!r} is not a Punkt language; one of {', '.join(PUNKT_LANGUAGES)}")


@dataclass
class PreprocessStats:
    files: int = 0
    input_bytes: int = 0
    documents: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per json key
    sequences: dict[str, int] = field(default_factory=dict)
    bad_lines: dict[str, int] = field(default_factory=dict)  # by kind
    blank_lines: int = 0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # json key -> dataset prefix
    sentence_splitter: Optional[str] = None

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def summary(self) -> str:
        rate = self.total_tokens / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"preprocessed {self.files} file(s), {self.input_bytes / 1e6:.1f} MB, in {self.seconds:.1f} s: "
            f"{self.documents:,} documents, {self.total_tokens:,} tokens ({rate:,.0f} tokens/s)",
        ]
        for key, prefix in self.outputs.items():
            lines.append(f"  {prefix}.{{bin,idx,meta.json}}: {self.tokens.get(key, 0):,} tokens, "
                         f"{self.sequences.get(key, 0):,} sequences")
        if self.bad_lines:
            kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.bad_lines.items()))
            lines.append(f"  bad lines skipped: {sum(self.bad_lines.values())} ({kinds})")
        else:
            lines.append("  bad lines: none")
        if self.blank_lines:
            lines.append(f"  blank lines ignored: {self.blank_lines}")
        if self.sentence_splitter:
            lines.append(f"  sentence splitter: {self.sentence_splitter}")
        return "\n".join(lines)


@dataclass
class EncodedBatch:
    """Tokens of one batch, per key: all documents concatenated, the length of every
    item (sentence or whole document) and the number of items of each document."""

    tokens: dict[str, np.ndarray]
    item_lengths: dict[str, np.ndarray]
    items_per_doc: dict[str, np.ndarray]
    documents: int
    bad: list[BadLine]
    blank_lines: int
    nbytes: int


class BatchEncoder:
    """Parse, check and tokenize line batches (runs in each worker)."""

    def __init__(self, tokenizer: Tokenizer, keys: list[str], append_eod: bool, dtype, splitter=None,
                 keep_empty: bool = False):
        self.tokenizer = tokenizer
        self.keys = keys
        self.append_eod = append_eod
        self.keep_empty = keep_empty
        self.dtype = np.dtype(dtype)
        self.splitter = splitter
        self._eod = np.array([tokenizer.eod_id], dtype=self.dtype)

    def __call__(self, batch: LineBatch) -> EncodedBatch:
        parsed = parse_batch(batch, self.keys, allow_empty=self.keep_empty)
        n = len(parsed.line_numbers)
        per_key = {key: self._encode_documents(parsed.texts[key]) for key in self.keys}
        # A document whose text encodes to no token at all is dropped for every key (keeps keys aligned),
        # unless kept as Megatron-LM does: a document with no items.
        keep = np.ones(n, dtype=bool)
        for key, docs in per_key.items():
            if self.keep_empty:
                break
            for i, items in enumerate(docs):
                if keep[i] and not any(len(item) for item in items):
                    keep[i] = False
                    parsed.bad.append(BadLine("empty", batch.source, parsed.line_numbers[i],
                                              f"key {key!r} encodes to no tokens"))
        parsed.bad.sort(key=lambda b: b.line)
        out = EncodedBatch({}, {}, {}, int(keep.sum()), parsed.bad, parsed.blank_lines, batch.nbytes)
        for key, docs in per_key.items():
            pieces, lengths, counts = [], [], []
            for i, items in enumerate(docs):
                if not keep[i]:
                    continue
                items = [item for item in items if len(item)]  # Megatron-LM drops empty sentences
                if self.append_eod and items:  # Megatron-LM: no EOD for a document with no tokens
                    items[-1] = np.concatenate([items[-1].astype(self.dtype, copy=False), self._eod])
                pieces.extend(items)
                lengths.extend(len(item) for item in items)
                counts.append(len(items))
            tokens = np.concatenate(pieces).astype(self.dtype, copy=False) if pieces else np.zeros(0, self.dtype)
            out.tokens[key] = tokens
            out.item_lengths[key] = np.asarray(lengths, dtype=np.int64)
            out.items_per_doc[key] = np.asarray(counts, dtype=np.int64)
        return out

    def _encode_documents(self, texts: list[str]) -> list[list[np.ndarray]]:
        if self.splitter is None:
            return [[arr] for arr in self.tokenizer.encode_batch_arrays(texts)]
        sentences = [self.splitter.split(t) for t in texts]
        flat = self.tokenizer.encode_batch_arrays([s for doc in sentences for s in doc])
        docs, start = [], 0
        for doc in sentences:
            docs.append(flat[start:start + len(doc)])
            start += len(doc)
        return docs


# --- worker processes -------------------------------------------------------------

_WORKER_ENCODER: Optional[BatchEncoder] = None


def _init_worker(tokenizer_cfg: TokenizerConfig, keys, append_eod, dtype, splitter, keep_empty) -> None:
    # One tokenizer thread per worker process: parallelism comes from the processes.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_ENCODER
    _WORKER_ENCODER = BatchEncoder(build_tokenizer(tokenizer_cfg), keys, append_eod, dtype, splitter, keep_empty)


def _encode_in_worker(batch: LineBatch) -> EncodedBatch:
    return _WORKER_ENCODER(batch)


def _ordered_results(batches: Iterable[LineBatch], cfg: PreprocessConfig, encoder: BatchEncoder,
                     splitter) -> Iterator[EncodedBatch]:
    init_args = (cfg.tokenizer, cfg.json_keys, cfg.append_eod, encoder.dtype, splitter, encoder.keep_empty)
    # one process: this encoder; several: each worker builds its own (a generator either way)
    return ordered_map(encoder if cfg.workers == 1 else _encode_in_worker, batches, cfg.workers,
                       _init_worker, init_args)


# --- the run ------------------------------------------------------------------------

def _sentence_splitter(cfg: PreprocessConfig, batches: Iterator[LineBatch]):
    """Load or train the splitter; returns it and the batch stream (sample batches put back)."""
    from megatron_longsky.data.sentences import installed_punkt, load_sentence_splitter

    if installed_punkt(cfg.language) is not None:
        return load_sentence_splitter(language=cfg.language), batches
    consumed: list[LineBatch] = []
    sample: list[str] = []
    chars = 0
    for batch in batches:
        consumed.append(batch)
        parsed = parse_batch(batch, cfg.json_keys[:1])
        sample.extend(parsed.texts[cfg.json_keys[0]])
        chars += sum(map(len, parsed.texts[cfg.json_keys[0]]))
        if chars >= cfg.sentence_sample_chars:
            break
    splitter = load_sentence_splitter(sample, cfg.language, cfg.sentence_sample_chars)
    return splitter, itertools.chain(consumed, batches)


def preprocess(cfg: PreprocessConfig) -> PreprocessStats:
    from megatron_longsky import __version__
    from megatron_longsky.data.indexed import (
        IndexedDatasetWriter,
        commit_datasets,
        dataset_files,
        dataset_prefix,
        token_dtype,
    )
    from megatron_longsky.utils.output_paths import check_outputs, check_prefix
    from megatron_longsky.utils.progress import progress_bar

    start = time.perf_counter()
    check_prefix(cfg.output_prefix)
    paths = expand_inputs(cfg.inputs)
    prefixes = {key: dataset_prefix(cfg.output_prefix, key) for key in cfg.json_keys}
    # before any work: never over an input, never over an existing dataset without overwrite
    check_outputs([f for p in prefixes.values() for f in dataset_files(p)], paths, cfg.overwrite)
    tokenizer = build_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    stats = PreprocessStats(files=len(paths), input_bytes=total_size(paths))
    bar = progress_bar(total=stats.input_bytes or None, unit="B", unit_scale=True, desc="preprocess",
                       enabled=cfg.progress, file=sys.stderr, dynamic_ncols=True)
    writers: dict = {}
    committed = False
    try:
        for key, prefix in prefixes.items():  # one by one: abort() below sees every one made
            writers[key] = IndexedDatasetWriter(prefix, dtype, overwrite=cfg.overwrite, inputs=paths)
        for writer in writers.values():
            for path in writer.stale_removed:
                log.info("removed %s left by an interrupted run", path)
        batches: Iterator[LineBatch] = iter_line_batches(paths, cfg.batch_lines, progress=bar.update)
        splitter = None
        if cfg.split_sentences:
            splitter, batches = _sentence_splitter(cfg, batches)
            stats.sentence_splitter = splitter.source
        encoder = BatchEncoder(tokenizer, cfg.json_keys, cfg.append_eod, dtype, splitter,
                               keep_empty=cfg.empty_documents == "keep")
        bad_kinds: Counter = Counter()
        next_log, bytes_done = cfg.log_interval, 0
        with contextlib.closing(_ordered_results(batches, cfg, encoder, splitter)) as results:
            for result in results:
                if result.bad and not cfg.skip_bad_lines:
                    raise CorpusError(f"{result.bad[0]} (use --skip-bad-lines to skip and count such lines)")
                for bad in result.bad:
                    bad_kinds[bad.kind] += 1
                    log.debug("skipped %s", bad)
                stats.blank_lines += result.blank_lines
                stats.documents += result.documents
                bytes_done += result.nbytes
                for key, writer in writers.items():
                    _write_batch(writer, result, key)
                if next_log is not None and stats.documents >= next_log:
                    elapsed = time.perf_counter() - start
                    log.info("processed %d documents (%.0f docs/s, %.2f MB/s)", stats.documents,
                             stats.documents / elapsed, bytes_done / elapsed / 2**20)
                    next_log = (stats.documents // cfg.log_interval + 1) * cfg.log_interval
                if bar.n and bar.format_dict.get("elapsed"):
                    elapsed = bar.format_dict["elapsed"]
                    bar.set_postfix_str(f"{stats.documents / elapsed:,.0f} docs/s, "
                                        f"{sum(w.tokens for w in writers.values()) / elapsed:,.0f} tokens/s",
                                        refresh=False)
        if stats.documents == 0:
            raise CorpusError(f"no documents found in {', '.join(map(str, paths))}")
        stats.bad_lines = dict(bad_kinds)
        for key, writer in writers.items():
            writer.finalize({
                "tokenizer": tokenizer.metadata(),
                "json_key": key,
                "append_eod": cfg.append_eod,
                "split_sentences": cfg.split_sentences,
                "sentence_splitter": stats.sentence_splitter,
                "empty_documents": cfg.empty_documents,
                "sources": [str(p) for p in paths],
                "bad_lines": stats.bad_lines,
                "created_by": f"megatron_longsky {__version__} preprocess",
            })
        commit_datasets(list(writers.values()))
        committed = True
    finally:
        bar.close()
        if not committed:
            for writer in writers.values():
                writer.abort()
    stats.tokens = {key: w.tokens for key, w in writers.items()}
    stats.sequences = {key: w.sequences for key, w in writers.items()}
    stats.outputs = {key: w.prefix for key, w in writers.items()}
    stats.seconds = time.perf_counter() - start
    return stats


def _write_batch(writer, result: EncodedBatch, key: str) -> None:
    tokens, lengths, counts = result.tokens[key], result.item_lengths[key], result.items_per_doc[key]
    item_ends = np.cumsum(lengths)
    doc_item_ends = np.cumsum(counts)
    token_start, item_start = 0, 0
    for item_end in doc_item_ends.tolist():
        token_end = int(item_ends[item_end - 1])
        writer.add_document(tokens[token_start:token_end], lengths[item_start:item_end].tolist())
        token_start, item_start = token_end, item_end


# --- command line -------------------------------------------------------------------

# Megatron-LM's tools/preprocess_data.py flags that only tune its own internals. Here the
# parallelism comes from --workers alone and documents are always written in input order.
MEGATRON_NO_OPS = {
    "--partitions": "input partitions: parallelism comes from --workers; the output is in input order",
    "--keep-sequential-samples": "the output is always in input order",
    "--find-optimal-num-workers": "worker-count search: not needed, pick --workers",
    "--workers-to-check": "worker-count search: not needed, pick --workers",
    "--max-documents": "worker-count search: not needed, pick --workers",
    "--performance-dir": "worker-count search: not needed, pick --workers",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longsky preprocess",
        description="Tokenize jsonl corpora into Megatron indexed datasets "
                    "(<prefix>_<key>_document.bin/.idx plus a .meta.json sidecar). "
                    "Megatron-LM's tools/preprocess_data.py command line is accepted unchanged.",
    )
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH",
                        help="jsonl or jsonl.gz files, directories of them, or globs (several per flag; repeatable)")
    parser.add_argument("--output-prefix", required=True, help="output path prefix")
    parser.add_argument("--json-keys", nargs="+", action="extend", default=None, metavar="KEY",
                        help="keys to extract (default: text; repeatable)")
    add_tokenizer_args(parser)
    parser.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--split-sentences", action="store_true",
                        help="store each sentence as its own item (nltk Punkt, offline)")
    parser.add_argument("--keep-newlines", action="store_true",
                        help="accepted for Megatron-LM: sentences always keep every character, newlines included")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count bad lines instead of stopping at the first")
    parser.add_argument("--empty-documents", choices=("bad", "keep"), default="bad",
                        help="bad (default): an empty document, or one that encodes to no token, is a bad line; "
                             "keep: Megatron-LM's treatment, stored as a document with no tokens")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output datasets")
    parser.add_argument("--batch-lines", type=int, default=512, help="lines per worker task")
    parser.add_argument("--lang", default="english", help="Punkt language (installed model)")
    parser.add_argument("--log-interval", type=int, default=None, metavar="N",
                        help="log a progress line every N documents (Megatron-LM's flag)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    compat = parser.add_argument_group("Megatron-LM flags accepted as no-ops")
    for flag, why in MEGATRON_NO_OPS.items():
        if flag in ("--find-optimal-num-workers", "--keep-sequential-samples"):
            compat.add_argument(flag, action="store_true", help=why)
        else:
            compat.add_argument(flag, nargs="+" if flag == "--workers-to-check" else None, help=why)
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys or ["text"],
        tokenizer=tokenizer_config_from_args(args), append_eod=args.append_eod, workers=args.workers,
        split_sentences=args.split_sentences, skip_bad_lines=args.skip_bad_lines,
        batch_lines=args.batch_lines, language=args.lang, progress=not args.no_progress,
        overwrite=args.overwrite, empty_documents=args.empty_documents, log_interval=args.log_interval,
    )


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_longsky.utils.logging import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    for flag in MEGATRON_NO_OPS:
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False):
            log.info("%s: accepted for Megatron-LM compatibility, no effect (%s)", flag, MEGATRON_NO_OPS[flag])
    try:
        with stop_on_signals():  # Ctrl-C / SIGTERM unwind like an exception: temporary outputs are removed
            stats = preprocess(config_from_args(args))
    except (ValueError, OSError) as exc:  # user errors (CorpusError, OutputExistsError, ...) name file/line
        print(f"preprocess: error: {exc}", file=sys.stderr)
        return 2
    print(stats.summary())
    return 0
