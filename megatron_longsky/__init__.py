"""megatron_longsky: the LongSkywork long-context recipe on megatron-core."""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("LONGSKY_DEVICE", "").strip().lower() == "cpu":
    # Before megatron-core is imported: it would pick Transformer Engine's CUDA-only modules.
    from megatron_longsky.runtime.gpu_extensions import hide_gpu_extensions as _hide

    _hide()

from megatron_longsky.runtime.jit_fuser import install_jit_fuser_hook as _install_jit_fuser_hook

# On CPU, megatron-core's torch.compile-decorated fusions would import torch._inductor in every
# process for functions a CPU process never calls (runtime/jit_fuser.py).
_install_jit_fuser_hook()

import warnings as _warnings

# megatron-core warnings that say nothing to our users: the CPU path has neither TE nor apex by
# design, and TransformerConfig warns about its own default cuda_graph_scope ("full") on every build.
_warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
_warnings.filterwarnings("ignore", message=r"Apex is not installed\. Falling back to Torch Norm", category=UserWarning)
_warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
