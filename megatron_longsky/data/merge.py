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
from megatron_longsky.data.workers import stop_on_signals


class MergeError(UserError, ValueError):
    """Inputs that cannot be merged; the message names the offending dataset."""


def expand_prefixes(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes: each input is a prefix, or a directory whose ``*.idx`` are taken (sorted).

    A file of a dataset names its prefix, so an unquoted shell glob over a directory of
    datasets (``x.bin x.idx x.meta.json ...``) names each dataset once."""
    prefixes: list[str] = []
    from_files: set[str] = set()  # prefixes named through one of their files
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(str(p)[: -len(".idx")] for p in path.glob("*.idx"))
            if not found:
                raise MergeError(f"directory {spec} holds no indexed dataset (*.idx)")
            prefixes.extend(found)
        else:
            suffix = next((s for s in (".idx", ".bin", ".meta.json") if spec.endswith(s)), "")
            prefix = spec[: len(spec) - len(suffix)]
            if suffix and prefix in from_files:
                continue  # another file of a dataset already named
            if suffix:
                from_files.add(prefix)
            prefixes.append(prefix)
    if len(set(prefixes)) != len(prefixes):
        raise MergeError(f"an input dataset is listed twice: {prefixes}")
    return prefixes


def merge_datasets(inputs: Sequence[str], output_prefix: str, overwrite: bool = False) -> dict:
    """Merge ``inputs`` (prefixes or directories) into ``output_prefix``; returns its counts.
    An existing output is replaced only with ``overwrite``."""
    from megatron_longsky.data.indexed import IndexedDatasetWriter, check_dataset, dataset_files, index_dtype
    from megatron_longsky.utils.output_paths import check_outputs, check_prefix

    prefixes = expand_prefixes(inputs)
    if not prefixes:
        raise MergeError("nothing to merge")
    check_prefix(output_prefix)
    if str(output_prefix) in prefixes:
        raise MergeError(f"the output {output_prefix} is also an input")
    # an input named twice under two spellings (a and ./a, a symlink) is the same files
    check_outputs(dataset_files(output_prefix), [f"{p}.idx" for p in prefixes], overwrite, unique_inputs=True)
    input_files = [f for prefix in prefixes for f in dataset_files(prefix)]
    check_outputs(dataset_files(output_prefix), input_files, overwrite)
    metas, dtypes = [], []
    for prefix in prefixes:
        check_dataset(prefix)  # files present, .bin size matching the .idx
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

    writer = IndexedDatasetWriter(output_prefix, dtypes[0], overwrite=overwrite, inputs=input_files)
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
    parser.add_argument("--input", nargs="+", action="extend", required=True, metavar="PREFIX_OR_DIR",
                        help="dataset prefixes (paths without .bin/.idx) or directories of datasets "
                             "(several per flag; repeatable)")
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    args = parser.parse_args(argv)
    try:
        with stop_on_signals():  # Ctrl-C / SIGTERM unwind like an exception: temporary outputs are removed
            result = merge_datasets(args.input, args.output_prefix, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:  # user errors (MergeError, TokenizerMismatchError, ...) name the dataset
        print(f"merge-datasets: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged {len(result['inputs'])} datasets into {result['prefix']}: {result['documents']:,} documents, "
          f"{result['sequences']:,} sequences, {result['tokens']:,} tokens")
    return 0
