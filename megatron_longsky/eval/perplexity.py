"""Perplexity by position on long held-out documents.

Each document with at least ``length`` tokens contributes ``length`` tokens (after
an optional BOS): its first ones, or (``window: random``) a window at a seeded random
offset, so that every position sees text of the same kind (documents that open with
formulaic lines, such as licence headers, make early positions look easy otherwise).
The negative log-likelihood of every predicted token is grouped by its position
into buckets, so one can see whether tokens far into the context are predicted
better (the context is used) or worse (the model breaks past its trained length).
Documents are never concatenated: that would measure something else.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch

from megatron_longsky.eval.backends import LMBackend
from megatron_longsky.eval.errors import EvalInputError
from megatron_longsky.tokenizer.base import Tokenizer
from megatron_longsky.utils.atomic import atomic_write_json, atomic_write_text


@dataclass
class PerplexityConfig:
    # An indexed dataset ("indexed:<prefix>"), or a .jsonl / .txt file of documents.
    data: str = ""
    json_key: str = "text"
    length: int = 4096
    max_documents: int = 16
    # "log2": buckets [1,2), [2,4), ..., "linear": num_buckets equal-width buckets.
    buckets: Literal["log2", "linear"] = "log2"
    num_buckets: int = 8
    add_bos: bool = True
    # "start": each document's first tokens; "random": a window at a random offset
    # (seeded by ``seed`` and the document's index).
    window: Literal["start", "random"] = "start"
    seed: int = 0

    def __post_init__(self):
        if self.length < 2 or self.max_documents < 1 or self.num_buckets < 1:
            raise ValueError("length must be >= 2, max_documents and num_buckets >= 1")
        if self.window not in ("start", "random"):
            raise ValueError(f"window must be 'start' or 'random', got {self.window!r}")


def bucket_edges(length: int, kind: str = "log2", num_buckets: int = 8) -> list[int]:
    """Edges over predicted-token positions ``1..length-1`` (position = index in the sequence)."""
    if kind == "log2":
        edges = [1]
        while edges[-1] < length:
            edges.append(min(edges[-1] * 2, length))
        return edges
    if kind == "linear":
        edges = sorted({1 + round(i * (length - 1) / num_buckets) for i in range(num_buckets + 1)})
        return edges
    raise ValueError(f"bucket kind must be 'log2' or 'linear', got {kind!r}")


def iter_documents(cfg: PerplexityConfig, tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids of the documents in ``cfg.data`` (no BOS/EOD)."""
    if cfg.data.startswith("indexed:"):
        from megatron_longsky.data.indexed import open_indexed

        dataset = open_indexed(cfg.data[len("indexed:"):])
        bounds = dataset.document_indices
        for d in range(len(bounds) - 1):
            ids = [int(t) for s in range(bounds[d], bounds[d + 1]) for t in dataset[s]]
            yield [t for t in ids if t != tokenizer.eod_id]
        return
    path = Path(cfg.data)
    if not path.exists():
        raise EvalInputError(f"--data {path}: no such file (a .txt/.jsonl file or indexed:<prefix>)")
    try:
        yield from _file_documents(path, cfg, tokenizer)
    except UnicodeDecodeError as exc:
        raise EvalInputError(f"--data {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _file_documents(path: Path, cfg: "PerplexityConfig", tokenizer: Tokenizer) -> Iterator[list[int]]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)[cfg.json_key]
                        if not isinstance(text, str):
                            raise TypeError(text)
                    except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                        raise EvalInputError(f"{path}:{lineno}: not a JSON object with a "
                                             f"{cfg.json_key!r} string") from None
                    yield tokenizer.encode(text)
    else:
        yield tokenizer.encode(path.read_text(encoding="utf-8"))


@dataclass
class PerplexityResult:
    config: dict
    documents: int
    edges: list[int]
    nll_sum: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    model: str = ""
    # Per document: NLL summed per bucket (for paired comparisons between models).
    per_document_nll_sum: list[list[float]] = field(default_factory=list)

    def buckets(self) -> list[dict]:
        out = []
        for i, (lo, hi) in enumerate(zip(self.edges, self.edges[1:])):
            mean = self.nll_sum[i] / self.tokens[i] if self.tokens[i] else float("nan")
            out.append({"start": lo, "end": hi, "tokens": self.tokens[i], "nll": mean, "ppl": math.exp(mean)})
        return out

    @property
    def overall_nll(self) -> float:
        return sum(self.nll_sum) / max(1, sum(self.tokens))

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "documents": self.documents,
                "overall_nll": self.overall_nll, "overall_ppl": math.exp(self.overall_nll),
                "buckets": self.buckets(), "per_document_nll_sum": self.per_document_nll_sum}

    def markdown(self) -> str:
        lines = [f"# Perplexity by position{': ' + self.model if self.model else ''}", "",
                 f"- {self.documents} documents of {self.config.get('length')} tokens from "
                 f"{self.config.get('data')}; overall perplexity **{math.exp(self.overall_nll):.3f}**", "",
                 "| positions | tokens | NLL | perplexity |", "|---|---:|---:|---:|"]
        for b in self.buckets():
            lines.append(f"| {b['start']}-{b['end'] - 1} | {b['tokens']} | {b['nll']:.4f} | {b['ppl']:.3f} |")
        return "\n".join(lines) + "\n"


