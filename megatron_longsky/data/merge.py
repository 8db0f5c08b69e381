"""Merge several indexed datasets into one (``longsky merge-datasets``).

All inputs must carry a ``.meta.json`` sidecar made with the same tokenizer
(fingerprint) and store the same token dtype; documents keep their order (inputs
in the given order). The output is written atomically like preprocessing's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_longsky.data.metadata import TokenizerMismatchError, meta_path, read_meta
from megatron_longsky.errors import UserError


class MergeError(UserError, ValueError):
    """Inputs that cannot be merged; the message names the offending dataset."""


def expand_prefixes(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes: each input is a prefix, or a directory whose ``*.idx`` are taken (sorted)."""
    prefixes: list[str] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(str(p)[: -len(".idx")] for p in path.glob("*.idx"))
            if not found:
                raise MergeError(f"directory {spec} holds no indexed dataset (*.idx)")
            prefixes.extend(found)
        else:
            prefix = spec[:-4] if spec.endswith((".idx", ".bin")) else spec
            prefixes.append(prefix)
    if len(set(prefixes)) != len(prefixes):
        raise MergeError(f"an input dataset is listed twice: {prefixes}")
    return prefixes


def merge_datasets(inputs: Sequence[str], output_prefix: str) -> dict:
    """Merge ``inputs`` (prefixes or directories) into ``output_prefix``; returns its counts."""
    from megatron_longsky.data.indexed import IndexedDatasetWriter, index_dtype, open_indexed

    prefixes = expand_prefixes(inputs)
    if not prefixes:
        raise MergeError("nothing to merge")
    if str(output_prefix) in prefixes:
        raise MergeError(f"the output {output_prefix} is also an input")
    metas, dtypes = [], []
    for prefix in prefixes:
        open_indexed(prefix)  # clear error if .bin/.idx is missing
        meta = read_meta(prefix)
        if meta is None or "tokenizer" not in meta:
            raise MergeError(f"{meta_path(prefix)} is missing or has no tokenizer record: cannot check "
                             "that the datasets share a tokenizer")
        metas.append(meta)
        dtypes.append(index_dtype(prefix))
    first = metas[0]["tokenizer"]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        other = meta["tokenizer"]
        if other.get("fingerprint") != first.get("fingerprint"):
            raise TokenizerMismatchError(
                f"cannot merge: {prefixes[0]} was tokenized with {first.get('type')} tokenizer "
                f"{first.get('fingerprint')!r} but {prefix} with {other.get('type')} tokenizer "
                f"{other.get('fingerprint')!r}")
    for prefix, dtype in zip(prefixes[1:], dtypes[1:]):
        if dtype != dtypes[0]:
            raise MergeError(f"cannot merge: {prefixes[0]} stores {dtypes[0].__name__} tokens but "
                             f"{prefix} stores {dtype.__name__}")

    writer = IndexedDatasetWriter(output_prefix, dtypes[0])
    try:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        flags = {k: sorted({str(m.get(k)) for m in metas}) for k in ("append_eod", "split_sentences")}
        writer.finalize({
            "tokenizer": first,
            "merged_from": prefixes,
            "append_eod": metas[0].get("append_eod") if len(flags["append_eod"]) == 1 else None,
            "split_sentences": metas[0].get("split_sentences") if len(flags["split_sentences"]) == 1 else None,
            "created_by": "megatron_longsky merge-datasets",
        })
        writer.commit()
    finally:
        writer.abort()
    return {"prefix": str(output_prefix), "inputs": prefixes, "documents": writer.documents,
            "sequences": writer.sequences, "tokens": writer.tokens}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longsky merge-datasets",
                                     description="Merge indexed datasets made with the same tokenizer into one.")
    parser.add_argument("--input", action="append", required=True, metavar="PREFIX_OR_DIR",
                        help="dataset prefix (path without .bin/.idx) or a directory of datasets (repeatable)")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    args = parser.parse_args(argv)
    try:
        result = merge_datasets(args.input, args.output_prefix)
    except (MergeError, TokenizerMismatchError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(result['inputs'])} datasets into {result['prefix']}: {result['documents']:,} documents, "
          f"{result['sequences']:,} sequences, {result['tokens']:,} tokens")
    return 0
