"""Start-up of a CPU process that uses megatron-core: with and without our jit_fuser switch.

Every training rank, evaluation and conversion is a fresh process that imports megatron-core.
On CPU, ``megatron_longsky`` switches megatron-core's ``jit_fuser`` to its no-op decorator
before the fused functions are defined (``megatron_longsky/runtime/jit_fuser.py``), so the
process never imports ``torch._dynamo`` / ``torch._inductor``. "before" imports megatron-core
ahead of ``megatron_longsky`` (the switch then stays off, as it was before it existed); "now"
imports them in the usual order. Both end with the same modules a training or evaluation
process needs; the runs alternate, and the table gives the median wall and CPU seconds.

    .venv/bin/python benchmarks/process_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

NEEDED = ("import megatron.core.models.gpt, megatron.core.optimizer, megatron.core.dist_checkpointing; "
          "import megatron_longsky.model.build, megatron_longsky.eval.megatron_backend")
ORDERS = {
    "before (megatron.core first)": "import megatron.core; import megatron_longsky; " + NEEDED,
    "now (megatron_longsky first)": "import megatron_longsky; import megatron.core; " + NEEDED,
}


def _run(code: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, env=dict(os.environ, LONGSKY_DEVICE="cpu"))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _run(ORDERS["now (megatron_longsky first)"])  # warm the file cache
    times: dict = {name: [] for name in ORDERS}
    for _ in range(args.repeats):
        for name, code in ORDERS.items():
            times[name].append(_run(code))
    print("| process start-up | wall s (median) | CPU s (median) |")
    print("|---|---:|---:|")
    medians = {}
    for name, runs in times.items():
        medians[name] = (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        print(f"| {name} | {medians[name][0]:.2f} | {medians[name][1]:.2f} |")
    (bw, bc), (nw, nc) = medians.values()
    print(f"\nbefore / now: wall {bw / nw:.2f}x, CPU {bc / nc:.2f}x; saved per process: {bw - nw:.2f} s wall")


if __name__ == "__main__":
    main()
