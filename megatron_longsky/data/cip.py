"""Chunk Interleaved Pretraining (CIP) data: long sequences built from ordinary documents.

Each CIP sequence takes N fresh documents from the pool (a random permutation per
pass; a new pass starts when the pool is exhausted), gives each document a share of
the sequence (water-filling: short documents whole, longer ones cut to an equal
share, counted), cuts each share into K chunks and emits them round-robin:
d1c1 d2c1 ... dNc1 d1c2 ... dNcK. Sequences can be mixed with natural long documents
and short data, each concatenated to the target length. ``mode="concat"`` keeps the
same sampling and cuts but emits each document whole, for the CIP-vs-concatenation
ablation on equal data.

The plan (per-sequence N, K, seeds, pass permutations) is drawn here with numpy from
the seed; the segment loop runs in C++ (``csrc/cip_index.cpp``, reference in
``cip_reference.py``); tokens are gathered from the memory-mapped inputs by C++
threads. The output never depends on the number of workers.

Output: ``<output_prefix>.bin/.idx`` where every stored document is one sequence of
exactly ``seq_length`` tokens (``seq_length + 1`` with ``add_extra_token``), the
``.meta.json`` sidecar with the inputs' tokenizer, and ``<output_prefix>.manifest.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from megatron_longsky.config import ConfigError, load_config, to_dict
from megatron_longsky.data.metadata import TokenizerMismatchError, meta_path, read_meta
from megatron_longsky.data.workers import stop_on_signals
from megatron_longsky.errors import UserError
from megatron_longsky.utils.atomic import temp_path_for
from megatron_longsky.utils.logging import setup_logging

log = logging.getLogger(__name__)

POLICIES = {"equal": 0, "fixed": 1, "random": 2}
KINDS = ("cip", "natural", "short")
GATHER_BATCH_TOKENS = 1 << 25  # tokens gathered per write (64 MiB of uint16)


@dataclass
class CIPConfig:
    """Parameters of one CIP build (YAML keys are these field names)."""

    input_prefixes: list[str] = field(default_factory=list)  # the document pool for CIP sequences
    output_prefix: str = ""
    seq_length: int = 4096
    docs_per_seq: int = 4  # N, or the low end of a range with docs_per_seq_max
    docs_per_seq_max: Optional[int] = None
    chunks_per_doc: int = 4  # K, or the low end of a range with chunks_per_doc_max
    chunks_per_doc_max: Optional[int] = None
    chunking: Literal["equal", "fixed", "random"] = "equal"
    chunk_size: int = 0  # tokens per chunk for chunking=fixed (K is then share / chunk_size)
    separator: Literal["none", "eod"] = "none"  # eod: one EOD after each document's last chunk
    mode: Literal["cip", "concat"] = "cip"  # concat: same documents and cuts, no interleaving
    add_extra_token: bool = False  # store seq_length + 1 tokens (an extra label token) per sequence
    num_sequences: Optional[int] = None  # default: about one pass over the CIP pool
    seed: int = 1234
    cip_ratio: float = 1.0  # fractions of output sequences (normalised)
    natural_prefixes: list[str] = field(default_factory=list)  # long documents, concatenated
    natural_ratio: float = 0.0
    short_prefixes: list[str] = field(default_factory=list)  # short documents, concatenated
    short_ratio: float = 0.0
    eod_id: Optional[int] = None  # default: the tokenizer's eod_id from the inputs' meta.json
    require_meta: bool = True  # inputs must have a .meta.json naming their tokenizer
    workers: int = 1  # gather threads; the output is identical for any value
    index_backend: Literal["cpp", "numpy"] = "cpp"  # numpy: the slow reference loop

    def __post_init__(self):
        def check(ok, name, why):
            if not ok:
                raise ValueError(f"{name}: {why}")

        check(self.seq_length >= 1, "seq_length", f"must be >= 1, got {self.seq_length}")
        for name in ("docs_per_seq", "chunks_per_doc"):
            lo, hi = getattr(self, name), getattr(self, f"{name}_max")
            check(lo >= 1, name, f"must be >= 1, got {lo}")
            check(hi is None or hi >= lo, f"{name}_max", f"{hi} is below {name}={lo}")
        check(self.workers >= 1, "workers", f"must be >= 1, got {self.workers}")
        check(0 <= self.seed < 2**63, "seed", f"must be a non-negative integer below 2**63, got {self.seed}")
        check(self.num_sequences is None or self.num_sequences >= 1, "num_sequences", "must be >= 1")
        for name in ("cip_ratio", "natural_ratio", "short_ratio"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), name, f"must be a finite number >= 0, got {value}")
        check(math.isfinite(self.cip_ratio + self.natural_ratio + self.short_ratio), "cip_ratio",
              "cip_ratio + natural_ratio + short_ratio overflows: use smaller ratios (only their proportions count)")
        check(self.cip_ratio + self.natural_ratio + self.short_ratio > 0, "cip_ratio",
              "cip_ratio, natural_ratio and short_ratio are all zero")
        if self.chunking == "fixed":
            check(self.chunk_size >= 1, "chunk_size", "chunking=fixed needs chunk_size >= 1")
        n_max, k_max = self.n_range[1], self.k_range[1]
        sep = 1 if self.separator == "eod" else 0
        if self.chunking == "fixed":
            check(n_max * (self.chunk_size + sep) <= self.seq_length, "chunk_size",
                  f"docs_per_seq ({n_max}) x (chunk_size {self.chunk_size} + separator {sep}) exceeds "
                  f"seq_length {self.seq_length}: documents would get less than one chunk")
        else:
            check(n_max * (k_max + sep) <= self.seq_length, "chunks_per_doc",
                  f"docs_per_seq x chunks_per_doc = {n_max} x {k_max} (+{sep} separator per document) "
                  f"exceeds seq_length {self.seq_length}: chunks would be empty")

    @property
    def n_range(self) -> tuple[int, int]:
        return self.docs_per_seq, self.docs_per_seq_max or self.docs_per_seq

    @property
    def k_range(self) -> tuple[int, int]:
        return self.chunks_per_doc, self.chunks_per_doc_max or self.chunks_per_doc

    @property
    def sequence_tokens(self) -> int:
        return self.seq_length + (1 if self.add_extra_token else 0)


class CIPInputError(UserError, ValueError):
    """The inputs cannot make the requested CIP data (empty or too-small pool, ...)."""


# ----------------------------------------------------------------------------- inputs

@dataclass
class Source:
    prefix: str
    dtype: np.dtype
    doc_start: np.ndarray  # token offset of each document in the .bin
    doc_len: np.ndarray
    meta: Optional[dict]


def _read_source(prefix: str) -> Source:
    from megatron_longsky.data.index_format import read_index

    index = read_index(prefix)  # files present, .bin size matching the .idx
    seq_cum = np.concatenate([[0], np.cumsum(index.sequence_lengths, dtype=np.int64)])
    doc_idx = np.asarray(index.document_indices, dtype=np.int64)
    starts, ends = seq_cum[doc_idx[:-1]], seq_cum[doc_idx[1:]]
    dtype = np.dtype(index.dtype)
    del index
    return Source(prefix, dtype, starts, ends - starts, read_meta(prefix))


def _fingerprint(source: Source) -> dict:
    digest = hashlib.sha256()
    with open(source.prefix + ".idx", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    tok = (source.meta or {}).get("tokenizer") or {}
    return {"prefix": source.prefix, "idx_sha256": digest.hexdigest(),
            "bin_bytes": Path(source.prefix + ".bin").stat().st_size,
            "documents": int(len(source.doc_len)), "tokens": int(source.doc_len.sum()),
            "tokenizer_fingerprint": tok.get("fingerprint")}


def common_tokenizer(prefixes: list[str], require_meta: bool) -> Optional[dict]:
    """The tokenizer metadata shared by every input; a mismatch is an error naming both."""
    found = None
    for prefix in prefixes:
        meta = read_meta(prefix)
        if meta is None:
            if require_meta:
                raise TokenizerMismatchError(
                    f"{meta_path(prefix)} is missing: cannot verify which tokenizer made {prefix} "
                    "(set require_meta=false to build anyway)")
            continue
        tok = meta.get("tokenizer") or {}
        if found is None:
            found = (prefix, tok)
        elif tok.get("fingerprint") != found[1].get("fingerprint"):
            raise TokenizerMismatchError(
                f"inputs were made with different tokenizers: {found[0]} has fingerprint "
                f"{found[1].get('fingerprint')!r} ({found[1].get('type')}), {prefix} has "
                f"{tok.get('fingerprint')!r} ({tok.get('type')}); re-tokenize them with one tokenizer")
    return found[1] if found else None


@dataclass
class DocTable:
    """Every document of every source, under one global id."""

    sources: list[Source]
    doc_src: np.ndarray
    doc_start: np.ndarray
    content_len: np.ndarray  # tokens usable (a trailing EOD removed when the separator adds one)
    pool_ids: dict[str, np.ndarray]  # pool kind -> global ids of its non-empty documents
    pool_empty: dict[str, int]  # pool kind -> empty documents skipped


def _build_table(cfg: CIPConfig, pools: dict[str, list[str]], eod_id: Optional[int]) -> DocTable:
    prefixes = list(dict.fromkeys(p for ps in pools.values() for p in ps))
    sources = [_read_source(p) for p in prefixes]
    dtypes = {s.dtype for s in sources}
    if len(dtypes) > 1:
        raise CIPInputError("inputs store different token dtypes: "
                            + ", ".join(f"{s.prefix}={s.dtype.name}" for s in sources))
    base = np.concatenate([[0], np.cumsum([len(s.doc_len) for s in sources])])
    doc_src = np.concatenate([np.full(len(s.doc_len), i, np.int64) for i, s in enumerate(sources)])
    doc_start = np.concatenate([s.doc_start for s in sources])
    content = np.concatenate([s.doc_len for s in sources]).astype(np.int64)
    if cfg.separator == "eod":
        for i, s in enumerate(sources):
            nonempty = np.nonzero(s.doc_len > 0)[0]
            if not len(nonempty):
                continue
            tokens = np.memmap(s.prefix + ".bin", dtype=s.dtype, mode="r")
            last = tokens[s.doc_start[nonempty] + s.doc_len[nonempty] - 1]
            content[base[i] + nonempty[last == eod_id]] -= 1
            del tokens
    pool_ids, pool_empty = {}, {}
    for kind, ps in pools.items():
        ids = np.concatenate([np.arange(base[prefixes.index(p)], base[prefixes.index(p) + 1]) for p in ps])
        pool_ids[kind] = ids[content[ids] > 0]
        pool_empty[kind] = int(len(ids) - len(pool_ids[kind]))
        if len(pool_ids[kind]) == 0:
            raise CIPInputError(f"the {kind} pool ({', '.join(ps)}) has no non-empty documents")
    return DocTable(sources, doc_src, doc_start, content, pool_ids, pool_empty)


# ----------------------------------------------------------------------------- planning

def _pass_order(pool: np.ndarray, seed: int, tag: int, passes: int) -> np.ndarray:
    """Pool documents in sampled order: one fresh permutation per pass."""
    perms = [pool[np.random.default_rng([seed, tag, p]).permutation(len(pool))] for p in range(passes)]
    return np.concatenate(perms)


def _index_fn(backend: str):
    if backend == "numpy":
        from megatron_longsky.data.cip_reference import build_cip_index
        return build_cip_index
    try:
        from megatron_longsky._ext_cip_index import build_cip_index
    except ImportError as exc:
        raise ImportError("the C++ extension megatron_longsky._ext_cip_index is not built: run "
                          "`pip install --no-build-isolation --no-deps -e .` (or use index_backend=numpy)") from exc
    return build_cip_index


def plan_cip(cfg: CIPConfig, lengths: np.ndarray, pool: np.ndarray, num_seqs: int) -> dict:
    """Segments of ``num_seqs`` CIP sequences drawn from ``pool`` (global document ids)."""
    rng = np.random.default_rng([cfg.seed, 0xC1F])
    (n_lo, n_hi), (k_lo, k_hi) = cfg.n_range, cfg.k_range
    n_per_seq = rng.integers(n_lo, n_hi + 1, size=num_seqs, dtype=np.int64)
    k_per_seq = rng.integers(k_lo, k_hi + 1, size=num_seqs, dtype=np.int64)
    seq_seed = rng.bit_generator.random_raw(num_seqs).astype(np.uint64)
    sep = 1 if cfg.separator == "eod" else 0
    pass_tokens = int(lengths[pool].sum()) + sep * len(pool)
    passes = max(-(-num_seqs * cfg.sequence_tokens // pass_tokens), -(-num_seqs * n_hi // len(pool))) + 1
    build = _index_fn(cfg.index_backend)
    while True:
        order = _pass_order(pool, cfg.seed, 0, passes)
        result = build(lengths, order, n_per_seq, k_per_seq, seq_seed, cfg.sequence_tokens, sep,
                       POLICIES[cfg.chunking], max(cfg.chunk_size, 1), cfg.mode == "cip", 0)
        if not result["exhausted"]:
            break
        passes *= 2  # cut documents used more of the pool than estimated: plan again, longer
    result["documents_drawn"] = int(result["cursor"])
    result["order"] = order[: result["cursor"]]
    return result


def plan_concat(lengths: np.ndarray, pool: np.ndarray, num_seqs: int, seq_tokens: int, sep: int,
                seed: int, tag: int) -> dict:
    """Documents concatenated into ``num_seqs`` sequences; a document crossing a sequence
    boundary continues in the next sequence (nothing is dropped but the final tail)."""
    need = num_seqs * seq_tokens
    pass_tokens = int(lengths[pool].sum()) + sep * len(pool)
    order = _pass_order(pool, seed, tag, -(-need // pass_tokens) + 1)
    sizes = lengths[order] + sep
    cum = np.concatenate([[0], np.cumsum(sizes)])
    used = int(np.searchsorted(cum, need, side="left"))  # cum[used] >= need
    order, sizes, cum = order[:used], sizes[:used], cum[: used + 1]
    points = [cum, np.arange(0, need + 1, seq_tokens, dtype=np.int64)]
    if sep:
        points.append(cum[1:] - 1)
    points = np.unique(np.concatenate(points))
    points = points[points <= need]
    a, b = points[:-1], points[1:]
    item = np.searchsorted(cum, a, side="right") - 1
    offset = a - cum[item]
    is_sep = offset >= lengths[order[item]]
    seq = a // seq_tokens
    return {
        "seg_doc": np.where(is_sep, -1, order[item]).astype(np.int64),
        "seg_off": np.where(is_sep, 0, offset).astype(np.int64),
        "seg_len": (b - a).astype(np.int64),
        "seq_seg_start": np.searchsorted(seq, np.arange(num_seqs + 1)).astype(np.int64),
        "distances": np.zeros(0, np.int64),
        "cursor": used, "documents_drawn": used, "order": order,
        "cut_documents": int(cum[-1] > need), "cut_tokens": int(cum[-1] - need),
        "continued_documents": _continued(cum, need, seq_tokens, sep),
        "extra_documents": 0, "exhausted": False,
    }


def _continued(cum: np.ndarray, need: int, seq_tokens: int, sep: int) -> int:
    """Sequence boundaries that fall inside a document's text (it continues in the next one)."""
    boundaries = np.arange(seq_tokens, need, seq_tokens)
    at_edge = np.isin(boundaries, cum) | np.isin(boundaries, cum[1:] - sep)
    return int(np.count_nonzero(~at_edge))


