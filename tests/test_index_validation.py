"""Issue 22: one .idx validator for every reader, malformed .meta.json named everywhere, build-cip
input checks up front, checkpoint directories read robustly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_longsky.cli import main as longsky
from megatron_longsky.data.index_format import _FIXED, IndexedDatasetError, validate_index
from megatron_longsky.tokenizer import ByteTokenizer

from cli_fuzz import _write_dataset


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def dataset(path: Path, docs=((97, 98, 99, 0), (100, 101, 0), (102, 103, 104, 105, 0))) -> str:
    return _write_dataset(path, ByteTokenizer().metadata(), [list(d) for d in docs])


def _arrays(prefix: str):
    raw = bytearray(Path(prefix + ".idx").read_bytes())
    n, d = struct.unpack("<QQ", raw[_FIXED - 16:_FIXED])
    return raw, n, d


def corrupt(prefix: str, how: str) -> None:
    """Rewrite one field of ``prefix``.idx (keeping its size) the way the issue's cases did."""
    raw, n, d = _arrays(prefix)
    lengths = slice(_FIXED, _FIXED + 4 * n)
    pointers = slice(_FIXED + 4 * n, _FIXED + 12 * n)
    docs = slice(_FIXED + 12 * n, _FIXED + 12 * n + 8 * d)
    L = np.frombuffer(bytes(raw[lengths]), np.int32).copy()
    P = np.frombuffer(bytes(raw[pointers]), np.int64).copy()
    D = np.frombuffer(bytes(raw[docs]), np.int64).copy()
    if how == "negative_length":
        L[1] = -L[1]
    elif how == "pointer_not_monotone":
        P[1], P[2] = P[2], P[1]
    elif how == "first_pointer":
        P[:] += 2
    elif how == "doc_idx_decreasing":
        D[1], D[2] = D[2], D[1]
    elif how == "doc_idx_out_of_range":
        D[-1] = n + 5
    elif how == "doc_idx_not_from_zero":
        D[0] = 1
    elif how == "no_doc_idx":
        raw = raw[:docs.start]
        raw[_FIXED - 8:_FIXED] = struct.pack("<Q", 0)
        Path(prefix + ".idx").write_bytes(bytes(raw))
        return
    elif how == "bad_dtype_code":
        raw[len(b"MMIDIDX\x00\x00") + 8] = 99
    elif how == "bad_version":
        raw[len(b"MMIDIDX\x00\x00"):len(b"MMIDIDX\x00\x00") + 8] = struct.pack("<Q", 2)
    raw[lengths], raw[pointers], raw[docs] = L.tobytes(), P.tobytes(), D.tobytes()
    Path(prefix + ".idx").write_bytes(bytes(raw))


