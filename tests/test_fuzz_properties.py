"""Property-based fuzzing (issue 22): for ANY generated .idx header and arrays, .meta.json
sidecar, or pair of output/input paths, the contract holds: exit 0 or 2, one line naming the
culprit, inputs unchanged, no finished-looking output. The commands run in this process
(``tests/cli_fuzz.py``'s harness and judge); the fixed cases there stay as regression."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_fuzz import Case, _write_dataset, run_inprocess
from megatron_longsky.data.index_format import INDEX_HEADER, IndexedDatasetError, validate_index
from megatron_longsky.tokenizer import ByteTokenizer

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MUTATIONS = ("none", "version", "dtype_code", "negative_length", "pointer", "doc_idx_swap", "doc_idx_end",
             "doc_idx_start", "no_doc_idx", "truncate", "append", "bin_short", "bin_long", "counts")


@st.composite
def index_files(draw):
    """(idx bytes, bin bytes): a valid uint16 dataset, then one mutation of any field."""
    docs = draw(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), min_size=1, max_size=4))
    lengths = [n for doc in docs for n in doc]
    doc_idx = [0] + list(np.cumsum([len(doc) for doc in docs]))
    pointers = [0] + list(np.cumsum([2 * n for n in lengths[:-1]]))
    version, code, n, d = 1, 8, len(lengths), len(doc_idx)
    bin_size = 2 * sum(lengths)
    mutation = draw(st.sampled_from(MUTATIONS))
    value = draw(st.integers(-(2**40), 2**40))
    k = draw(st.integers(0, 10_000))
    if mutation == "version":
        version = value % 2**64
    elif mutation == "dtype_code":
        code = value % 256
    elif mutation == "negative_length":
        lengths[k % n] = -1 - (abs(value) % 100)
    elif mutation == "pointer":
        pointers[k % n] = value
    elif mutation == "doc_idx_swap" and d > 2:
        i = 1 + k % (d - 2)
        doc_idx[i], doc_idx[i + 1] = doc_idx[i + 1] + 1, doc_idx[i]
    elif mutation == "doc_idx_end":
        doc_idx[-1] = value
    elif mutation == "doc_idx_start":
        doc_idx[0] = value
    elif mutation == "no_doc_idx":
        doc_idx, d = [], 0
    elif mutation == "counts":
        n, d = abs(value) % 2**64, k
    body = (INDEX_HEADER + struct.pack("<QBQQ", version, code, n, d)
            + np.array(lengths, np.int64).astype(np.int32).tobytes() + np.array(pointers, np.int64).tobytes()
            + np.array(doc_idx, np.int64).tobytes())
    if mutation == "truncate":
        body = body[: k % len(body)]
    elif mutation == "append":
        body += b"\x00" * (1 + k % 16)
    if mutation == "bin_short":
        bin_size = max(0, bin_size - 1 - k % 4)
    elif mutation == "bin_long":
        bin_size += 1 + k % 4
    return body, bytes(range(256)) * (bin_size // 256) + bytes(bin_size % 256)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    return _write_dataset(root / "good", ByteTokenizer().metadata(), [[97, 98, 0], [99, 0]])


def _contract(case: Case) -> str:
    outcome = run_inprocess(case)
    assert outcome.verdict in ("clean", "accepted"), f"{case.argv}: {outcome.verdict}: {outcome.detail}"
    return outcome.verdict


@FAST
@given(files=index_files())
def test_any_index_is_merged_validly_or_refused_naming_it(tmp_path_factory, good, files):
    root = tmp_path_factory.mktemp("idx")
    fuzzed = root / "fuzzed"
    Path(f"{fuzzed}.idx").write_bytes(files[0])
    Path(f"{fuzzed}.bin").write_bytes(files[1])
    shutil.copy(good + ".meta.json", f"{fuzzed}.meta.json")
    out = root / "out"
    case = Case("fuzz", ["merge-datasets", "--input", good, "--input", str(fuzzed), "--output-prefix", str(out)],
                ["fuzzed.idx", "fuzzed.bin"], [f"{out}.idx", f"{out}.bin"],
                [f"{fuzzed}.idx", f"{fuzzed}.bin", good + ".idx"])
    try:
        validate_index(f"{fuzzed}.idx", len(files[1]))
        valid = True
    except IndexedDatasetError:
        valid = False
    verdict = _contract(case)
    assert verdict == ("accepted" if valid else "clean")
    if valid:  # what was written is itself a valid dataset
        validate_index(f"{out}.idx", Path(f"{out}.bin").stat().st_size)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=3), max_leaves=8)


@st.composite
def meta_files(draw):
    kind = draw(st.sampled_from(["json", "tokenizer", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "tokenizer":  # the shape readers look into, with fields of any type
        tok = dict(ByteTokenizer().metadata())
        for key in draw(st.lists(st.sampled_from(sorted(tok) + ["pad_id"]), max_size=2)):
            tok[key] = draw(json_values)
        extra = {"sft": draw(json_values)} if draw(st.booleans()) else {}
        return json.dumps({"tokenizer": tok, **extra}).encode()
    return json.dumps(draw(json_values)).encode()


@FAST
@given(meta=meta_files())
def test_any_sidecar_is_used_or_refused_naming_it(tmp_path_factory, good, meta):
    root = tmp_path_factory.mktemp("meta")
    fuzzed = root / "fuzzed"
    for suffix in (".bin", ".idx"):
        shutil.copy(good + suffix, f"{fuzzed}{suffix}")
    Path(f"{fuzzed}.meta.json").write_bytes(meta)
    for command in (["merge-datasets", "--input", good, "--input", str(fuzzed), "--output-prefix", str(root / "m")],
                    ["build-cip", "--input-prefix", good, str(fuzzed), "--output-prefix", str(root / "c"),
                     "--seq-length", "4", "--docs-per-seq", "2", "--chunks-per-doc", "2"]):
        _contract(Case("fuzz", command, ["fuzzed"], [f"{root / 'm'}.idx", f"{root / 'c'}.idx"],
                       [f"{fuzzed}.meta.json", f"{fuzzed}.idx"]))


# --------------------------------------------------------------------------- the path resolver

SPELLINGS = st.lists(st.sampled_from(["d", "d2", "f", "link_d", "link_f", ".", "..", "new"]), min_size=1, max_size=4)


@FAST
@given(output=SPELLINGS, source=st.sampled_from(["d", "d/f", "f", "link_d", "d/sub"]),
       tree_output=st.booleans(), tree_input=st.booleans())
def test_whatever_the_resolver_lets_through_never_touches_an_input(tmp_path_factory, output, source, tree_output,
                                                                   tree_input):
    from megatron_longsky.utils.atomic import atomic_directory, atomic_write_text
    from megatron_longsky.utils.output_paths import OutputExistsError, check_outputs

    root = tmp_path_factory.mktemp("paths")
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d2").mkdir()
    (root / "d" / "f").write_text("input in d")
    (root / "d" / "sub" / "g").write_text("deep input")
    (root / "f").write_text("input at top")
    os.symlink(root / "d", root / "link_d")
    os.symlink(root / "f", root / "link_f")
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    out = os.path.join(str(root / "d2"), *output)  # any spelling, starting inside the tree
    if not os.path.realpath(out).startswith(str(root) + os.sep):
        return  # outside this test's directory
    src = root / source
    is_dir = src.is_dir()
    try:
        check_outputs([] if tree_output else [out], inputs=[] if (is_dir and tree_input) else [src],
                      tree_inputs=[src] if (is_dir and tree_input) else [],
                      tree_outputs=[out] if tree_output else [], overwrite=True)
    except OutputExistsError as exc:
        assert "\n" not in str(exc) and str(root) in str(exc)
        return
    except OSError:
        return
    try:
        if tree_output:
            with atomic_directory(out) as tmp:
                (tmp / "written").write_text("output")
        else:
            atomic_write_text(out, "output")
    except OSError:
        pass  # e.g. a file where a directory must be: refused by the OS, nothing replaced
    if is_dir and not tree_input:
        # only the directory entry itself was declared: files below it are not inputs then
        snapshot = {p: b for p, b in snapshot.items() if not str(p).startswith(str(src) + os.sep)}
    for path, data in snapshot.items():
        if path == src or (is_dir and tree_input and str(path).startswith(str(src) + os.sep)):
            assert path.exists() and path.read_bytes() == data, (out, source, path)
