"""Keeping Transformer Engine and apex out of a CPU process, without importing torch (the
package applies it on import; data commands must stay torch-free for a fast start)."""

from __future__ import annotations

DEVICE_ENV = "LONGSKY_DEVICE"

GPU_EXTENSIONS = ("transformer_engine", "transformer_engine_torch", "apex")


def hide_gpu_extensions() -> list[str]:
    """Make ``import transformer_engine`` / ``import apex`` fail in this process (a None entry in
    ``sys.modules`` is Python's own way to block an import). Returns the names blocked; a
    module already imported cannot be hidden and is left as it is (and logged)."""
    import logging
    import sys

    blocked = []
    for name in GPU_EXTENSIONS:
        if sys.modules.get(name) is not None:
            logging.getLogger(__name__).warning("%s=cpu but %s is already imported: megatron-core may use it",
                                                DEVICE_ENV, name)
            continue
        sys.modules[name] = None
        blocked.append(name)
    return blocked
