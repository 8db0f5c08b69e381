"""FLOP model of a training step and the step time / MFU it implies.

Forward FLOPs per token of a Llama layer (a multiply-add = 2 FLOPs; ``h`` hidden, ``g``
KV groups, ``d`` head dim, ``f`` FFN size, ``s`` sequence length):

* QKV projection ``2 h (h + 2 g d)``, output projection ``2 h^2``
* SwiGLU MLP (gate, up, down) ``3 * 2 h f``
* attention scores and the weighted sum of values ``2 * 2 s h``, times 1/2 for causal
  attention (only the visible half is work; FlashAttention-style kernels skip the rest)

plus the output layer ``2 h V``. Training is forward + backward = 3x forward ("model
FLOPs", the numerator of MFU as in Narayanan et al. 2021 / Chowdhery et al. 2022). Full
activation recomputation runs the layers' forward once more and selective recomputation
re-runs core attention: these count as hardware FLOPs (they take time) but not as model
FLOPs.

MFU (one definition, used by the training metrics and ``longsky plan``): the time the
step's model FLOPs would take on the devices if every FLOP ran at the dense datasheet peak
of the precision it runs in, over the time the step took:

    MFU = (GEMM model FLOPs / GEMM peak + attention model FLOPs / attention peak)
          / (step time x devices)

The GEMM peak is the FP8 one when ``model.fp8`` is set (else BF16); core attention (scores,
weighted values) runs at the BF16 peak unless ``model.fp8_attention`` is on. Without FP8
both peaks are the same and this is the usual model FLOPs / (time x devices x peak). HFU
is the same with the hardware FLOPs (recomputation included). Dividing all FLOPs by the FP8
peak would make a perfect FP8 run with BF16 attention look half as utilised as it is.
Peaks come from :data:`DEVICE_PEAK_TFLOPS` (or the user's ``peak_tflops_per_device``, the
GEMM peak).

The step time is an *estimate*: hardware FLOPs / (devices x peak x efficiency), where
``efficiency`` is an assumption the user states (what fraction of the datasheet peak the
kernels reach, communication and pipeline bubbles included). MFU follows from it. With
FP8 the GEMMs run at the FP8 peak but core attention (scores, weighted values) stays in
BF16 unless ``model.fp8_attention`` is on: those FLOPs are timed at the attention peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_longsky.model.config import ModelConfig

# Dense (no sparsity) datasheet peaks, TFLOP/s per device, SXM parts. A100 has no FP8.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0},
    "a100": {"bf16": 312.0, "fp16": 312.0},
    "b200": {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0},
}
_DTYPE_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


class UnknownPeakError(ValueError):
    """No datasheet peak is known for this device and precision."""


def gemm_precision(model: ModelConfig, on_gpu: bool = True) -> str:
    """The GEMMs' precision: FP8 when on, else the parameters' dtype (``params_dtype: auto`` is
    bf16 on a GPU and fp32 on CPU). fp32 has no datasheet peak here: TF32 or not is the
    framework's choice, so MFU is not computed for it unless the user states the peak."""
    return "fp8" if model.fp8 else _DTYPE_PRECISION[model.resolved_dtype(on_gpu)]


