"""Our sbatch scripts under a real single-node Slurm (slurm-wlm + munge, started by the test).

CI installs Slurm (`apt-get install -y slurm-wlm munge`) and runs as root; elsewhere the
end-to-end test is skipped only when `sbatch` is absent and `CI` is unset.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _training_fixtures import TINY_MODEL

from megatron_longsky.launch.slurm_local import APT_PACKAGES, LocalSlurm, missing_binaries, render_slurm_conf

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "examples" / "slurm"
GPU_SCRIPTS = ["cpt.sbatch", "sft.sbatch", "long_sft.sbatch", "needle.sbatch"]
TRAIN_ITERS = 150

needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None and not os.environ.get("CI"),
    reason=f"Slurm is not installed (apt-get install -y {APT_PACKAGES}); in CI (CI set) this test always runs",
)


def _sbatch_options(path: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("name", GPU_SCRIPTS + ["cpu_tiny.sbatch"])
def test_sbatch_scripts_parse_and_ask_for_requeue_signal_and_job_logs(name):
    path = SLURM_DIR / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    options = _sbatch_options(path)
    assert "--requeue" in options
    assert "--output=logs/%x-%j.out" in options and "--open-mode=append" in options
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", o) for o in options), options
    assert "common.sh" in path.read_text() and "longsky_srun" in path.read_text()
    if name != "cpu_tiny.sbatch":
        assert any(o.startswith("--gpus-per-node=") for o in options)
        assert any(o.startswith("--ntasks-per-node=") for o in options)  # one task per GPU


def test_common_sh_parses():
    subprocess.run(["bash", "-n", str(SLURM_DIR / "common.sh")], check=True)


def test_local_cluster_config_is_self_contained(tmp_path):
    conf = render_slurm_conf(tmp_path, "node1", 2, 16817, 16818, tmp_path / "munge.socket")
    settings = dict(line.split("=", 1) for line in conf.splitlines() if "=" in line and not line.startswith(("#", "NodeName", "PartitionName")))
    assert settings["AuthType"] == "auth/munge" and settings["CredType"] == "cred/munge"
    assert settings["ProctrackType"] == "proctrack/linuxproc" and settings["TaskPlugin"] == "task/none"
    assert settings["SelectType"] == "select/cons_tres" and settings["SelectTypeParameters"] == "CR_Core"
    assert settings["SlurmUser"] == "root"
    assert f"socket={tmp_path / 'munge.socket'}" in settings["AuthInfo"]
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile", "SlurmctldLogFile"):
        assert settings[key].startswith(str(tmp_path)), key
    assert "NodeName=node1 NodeAddr=127.0.0.1 CPUs=2" in conf


def _wait_for(predicate, timeout: float, what: str, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")


def _cpu_tiny_env(tmp_path: Path, job: dict, **env: str) -> dict:
    """A cpu_tiny.sbatch job: its YAML (the tiny model, built-in data, plus ``job``) and
    the environment the script reads; job logs go to ``tmp_path/logs``."""
    missing = missing_binaries()
    assert not missing, f"Slurm binaries missing: {missing}; install with apt-get install -y {APT_PACKAGES}"
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump({
        "model": {**TINY_MODEL, "seq_length": 64}, "data": {"kind": "gpt", "split": "100,0,0"},
        "logging": {"log_interval": 1, "tensorboard": False},
        "micro_batch_size": 1, "global_batch_size": 4, **job}))
    (tmp_path / "logs").mkdir()
    return {"LONGSKY_ROOT": str(REPO), "LONGSKY_PYTHON": sys.executable, "CONFIG": str(job_yaml),
            "OUTPUT_DIR": str(tmp_path / "run"), "DATA_PREFIX": str(tmp_path / "data" / "builtin_text_document"),
            **env}


class _JobLog:
    """The job's log file as the test waits on it."""

    def __init__(self, tmp_path: Path, slurm: LocalSlurm, job: str):
        self.path = tmp_path / "logs" / f"longsky-cpu-tiny-{job}.out"
        self.slurm = slurm

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def debug(self) -> str:
        return (f"--- job log ---\n{self.text()[-4000:]}\n{self.slurm.log_tail('slurmctld')}\n"
                f"{self.slurm.log_tail('slurmd')}")

    def iterations(self, after: str = "") -> list[int]:
        body = self.text()
        return [int(n) for n in re.findall(r"\] iter (\d+) \|", body[body.find(after):] if after else body)]

    def wait_for_training(self) -> None:
        _wait_for(lambda: max(self.iterations(), default=0) >= 3, 240, "training progress in the job log",
                  self.debug)