CORRUPTIONS = {
    "negative_length": "length -3",
    "pointer_not_monotone": "pointers must follow the lengths",
    "first_pointer": "starts at byte 2, not 0",
    "doc_idx_decreasing": "doc_idx decreases",
    "doc_idx_out_of_range": "doc_idx ends at 8, not at the sequence count 3",
    "doc_idx_not_from_zero": "doc_idx starts at 1",
    "no_doc_idx": "no document index entries",
    "bad_dtype_code": "dtype code 99",
    "bad_version": "version 2",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_the_validator_names_each_broken_invariant(tmp_path, how):
    prefix = dataset(tmp_path / "d")
    validate_index(prefix + ".idx", Path(prefix + ".bin").stat().st_size)  # the intact file passes
    corrupt(prefix, how)
    with pytest.raises(IndexedDatasetError, match=CORRUPTIONS[how]) as info:
        validate_index(prefix + ".idx", Path(prefix + ".bin").stat().st_size)
    assert "d.idx" in str(info.value)


@pytest.mark.parametrize("how", ["negative_length", "doc_idx_decreasing", "doc_idx_out_of_range", "no_doc_idx"])
def test_every_reader_refuses_a_corrupt_index(tmp_path, capsys, how):
    good = dataset(tmp_path / "good")
    bad = dataset(tmp_path / "bad")
    corrupt(bad, how)
    before = Path(bad + ".idx").read_bytes()
    # merge-datasets: no corrupt merged index
    assert longsky(["merge-datasets", "--input", good, "--input", bad, "--output-prefix",
                    str(tmp_path / "m")]) == 2
    assert "bad.idx" in one_error_line(capsys) and not (tmp_path / "m.idx").exists()
    # build-cip: no sequences from overlapping documents
    assert longsky(["build-cip", "--input-prefix", bad, "--output-prefix", str(tmp_path / "c"), "--seq-length", "8",
                    "--docs-per-seq", "2", "--chunks-per-doc", "2"]) == 2
    assert "bad.idx" in one_error_line(capsys) and not (tmp_path / "c.idx").exists()
    # train's checks before a run (preflight) and the dataset checks of the set-up
    from megatron_longsky.config import ConfigError
    from megatron_longsky.training.preflight import check_dataset_files

    with pytest.raises(ConfigError, match="bad.idx"):
        check_dataset_files("data.prefixes", bad)
    from megatron_longsky.data.indexed import check_dataset, open_indexed

    for reader in (check_dataset, open_indexed):  # eval ppl / haystacks / SFT datasets open through this
        with pytest.raises(IndexedDatasetError, match="bad.idx"):
            reader(bad)
    assert Path(bad + ".idx").read_bytes() == before


META_CASES = {
    "invalid_json": b'{"tokenizer": ',
    "list": b"[1, 2]",
    "tokenizer_string": b'{"tokenizer": "byte"}',
    "vocab_string": b'{"tokenizer": {"fingerprint": "x", "vocab_size": "big"}}',
    "invalid_utf8": b'{"tokenizer": {"fingerprint": "\xff\xfe"}}',
}


@pytest.mark.parametrize("name", sorted(META_CASES))
def test_a_malformed_meta_is_one_line_naming_the_file_everywhere(tmp_path, capsys, name):
    good = dataset(tmp_path / "good")
    bad = dataset(tmp_path / "bad")
    Path(bad + ".meta.json").write_bytes(META_CASES[name])
    assert longsky(["merge-datasets", "--input", good, "--input", bad, "--output-prefix",
                    str(tmp_path / "m")]) == 2
    assert "bad.meta.json" in one_error_line(capsys)
    assert longsky(["build-cip", "--input-prefix", good, bad, "--output-prefix", str(tmp_path / "c"),
                    "--seq-length", "8", "--docs-per-seq", "2", "--chunks-per-doc", "2"]) == 2
    assert "bad.meta.json" in one_error_line(capsys)
    from megatron_longsky.data.metadata import MetaFileError, check_tokenizer

    with pytest.raises(MetaFileError, match="bad.meta.json"):  # train's tokenizer check
        check_tokenizer(bad, ByteTokenizer().fingerprint)


def test_build_cip_names_a_missing_dataset_as_missing(tmp_path, capsys):
    missing = str(tmp_path / "nothing_here")
    assert longsky(["build-cip", "--input-prefix", missing, "--output-prefix", str(tmp_path / "c"),
                    "--seq-length", "8", "--docs-per-seq", "2", "--chunks-per-doc", "2"]) == 2
    line = one_error_line(capsys)
    assert "nothing_here.idx does not exist" in line and "require_meta" not in line


@pytest.mark.parametrize("flags, names", [
    (["eod_id=70000"], "eod_id=70000"),
    (["eod_id=-1"], "eod_id=-1"),
    (["cip_ratio=1.0e+308", "natural_ratio=1.0e+308", "natural_prefixes=[{good}]"], "overflows"),
    (["--num-sequences", "1000000000000"], "num_sequences=1000000000000"),
])
def test_build_cip_checks_its_numbers_up_front(tmp_path, capsys, flags, names):
    good = dataset(tmp_path / "good", docs=[[97] * 20 + [0]] * 8)
    flags = [f.replace("{good}", good) for f in flags]
    rc = longsky(["build-cip", "--input-prefix", good, "--output-prefix", str(tmp_path / "c"), "--seq-length", "16",
                  "--docs-per-seq", "2", "--chunks-per-doc", "2", "--separator", "eod", *flags])
    assert rc == 2 and names in one_error_line(capsys)
    assert not (tmp_path / "c.idx").exists()


# --------------------------------------------------------------------------- checkpoints

def test_latest_with_invalid_utf8_is_one_line(tmp_path):
    from megatron_longsky.checkpoint.layout import CheckpointError, read_latest

    (tmp_path / "latest").write_bytes(b"iter_\xff\xfe0001\n")
    with pytest.raises(CheckpointError, match="latest: not UTF-8"):
        read_latest(tmp_path)


def test_a_truncated_checkpoint_is_refused_by_name(tmp_path, capsys):
    from megatron_longsky.checkpoint.layout import CheckpointError, read_latest, resolve_checkpoint

    it = tmp_path / "ck" / "iter_0000010"
    (it / "model").mkdir(parents=True)
    (it / "config.yaml").write_text("model: {}\n")
    (tmp_path / "ck" / "latest").write_text("iter_0000010\n")
    for call in (read_latest, resolve_checkpoint):
        with pytest.raises(CheckpointError, match=r"incomplete \(missing model/metadata.json\)"):
            call(tmp_path / "ck")
    assert longsky(["convert", "export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")]) == 2
    assert "incomplete" in one_error_line(capsys) and not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_export_from_a_checkpoint_with_truncated_weights_is_one_line(tmp_path, capsys):
    from test_convert import make_hf_model

    make_hf_model(tmp_path / "hf")
    assert longsky(["convert", "import", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    shards = sorted((tmp_path / "ck" / "iter_0000000" / "model").glob("*.distcp"))
    assert shards
    for shard in shards:
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    assert longsky(["convert", "export", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert "iter_0000000/model" in line and "truncated or corrupt" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b'{"iteration": ', b"\xff\xfe", b"[1]", b'{"scheduler": 3}'])
def test_a_corrupt_trainer_state_is_one_line_naming_it(tmp_path, content):
    from megatron_longsky.checkpoint.layout import CheckpointError
    from megatron_longsky.training.checkpointing import read_trainer_state

    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "state.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="trainer/state.json: "):
        read_trainer_state(tmp_path)
