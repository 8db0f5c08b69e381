"""Training data: datasets, the global-batch order, and per-rank micro-batch loaders.

Order is defined over *global* batches: step ``i`` uses samples
``[i * G, (i + 1) * G)`` of the train dataset (G = global batch size), whatever the
TP/PP/DP layout; data-parallel rank ``r`` takes the r-th contiguous slice of that
window and cuts it into micro-batches. So the same global batch reaches the model at
any layout and micro-batch count, and a resumed run continues from
``consumed_samples`` without replaying data.

``kind: gpt`` builds megatron-core ``GPTDataset`` splits through
``BlendedMegatronDatasetBuilder`` (blend weights, train/valid/test split, index
cache). ``kind: sft`` uses ``PackedSFTDataset`` rows (tokens, labels, loss_mask,
position_ids, cu_seqlens), repeated in the same (seeded) row order when training runs
longer than one epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from megatron_longsky.data import metadata
from megatron_longsky.training.config import DataConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Splits:
    train: torch.utils.data.Dataset
    valid: Optional[torch.utils.data.Dataset]


def check_dataset_tokenizers(data: DataConfig, tokenizer) -> None:
    """Refuse datasets whose files are missing or whose ``.bin`` does not match its ``.idx``,
    and datasets made with another tokenizer (``<prefix>.meta.json``)."""
    from megatron_longsky.data.indexed import check_dataset

    if data.kind == "gpt":  # SFT datasets are checked when opened (PackedSFTDataset)
        for prefix in data.prefixes:
            check_dataset(prefix)
    if data.check_tokenizer == "off":
        return
    for prefix in data.prefixes:
        if data.kind == "sft":
            from megatron_longsky.sft.dataset import resolve_prefixes

            prefix = resolve_prefixes(prefix)[0]
        metadata.check_tokenizer(prefix, tokenizer.fingerprint, required=data.check_tokenizer == "required")


def dataset_chat_template(data: DataConfig) -> Optional[dict]:
    """The chat template an SFT dataset was encoded with (recorded in its meta.json)."""
    if data.kind != "sft" or not data.prefixes:
        return None
    from megatron_longsky.sft.dataset import resolve_prefixes

    meta = metadata.read_meta(resolve_prefixes(data.prefixes[0])[0]) or {}
    return (meta.get("sft") or {}).get("chat_template")


def gpt_dataset_config(cfg: TrainConfig, tokenizer, prefixes: list[str], weights, split: str):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_longsky.tokenizer.megatron import to_megatron_tokenizer

    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(list(prefixes), list(weights) if weights else None),
        split=split,
        path_to_cache=cfg.data.cache_dir,
        tokenizer=to_megatron_tokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.data.eod_mask_loss,
        # Causal masking is done inside attention; never materialise s x s masks here.
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )


def build_gpt_splits(cfg: TrainConfig, tokenizer, train_samples: int, valid_samples: int,
                     prefixes: list[str] | None = None, split: str | None = None) -> Splits:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if not (prefixes or cfg.data.prefixes):
        raise ValueError("data.prefixes is empty: name at least one indexed dataset prefix")
    config = gpt_dataset_config(cfg, tokenizer, prefixes or cfg.data.prefixes,
                                None if prefixes else cfg.data.weights, split or cfg.data.split)
    # megatron-core wants a size for every split of a weighted blend.
    sizes = [train_samples, max(valid_samples, cfg.global_batch_size), cfg.global_batch_size]
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"data.split={config.split!r} leaves no training data in {config.blend[0]}")
    return Splits(train=train, valid=valid)


class EpochCycle(torch.utils.data.Dataset):
    """Index ``i`` -> row ``i % n`` of a dataset (SFT rows repeat over epochs)."""

    def __init__(self, dataset, length: int):
        self.dataset = dataset
        self.length = max(length, len(dataset))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def build_sft_splits(cfg: TrainConfig, train_samples: int) -> Splits:
    from megatron_longsky.sft.dataset import PackedSFTDataset

    if not cfg.data.prefixes:
        raise ValueError("data.prefixes is empty: name the dataset written by longsky preprocess-sft")
    dataset = PackedSFTDataset(cfg.data.prefixes[0], cfg.seq_length,
                               pad_to_multiple=cfg.data.pad_to_multiple,
                               seed=cfg.seed, unpacked=not cfg.data.packed)
    return Splits(train=EpochCycle(dataset, train_samples), valid=None)


def collate(items: list[dict]) -> dict:
    if "cu_seqlens" in items[0]:
        from megatron_longsky.sft.dataset import collate_packed

        return collate_packed(items)
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this data-parallel rank's micro-batches (lists of dataset indices), step after step,
    starting at ``consumed_samples`` (a multiple of the global batch size)."""

    def __init__(self, total_samples: int, consumed_samples: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int):
        if consumed_samples % global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch "
                             f"size {global_batch_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global batch {global_batch_size} does not split into micro-batches of "
                             f"{micro_batch_size} over {dp_size} data-parallel ranks")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.per_rank = global_batch_size // dp_size

    def __len__(self) -> int:
        steps = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return steps * self.per_rank // self.micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self.global_batch_size <= self.total_samples:
            first = start + self.dp_rank * self.per_rank
            for m in range(0, self.per_rank, self.micro_batch_size):
                yield list(range(first + m, first + m + self.micro_batch_size))
            start += self.global_batch_size


class Prefetcher:
    """Reads the next micro-batches in a background thread while the model computes
    (torch releases the GIL in its kernels), keeping the same order."""

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True, name="batch-prefetch")
        self._thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                self._queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
            self._queue.put(exc)
            return
        self._queue.put(self._DONE)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


def micro_batch_loader(dataset, cfg: TrainConfig, consumed_samples: int, dp_rank: int, dp_size: int,
                       total_samples: int | None = None, prefetch: bool = True) -> Iterator[dict]:
    """This rank's micro-batches from ``consumed_samples`` on; read ahead in a thread
    (``data.num_workers: 0``) or by DataLoader worker processes."""
    sampler = GlobalBatchSampler(total_samples if total_samples is not None else len(dataset),
                                 consumed_samples, cfg.global_batch_size, cfg.micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers, collate_fn=collate,
        persistent_workers=cfg.data.num_workers > 0,
    )
    if prefetch and cfg.data.num_workers == 0:
        return Prefetcher(iter(loader))
    return iter(loader)
