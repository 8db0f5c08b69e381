"""A corpus from text every Python installation carries (the quickstart's data).

Three sources, in order of preference: the language reference topics of
``pydoc_data.topics`` (English prose), the docstrings of the standard library
(one document per module and per class), and the standard library's source files
(code with comments; long documents). Docstrings and topics fill the budget first;
code is capped at ``code_fraction`` unless prose runs out. Selection and order are
deterministic for a seed on a given Python version. ``split`` keeps documents by
a stable hash of their name, so train and held-out never share a document.

``recall_fraction`` turns that share of the documents into *recall documents*: the
same text with made-up facts ("The locker number of Kelvo-Tamsi is 48213.") put
between its lines and repeated, or asked about and answered, further on (at distances
from a few tokens to a few thousand), and some earlier lines repeated verbatim. They
make copying from far back in the context pay off, so a tiny model learns to retrieve
(induction) within minutes. Keys are made-up syllable names, values random numbers;
the wording is not the needle test's, whose haystack and values never appear here.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

from megatron_longsky.utils.atomic import atomic_path

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


@dataclass
class Document:
    name: str  # stable identity, used for the split hash
    source: Literal["topic", "docstring", "code", "recall", "drill"]
    text: str


def in_split(name: str, split: str, heldout_fraction: float) -> bool:
    if split == "all":
        return True
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    is_heldout = int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction
    return is_heldout if split == "heldout" else not is_heldout


def topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds strip pydoc_data
        return []
    return [Document(f"topic:{name}", "topic", text.strip() + "\n")
            for name, text in sorted(topics.items()) if text.strip()]


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def _docstring_sections(node, title: str) -> list[str]:
    sections = []
    doc = ast.get_docstring(node)
    if doc:
        sections.append(f"{title}\n\n{doc.strip()}")
    for child in node.body:
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            child_doc = ast.get_docstring(child)
            if child_doc:
                sections.append(f"{child.name}(): {child_doc.strip()}")
    return sections


def file_documents(path: Path) -> list[Document]:
    """The docstring documents (module, then each class) and the code document of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    module = module_name(path)
    docs = []
    sections = _docstring_sections(tree, f"The {module} module.")
    if sections:
        docs.append(Document(f"doc:{module}", "docstring", "\n\n".join(sections) + "\n"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            sections = _docstring_sections(node, f"The {node.name} class of {module}.")
            if sections:
                docs.append(Document(f"doc:{module}.{node.name}", "docstring", "\n\n".join(sections) + "\n"))
    if source.strip():
        docs.append(Document(f"code:{module}", "code", f"# {module} ({path.name})\n{source}"))
    return docs


def iter_documents(seed: int = 0) -> Iterator[Document]:
    """Topics and per-file documents, in a seeded order (files parsed lazily)."""
    sources: list = [*topic_documents(), *stdlib_files()]
    random.Random(seed).shuffle(sources)
    for item in sources:
        if isinstance(item, Document):
            yield item
        else:
            yield from file_documents(item)


_SYLLABLES = ("ka", "lo", "mi", "ter", "vos", "zu", "ben", "dra", "fel", "gor", "hin", "jas", "kel", "mar",
              "nov", "pil", "quo", "ras", "sel", "tam", "ul", "vek", "wen", "yor", "zan", "bri", "cor", "dun")
_ATTRIBUTES = ("locker number", "access code", "serial number", "room number", "ticket number", "order code",
               "account number", "batch number", "reference code", "pin", "badge number", "shelf number")
# (fact, recall) templates: the recall repeats the fact's words up to the value.
_RECALL_TEMPLATES = (
    ("The {attr} of {key} is {value}.", "As noted above, the {attr} of {key} is {value}."),
    ("Note: {key} has {attr} {value}.", "Q: Which {attr} does {key} have? A: {key} has {attr} {value}."),
    ("Record {key}: {attr} = {value}", "Lookup {key}: {attr} = {value}"),
    ("Remember that the {attr} for {key} is {value}.",
     "What was the {attr} for {key}? The {attr} for {key} is {value}."),
)


def _made_up_key(rng: random.Random) -> str:
    def word():
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
    return f"{word()}-{word()}" if rng.random() < 0.6 else word()


def _number(rng: random.Random) -> str:
    # 3 to 6 digits: never a 7-digit string, the needle test's default value length.
    digits = rng.randint(3, 6)
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _later(rng: random.Random, at: int, n_lines: int) -> int:
    """A line index after ``at``, log-uniform in distance (mostly near, sometimes far)."""
    return min(n_lines, at + max(1, round(math.exp(rng.uniform(0, math.log(n_lines + 1))))))


def with_recalls(text: str, rng: random.Random, facts_per_kchar: float = 4.0, repeat_fraction: float = 0.5,
                 list_probability: float = 1.0) -> str:
    """``text`` with made-up facts between its lines, each recalled once further on, and
    ``repeat_fraction`` of its lines repeated verbatim further on."""
    lines = text.split("\n")
    inserts: dict[int, list[str]] = {}
    for _ in range(max(2, round(len(text) / 1000 * facts_per_kchar))):
        at = rng.randrange(len(lines))
        fact, recall = rng.choice(_RECALL_TEMPLATES)
        fields = {"attr": rng.choice(_ATTRIBUTES), "key": _made_up_key(rng), "value": _number(rng)}
        inserts.setdefault(at, []).append(fact.format(**fields))
        inserts.setdefault(_later(rng, at, len(lines)), []).append(recall.format(**fields))
    for at, line in enumerate(lines):
        if len(line.strip()) >= 20 and rng.random() < repeat_fraction:
            inserts.setdefault(_later(rng, at, len(lines)), []).append(line)
    out = []
    for i in range(len(lines) + 1):
        out.extend(inserts.get(i, []))
        if i < len(lines):
            out.append(lines[i])
    if rng.random() < list_probability:
        at = rng.randrange(len(out) + 1)
        out[at:at] = _list_block(rng)
    return "\n".join(out)


def _list_block(rng: random.Random) -> list[str]:
    """A list of made-up key/value items, then some of them again in another order (and
    sometimes the whole list verbatim): copying a value after its key is what pays."""
    items = [f"{_made_up_key(rng)} {_number(rng)}" for _ in range(rng.randint(4, 24))]
    title = rng.choice(("Inventory", "Codes", "Registry", "Ledger", "Index"))
    lines = [f"{title}: " + ", ".join(items) + "."]
    if rng.random() < 0.3:
        lines.append(f"{title} again: " + ", ".join(items) + ".")
    checks = rng.sample(items, rng.randint(1, len(items)))
    lines.append("Check: " + ", ".join(checks) + ".")
    return lines


def _take(docs: list[tuple[Document, int]], budget: float) -> tuple[list[Document], int]:
    """Documents in order while they fit in ``budget`` bytes (smaller later ones may still fit)."""
    taken, used = [], 0
    for doc, size in docs:
        if used + size <= budget:
            taken.append(doc)
            used += size
    return taken, used


def build_builtin_corpus(out_path: str | Path, max_bytes: int = 4_000_000, seed: int = 0,
                         split: Literal["train", "heldout", "all"] = "train", heldout_fraction: float = 0.05,
                         code_fraction: float = 0.3, min_chars: int = 64, recall_fraction: float = 0.0,
                         recall_max_chars: int = 6000, drill_fraction: float = 0.0,
                         drill_chars: int = 2000, drill_repeat_share: float = 0.3) -> dict:
    """Write a jsonl of ``{"text", "source", "name"}`` documents; return statistics."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    if not 0.0 <= code_fraction <= 1.0 or not 0.0 < heldout_fraction < 1.0:
        raise ValueError("code_fraction must be in [0, 1] and heldout_fraction in (0, 1)")
    if not 0.0 <= recall_fraction <= 1.0:
        raise ValueError(f"recall_fraction must be in [0, 1], got {recall_fraction}")
    if not 0.0 <= drill_fraction < 1.0:
        raise ValueError(f"drill_fraction must be in [0, 1), got {drill_fraction}")
    # Recall drills (megatron_longsky.data.recall_drills) take drill_fraction of the bytes.
    drill_budget = max_bytes * drill_fraction
    max_bytes = max_bytes - drill_budget
    prose_budget = max_bytes * (1.0 - code_fraction)
    code_budget = max_bytes * code_fraction
    prose, code = [], []
    prose_bytes = code_bytes = 0
    for doc in iter_documents(seed):
        if len(doc.text) < min_chars or not in_split(doc.name, split, heldout_fraction):
            continue
        size = len(doc.text.encode("utf-8"))
        if doc.source == "code":
            if code_bytes < code_budget:
                code.append((doc, size))
                code_bytes += size
        elif prose_bytes < prose_budget:
            prose.append((doc, size))
            prose_bytes += size
        if prose_bytes >= prose_budget and code_bytes >= code_budget:
            break
    chosen, used = _take(prose, max_bytes)
    # Code stays at most code_fraction of the corpus, even when prose runs short.
    code_cap = max_bytes - used if code_fraction >= 1.0 else min(
        max_bytes - used, code_fraction / (1.0 - code_fraction) * used)
    chosen_code, code_used = _take(code, code_cap)
    chosen += chosen_code
    used += code_used
    random.Random(seed + 1).shuffle(chosen)
    if recall_fraction > 0:
        rng = random.Random(seed + 2)
        for i, doc in enumerate(chosen):
            if rng.random() < recall_fraction:
                # A window of the document (long code files would take the whole budget).
                start = rng.randrange(max(1, len(doc.text) - recall_max_chars))
                window = doc.text[start:start + recall_max_chars]
                chosen[i] = Document(f"recall:{doc.name}", "recall", with_recalls(window, rng))
        used = sum(len(d.text.encode("utf-8")) for d in chosen)
    if drill_budget > 0 and chosen:
        from megatron_longsky.data.recall_drills import drill_document

        rng = random.Random(seed + 3)
        drills, drill_bytes = [], 0
        while drill_bytes < drill_budget:
            source = rng.choice(chosen)
            text = drill_document(rng, source.text[:20000], drill_chars, drill_repeat_share)
            drills.append(Document(f"drill:{len(drills)}:{source.name}", "drill", text))
            drill_bytes += len(text.encode("utf-8"))
        chosen += drills
        random.Random(seed + 4).shuffle(chosen)
        used += drill_bytes

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in chosen:
                f.write(json.dumps({"text": doc.text, "source": doc.source, "name": doc.name},
                                   ensure_ascii=False) + "\n")
    by_source: dict[str, int] = {}
    bytes_by_source: dict[str, int] = {}
    for doc in chosen:
        by_source[doc.source] = by_source.get(doc.source, 0) + 1
        bytes_by_source[doc.source] = bytes_by_source.get(doc.source, 0) + len(doc.text.encode("utf-8"))
    lengths = sorted(len(d.text) for d in chosen)
    return {
        "path": str(out_path),
        "documents": len(chosen),
        "bytes": used,
        "documents_by_source": by_source,
        "bytes_by_source": bytes_by_source,
        "median_chars": lengths[len(lengths) // 2] if lengths else 0,
        "max_chars": lengths[-1] if lengths else 0,
        "split": split,
        "seed": seed,
        "python": sys.version.split()[0],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write a jsonl corpus from the Python standard library's text.")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    args = parser.parse_args(argv)
    stats = build_builtin_corpus(args.output, max_bytes=args.max_bytes, seed=args.seed, split=args.split)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
