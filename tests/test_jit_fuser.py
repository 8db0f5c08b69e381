"""megatron-core's jit_fuser on CPU: switched to its no-op decorator before the fused functions
are defined, so a CPU process never imports torch._dynamo / torch._inductor for them; a CUDA
process, or one that imported megatron-core first, keeps megatron-core's choice."""

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
{before}
import megatron.core
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
print(json.dumps({{
    "fuser": jit.jit_fuser.__name__,
    "inductor": "torch._inductor.compile_fx" in sys.modules,
    "dynamo": "torch._dynamo" in sys.modules,
    # the function as written (not torch.compile's wrapper, whose code is torch's)
    "swiglu_plain": fused_bias_swiglu.bias_swiglu.__code__.co_filename == fused_bias_swiglu.__file__,
}}))
"""


def _probe(before: str, device: str = "cpu") -> dict:
    env = dict(os.environ, LONGSKY_DEVICE=device)
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_cpu_process_defines_fusions_without_torch_compile():
    got = _probe("import megatron_longsky")
    assert got == {"fuser": "noop_decorator", "inductor": False, "dynamo": False, "swiglu_plain": True}


def test_cuda_process_keeps_megatron_cores_fuser():
    # What a GPU process sees: use_cuda() is True when megatron.core.jit runs.
    got = _probe("import megatron_longsky\nimport megatron_longsky.runtime.device as d\nd.use_cuda = lambda: True")
    assert got["fuser"] == "compile" and got["inductor"] and not got["swiglu_plain"]


def test_megatron_core_imported_first_is_left_alone():
    got = _probe("import megatron.core\nimport megatron_longsky\n"
                 "from megatron_longsky.runtime.jit_fuser import install_jit_fuser_hook\n"
                 "assert install_jit_fuser_hook() is False")
    assert got["fuser"] == "compile"