def select_documents(cfg: PerplexityConfig, tokenizer: Tokenizer,
                     documents: Optional[list[list[int]]] = None) -> list[list[int]]:
    """The windows the evaluation scores: (BOS +) ``length`` tokens of each of the first
    ``max_documents`` documents that long; an error naming the data when there is none
    (call it before loading a model: it needs only the tokenizer)."""
    bos = [tokenizer.bos_id] if cfg.add_bos and tokenizer.bos_id is not None else []
    body = cfg.length - len(bos)
    selected = []
    for number, doc in enumerate(documents if documents is not None else iter_documents(cfg, tokenizer)):
        if len(doc) >= body:
            start = 0
            if cfg.window == "random":
                start = random.Random(f"ppl/{cfg.seed}/{number}").randrange(len(doc) - body + 1)
            selected.append(bos + list(doc[start:start + body]))
            if len(selected) == cfg.max_documents:
                break
    if not selected:
        raise EvalInputError(f"no document in {cfg.data or 'the given documents'} has {body} tokens "
                             f"(--length {cfg.length}); use a shorter length or longer held-out documents")
    return selected


def perplexity_by_position(cfg: PerplexityConfig, backend: LMBackend, tokenizer: Tokenizer,
                           model_name: str = "", documents: Optional[list[list[int]]] = None,
                           progress: bool = True, journal_dir: Optional[str] = None,
                           model_source: str = "", windows: Optional[list[list[int]]] = None) -> PerplexityResult:
    """NLL per position bucket over up to ``max_documents`` long documents.
    ``journal_dir``: resumable, as :func:`megatron_longsky.eval.needle.run_needle`;
    ``windows``: what :func:`select_documents` returned for these arguments (else selected here)."""
    import hashlib

    from megatron_longsky.eval.distribute import sweep_journal
    from megatron_longsky.utils.progress import progress_bar

    edges = bucket_edges(cfg.length, cfg.buckets, cfg.num_buckets)
    result = PerplexityResult(asdict(cfg), 0, edges, [0.0] * (len(edges) - 1), [0] * (len(edges) - 1), model_name)
    from megatron_longsky.eval.distribute import sharded_map

    selected = windows if windows is not None else select_documents(cfg, tokenizer, documents)
    positions = torch.arange(1, cfg.length)
    index = torch.bucketize(positions, torch.tensor(edges), right=True) - 1

    def bucket_sums(ids: list[int]) -> list[float]:
        nll = backend.token_nll(ids).double()
        return [float(nll[index == i].sum()) for i in range(len(edges) - 1)]

    journal = None
    if journal_dir is not None:
        journal = sweep_journal(journal_dir, "perplexity", asdict(cfg), model_source or model_name, tokenizer,
                                key=lambda ids: hashlib.sha256(str(ids).encode()).hexdigest())
    with progress_bar(total=len(selected), desc="perplexity", unit="doc", enabled=progress, leave=False) as bar:
        per_document = sharded_map(selected, bucket_sums, bar, journal)
    result.per_document_nll_sum = [list(sums) for sums in per_document]
    for sums in per_document:
        result.nll_sum = [a + b for a, b in zip(result.nll_sum, sums)]
    result.tokens = [int((index == i).sum()) * len(selected) for i in range(len(edges) - 1)]
    result.documents = len(selected)
    return result


def write_perplexity_report(result: PerplexityResult, out_dir: str | Path, name: str = "perplexity") -> dict:
    out = Path(out_dir)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_json(paths["json"], result.to_dict())
    atomic_write_text(paths["md"], result.markdown())
    return {k: str(v) for k, v in paths.items()}
