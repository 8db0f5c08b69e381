"""Transformer Engine's attention-backend and FP8-recipe rules, as one table, checked at
config time.

TE picks the core-attention backend at the first forward
(``transformer_engine/pytorch/attention/dot_product_attention/utils.py``,
``get_attention_backend``): FlashAttention, FusedAttention (cuDNN) or
UnfusedDotProductAttention. Each filter there switches some of them off; when none is left
the first step ends in ``ValueError: No dot product attention backend is available``, on
every rank of the job. The same holds for FP8 recipes TE refuses on entering its autocast
(``transformer_engine/pytorch/quantization.py``, ``check_recipe_support``). This module
mirrors the filters that a Llama-style training or evaluation config can trip (causal
self-attention, no bias, no dropout, vanilla softmax, BSHD/SBHD or THD input), so that
config validation (``model/config.py``, ``training/config.py``), the run-time check before
the model is built (``model/build.py``), ``longsky doctor`` and ``longsky plan --dry-run``
all refuse the same combinations, in one line naming the setting.

Read in TE 2.9, 2.10 and 2.11 (the versions megatron-core 0.16.1 allows); where they differ
the rule says so. Rules needing the compute capability are skipped when it is not known
(config time on a login node); they apply in the dry-run (``--device``), in the doctor and
at run time. FlashAttention counts as present (NVIDIA's containers ship flash-attn 2); no
combination refused here depends on that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_longsky.config import ConfigError

FLASH, FUSED, UNFUSED = "FlashAttention", "FusedAttention", "UnfusedDotProductAttention"
BACKENDS = (FLASH, FUSED, UNFUSED)
TE_VERSIONS = ((2, 9), (2, 10), (2, 11))  # what megatron-core 0.16.1 allows (>=2.9, <2.12)
_UTILS = "transformer_engine/pytorch/attention/dot_product_attention/utils.py, get_attention_backend"
_FUSED_CPP = "transformer_engine/common/fused_attn/fused_attn.cpp, nvte_get_fused_attn_backend"
_DPA = "transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py, init_fp8_metadata"
_QUANT = "transformer_engine/pytorch/quantization.py"

# Compute capabilities of the devices `longsky plan --device` knows (plan/flops.py).
DEVICE_CAPABILITY = {"a100": (8, 0), "h100": (9, 0), "h200": (9, 0), "b200": (10, 0), "gb200": (10, 0)}


class AttentionBackendError(ConfigError):
    """No TE attention backend (or FP8 recipe) would run this config; the message says why."""


@dataclass(frozen=True)
class AttentionCase:
    """What TE's backend choice depends on, for one run (see :func:`case_for`).

    ``dtype``: the QKV dtype (the model's resolved params dtype). ``packed``: THD input
    (packed rows). ``capability`` / ``te_version``: None when unknown (then every TE version
    2.9-2.11 must work, and device rules are skipped). ``dpa_fp8_recipe``: TE's
    ``NVTE_DPA_FP8_RECIPE`` environment variable."""

    dtype: str
    head_dim: int
    context_parallel: int = 1
    packed: bool = False
    fp8: bool = False
    fp8_recipe: str = "delayed"
    fp8_attention: str = "off"
    capability: Optional[tuple] = None
    te_version: Optional[tuple] = None
    dpa_fp8_recipe: str = ""
    training: bool = True

    @property
    def fp8_dpa(self) -> bool:
        """TE's ``recipe.fp8_dpa``: megatron-core sets it from ``fp8_dot_product_attention``
        (fp8_utils.get_fp8_recipe, extensions/transformer_engine.py TEDelayedScaling), which
        model/build.py sets for fp8_attention=dot_product; NVTE_DPA_FP8_RECIPE=F16 clears it."""
        return self.fp8 and self.fp8_attention == "dot_product" and self.dpa_fp8_recipe != "F16"

    @property
    def dpa_recipe(self) -> str:
        """The recipe TE's DotProductAttention filters on (``fp8_meta['local_recipes'][0]``):
        with tensorwise (Float8CurrentScaling) and FP8 attention, TE builds
        [Float8CurrentScaling, DelayedScaling] unless NVTE_DPA_FP8_RECIPE=DelayedScaling
        replaces it by DelayedScaling alone (dot_product_attention.py, init_fp8_metadata)."""
        if self.fp8_recipe == "tensorwise" and self.dpa_fp8_recipe == "DelayedScaling":
            return "delayed"
        if self.fp8_recipe == "delayed" and self.dpa_fp8_recipe == "Float8CurrentScaling":
            return "tensorwise"
        return self.fp8_recipe


@dataclass(frozen=True)
class Rule:
    """One filter of TE's: when ``applies``, the ``off`` backends are unavailable."""

    name: str
    off: tuple
    applies: Callable[[AttentionCase], bool]
    reason: str
    source: str
    setting: str  # the config setting a refusal names


def _te_before(case: AttentionCase, version: tuple) -> bool:
    """Could the TE in use be older than ``version`` (unknown: any of 2.9-2.11)?"""
    return (case.te_version or TE_VERSIONS[0])[:2] < version


def _cap(case: AttentionCase) -> tuple:
    return tuple(case.capability[:2])


RULES: tuple[Rule, ...] = (
    Rule("dtype", (FLASH, FUSED),
         lambda c: c.dtype not in ("bfloat16", "float16"),
         "FlashAttention and FusedAttention take bf16/fp16 only",
         f"{_UTILS} ('Filter: Data type')", "model.params_dtype"),
    Rule("unfused-context-parallel", (UNFUSED,),
         lambda c: c.context_parallel > 1,
         "UnfusedDotProductAttention has no context parallelism",
         f"{_UTILS} ('Filter: Context parallelism')", "parallel.context_parallel_size"),
    Rule("unfused-thd", (UNFUSED,),
         lambda c: c.packed and _te_before(c, (2, 11)),
         "UnfusedDotProductAttention takes no THD (packed) input before TE 2.11",
         f"{_UTILS} ('Filter: QKV layout', qkv_format == 'thd'; removed in v2.11)", "data.packed"),
    Rule("fp8-dpa-flash-unfused", (FLASH, UNFUSED),
         lambda c: c.fp8_dpa and c.training,
         "FP8 attention runs in FusedAttention only when training (Flash 2 and Unfused are off, "
         "Flash 3 is off for FP8 training; NVTE_UnfusedDPA_Emulate_FP8 is a test emulation)",
         f"{_UTILS} ('Filter: Execution type', fp8_meta['recipe'].fp8_dpa)", "model.fp8_attention"),
    Rule("fp8-current-scaling-dpa", (FUSED,),
         lambda c: c.fp8_dpa and c.dpa_recipe == "tensorwise" and c.capability is not None and _cap(c) < (10, 0),
         "FP8 current scaling (fp8_recipe=tensorwise) attention has no FusedAttention below sm100; set "
         "NVTE_DPA_FP8_RECIPE=DelayedScaling to run the attention with delayed scaling instead",
         f"{_UTILS} ('Disabling FusedAttention for FP8 current scaling on arch < sm100'); {_DPA}",
         "model.fp8_recipe"),
    Rule("fp8-sm120", (FLASH, FUSED),
         lambda c: c.fp8_dpa and c.capability is not None and _cap(c) == (12, 0),
         "FP8 attention is not supported on sm120",
         f"{_UTILS} ('FP8 is not supported for compute capability = sm120')", "model.fp8_attention"),
    Rule("fp8-dpa-sm90", (FUSED,),
         lambda c: c.fp8_dpa and c.capability is not None and _cap(c) < (9, 0),
         "cuDNN's FP8 fused attention needs sm90 or newer",
         f"{_FUSED_CPP} (FP8 branch: sm_arch_ >= 90)", "model.fp8_attention"),
    Rule("fp8-dpa-head-dim", (FUSED,),
         lambda c: c.fp8_dpa and c.capability is not None and (
             (_cap(c) < (10, 0) and c.training and c.head_dim != 128)
             or (_cap(c) >= (10, 0) and (c.head_dim > 128 or c.head_dim % 16))),
         "cuDNN's FP8 fused attention trains head dimension 128 only below sm100 (<= 128 and a multiple of "
         "16 on sm100)",
         f"{_FUSED_CPP} (FP8 branch)", "model.fp8_attention"),
    Rule("fp8-dpa-thd", (FUSED,),
         lambda c: c.fp8_dpa and c.packed,
         "cuDNN's FP8 fused attention takes BSHD/SBHD input only, not THD (packed rows)",
         f"{_FUSED_CPP} (FP8 branch: qkv_format BSHD or SBHD)", "model.fp8_attention"),
    Rule("head-dim-multiple-of-8", (FLASH, FUSED),
         lambda c: c.head_dim % 8 != 0,
         "FlashAttention 2 and FusedAttention need the head dimension divisible by 8",
         f"{_UTILS} ('Filter: Head dimension'); {_FUSED_CPP}", "model.hidden_size / model.num_attention_heads"),
    Rule("head-dim-max", (FLASH, FUSED),
         lambda c: c.head_dim > 256,
         "FlashAttention 2 and FusedAttention train head dimensions up to 256",
         f"{_UTILS} ('Filter: Head dimension', head_dim_qk > 256); {_FUSED_CPP}",
         "model.hidden_size / model.num_attention_heads"),
    Rule("fused-head-dim-hopper", (FUSED,),
         lambda c: not c.fp8_dpa and c.capability is not None and 128 < c.head_dim <= 256
         and c.training and _cap(c) != (9, 0),
         "FusedAttention trains head dimensions above 128 on sm90 only",
         f"{_FUSED_CPP} (F16 arbitrary-seqlen branch, '9.5: <= 256 + Hopper + bprop')",
         "model.hidden_size / model.num_attention_heads"),
    Rule("capability-sm80", (FLASH, FUSED),
         lambda c: c.capability is not None and _cap(c) < (8, 0),
         "FlashAttention 2 and FusedAttention need sm80 or newer",
         f"{_UTILS} ('Filter: Compute capability')", "the GPU"),
)


@dataclass(frozen=True)
class RecipeRule:
    name: str
    recipe: str
    supported: Callable[[tuple], bool]
    reason: str
    source: str


# FP8 recipe x compute capability: TE asserts these on entering FP8 autocast
# (quantization.py, check_recipe_support, the same in 2.9-2.11).
RECIPE_RULES: tuple[RecipeRule, ...] = (
    RecipeRule("fp8-per-tensor", "delayed", lambda cap: cap >= (8, 9),
               "FP8 needs compute capability 8.9 or newer", f"{_QUANT}, check_fp8_support"),
    RecipeRule("fp8-per-tensor", "tensorwise", lambda cap: cap >= (8, 9),
               "FP8 needs compute capability 8.9 or newer", f"{_QUANT}, check_fp8_support"),
    RecipeRule("mxfp8", "mxfp8", lambda cap: (10, 0) <= cap < (12, 0),
               "MXFP8 needs compute capability 10.x (Blackwell; not 12.0)", f"{_QUANT}, check_mxfp8_support"),
    RecipeRule("fp8-block-scaling", "blockwise", lambda cap: cap >= (9, 0),
               "FP8 block scaling needs compute capability 9.0 or newer (and CUDA >= 12.9)",
               f"{_QUANT}, check_fp8_block_scaling_support"),
)


def backends(case: AttentionCase) -> dict[str, list[Rule]]:
    """Each backend -> the rules that switch it off (an empty list: available)."""
    out: dict[str, list[Rule]] = {b: [] for b in BACKENDS}
    for rule in RULES:
        if rule.applies(case):
            for backend in rule.off:
                out[backend].append(rule)
    return out


def available_backends(case: AttentionCase) -> list[str]:
    return [b for b, rules in backends(case).items() if not rules]


def recipe_problem(recipe: str, capability: Optional[tuple]) -> Optional[RecipeRule]:
    """The recipe rule ``recipe`` breaks on ``capability`` (None: unknown device, or fine)."""
    if capability is None:
        return None
    for rule in RECIPE_RULES:
        if rule.recipe == recipe and not rule.supported(tuple(capability[:2])):
            return rule
    return None


def _describe(case: AttentionCase) -> str:
    parts = [case.dtype, f"head_dim={case.head_dim}", f"CP={case.context_parallel}"]
    if case.packed:
        parts.append("packed (THD) rows")
    if case.fp8_dpa:
        parts.append(f"FP8 attention ({case.fp8_recipe})")
    if case.capability is not None:
        parts.append(f"sm{case.capability[0]}{case.capability[1]}")
    parts.append(f"TE {'.'.join(map(str, case.te_version[:2]))}" if case.te_version else "TE 2.9-2.11")
    return ", ".join(parts)


def check(case: AttentionCase, fp8: Optional[str] = None) -> None:
    """Raise :class:`AttentionBackendError` naming the setting when TE would find no attention
    backend for ``case``, or refuse its FP8 recipe on this device (``fp8``: model.fp8)."""
    if fp8:
        rule = recipe_problem(case.fp8_recipe, case.capability)
        if rule is not None:
            cap = case.capability
            raise AttentionBackendError(
                f"model.fp8_recipe={case.fp8_recipe} on sm{cap[0]}{cap[1]}: {rule.reason} "
                f"(Transformer Engine asserts it entering FP8 autocast: {rule.source}); use fp8_recipe=delayed "
                "or tensorwise on Hopper")
    off = backends(case)
    if any(not rules for rules in off.values()):
        return
    seen, reasons, settings = set(), [], []
    for rules in off.values():
        for rule in rules:
            if rule.name not in seen:
                seen.add(rule.name)
                reasons.append(f"{rule.reason} [{rule.source}]")
                if rule.setting not in settings:
                    settings.append(rule.setting)
    hint = ""
    if case.dtype not in ("bfloat16", "float16"):
        hint = "; use model.params_dtype=bfloat16 (the GPU default)"
    elif case.fp8_dpa:
        hint = "; use model.fp8_attention=off" + (" or fp8_recipe=delayed" if case.fp8_recipe == "tensorwise" else "")
    raise AttentionBackendError(
        f"{', '.join(settings)}: Transformer Engine has no attention backend for {_describe(case)}: "
        + "; ".join(reasons) + hint)


def case_for(model, context_parallel: int = 1, packed: bool = False, dtype: Optional[str] = None,
             capability: Optional[tuple] = None, te_version: Optional[tuple] = None, training: bool = True,
             environ: Optional[dict] = None) -> AttentionCase:
    """The :class:`AttentionCase` of a ModelConfig. ``dtype``: the resolved params dtype
    (default: the model's, ``auto`` read as on a GPU: bfloat16)."""
    env = os.environ if environ is None else environ
    return AttentionCase(
        dtype=dtype or model.resolved_dtype(on_gpu=True), head_dim=model.head_dim,
        context_parallel=context_parallel, packed=packed, fp8=bool(model.fp8), fp8_recipe=model.fp8_recipe,
        fp8_attention=model.fp8_attention, capability=tuple(capability) if capability else None,
        te_version=tuple(te_version)[:2] if te_version else None,
        dpa_fp8_recipe=env.get("NVTE_DPA_FP8_RECIPE", ""), training=training)


def check_model(model, context_parallel: int = 1, packed: bool = False, **kwargs) -> None:
    """:func:`check` for a ModelConfig on the TE path (see :func:`case_for` for ``kwargs``)."""
    check(case_for(model, context_parallel, packed, **kwargs), model.fp8)


def device_capability() -> Optional[tuple]:
    """This process's GPU compute capability (None when it does not compute on CUDA)."""
    import torch

    from megatron_longsky.runtime.device import use_cuda

    if not use_cuda():
        return None
    return tuple(torch.cuda.get_device_capability())


def installed_te_version() -> Optional[tuple]:
    """(major, minor) of the installed Transformer Engine (None: not installed)."""
    import importlib.metadata as metadata
    import re

    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            found = re.match(r"(\d+)\.(\d+)", metadata.version(name))
        except metadata.PackageNotFoundError:
            continue
        if found:
            return int(found.group(1)), int(found.group(2))
    try:  # a source build without distribution metadata
        import transformer_engine

        found = re.match(r"(\d+)\.(\d+)", getattr(transformer_engine, "__version__", ""))
    except Exception:  # noqa: BLE001 - not importable: unknown
        return None
    return (int(found.group(1)), int(found.group(2))) if found else None
