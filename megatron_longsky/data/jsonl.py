"""Reading jsonl corpora: files, ``.jsonl.gz``, directories and globs.

Lines are read as raw bytes in batches (decoding and JSON parsing happen in the
preprocessing workers); every batch knows its file and first line number so any
bad line is reported as ``file:line``.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_longsky.errors import UserError

CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")

# Kinds of bad lines, in the order they are checked.
BAD_KINDS = ("invalid_utf8", "invalid_json", "not_object", "missing_key", "non_string", "empty")


class CorpusError(UserError, ValueError):
    """A bad input line or file; the message names the file and line."""


@dataclass
class LineBatch:
    source: str
    first_line: int  # 1-based number of lines[0] in source
    lines: list[bytes]
    nbytes: int = 0


@dataclass
class BadLine:
    kind: str
    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass
class ParsedBatch:
    """Documents of one batch (one list of texts per json key) plus what was skipped."""

    texts: dict[str, list[str]]
    line_numbers: list[int] = field(default_factory=list)  # of each kept document
    bad: list[BadLine] = field(default_factory=list)
    blank_lines: int = 0


def _is_corpus_file(path: Path) -> bool:
    return path.name.endswith(CORPUS_SUFFIXES)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files named by ``inputs`` (files, directories, globs), in a deterministic order.

    Explicit files keep their given order; a directory contributes its corpus files
    (recursively, sorted); a glob its sorted matches. Duplicates are dropped.
    """
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
            if not matches:
                raise CorpusError(f"input directory {spec} has no files ending in {list(CORPUS_SUFFIXES)}")
        elif path.exists():  # a file, or a named pipe
            matches = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if not Path(p).is_dir())
            if not matches:
                raise CorpusError(f"input pattern {spec!r} matches no files")
        else:
            raise CorpusError(f"input {spec} does not exist")
        found.extend(matches)
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(os.path.realpath(p), p)
    return list(unique.values())


def total_size(paths: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, transparently un-gzipping (by magic number)."""
    f = open(path, "rb")
    if f.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")
    return f


def iter_line_batches(paths: Sequence[Path], max_lines: int = 1024, max_bytes: int = 4 << 20,
                      progress=None) -> Iterator[LineBatch]:
    """Batches of raw lines, never spanning two files. ``progress(nbytes)`` is called
    with the compressed/on-disk bytes consumed, when given."""
    for path in paths:
        source = str(path)
        with open_binary(path) as f:
            raw = f.fileobj if isinstance(f, gzip.GzipFile) else f
            last_pos = 0
            lines: list[bytes] = []
            nbytes = 0
            first = 1
            line_no = 0
            try:
                for line in f:
                    line_no += 1
                    lines.append(line)
                    nbytes += len(line)
                    if len(lines) >= max_lines or nbytes >= max_bytes:
                        if progress is not None:
                            last_pos = _report(progress, raw, last_pos)
                        yield LineBatch(source, first, lines, nbytes)
                        lines, nbytes, first = [], 0, line_no + 1
            except (EOFError, gzip.BadGzipFile, OSError) as exc:
                raise CorpusError(f"{source}:{line_no + 1}: cannot read the file ({exc})") from exc
            if lines:
                yield LineBatch(source, first, lines, nbytes)
            if progress is not None:
                _report(progress, raw, last_pos)


def _report(progress, raw, last_pos: int) -> int:
    try:
        pos = raw.tell()
    except (OSError, ValueError):  # pipes cannot tell
        return last_pos
    progress(pos - last_pos)
    return pos


def loads_line(text: str):
    """``json.loads`` where nesting too deep for the parser is invalid JSON like any other."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def parse_batch(batch: LineBatch, keys: Sequence[str], allow_empty: bool = False) -> ParsedBatch:
    """Decode and check each line; a line is kept only if every key holds a string, non-empty
    unless ``allow_empty``."""
    texts: dict[str, list[str]] = {k: [] for k in keys}
    out = ParsedBatch(texts)
    loads = loads_line
    for offset, raw in enumerate(batch.lines):
        if not raw.strip():
            out.blank_lines += 1
            continue
        line_no = batch.first_line + offset
        bad = None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = ("invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({exc.reason})")
        else:
            try:
                obj = loads(text)
            except json.JSONDecodeError as exc:
                bad = ("invalid_json", f"invalid JSON: {exc.msg} at column {exc.colno}")
            else:
                bad = _check_object(obj, keys, allow_empty)
                if bad is None and (b"\\ud" in raw or b"\\uD" in raw):
                    bad = _check_surrogates(obj, keys)
        if bad is not None:
            out.bad.append(BadLine(bad[0], batch.source, line_no, bad[1]))
            continue
        for k in keys:
            texts[k].append(obj[k])
        out.line_numbers.append(line_no)
    return out


def _check_surrogates(obj: dict, keys: Sequence[str]) -> Optional[tuple[str, str]]:
    # A JSON escape like "\\ud800" decodes to a lone surrogate that no UTF-8 encoder accepts.
    for k in keys:
        try:
            obj[k].encode("utf-8")
        except UnicodeEncodeError as exc:
            return "invalid_utf8", f"key {k!r} holds a lone surrogate escape at character {exc.start}"
    return None


def _check_object(obj, keys: Sequence[str], allow_empty: bool = False) -> Optional[tuple[str, str]]:
    if not isinstance(obj, dict):
        return "not_object", f"expected a JSON object, got {type(obj).__name__}"
    for k in keys:
        if k not in obj:
            return "missing_key", f"missing key {k!r} (keys present: {sorted(obj)[:10]})"
        value = obj[k]
        if not isinstance(value, str):
            return "non_string", f"key {k!r} holds {type(value).__name__}, not a string"
        if not allow_empty and not value.strip():
            return "empty", f"key {k!r} holds an empty document"
    return None
