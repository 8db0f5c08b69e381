# Shared by the sbatch scripts in this directory: `source` it, then call longsky_srun.
#
# Launch: one task per GPU (srun) by default. megatron_longsky's runtime reads
# SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and takes the master from the first host of
# SLURM_JOB_NODELIST (exported below as MASTER_ADDR) with a per-job MASTER_PORT.
# LONGSKY_LAUNCHER=torchrun instead runs one torchrun agent per node (c10d rendezvous)
# that starts one worker per task the job asked for on that node.
#
# Stop, requeue, resume (docs/slurm.md):
#   time limit / preemption: the scripts ask for `--signal=B:USR1@<seconds>` and
#       `--requeue`. On USR1 the batch shell forwards it to the training tasks, which
#       finish their step, save a checkpoint and exit 0; then the job requeues itself
#       (`scontrol requeue`) and the next run resumes from the checkpoint's `latest`.
#       Preempt by hand the same way:  scancel --batch --signal=USR1 <jobid>
#   stop:  scancel <jobid>  (SIGTERM): the tasks save if Slurm's KillWait leaves them the
#       time, and the job ends CANCELLED, never requeued. Resume later by submitting the
#       same command again: it starts from `latest`.
#   Slurm's own preemption (PreemptMode=REQUEUE) sends SIGTERM and requeues by itself.
#
# Variables (all optional):
#   LONGSKY_ROOT       repository checkout (default: the submit directory)
#   LONGSKY_PYTHON     python with megatron_longsky installed (default: python)
#   LONGSKY_LAUNCHER   srun (one task per GPU, default) | torchrun (one agent per node)
#   LONGSKY_NO_REQUEUE set to 1 to exit on the preemption signal without requeueing
#   LONGSKY_CONTAINER_IMAGE, LONGSKY_CONTAINER_MOUNTS, LONGSKY_STEP_SETUP
#                      run every srun step in a pyxis/enroot container (see below)
#   SRUN_EXTRA_ARGS    extra srun options
#
# Containers (pyxis/enroot): never put --container-image on the batch script itself (its
# shell would then run in an image without scontrol/srun). Each srun step gets the
# container instead, with the checkout mounted:
#   LONGSKY_CONTAINER_IMAGE=/lustre/images/longsky.sqsh      # derived image (see docs/slurm.md)
#   LONGSKY_CONTAINER_MOUNTS=/lustre:/lustre                  # the checkout is added
# With a stock image (nvcr.io#nvidia/pytorch:25.01-py3), install per step:
#   LONGSKY_STEP_SETUP="pip install --no-deps --no-build-isolation -e ."
# (an unnamed container starts fresh in every step: nothing installed in one persists).

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
_longsky_stop=""   # "preempt" (USR1) or "cancel" (TERM)

_longsky_on_signal() {
    local sig="$1"
    if [ "$sig" = USR1 ]; then
        _longsky_stop=preempt
        echo "longsky: batch script got SIGUSR1 (preemption / time limit): the tasks checkpoint and stop, then the job is requeued"
    else
        _longsky_stop=cancel
        echo "longsky: batch script got SIG${sig} (scancel, or Slurm requeueing the job: scontrol requeue," \
             "PreemptMode=REQUEUE): the tasks checkpoint if there is time and stop; this script does not requeue" \
             "the job itself (Slurm does, when that is what sent the signal)"
    fi
    if [ -n "$_longsky_step_pid" ]; then
        # srun passes the signal on to every task (to the torchrun agents, which pass it
        # on to their workers).
        kill -"$sig" "$_longsky_step_pid" 2>/dev/null || true
    fi
}