def device_kind(device_name: str) -> Optional[str]:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'h100'``; None for devices not in the table (the
    PCIe/NVL H100 parts have lower peaks than the SXM figures listed)."""
    name = device_name.upper()
    if "H100" in name and ("PCIE" in name or "NVL" in name):
        return None
    for kind in DEVICE_PEAK_TFLOPS:
        if kind.upper() in name:
            return kind
    return None


def device_peak_tflops(device: str, precision: str) -> float:
    """Dense peak of ``device`` (a table key or a CUDA device name) at ``precision``."""
    kind = device if device in DEVICE_PEAK_TFLOPS else device_kind(device)
    peak = DEVICE_PEAK_TFLOPS.get(kind or "", {}).get(precision)
    if peak is None:
        known = ", ".join(f"{k} {'/'.join(v)}" for k, v in DEVICE_PEAK_TFLOPS.items())
        raise UnknownPeakError(f"unknown peak TFLOP/s for {device!r} at {precision} (known: {known}); "
                               "give the peak explicitly")
    return peak


def attention_peak(model: ModelConfig, peak_tflops: float) -> float:
    """The peak core attention runs at: FP8 only with ``fp8_attention``, else BF16's share of
    ``peak_tflops`` (half of an FP8 peak)."""
    if model.fp8 and model.fp8_attention == "off":
        h100 = DEVICE_PEAK_TFLOPS["h100"]
        return peak_tflops * h100["bf16"] / h100["fp8"]
    return peak_tflops


def layer_forward_flops_per_token(model: ModelConfig, seq_length: int, causal: bool = True) -> dict[str, float]:
    h, f, d, g = model.hidden_size, model.ffn_hidden_size, model.head_dim, model.kv_groups
    attention = 2 * 2 * seq_length * h * (0.5 if causal else 1.0)
    return {
        "qkv": 2 * h * (h + 2 * g * d),
        "attention": attention,
        "proj": 2 * h * h,
        "mlp": 3 * 2 * h * f,
    }


@dataclass
class StepFlops:
    tokens: int  # tokens per global batch
    model_flops: float  # forward + backward, no recomputation
    hardware_flops: float  # including recomputation
    attention_flops: float = 0.0  # the part of hardware_flops in core attention (QK^T, softmax . V)
    model_attention_flops: float = 0.0  # the part of model_flops in core attention

    def to_dict(self) -> dict:
        return asdict(self)


def step_flops(model: ModelConfig, vocab_size: int, global_batch_size: int, causal: bool = True,
               pipeline_parallel: int = 1) -> StepFlops:
    """FLOPs of one optimizer step over ``global_batch_size`` sequences of ``model.seq_length``.
    ``recompute_method: block`` recomputes the first ``recompute_num_layers`` of each pipeline stage."""
    s = model.seq_length
    parts = layer_forward_flops_per_token(model, s, causal)
    layer = sum(parts.values())
    forward_per_token = model.num_layers * layer + 2 * model.hidden_size * vocab_size
    tokens = global_batch_size * s
    model_flops = 3 * forward_per_token * tokens
    if model.recompute_granularity == "full":
        layers = model.num_layers
        if model.recompute_method == "block" and model.recompute_num_layers is not None:
            per_stage = model.num_layers // pipeline_parallel
            layers = min(model.recompute_num_layers, per_stage) * pipeline_parallel
        extra = layers * layer * tokens
    elif model.recompute_granularity == "selective":
        extra = model.num_layers * parts["attention"] * tokens
    else:
        extra = 0.0
    attention = model_attention = 3 * model.num_layers * parts["attention"] * tokens
    if model.recompute_granularity is not None:  # full and selective both re-run core attention
        attention += extra * parts["attention"] / layer if model.recompute_granularity == "full" else extra
    return StepFlops(tokens=tokens, model_flops=model_flops, hardware_flops=model_flops + extra,
                     attention_flops=attention, model_attention_flops=model_attention)


def seconds_at_peak(total_flops: float, attention_flops: float, peak: float, attention_peak: float) -> float:
    """Seconds one device needs for ``total_flops`` when each FLOP runs at its own peak
    (TFLOP/s): core attention's at ``attention_peak``, the rest (GEMMs) at ``peak``."""
    return ((total_flops - attention_flops) / peak + attention_flops / attention_peak) / 1e12


def utilization(flops: StepFlops, step_seconds: float, devices: int, peak: Optional[float],
                attention_peak_tflops: Optional[float] = None) -> dict:
    """Achieved model TFLOP/s per device, MFU and HFU (None without a peak) of one step; MFU
    and HFU against the peak each FLOP runs at (see the module doc; ``attention_peak_tflops``:
    :func:`attention_peak`, default ``peak``)."""
    model_tflops = flops.model_flops / step_seconds / devices / 1e12
    if not peak:
        return {"tflops_per_device": model_tflops, "mfu": None, "hfu": None}
    attention = attention_peak_tflops or peak
    budget = step_seconds * devices
    return {"tflops_per_device": model_tflops,
            "mfu": seconds_at_peak(flops.model_flops, flops.model_attention_flops, peak, attention) / budget,
            "hfu": seconds_at_peak(flops.hardware_flops, flops.attention_flops, peak, attention) / budget}


@dataclass
class StepTimeEstimate:
    step_seconds: float
    tokens_per_second_per_device: float
    mfu: float  # model FLOPs at the peak each runs at / (time x devices), see the module doc
    hfu: float  # the same for the hardware FLOPs (recomputation included)
    model_tflops_per_device: float  # achieved model TFLOP/s per device

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_step_time(flops: StepFlops, devices: int, peak_tflops: float, efficiency: float,
                       attention_peak_tflops: float | None = None) -> StepTimeEstimate:
    """Step time if the devices sustain ``efficiency`` x ``peak_tflops`` on the hardware FLOPs
    (core attention at ``attention_peak_tflops`` when given: BF16 attention in an FP8 run)."""
    if devices < 1 or peak_tflops <= 0 or not 0 < efficiency <= 1:
        raise ValueError(f"need devices >= 1, peak_tflops > 0 and 0 < efficiency <= 1 "
                         f"(got {devices}, {peak_tflops}, {efficiency})")
    attention_peak = attention_peak_tflops or peak_tflops
    seconds = seconds_at_peak(flops.hardware_flops, flops.attention_flops, peak_tflops, attention_peak) / (
        devices * efficiency)
    used = utilization(flops, seconds, devices, peak_tflops, attention_peak)
    return StepTimeEstimate(
        step_seconds=seconds,
        tokens_per_second_per_device=flops.tokens / seconds / devices,
        mfu=used["mfu"],
        hfu=used["hfu"],
        model_tflops_per_device=used["tflops_per_device"],
    )
