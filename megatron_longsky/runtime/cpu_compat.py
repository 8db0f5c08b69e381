"""Run megatron-core on a machine without CUDA.

megatron-core hard-codes CUDA in a handful of places (``torch.cuda.current_device()``
devices, ``device='cuda'`` literals, the CUDA RNG tracker, ``torch.cuda.synchronize``,
an assert that gradients are ``torch.cuda.FloatTensor`` in grad clipping, pinned
memory in RoPE slicing). This module maps those to CPU so the *real* megatron-core
code paths run on CPU with gloo. It is entered only when the process runs on CPU
(:func:`megatron_longsky.runtime.device.use_cuda` is False: no CUDA, or
``LONGSKY_DEVICE=cpu``); a process computing on CUDA never activates it, so nothing
here can hide a GPU bug.
"""

from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE_MODE: "_CudaToCpuMode | None" = None
_PATCHED: dict = {}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):  # a bare int means a CUDA ordinal to torch
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _map_device(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU in tensor factories and moves."""

    _MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.type}

    def _backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None,
                  gradient=None):
        """``torch.autograd.backward`` with this mode active in the backward pass.

        torch >= 2.10 hands ``backward`` to the active modes, and a mode is off while its own
        handler runs: calling ``func`` here would run the whole backward pass without this
        mode, and megatron-core's backward functions that allocate on
        ``torch.cuda.current_device()`` (the sequence-parallel reduce-scatter output in
        ``tensor_parallel/layers.py``) would ask for CUDA. So the engine is run here, as
        ``torch.autograd.backward`` runs it, inside the mode."""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        if gradient is not None:  # Tensor.backward(gradient=...)
            grad_tensors = gradient
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False)
        if retain_graph is None:
            retain_graph = create_graph
        inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
        with self:
            _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs, allow_unreachable=True,
                                 accumulate_grad=True)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            return self._backward(*args, **kwargs)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's grad clipping asserts grads are 'torch.cuda.FloatTensor';
            # report CPU tensors under their CUDA type name for that check only.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


class _CpuGeneratorView:
    """Stands in for ``torch.cuda.default_generators[i]``: the CPU default generator."""

    def clone_state(self):
        return torch.get_rng_state()

    def graphsafe_get_state(self):
        return torch.get_rng_state()

    def set_state(self, state):
        torch.set_rng_state(state)

    graphsafe_set_state = set_state


def is_active() -> bool:
    return _ACTIVE_MODE is not None


def _patch(obj, name, value):
    key = (id(obj), name)
    if key not in _PATCHED:
        _PATCHED[key] = (obj, name, getattr(obj, name, None))
    setattr(obj, name, value)


def enable() -> bool:
    """Activate the CPU layer. Returns False (and does nothing) when this process runs on CUDA."""
    global _ACTIVE_MODE
    from megatron_longsky.runtime.device import use_cuda

    if use_cuda():
        return False
    if _ACTIVE_MODE is not None:
        return True

    import megatron.core.tensor_parallel.random as mrandom

    def get_cuda_rng_state(device=None, clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    _patch(mrandom, "_get_cuda_rng_state", get_cuda_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", set_cuda_rng_state)
    _patch(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    _patch(torch.cuda, "set_rng_state", lambda state, device="cuda": torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU
    # generator directly to avoid recursion.
    _patch(torch.cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    _patch(torch.cuda, "manual_seed_all", lambda seed: None)
    _patch(torch.cuda, "current_device", lambda: 0)
    _patch(torch.cuda, "synchronize", lambda device=None: None)
    _patch(torch.cuda, "empty_cache", lambda: None)
    _patch(torch.cuda, "default_generators", (_CpuGeneratorView(),))
    _patch(torch.cuda, "max_memory_allocated", lambda device=None: 0)
    _patch(torch.cuda, "memory_allocated", lambda device=None: 0)
    _patch(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)

    _ACTIVE_MODE = _CudaToCpuMode()
    _ACTIVE_MODE.__enter__()
    log.info("megatron-core CPU compatibility layer active (no CUDA device)")
    return True


def disable() -> None:
    """Undo :func:`enable` (used by tests)."""
    global _ACTIVE_MODE
    if _ACTIVE_MODE is None:
        return
    _ACTIVE_MODE.__exit__(None, None, None)
    _ACTIVE_MODE = None
    for obj, name, original in _PATCHED.values():
        setattr(obj, name, original)
    _PATCHED.clear()
