"""megatron-core's ``jit_fuser`` off in a CPU process, before its fused functions are defined.

``megatron.core.jit`` sets ``jit_fuser = torch.compile`` (torch >= 2.2), and importing
``megatron.core`` decorates a dozen fused functions with it (bias-GeLU/SwiGLU/GeGLU,
bias-dropout-add, activations, the L2 norm). Decorating is enough to import ``torch._dynamo``
and ``torch._inductor``: about half of ``import megatron.core``, paid again by every process
(each training rank, each evaluation, each conversion). A CPU process never calls those
functions (``model/build.py`` turns the bias-activation, bias-dropout and softmax fusions off
without a GPU, and our norm is our own), so on CPU ``jit_fuser`` is switched to megatron-core's
own no-op decorator (``disable_jit_fuser``) right after ``megatron.core.jit`` runs. A process
that computes on CUDA keeps megatron-core's choice untouched.

The switch is an import hook (installed by the package's ``__init__`` without importing
torch): ``megatron.core.jit`` is imported inside ``import megatron.core``, before the modules
that decorate, so there is no later point at which turning it off still reaches them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


class _SwitchAfterExec(importlib.abc.Loader):
    """Runs ``megatron.core.jit`` with its own loader, then turns the fuser off on CPU."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from megatron_longsky.runtime.device import use_cuda

        if not use_cuda():
            module.disable_jit_fuser()

    def __getattr__(self, name):  # get_source, get_filename ... for tracebacks and inspect
        return getattr(self._loader, name)


class _JitFuserHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _SwitchAfterExec(spec.loader)
        return spec


def install_jit_fuser_hook() -> bool:
    """Install the hook unless ``megatron.core.jit`` is already imported (then it is too late
    and the fuser stays as megatron-core set it). Returns whether the hook is in place."""
    if JIT_MODULE in sys.modules:
        return False
    if not any(isinstance(f, _JitFuserHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserHook())
    return True