def sequence_counts(cfg: CIPConfig, cip_pool_tokens: int) -> dict[str, int]:
    """Output sequences per kind: exact ratios by largest remainder."""
    ratios = np.array([cfg.cip_ratio, cfg.natural_ratio, cfg.short_ratio], dtype=np.float64)
    ratios /= ratios.sum()
    total = cfg.num_sequences
    if total is None:
        if ratios[0] == 0:
            raise ConfigError("num_sequences: must be set when cip_ratio is 0")
        total = max(1, int(round(max(1, cip_pool_tokens // cfg.sequence_tokens) / ratios[0])))
    raw = ratios * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return dict(zip(KINDS, map(int, counts)))


def merge_plans(kinds_order: np.ndarray, plans: dict[str, dict]) -> dict:
    """Segments of all kinds in output-sequence order."""
    seg = {key: [] for key in ("seg_doc", "seg_off", "seg_len")}
    starts, counts, base = [], [], 0
    for kind in KINDS:
        plan = plans.get(kind)
        if plan is None:
            starts.append(np.zeros(0, np.int64))
            counts.append(np.zeros(0, np.int64))
            continue
        for key in seg:
            seg[key].append(plan[key])
        starts.append(plan["seq_seg_start"][:-1] + base)
        counts.append(np.diff(plan["seq_seg_start"]))
        base += len(plan["seg_doc"])
    seg = {key: np.concatenate(v) if v else np.zeros(0, np.int64) for key, v in seg.items()}
    kind_rank = np.zeros(len(kinds_order), np.int64)
    for k in range(len(KINDS)):
        mask = kinds_order == k
        kind_rank[mask] = np.arange(mask.sum())
    seq_first = np.zeros(len(kinds_order), np.int64)
    seq_count = np.zeros(len(kinds_order), np.int64)
    for k in range(len(KINDS)):
        mask = kinds_order == k
        seq_first[mask] = starts[k][kind_rank[mask]]
        seq_count[mask] = counts[k][kind_rank[mask]]
    seq_seg_start = np.concatenate([[0], np.cumsum(seq_count)]).astype(np.int64)
    take = np.repeat(seq_first - seq_seg_start[:-1], seq_count) + np.arange(seq_seg_start[-1])
    return {key: v[take] for key, v in seg.items()} | {"seq_seg_start": seq_seg_start}


# ----------------------------------------------------------------------------- statistics

def distance_stats(distances: np.ndarray) -> dict:
    """Tokens between the end of a chunk and the start of the same document's next chunk."""
    if len(distances) == 0:
        return {"count": 0}
    d = np.asarray(distances, dtype=np.int64)
    # distances are < seq_length: one bincount gives exact (nearest-rank) percentiles and the histogram
    cdf = np.cumsum(np.bincount(d))
    edges = [0] + [1 << i for i in range(int(d.max()).bit_length() + 1)]
    below = np.concatenate([[0], cdf])[np.minimum(edges, len(cdf))]
    return {
        "count": int(len(d)), "min": int(d.min()), "max": int(d.max()), "mean": float(d.mean()),
        "percentiles": {str(p): float(np.searchsorted(cdf, max(1, int(np.ceil(p / 100 * len(d))))))
                        for p in (10, 50, 90, 99)},
        "histogram": [{"from": int(lo), "to": int(hi), "count": int(c)}
                      for lo, hi, c in zip(edges[:-1], edges[1:], np.diff(below)) if c],
    }


def _pool_stats(plan: dict, pool: np.ndarray, empty: int, num_seqs: int) -> dict:
    drawn = plan["documents_drawn"]
    stats = {
        "sequences": num_seqs, "pool_documents": int(len(pool)), "empty_documents_skipped": empty,
        "document_uses": drawn, "documents_used": int(min(drawn, len(pool))),
        "passes": int(-(-drawn // len(pool))), "cut_documents": int(plan["cut_documents"]),
        "cut_tokens": int(plan["cut_tokens"]),
    }
    if "continued_documents" in plan:
        stats["continued_documents"] = int(plan["continued_documents"])
    else:
        stats["extra_documents"] = int(plan["extra_documents"])
        stats["chunk_distance"] = distance_stats(plan["distances"])
    return stats


# ----------------------------------------------------------------------------- writing

def write_sequences(plan: dict, table: DocTable, prefix_tmp: tuple[Path, Path], seq_tokens: int,
                    separator_token: int, workers: int, progress: bool = True) -> None:
    """Gather every sequence's tokens into ``.bin`` (streamed) and write the ``.idx``."""
    from megatron_longsky.utils.progress import progress_bar

    from megatron_longsky._ext_cip_index import gather_tokens
    from megatron_longsky.data.index_format import BinIdxBuilder

    bin_tmp, idx_tmp = prefix_tmp
    dtype = table.sources[0].dtype
    num_seqs = len(plan["seq_seg_start"]) - 1
    sources = [np.memmap(s.prefix + ".bin", dtype=np.uint8, mode="r") if s.doc_start.size and
               Path(s.prefix + ".bin").stat().st_size else np.zeros(0, np.uint8) for s in table.sources]
    separator = np.array([separator_token], dtype=dtype).tobytes()
    batch = max(1, GATHER_BATCH_TOKENS // seq_tokens)
    # two buffers: one batch is written (the write releases the GIL) while the next is gathered
    buffers = [np.empty(min(batch, num_seqs) * seq_tokens, dtype=dtype) for _ in range(2)]
    builder = BinIdxBuilder(bin_tmp, dtype.type)
    pending = None
    with ThreadPoolExecutor(max_workers=1) as writer, \
            progress_bar(total=num_seqs * seq_tokens, unit="tok", unit_scale=True, desc="build-cip",
                         enabled=progress) as bar:
        for step, first in enumerate(range(0, num_seqs, batch)):
            last = min(first + batch, num_seqs)
            buffer = buffers[step % 2]
            gather_tokens(buffer.view(np.uint8), sources, dtype.itemsize, table.doc_src, table.doc_start,
                          plan["seg_doc"], plan["seg_off"], plan["seg_len"], plan["seq_seg_start"],
                          first, last, seq_tokens, separator, workers)
            if pending is not None:
                pending.result()  # the other buffer is free again (and write errors surface here)
            pending = writer.submit(builder.data_file.write,
                                    memoryview(buffer[: (last - first) * seq_tokens]).cast("B"))
            builder.record_sequences([seq_tokens] * (last - first))  # one stored document per sequence
            bar.update((last - first) * seq_tokens)
        if pending is not None:
            pending.result()
    builder.finalize(idx_tmp)  # .bin and .idx on disk before the rename makes them look finished


def output_paths(prefix: str) -> dict[str, Path]:
    return {"bin": Path(prefix + ".bin"), "meta": meta_path(prefix),
            "manifest": Path(prefix + ".manifest.json"), "idx": Path(prefix + ".idx")}


# ----------------------------------------------------------------------------- the build

def build_cip(cfg: CIPConfig, progress: bool = False, overwrite: bool = False) -> dict:
    """Build the CIP dataset described by ``cfg``; return the manifest (also written to disk).
    An existing output is replaced only with ``overwrite``; an input never. The run holds
    the output's lock (a second run on the same prefix refuses)."""
    from megatron_longsky.data.indexed import dataset_files, prepare_dataset_output
    from megatron_longsky.utils.output_paths import check_outputs, check_prefix

    if not cfg.input_prefixes:
        raise ConfigError("input_prefixes: at least one input dataset prefix is required")
    check_prefix(cfg.output_prefix, "output_prefix")
    paths = output_paths(cfg.output_prefix)
    named = list(cfg.input_prefixes) + list(cfg.natural_prefixes) + list(cfg.short_prefixes)
    input_files = [f for p in dict.fromkeys(named) for f in dataset_files(p)]
    check_outputs(list(paths.values()), input_files, overwrite)  # before any work
    lock = prepare_dataset_output(cfg.output_prefix, input_files, overwrite, files=list(paths.values()))
    try:
        return _build_cip(cfg, paths, progress)
    finally:
        lock.release()


def _check_plan_size(cfg: CIPConfig) -> None:
    """Refuse a ``num_sequences`` whose plan cannot fit in this machine's memory, before planning."""
    if cfg.num_sequences is None:
        return
    segments = cfg.num_sequences * cfg.n_range[1] * cfg.k_range[1]
    need = segments * 40 + cfg.num_sequences * 24  # seg_doc/off/len + order, per-sequence arrays
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if need > memory:
        raise ConfigError(f"num_sequences={cfg.num_sequences}: planning that many sequences needs about "
                          f"{need / 2**30:,.0f} GiB of memory (this machine has {memory / 2**30:,.0f} GiB); "
                          "build fewer sequences per run and merge the outputs")


def _build_cip(cfg: CIPConfig, paths: dict[str, Path], progress: bool) -> dict:
    from megatron_longsky.data.index_format import check_pair
    from megatron_longsky.data.indexed import journal_path, remove_stale_temps
    from megatron_longsky.data.switch import switch_files

    started = time.perf_counter()
    for stale in remove_stale_temps([*paths.values(), journal_path(paths["idx"])]):
        log.info("removed %s left by an interrupted run", stale)
    _check_plan_size(cfg)
    pools = {"cip": list(cfg.input_prefixes)}
    for kind in ("natural", "short"):
        prefixes, ratio = getattr(cfg, f"{kind}_prefixes"), getattr(cfg, f"{kind}_ratio")
        if ratio > 0 and not prefixes:
            raise ConfigError(f"{kind}_ratio is {ratio} but {kind}_prefixes is empty")
        if ratio > 0:
            pools[kind] = list(prefixes)
    if cfg.cip_ratio == 0:
        pools.pop("cip")
    all_prefixes = list(dict.fromkeys(p for ps in pools.values() for p in ps))
    for prefix in all_prefixes:
        check_pair(prefix)  # a missing or corrupt dataset is named as such, before its sidecar
    tokenizer = common_tokenizer(all_prefixes, cfg.require_meta)
    eod_id = cfg.eod_id if cfg.eod_id is not None else (tokenizer or {}).get("eod_id")
    if cfg.separator == "eod" and eod_id is None:
        raise ConfigError("separator=eod needs an EOD id: the inputs' meta.json has none; set eod_id")
    _check_eod_id(eod_id, tokenizer, check_pair(all_prefixes[0]).dtype)

    from megatron_longsky.utils.progress import progress_bar

    planning = progress_bar(total=1 + len(KINDS), desc="build-cip planning", unit="step", enabled=progress)
    table = _build_table(cfg, pools, eod_id)
    planning.update(1)
    sep = 1 if cfg.separator == "eod" else 0
    tokens_of = {k: int(table.content_len[ids].sum()) + sep * len(ids) for k, ids in table.pool_ids.items()}
    counts = sequence_counts(cfg, tokens_of.get("cip", 0))
    if "cip" in pools:
        pool = table.pool_ids["cip"]
        if len(pool) < cfg.n_range[1]:
            raise CIPInputError(f"the CIP pool ({', '.join(pools['cip'])}) has {len(pool)} non-empty documents, "
                                f"fewer than docs_per_seq={cfg.n_range[1]}")
        if tokens_of["cip"] < cfg.sequence_tokens:
            raise CIPInputError(f"the CIP pool ({', '.join(pools['cip'])}) holds {tokens_of['cip']} tokens, "
                                f"less than one sequence of {cfg.sequence_tokens}")

    planning.total = 1 + sum(1 for k in KINDS if counts[k])
    plans, stats = {}, {}
    for tag, kind in enumerate(KINDS):
        if counts[kind] == 0:
            continue
        pool = table.pool_ids[kind]
        if kind == "cip":
            plans[kind] = plan_cip(cfg, table.content_len, pool, counts[kind])
        else:
            plans[kind] = plan_concat(table.content_len, pool, counts[kind], cfg.sequence_tokens, sep,
                                      cfg.seed, tag)
        # the CIP pool's statistics are named after the mode: "cip", or "concat" for the ablation
        stats[cfg.mode if kind == "cip" else kind] = _pool_stats(plans[kind], pool, table.pool_empty[kind],
                                                                 counts[kind])
        planning.update(1)
    planning.close()
    kinds_order = np.random.default_rng([cfg.seed, 0x3E1]).permutation(
        np.repeat(np.arange(len(KINDS)), [counts[k] for k in KINDS]))
    plan = merge_plans(kinds_order, plans)
    num_seqs = len(kinds_order)
    planned = time.perf_counter()
    log.info("planned %d sequences (%d segments) in %.2f s", num_seqs, len(plan["seg_doc"]), planned - started)

    tokenizer_meta = tokenizer or {"eod_id": eod_id}
    manifest = {
        "builder": "megatron_longsky.data.cip",
        "parameters": to_dict(cfg),
        "seed": cfg.seed,
        "sources": [_fingerprint(s) for s in table.sources],
        "tokenizer": tokenizer_meta,
        "output": {"prefix": cfg.output_prefix, "dtype": table.sources[0].dtype.name,
                   "sequence_tokens": cfg.sequence_tokens, "seq_length": cfg.seq_length,
                   "add_extra_token": cfg.add_extra_token},
        "statistics": {"sequences": num_seqs, "tokens": num_seqs * cfg.sequence_tokens,
                       **stats},
    }
    finals = [paths["bin"], paths["meta"], paths["manifest"], paths["idx"]]  # .idx last: marks completion
    tmps = [temp_path_for(p) for p in finals]
    bin_tmp, meta_tmp, manifest_tmp, idx_tmp = tmps
    paths["idx"].parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(paths["idx"].parent).free
    need = num_seqs * cfg.sequence_tokens * table.sources[0].dtype.itemsize
    if need > free:
        raise CIPInputError(f"{cfg.output_prefix}.bin needs {need:,} bytes ({num_seqs:,} sequences x "
                            f"{cfg.sequence_tokens:,} tokens) but {paths['idx'].parent} has {free:,} free")
    try:
        write_sequences(plan, table, (bin_tmp, idx_tmp), cfg.sequence_tokens,
                        eod_id if eod_id is not None else 0, cfg.workers, progress)
        meta = {"tokenizer": tokenizer_meta, "built_by": "build_cip", "mode": cfg.mode,
                "dtype": table.sources[0].dtype.name, "documents": num_seqs, "sequences": num_seqs,
                "tokens": num_seqs * cfg.sequence_tokens, "sequence_tokens": cfg.sequence_tokens,
                "manifest": paths["manifest"].name}
        meta_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        manifest_tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        switch_files([(tmps, finals)])
    finally:
        if not journal_path(paths["idx"]).exists():  # else a switch to finish needs them
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
    log.info("wrote %s in %.2f s (%.2f s in all)", cfg.output_prefix, time.perf_counter() - planned,
             time.perf_counter() - started)
    return manifest


def _check_eod_id(eod_id: Optional[int], tokenizer: Optional[dict], dtype: np.dtype) -> None:
    """The separator / padding id must be a token the inputs' vocabulary and dtype can hold."""
    if eod_id is None:
        return
    vocab = (tokenizer or {}).get("vocab_size")
    top = int(vocab) - 1 if isinstance(vocab, int) and vocab > 0 else int(np.iinfo(np.dtype(dtype)).max)
    if not isinstance(eod_id, (int, np.integer)) or isinstance(eod_id, bool) or not 0 <= eod_id <= top:
        where = f"the tokenizer's vocabulary ({vocab} ids)" if top != int(np.iinfo(np.dtype(dtype)).max) \
            else f"the inputs' {np.dtype(dtype).name} tokens"
        raise ConfigError(f"eod_id={eod_id}: must be a token id in 0..{top} ({where})")


def format_summary(manifest: dict) -> str:
    st = manifest["statistics"]
    lines = [f"{manifest['output']['prefix']}: {st['sequences']} sequences x "
             f"{manifest['output']['sequence_tokens']} tokens = {st['tokens']} tokens"]
    for kind in ("cip", "concat", "natural", "short"):
        if kind not in st:
            continue
        k = st[kind]
        lines.append(f"  {kind}: {k['sequences']} sequences, {k['documents_used']}/{k['pool_documents']} documents "
                     f"used ({k['document_uses']} uses, {k['passes']} pass(es)), {k['cut_documents']} cut "
                     f"({k['cut_tokens']} tokens not used)")
        dist = k.get("chunk_distance")
        if dist and dist["count"]:
            p = dist["percentiles"]
            lines.append(f"    distance between consecutive chunks of a document: mean {dist['mean']:.0f}, "
                         f"p10 {p['10']:.0f}, median {p['50']:.0f}, p90 {p['90']:.0f}, max {dist['max']} tokens")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def _range_arg(text: str) -> list[int]:
    """``4`` or ``4-8`` -> [lo, hi]."""
    try:
        parts = [int(x) for x in text.split("-")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}")
    return [parts[0], parts[-1]]


def parse_args(argv: list[str]) -> tuple[CIPConfig, bool]:
    p = argparse.ArgumentParser(prog="longsky build-cip", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML with CIPConfig fields (examples/configs/cip/)")
    p.add_argument("--input-prefix", nargs="+", action="extend", dest="input_prefixes", metavar="P")
    p.add_argument("--output-prefix")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--docs-per-seq", type=_range_arg, metavar="N|LO-HI")
    p.add_argument("--chunks-per-doc", type=_range_arg, metavar="K|LO-HI")
    p.add_argument("--chunking", choices=list(POLICIES))
    p.add_argument("--chunk-size", type=int)
    p.add_argument("--separator", choices=["none", "eod"])
    p.add_argument("--mode", choices=["cip", "concat"])
    p.add_argument("--num-sequences", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--natural-prefix", nargs="+", action="extend", dest="natural_prefixes", metavar="P")
    p.add_argument("--natural-ratio", type=float)
    p.add_argument("--short-prefix", nargs="+", action="extend", dest="short_prefixes", metavar="P")
    p.add_argument("--short-ratio", type=float)
    p.add_argument("--cip-ratio", type=float)
    p.add_argument("--add-extra-token", action="store_true", default=None)
    p.add_argument("--workers", type=int)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="CIPConfig field overrides")
    args = p.parse_args(argv)

    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "overwrite") and v is not None}
    for name in ("docs_per_seq", "chunks_per_doc"):
        if name in flags:
            lo, hi = flags.pop(name)
            flags[name], flags[f"{name}_max"] = lo, (hi if hi != lo else None)
    return load_config(CIPConfig, args.config, args.overrides, flags=flags, where="command line"), args.overwrite


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its index reader logs every file
    try:
        cfg, overwrite = parse_args(list(sys.argv[1:] if argv is None else argv))
        with stop_on_signals():  # Ctrl-C / SIGTERM unwind like an exception: temporary outputs are removed
            manifest = build_cip(cfg, progress=True, overwrite=overwrite)
    except (ValueError, OSError) as exc:  # user errors (ConfigError, CIPInputError, ...) name the field or file
        print(f"build-cip: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    return 0


__all__ = ["CIPConfig", "CIPInputError", "build_cip", "plan_cip", "plan_concat", "main", "distance_stats"]