# longsky_step_command <command...>: the srun command line of one job step (containers
# and SRUN_EXTRA_ARGS included).
longsky_step_command() {
    _longsky_step=(srun --kill-on-bad-exit=1)
    if [ -n "${LONGSKY_CONTAINER_IMAGE:-}" ]; then
        local mounts="$LONGSKY_ROOT:$LONGSKY_ROOT"
        [ -n "${LONGSKY_CONTAINER_MOUNTS:-}" ] && mounts="${LONGSKY_CONTAINER_MOUNTS},$mounts"
        _longsky_step+=(--container-image="$LONGSKY_CONTAINER_IMAGE" --container-mounts="$mounts"
                        --container-workdir="$LONGSKY_ROOT")
    fi
    # shellcheck disable=SC2206
    _longsky_step+=(${SRUN_EXTRA_ARGS:-})
    if [ "$1" = --one-per-node ]; then
        shift
        _longsky_step+=(--nodes="${SLURM_NNODES:-1}" --ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1
                        --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}")
    elif [ "$1" = --one ]; then
        shift
        _longsky_step+=(--nodes=1 --ntasks=1)
    fi
    if [ -n "${LONGSKY_STEP_SETUP:-}" ]; then
        # Quote every word of the command for `bash -c`.
        _longsky_step+=(bash -c "${LONGSKY_STEP_SETUP} && exec $(printf '%q ' "$@")")
    else
        _longsky_step+=("$@")
    fi
}

# longsky_run_one <command...>: run a command once (one task on the first node), in the
# container when one is configured (e.g. data preparation before training).
longsky_run_one() {
    longsky_step_command --one "$@"
    echo "longsky: ${_longsky_step[*]}"
    "${_longsky_step[@]}"
}

# longsky_srun <longsky subcommand and arguments...>: run it on every task of the job;
# after the preemption signal, requeue the job once the tasks have saved and exited.
longsky_srun() {
    local status=0
    if [ "$LONGSKY_LAUNCHER" = torchrun ]; then
        # One agent per node; it starts one worker per task the job asked for on the node.
        local per_node="${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / ${SLURM_NNODES:-1} ))}"
        per_node="${per_node%%(*}"   # "8(x16)" -> "8"
        longsky_step_command --one-per-node "$LONGSKY_PYTHON" -m megatron_longsky.launch.torchrun_agent \
            --nnodes="${SLURM_NNODES:-1}" --nproc-per-node="$per_node" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            -m megatron_longsky.cli "$@"
    elif [ "$LONGSKY_LAUNCHER" = srun ]; then
        longsky_step_command "$LONGSKY_PYTHON" -m megatron_longsky.cli "$@"
    else
        echo "longsky: LONGSKY_LAUNCHER must be srun or torchrun, got '$LONGSKY_LAUNCHER'" >&2
        exit 2
    fi
    trap '_longsky_on_signal USR1' USR1
    trap '_longsky_on_signal TERM' TERM
    echo "longsky: ${_longsky_step[*]}"
    "${_longsky_step[@]}" &
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
    case "$_longsky_stop" in
        preempt)
            if [ "${LONGSKY_NO_REQUEUE:-0}" = 1 ]; then
                echo "longsky: preempted (step exit status ${status}); not requeueing (LONGSKY_NO_REQUEUE=1)"
            else
                echo "longsky: preempted (step exit status ${status}); requeueing job ${SLURM_JOB_ID}"
                scontrol requeue "$SLURM_JOB_ID"
            fi
            # Leave quietly: Slurm stops this shell when it requeues the job.
            exit 0
            ;;
        cancel)
            echo "longsky: stopped (step exit status ${status}). If Slurm requeues job ${SLURM_JOB_ID}" \
                 "(scontrol requeue, preemption) it resumes from the checkpoint; after a scancel, resume by" \
                 "submitting the same command again."
            exit 143
            ;;
    esac
    return "$status"
}

# longsky_require_file <path> <what>: a clear error instead of a trainer traceback.
longsky_require_file() {
    if [ ! -e "$1" ]; then
        echo "longsky: $2 not found: $1" >&2
        exit 2
    fi
}