def _submit_cpu_tiny(tmp_path: Path, slurm: LocalSlurm, env: dict) -> tuple[str, _JobLog]:
    job = slurm.sbatch([f"--output={tmp_path}/logs/%x-%j.out", str(SLURM_DIR / "cpu_tiny.sbatch")],
                       cwd=REPO, env=env)
    return job, _JobLog(tmp_path, slurm, job)


@pytest.mark.slow
@needs_slurm
def test_cpu_sbatch_trains_on_two_tasks_and_resumes_after_preemption(tmp_path):
    # cpu_tiny.sbatch trains into OUTPUT_DIR whatever the YAML names.
    env = _cpu_tiny_env(tmp_path, {"optimizer": {"lr": 1.0e-3, "min_lr": 1.0e-4}, "train_iters": TRAIN_ITERS,
                                   "checkpoint": {"save": str(tmp_path / "not_here")}})
    run_dir = Path(env["OUTPUT_DIR"])
    with LocalSlurm.start(tmp_path / "cluster", cpus=2) as slurm:
        job, log = _submit_cpu_tiny(tmp_path, slurm, env)
        text, debug = log.text, log.debug

        # Preempt the way Slurm does before a time limit: USR1 to the batch shell.
        log.wait_for_training()
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        info = slurm.wait(job, timeout=300, predicate=lambda i: i.restarts >= 1)
        out = text()
        assert info.state == "COMPLETED" and info.restarts == 1, f"{info}\n{debug()}"

    # Trained on 2 tasks (srun), data parallel over both, in each of the two runs.
    assert out.count("launcher=slurm rank=0/2") == 2 and out.count("DP=2") == 2, debug()
    assert re.search(r"rank1 \S+ WARNING\] received SIGUSR1", out), "rank 1 did not take part"
    # The preemption path: checkpoint, requeue, then resume from that checkpoint.
    saved = re.search(r"preempted: checkpoint (\S+) saved at iteration (\d+)", out)
    assert saved, debug()
    stop_iteration = int(saved.group(2))
    assert 3 <= stop_iteration < TRAIN_ITERS
    assert f"requeueing job {job}" in out and "restart 1" in out
    resumed = re.search(r"resumed from (\S+) at iteration (\d+)", out)
    assert resumed and resumed.group(1) == saved.group(1) and int(resumed.group(2)) == stop_iteration
    after = out[resumed.end():]
    continued = [int(n) for n in re.findall(r"\] iter (\d+) \|", after)]
    assert continued == list(range(stop_iteration + 1, TRAIN_ITERS + 1))
    assert f"completed at iteration {TRAIN_ITERS}" in out
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / f"iter_{stop_iteration:07d}").is_dir()
    assert (checkpoints / f"iter_{TRAIN_ITERS:07d}").is_dir()
    assert "latest" in {p.name for p in checkpoints.iterdir()}
    assert not (tmp_path / "not_here").exists()


