"""megatron_longsky: the LongSkywork long-context recipe on megatron-core."""

__version__ = "0.1.0"

import os as _os

if _os.environ.get("LONGSKY_DEVICE", "").strip().lower() == "cpu":
    # Before megatron-core is imported: it would pick Transformer Engine's CUDA-only modules.
    from megatron_longsky.runtime.device import hide_gpu_extensions as _hide

    _hide()
