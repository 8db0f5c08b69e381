"""The training-side SFT dataset: packed rows with per-sample boundaries.

``PackedSFTDataset(prefix, seq_length)`` reads the two datasets written by
``longsky preprocess-sft`` (``<prefix>_tokens_document`` / ``<prefix>_loss_mask_document``)
and packs samples into rows of ``seq_length`` tokens by best-fit-decreasing
(:mod:`megatron_longsky.data.packing`). Item ``i`` is one row:

* ``tokens`` int64[s]; padding uses the tokenizer's pad id;
* ``labels`` int64[s]: the next token of the same sample (pad id elsewhere);
* ``loss_mask`` float32[s]: 1 where the label is an assistant token; 0 at each
  sample's last token and on padding;
* ``position_ids`` int64[s]: 0, 1, ... restarting at each segment;
* ``cu_seqlens`` int32[segments + 1]: segment boundaries. Each sample is one segment,
  its length rounded up to ``pad_to_multiple`` (the pad tokens belong to it, after its
  real tokens, so causal attention never lets them affect the sample). Padding left at
  the end of the row is **its own segment** (so ``cu_seqlens[-1] == seq_length`` and no
  sample attends to it); ``num_samples`` says how many segments are real samples.

``pad_to_multiple`` (the trainer passes ``data.pad_to_multiple``, default 64) must be a
multiple of 2 x context-parallel size so every segment splits into the 2*CP
load-balanced chunks; it is fixed by the data config, so the rows do not depend on CP. ``unpacked=True`` gives one sample per row (same fields), for
packed-vs-unpacked equality tests. Samples longer than ``seq_length`` are truncated
(counted in ``truncated_samples``). The packing plan is computed once and cached beside
the dataset in ``<prefix>_tokens_document.packing-bfd-s<S>-m<M>-<fingerprint>.npz``
(the fingerprint hashes the dataset's index, so a rebuilt dataset gets a new plan);
``seed`` only permutes the order of rows.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_longsky.data import metadata
from megatron_longsky.data.indexed import idx_path, open_indexed
from megatron_longsky.data.packing import PackingPlan, fill_rate, pack_best_fit_decreasing
from megatron_longsky.sft.preprocess import sft_prefixes
from megatron_longsky.utils.atomic import atomic_path

log = logging.getLogger(__name__)

PLAN_VERSION = "bfd1"


def dataset_fingerprint(prefix: str | Path) -> str:
    """Hash of ``<prefix>.idx`` (document lengths and offsets): changes when the data does."""
    h = hashlib.sha256()
    with open(idx_path(prefix), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def plan_cache_path(tokens_prefix: str, seq_length: int, pad_to_multiple: int, fingerprint: str) -> Path:
    return Path(f"{tokens_prefix}.packing-{PLAN_VERSION}-s{seq_length}-m{pad_to_multiple}-{fingerprint}.npz")


def load_or_build_plan(tokens_prefix: str, padded_lengths: np.ndarray, seq_length: int,
                       pad_to_multiple: int) -> tuple[PackingPlan, bool]:
    """The cached plan if present, else pack and cache it. Returns ``(plan, was_cached)``."""
    path = plan_cache_path(tokens_prefix, seq_length, pad_to_multiple, dataset_fingerprint(tokens_prefix))
    if path.exists():
        with np.load(path) as data:
            plan = PackingPlan(data["row_offsets"], data["sample_ids"])
        if plan.row_offsets[-1] == len(padded_lengths) and len(plan.sample_ids) == len(padded_lengths):
            return plan, True
        log.warning("ignoring packing cache %s: it does not match the dataset", path)
    plan = pack_best_fit_decreasing(padded_lengths, seq_length)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, row_offsets=plan.row_offsets, sample_ids=plan.sample_ids)
    except OSError as exc:  # a read-only dataset directory still trains
        log.warning("could not cache the packing plan at %s: %s", path, exc)
    return plan, False


def resolve_prefixes(prefix: str | Path) -> tuple[str, str]:
    """Accept the ``--output-prefix`` of preprocess-sft or the tokens dataset prefix itself."""
    prefix = str(prefix)
    suffix = "_tokens_document"
    if prefix.endswith(suffix) and not idx_path(sft_prefixes(prefix)[0]).exists():
        prefix = prefix[: -len(suffix)]
    return sft_prefixes(prefix)


class PackedSFTDataset(torch.utils.data.Dataset):
    def __init__(self, prefix: str | Path, seq_length: int, *, pad_to_multiple: int = 1, seed: int = 0,
                 unpacked: bool = False, pad_id: Optional[int] = None, use_cache: bool = True):
        if seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {seq_length}")
        if pad_to_multiple < 1 or seq_length % pad_to_multiple:
            raise ValueError(f"seq_length {seq_length} must be a multiple of pad_to_multiple {pad_to_multiple} "
                             "(data.pad_to_multiple)")
        self.tokens_prefix, self.mask_prefix = resolve_prefixes(prefix)
        self.seq_length = seq_length
        self.pad_to_multiple = pad_to_multiple
        self.unpacked = unpacked
        self._tokens = open_indexed(self.tokens_prefix)
        self._masks = open_indexed(self.mask_prefix)
        lengths = self._tokens.sequence_lengths.astype(np.int64)
        if not np.array_equal(lengths, self._masks.sequence_lengths):
            raise ValueError(f"{self.tokens_prefix} and {self.mask_prefix} do not hold the same samples "
                             "(their lengths differ); re-run preprocess-sft")
        if len(lengths) == 0:
            raise ValueError(f"{self.tokens_prefix} holds no samples")
        self.meta = metadata.read_meta(self.tokens_prefix) or {}
        tok_meta = self.meta.get("tokenizer") or {}
        if pad_id is None:
            pad_id = tok_meta.get("pad_id", tok_meta.get("eod_id"))
        if pad_id is None:
            raise ValueError(f"{metadata.meta_path(self.tokens_prefix)} names no pad/eod id; pass pad_id=")
        self.pad_id = int(pad_id)
        self.sample_lengths = np.minimum(lengths, seq_length)
        self.truncated_samples = int((lengths > seq_length).sum())
        if self.truncated_samples:
            log.warning("%d of %d samples in %s are longer than seq_length %d and are truncated",
                        self.truncated_samples, len(lengths), self.tokens_prefix, seq_length)
        m = pad_to_multiple
        self.padded_lengths = -(-self.sample_lengths // m) * m
        if unpacked:
            n = len(lengths)
            self.plan = PackingPlan(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))
            self.plan_was_cached = False
        elif use_cache:
            self.plan, self.plan_was_cached = load_or_build_plan(self.tokens_prefix, self.padded_lengths,
                                                                 seq_length, m)
        else:
            self.plan, self.plan_was_cached = pack_best_fit_decreasing(self.padded_lengths, seq_length), False
        self.row_order = np.random.default_rng(seed).permutation(self.plan.num_rows)

    @property
    def num_samples(self) -> int:
        return len(self.sample_lengths)

    def fill_rate(self) -> float:
        """Real (unpadded) tokens / (rows x seq_length)."""
        return fill_rate(self.plan, self.sample_lengths, self.seq_length)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ``TokenizerMismatchError`` unless ``tokenizer`` made this dataset."""
        metadata.check_tokenizer(self.tokens_prefix, tokenizer.fingerprint, required=True)

    def samples_of_row(self, i: int) -> np.ndarray:
        return self.plan.row(int(self.row_order[i]))

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range [0, {len(self)})")
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        bounds = [0]
        pos = 0
        for sample in self.samples_of_row(i):
            length = int(self.sample_lengths[sample])
            padded = int(self.padded_lengths[sample])
            ids = self._tokens.get(int(sample), 0, length)
            mask = self._masks.get(int(sample), 0, length)
            tokens[pos:pos + length] = ids
            labels[pos:pos + length - 1] = ids[1:]
            loss_mask[pos:pos + length - 1] = mask[1:]
            position_ids[pos:pos + padded] = np.arange(padded)
            pos += padded
            bounds.append(pos)
        if pos < s:  # the row's leftover padding is a segment of its own
            position_ids[pos:] = np.arange(s - pos)
            bounds.append(s)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        }


def collate_packed(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch; ``cu_seqlens`` becomes the boundaries over the flattened
    ``[batch * seq_length]`` tokens (THD layout), plus ``max_seqlen`` (a 0-d int32)."""
    out = {k: torch.stack([item[k] for item in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    seq_length = out["tokens"].shape[1]
    parts = [items[0]["cu_seqlens"]]
    for row, item in enumerate(items[1:], start=1):
        parts.append(item["cu_seqlens"][1:] + row * seq_length)
    cu = torch.cat(parts).to(torch.int32)
    out["cu_seqlens"] = cu
    out["max_seqlen"] = (cu[1:] - cu[:-1]).max().to(torch.int32)
    return out