def _step_command(tmp_path: Path, env: dict, *command: str) -> list[str]:
    """The srun command line common.sh builds for a step (stub scontrol, no cluster)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "scontrol").chmod(0o755)
    script = (f"source {SLURM_DIR / 'common.sh'} >/dev/null; longsky_step_command \"$@\"; "
              "printf '%s\\n' \"${_longsky_step[@]}\"")
    result = subprocess.run(
        ["bash", "-c", script, "bash", *command], capture_output=True, text=True, check=True,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
             "LONGSKY_ROOT": str(REPO), **env})
    return result.stdout.splitlines()


def test_container_goes_on_each_step_with_the_checkout_mounted(tmp_path):
    plain = _step_command(tmp_path, {}, "python", "-m", "megatron_longsky.cli", "train")
    assert plain == ["srun", "--kill-on-bad-exit=1", "python", "-m", "megatron_longsky.cli", "train"]
    step = _step_command(tmp_path, {"LONGSKY_CONTAINER_IMAGE": "/img/longsky.sqsh",
                                    "LONGSKY_CONTAINER_MOUNTS": "/lustre:/lustre",
                                    "LONGSKY_STEP_SETUP": "pip install --no-deps -e ."},
                         "python", "-m", "megatron_longsky.cli", "train", "a=b c")
    assert step[:5] == ["srun", "--kill-on-bad-exit=1", "--container-image=/img/longsky.sqsh",
                        f"--container-mounts=/lustre:/lustre,{REPO}:{REPO}", f"--container-workdir={REPO}"]
    assert step[5:7] == ["bash", "-c"]
    # The install runs in the step's own container, then the command with its words intact.
    out = subprocess.run(["bash", "-c", step[7].replace("pip install --no-deps -e .", "true")
                          .replace("exec python", "exec printf '%s|'")], capture_output=True, text=True)
    assert out.stdout == "-m|megatron_longsky.cli|train|a=b c|"
    # torchrun: one agent per node holding all of the node's CPUs.
    per_node = _step_command(tmp_path, {"SLURM_NNODES": "2", "SLURM_CPUS_ON_NODE": "96"}, "--one-per-node", "x")
    assert per_node[2:] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=96", "x"]
    # The batch scripts themselves never ask for a container (scontrol/srun live on the host).
    for name in GPU_SCRIPTS + ["cpu_tiny.sbatch"]:
        assert "container" not in " ".join(_sbatch_options(SLURM_DIR / name))


@pytest.mark.slow
@needs_slurm
def test_torchrun_launcher_requeues_on_usr1_and_scancel_stops_without_requeue(tmp_path):
    """LONGSKY_LAUNCHER=torchrun: one agent per node whose workers save on the preemption
    signal (USR1) and resume after the requeue; a plain `scancel` then stops the job for good."""
    env = _cpu_tiny_env(tmp_path, {"train_iters": 100000}, LONGSKY_LAUNCHER="torchrun")
    with LocalSlurm.start(tmp_path / "cluster", cpus=2) as slurm:
        job, log = _submit_cpu_tiny(tmp_path, slurm, env)
        text, debug, iterations = log.text, log.debug, log.iterations
        log.wait_for_training()
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        slurm.wait(job, states=("RUNNING",), timeout=300, predicate=lambda i: i.restarts >= 1)
        _wait_for(lambda: "resumed from" in text() and iterations(after="resumed from"), 240,
                  "the requeued run to resume and train", debug)
        slurm.run(["scancel", str(job)])
        info = slurm.wait(job, states=("CANCELLED", "COMPLETED", "FAILED"), timeout=120)
        time.sleep(15)  # longer than the local cluster's requeue delay (cred_expire=10 s)
        final = slurm.job(job)
        out = text()
    assert info.state == "CANCELLED" and final.state == "CANCELLED" and final.restarts == 1, f"{final}\n{debug()}"
    # One agent per node (one node here) in each run, starting 2 workers joined as DP=2.
    assert len(re.findall(r"longsky torchrun agent on \S+ \(Slurm task 0/1\)", out)) == 2, debug()
    assert out.count("launcher=torchrun rank=0/2") == 2 and out.count("DP=2") == 2, debug()
    # USR1 reached the workers through the agent; they saved; the job was requeued and resumed there.
    assert "forwarding it to 2 worker(s)" in out, debug()
    saved = re.search(r"preempted: checkpoint (\S+) saved at iteration (\d+)", out)
    assert saved and f"requeueing job {job}" in out, debug()
    resumed = re.search(r"resumed from (\S+) at iteration (\d+)", out)
    assert resumed and resumed.group(1) == saved.group(1) and resumed.group(2) == saved.group(2)
    # scancel: saved (KillWait leaves the time here), stopped, not requeued.
    saves = [int(n) for n in re.findall(r"rank0 \S+ WARNING\] preempted: checkpoint \S+ saved at iteration (\d+)", out)]
    assert len(saves) == 2 and saves[1] > saves[0], debug()
    assert "this script does not requeue" in out and out.count("requeueing job") == 1, debug()
