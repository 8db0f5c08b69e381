# Shared by the sbatch scripts in this directory: `source` it, then call longsky_srun.
#
# Launch: one task per GPU (srun) by default. megatron_longsky's runtime reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and takes the master from the first host of
# SLURM_JOB_NODELIST (exported below as MASTER_ADDR) with a per-job MASTER_PORT.
# LONGSKY_LAUNCHER=torchrun instead runs one `torchrun` per node with c10d rendezvous.
#
# Preemption: the scripts ask for `--signal=B:USR1@<seconds>` (USR1 to this batch shell
# before the time limit) and `--requeue`. On USR1 or TERM the trap below forwards the
# signal to the training tasks (srun passes it on), which finish their step, save a
# checkpoint and exit 0; then the job requeues itself (`scontrol requeue`) and the next run
# resumes from the checkpoint's `latest` automatically (same command line).
# To preempt by hand:  scancel --batch --signal=USR1 <jobid>
#
# Variables (all optional):
#   LONGSKY_ROOT       repository checkout (default: the submit directory)
#   LONGSKY_PYTHON     python with megatron_longsky installed (default: python)
#   LONGSKY_LAUNCHER   srun (one task per GPU, default) | torchrun (one per node)
#   LONGSKY_NO_REQUEUE set to 1 to exit on a preemption signal without requeueing
#   SRUN_EXTRA_ARGS    extra srun options, e.g. the container below
#
# Containers with pyxis/enroot (NVIDIA PyTorch images bring TE and apex):
#   SRUN_EXTRA_ARGS="--container-image=nvcr.io#nvidia/pytorch:25.01-py3 \
#                    --container-mounts=/lustre:/lustre,$HOME:$HOME \
#                    --container-workdir=$PWD --no-container-mount-home"
# and install this package in the image (pip install --no-deps -e .) or mount a venv.

set -euo pipefail
: "${SLURM_JOB_ID:?examples/slurm/common.sh runs inside a Slurm job: submit the script with sbatch}"

LONGSKY_ROOT="${LONGSKY_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
LONGSKY_PYTHON="${LONGSKY_PYTHON:-python}"
LONGSKY_LAUNCHER="${LONGSKY_LAUNCHER:-srun}"
cd "$LONGSKY_ROOT"
# Slurm opens logs/%x-%j.out before this runs: create logs/ before sbatch.

# Rendezvous: first host of the allocation, a port derived from the job id (two jobs on a
# node do not collide; the same port again after a requeue).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TOKENIZERS_PARALLELISM=false
# NCCL on clusters: fail fast on hangs instead of burning the allocation.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

echo "longsky: job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), master ${MASTER_ADDR}:${MASTER_PORT}, launcher ${LONGSKY_LAUNCHER}"

_longsky_step_pid=""
_longsky_preempted=0

_longsky_on_signal() {
    local sig="$1"
    _longsky_preempted=1
    echo "longsky: batch script got SIG${sig}: asking the training tasks to checkpoint and stop"
    if [ -n "$_longsky_step_pid" ]; then
        # torchrun dies on USR1 but turns TERM into a graceful stop of its workers; our
        # trainer saves on either.
        if [ "$LONGSKY_LAUNCHER" = torchrun ]; then
            kill -TERM "$_longsky_step_pid" 2>/dev/null || true
        else
            kill -USR1 "$_longsky_step_pid" 2>/dev/null || true
        fi
    fi
}

# longsky_srun <longsky subcommand and arguments...>: run it on every task of the job,
# requeueing the job after a preemption signal once the tasks have saved and exited.
longsky_srun() {
    local status=0
    local -a cmd
    if [ "$LONGSKY_LAUNCHER" = torchrun ]; then
        local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
        cmd=(srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${SRUN_EXTRA_ARGS:-}
             "$LONGSKY_PYTHON" -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node="$gpus"
             --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
             -m megatron_longsky.cli "$@")
    else
        cmd=(srun --kill-on-bad-exit=1 ${SRUN_EXTRA_ARGS:-} "$LONGSKY_PYTHON" -m megatron_longsky.cli "$@")
    fi
    trap '_longsky_on_signal USR1' USR1
    trap '_longsky_on_signal TERM' TERM
    echo "longsky: ${cmd[*]}"
    "${cmd[@]}" &
    _longsky_step_pid=$!
    # `wait` returns early when a trapped signal arrives: wait again until the step ends.
    while true; do
        set +e
        wait "$_longsky_step_pid"
        status=$?
        set -e
        if kill -0 "$_longsky_step_pid" 2>/dev/null; then
            continue
        fi
        break
    done
    _longsky_step_pid=""
    trap - USR1 TERM
    if [ "$_longsky_preempted" = 1 ]; then
        if [ "${LONGSKY_NO_REQUEUE:-0}" = 1 ]; then
            echo "longsky: preempted (step exit status ${status}); not requeueing (LONGSKY_NO_REQUEUE=1)"
        else
            echo "longsky: preempted (step exit status ${status}); requeueing job ${SLURM_JOB_ID}"
            scontrol requeue "$SLURM_JOB_ID"
        fi
        # Leave quietly: Slurm stops this shell when it requeues the job.
        exit 0
    fi
    return "$status"
}

# longsky_require_file <path> <what>: a clear error instead of a trainer traceback.
longsky_require_file() {
    if [ ! -e "$1" ]; then
        echo "longsky: $2 not found: $1" >&2
        exit 2
    fi
}
