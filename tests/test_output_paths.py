"""Issue 22, "no input lost": one resolver for every command's input and output paths, per-output
locks, temporary files removed on every exit path."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from megatron_longsky.cli import main as longsky
from megatron_longsky.utils.output_paths import (
    OutputExistsError,
    OutputLock,
    OutputLockedError,
    check_outputs,
    check_prefix,
)

REPO = Path(__file__).resolve().parents[1]


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


# --------------------------------------------------------------------------- the resolver

def test_output_equal_to_an_input_under_any_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_text("x")
    os.symlink(tmp_path / "a", tmp_path / "link")
    os.link(tmp_path / "a", tmp_path / "hard")
    (tmp_path / "sub").mkdir()
    for spelling in ("a", "./a", str(tmp_path / "a"), "sub/../a", "link", "hard"):
        with pytest.raises(OutputExistsError, match=r"is also an input \(a\)"):
            check_outputs([spelling], ["a"], overwrite=True)


def test_parent_and_child_relations_both_ways(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_outputs([], tree_outputs=[tmp_path], tree_inputs=[hf], overwrite=True)  # the input's parent
    with pytest.raises(OutputExistsError, match="is also an input"):
        check_outputs([], tree_outputs=[str(hf) + "/."], tree_inputs=[hf], overwrite=True)
    with pytest.raises(OutputExistsError, match="inside the input directory"):
        check_outputs([], tree_outputs=[hf / "out"], tree_inputs=[hf], overwrite=True)
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_outputs([], tree_outputs=[tmp_path], inputs=[hf / "config.json"], overwrite=True)
    check_outputs([], tree_outputs=[tmp_path / "elsewhere"], tree_inputs=[hf])  # no relation: fine


def test_outputs_colliding_with_each_other(tmp_path):
    with pytest.raises(OutputExistsError, match="are the same file"):
        check_outputs([tmp_path / "o_tokens_document.bin", f"{tmp_path}/./o_tokens_document.bin"])
    with pytest.raises(OutputExistsError, match="lies inside the output"):
        check_outputs([tmp_path / "d" / "x"], tree_outputs=[tmp_path / "d"])


def test_an_input_named_twice_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.idx").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match=r"input \./a\.idx is listed twice \(also as a\.idx\)"):
        check_outputs(["out.idx"], ["a.idx", "./a.idx"], unique_inputs=True)


def test_non_regular_outputs_are_refused_even_with_overwrite(tmp_path):
    with pytest.raises(OutputExistsError, match="/dev/null is a character device, not a regular file"):
        check_outputs(["/dev/null"], overwrite=True)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputExistsError, match="a FIFO"):
        check_outputs([tmp_path / "fifo"], overwrite=True)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputExistsError, match="a directory, not a regular file"):
        check_outputs([tmp_path / "dir"], overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="a regular file, not a directory"):
        check_outputs([], tree_outputs=[tmp_path / "file"], overwrite=True)


@pytest.mark.parametrize("prefix", ["", "  ", "out/", "out/.", "."])
def test_prefixes_that_name_no_file(tmp_path, prefix):
    with pytest.raises(OutputExistsError, match="--output-prefix"):
        check_prefix(prefix)


def test_preprocess_refuses_an_empty_or_directory_prefix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("c.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "outdir").mkdir()
    for prefix in ("", "outdir/", "outdir"):
        rc = longsky(["preprocess", "--input", "c.jsonl", "--output-prefix", prefix, "--tokenizer-type", "byte",
                      "--no-progress"])
        assert rc == 2 and "--output-prefix" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.jsonl", "outdir"]


def test_merge_refuses_one_input_twice(tmp_path, capsys, monkeypatch):
    from cli_fuzz import _write_dataset
    from megatron_longsky.tokenizer import ByteTokenizer

    monkeypatch.chdir(tmp_path)
    _write_dataset(Path("a"), ByteTokenizer().metadata(), [[97, 98, 0]])
    assert longsky(["merge-datasets", "--input", "a", "--input", "./a", "--output-prefix", "m"]) == 2
    line = one_error_line(capsys)
    assert "./a.idx" in line and "listed twice" in line
    assert not Path("m.idx").exists()


def test_build_synl_outputs_may_not_collide(tmp_path, capsys):
    jsonl = tmp_path / "o_tokens_document.bin"
    jsonl.write_text("keep me")
    rc = longsky(["build-synl", "--output", str(jsonl), "--sft-output-prefix", str(tmp_path / "o"), "--overwrite",
                  "--num-samples", "1", "--no-progress", "--tokenizer-type", "byte"])
    assert rc == 2 and "same file" in one_error_line(capsys)
    assert jsonl.read_text() == "keep me"
    rc = longsky(["build-synl", "--output", "/dev/null", "--overwrite", "--num-samples", "1", "--no-progress",
                  "--tokenizer-type", "byte"])
    assert rc == 2 and "character device" in one_error_line(capsys)


def test_build_synl_sft_max_length_zero_leaves_no_jsonl(tmp_path, capsys):
    out = tmp_path / "y.jsonl"
    rc = longsky(["build-synl", "--output", str(out), "--sft-output-prefix", str(tmp_path / "y"),
                  "--sft-max-length", "0", "--num-samples", "1", "--min-tokens", "50", "--max-tokens", "80",
                  "--no-progress", "--tokenizer-type", "byte"])
    assert rc == 2 and "--sft-max-length" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_plot_loss_never_over_its_input_and_only_with_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metrics = Path("m.jsonl")
    metrics.write_text("".join(json.dumps({"iteration": i, "loss": 3.0 - i / 10}) + "\n" for i in range(1, 4)))
    before = metrics.read_bytes()
    assert longsky(["plot-loss", "m.jsonl", "-o", "./m.jsonl"]) == 2
    assert "is also an input" in one_error_line(capsys)
    assert longsky(["plot-loss", "m.jsonl", "-o", "./m.jsonl", "--overwrite"]) == 2
    assert "is also an input" in one_error_line(capsys)
    assert metrics.read_bytes() == before
    Path("old.png").write_bytes(b"old")
    assert longsky(["plot-loss", "m.jsonl", "-o", "old.png"]) == 2
    assert "--overwrite" in one_error_line(capsys) and Path("old.png").read_bytes() == b"old"
    assert longsky(["plot-loss", "m.jsonl", "-o", "/dev/null", "--overwrite"]) == 2
    assert "character device" in one_error_line(capsys)
    assert longsky(["plot-loss", "m.jsonl", "-o", "old.png", "--overwrite"]) == 0
    assert Path("old.png").read_bytes()[:4] == b"\x89PNG"


def _fake_hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(b"weights")
    return path


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["./hf", ".", "hf/ck"])
def test_convert_import_never_replaces_its_input(tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    hf = _fake_hf_dir(tmp_path / "hf")
    before = _tree(hf)
    assert longsky(["convert", "import", "--hf-dir", "hf", "--output", output, "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "hf" in line and ("input" in line)
    assert _tree(hf) == before and not (hf / "ck").exists()


@pytest.mark.parametrize("output", ["./ck", ".", "ck/hf"])
def test_convert_export_never_replaces_its_input(tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "ck"
    (ck / "iter_0000000" / "model").mkdir(parents=True)
    (ck / "latest").write_text("iter_0000000\n")
    before = _tree(ck)
    assert longsky(["convert", "export", "--checkpoint", "ck", "--output", output, "--overwrite"]) == 2
    assert "input" in one_error_line(capsys)
    assert _tree(ck) == before


# --------------------------------------------------------------------------- locks

def test_a_second_writer_of_one_prefix_refuses_naming_the_holder(tmp_path, capsys):
    from megatron_longsky.data.indexed import IndexedDatasetWriter

    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "hello"}\n')
    prefix = tmp_path / "o_text_document"
    with OutputLock(prefix):
        rc = longsky(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer-type", "byte", "--no-progress"])
        line = one_error_line(capsys)
        assert rc == 2 and f"pid {os.getpid()}" in line and "being written by another run" in line
        with pytest.raises(OutputLockedError, match=str(prefix)):
            IndexedDatasetWriter(prefix, np.uint16)
    assert not list(tmp_path.glob("o_*"))
    # the lock is gone with its holder: the next run writes, and leaves no lock file behind
    assert longsky(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
                    "--tokenizer-type", "byte", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "c.jsonl", "o_text_document.bin", "o_text_document.idx", "o_text_document.meta.json"]


def test_two_writers_of_one_new_prefix_never_both_succeed(tmp_path):
    from megatron_longsky.data.indexed import IndexedDatasetWriter

    first = IndexedDatasetWriter(tmp_path / "p", np.uint16)
    with pytest.raises(OutputLockedError):
        IndexedDatasetWriter(tmp_path / "p", np.uint16)
    first.add_document(np.array([1, 2], np.uint16), [2])
    first.finalize({})
    first.commit()
    with pytest.raises(OutputExistsError, match="already exists"):  # checked under the lock
        IndexedDatasetWriter(tmp_path / "p", np.uint16)


def test_a_killed_holder_never_blocks(tmp_path):
    code = f"from megatron_longsky.utils.output_paths import OutputLock; import os; " \
           f"OutputLock({str(tmp_path / 'x')!r}).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with OutputLock(tmp_path / "x"):
        pass


# --------------------------------------------------------------------------- temporary files

def test_abort_removes_temporaries_when_close_fails_with_a_full_disk(tmp_path):
    from megatron_longsky.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(tmp_path / "p", np.uint16)
    writer.add_document(np.array([1, 2, 3], np.uint16), [3])
    real = writer._builder.data_file

    class FullDisk:
        closed = False

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(writer.temp_paths[0]))

    writer._builder.data_file = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        writer.abort()
    assert list(tmp_path.iterdir()) == []  # no .tmp-<pid> left filling the disk, no lock file


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    from megatron_longsky.utils.atomic import atomic_directory, atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".r.txt.tmp-{dead}").write_text("half")
    (tmp_path / f".ck.tmp-{dead}").mkdir()
    (tmp_path / f".ck.tmp-{dead}" / "w").write_text("half")
    atomic_write_text(tmp_path / "r.txt", "new")
    with atomic_directory(tmp_path / "ck") as tmp:
        (tmp / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "r.txt"]


def test_directory_outputs_respect_the_umask(tmp_path):
    from megatron_longsky.utils.atomic import atomic_directory

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_a_killed_directory_swap_gets_the_old_tree_back(tmp_path):
    from megatron_longsky.utils.atomic import atomic_directory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old = tmp_path / f".ck.old-{dead}"  # killed between moving the old tree aside and the new one in
    old.mkdir()
    (old / "weights").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_directory(tmp_path / "ck", overwrite=False):
            pass
    assert (tmp_path / "ck" / "weights").read_text() == "old"


def _run_and_terminate(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigterm_to_build_synl_exits_143_and_leaves_no_temporary(tmp_path):
    proc = _run_and_terminate("""
        import os, signal, sys
        from megatron_longsky.synl import generate
        real = generate.iter_synl
        def iter_synl(cfg, tokenizer):
            for n, record in enumerate(real(cfg, tokenizer)):
                if n == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield record
        generate.iter_synl = iter_synl
        from megatron_longsky.cli import main
        sys.exit(main(["build-synl", "--output", "s.jsonl", "--num-samples", "4", "--min-tokens", "300",
                       "--max-tokens", "600", "--no-progress", "--tokenizer-type", "byte"]))
    """, tmp_path)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_workers_start_is_not_lost(monkeypatch):
    """The parent blocks (no longer ignores) SIGINT while its workers spawn: a Ctrl-C in that
    window stops the run instead of vanishing."""
    import multiprocessing.context
    import signal

    from megatron_longsky.data.workers import OrderedProcessPool, stop_on_signals

    started = []
    real_start = multiprocessing.context.SpawnProcess.start

    def start(self):
        if not started:
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the first worker starts
        started.append(self)
        real_start(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start)
    # Another thread alive (as a tqdm monitor or queue feeder would be): the kernel may hand it
    # the signal, which a per-thread mask does not stop.
    idle = threading.Event()
    threading.Thread(target=idle.wait, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as info:
            with stop_on_signals():
                with OrderedProcessPool(2, abs) as pool:
                    list(pool.imap([1, -2]))
    finally:
        idle.set()
    assert info.value.code == 130
    for proc in started:
        proc.join(timeout=10)
        assert not proc.is_alive()


@pytest.mark.slow
def test_sigterm_to_convert_import_and_export_exits_143_and_leaves_no_temporary(tmp_path):
    proc = _run_and_terminate(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_convert import make_hf_model
        from megatron_longsky.cli import main
        from megatron_longsky import checkpoint as importer  # import_checkpoint takes iteration_dir from here
        import safetensors.torch

        def terminating(real):
            def call(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output is half written
                return real(*args, **kwargs)
            return call

        make_hf_model(__import__("pathlib").Path("hf"))
        real_iteration_dir, real_save = importer.iteration_dir, safetensors.torch.save_file
        importer.iteration_dir = terminating(real_iteration_dir)
        codes = [main(["convert", "import", "--hf-dir", "hf", "--output", "ck"])]
        importer.iteration_dir = real_iteration_dir
        codes.append(main(["convert", "import", "--hf-dir", "hf", "--output", "ck"]))
        safetensors.torch.save_file = terminating(real_save)
        codes.append(main(["convert", "export", "--checkpoint", "ck", "--output", "out"]))
        print(codes)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[143, 0, 143]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]  # no .tmp-*, no half output
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_directories_are_never_an_input(tmp_path, capsys, monkeypatch):
    """needle / eval / synl-eval / quickstart: the report directory is checked against the
    command's inputs before any model is loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck" / "iter_0000001" / "model").mkdir(parents=True)
    Path("data.jsonl").write_text("{}\n")
    Path("job.yaml").write_text("base_iters: 1\n")
    for argv, name in (
        (["needle", "--checkpoint", "ck", "--output", "./ck"], "also an input (ck)"),
        (["needle", "--checkpoint", "ck", "--output", "ck/needle"], "inside the input directory ck"),
        (["eval", "ppl", "--checkpoint", "ck", "--data", "data.jsonl", "--output", "./data.jsonl"],
         "also an input (data.jsonl)"),
        (["quickstart", "--config", "job.yaml", "--output", "./job.yaml"], "also an input (job.yaml)"),
        (["quickstart", "--output", "/dev/null"], "/dev/null is a character device"),
    ):
        assert longsky(argv) == 2, argv
        assert name in one_error_line(capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "data.jsonl", "job.yaml"]
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["iter_0000001"]


def test_a_file_system_without_locks_writes_unlocked(tmp_path, monkeypatch, caplog):
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with OutputLock(tmp_path / "x"):
        pass
    assert "no file locks" in caplog.text
