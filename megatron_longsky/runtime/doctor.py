"""``longsky doctor``: the software on this machine, the path each feature takes on it, and
the known-bad combinations, refused with the fix.

    longsky doctor            # exit 0: usable; 1: a combination known to fail (printed with the fix)
    longsky doctor --config cpt.yaml [key=value ...]   # also: can this training config run here?

Tested together (setup.py says the same): megatron-core 0.16.1 (we patch some of its
internals), Transformer Engine 2.9-2.11 (megatron-core 0.16.1's own bound), torch >= 2.6
(NVIDIA containers ship pre-releases such as 2.10.0a0: the release number counts).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

MEGATRON_CORE_TESTED = "0.16.1"
TE_RANGE = ((2, 9), (2, 12))  # [2.9, 2.12)
TORCH_MIN = (2, 6)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper
FP8_ATTENTION_MIN_CAPABILITY = (9, 0)  # TE's FP8 fused attention: Hopper


def release(version: Optional[str]) -> Optional[tuple[int, ...]]:
    """``'2.10.0a0+b4e4ee8'`` -> (2, 10, 0): the release numbers, pre-release tags ignored."""
    if not version:
        return None
    match = re.match(r"(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in match.group(1).split(".")) if match else None


def _distribution_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class Environment:
    python: str
    torch: Optional[str]
    cuda: Optional[str]  # the CUDA torch was built with
    cudnn: Optional[int]
    nccl: Optional[str]
    gpus: list[tuple[str, tuple[int, int]]]  # (name, compute capability)
    transformer_engine: Optional[str]  # None: not importable
    transformer_engine_error: Optional[str]
    apex: Optional[str]  # "nvidia", "pypi-impostor" or None
    megatron_core: Optional[str]
    longsky: str
    einops: Optional[str]
    device_setting: str  # LONGSKY_DEVICE


@dataclass
class Report:
    environment: Environment
    paths: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refused, with the fix
    notes: list[str] = field(default_factory=list)


def _apex_kind() -> Optional[str]:
    try:
        import apex  # noqa: F401
    except Exception:  # noqa: BLE001
        return None
    try:
        importlib.import_module("apex.normalization")
        return "nvidia"
    except Exception:  # noqa: BLE001
        return "pypi-impostor"


def collect() -> Environment:
    import torch

    import megatron_longsky
    from megatron_longsky.runtime.device import requested_device

    # What the hardware has, whatever LONGSKY_DEVICE chooses (device_count() is 0 without CUDA).
    gpus = [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())]
    nccl = None
    try:
        nccl = ".".join(str(x) for x in torch.cuda.nccl.version()) if gpus else None
    except Exception:  # noqa: BLE001
        pass
    te_version, te_error = None, None
    if sys.modules.get("transformer_engine", False) is None:
        te_error = "hidden by LONGSKY_DEVICE=cpu"
    else:
        try:
            import transformer_engine  # noqa: F401

            te_version = _distribution_version("transformer_engine", "transformer-engine", "transformer_engine_torch") \
                or getattr(transformer_engine, "__version__", "unknown")
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            te_error = f"{type(exc).__name__}: {exc}"
    return Environment(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nccl=nccl,
        gpus=gpus,
        transformer_engine=te_version,
        transformer_engine_error=te_error,
        apex=_apex_kind(),
        megatron_core=_distribution_version("megatron-core", "megatron_core"),
        longsky=megatron_longsky.__version__,
        einops=_distribution_version("einops"),
        device_setting=requested_device(),
    )


def diagnose(env: Environment, cfg=None) -> Report:
    """What runs where, and what is refused (pure: tested with made-up environments).
    ``cfg``: a TrainConfig to check against this machine as well."""
    report = Report(env)
    problems, notes, paths = report.problems, report.notes, report.paths
    mcore = release(env.megatron_core)
    if env.megatron_core is None:
        problems.append(f"megatron-core is not installed: pip install megatron-core=={MEGATRON_CORE_TESTED}")
    elif mcore != release(MEGATRON_CORE_TESTED):
        problems.append(f"megatron-core {env.megatron_core} is untested (we patch {MEGATRON_CORE_TESTED} internals): "
                        f"pip install megatron-core=={MEGATRON_CORE_TESTED}")
    torch_release = release(env.torch)
    if torch_release is None or torch_release[:2] < TORCH_MIN:
        problems.append(f"torch {env.torch} is older than megatron-core {MEGATRON_CORE_TESTED} needs "
                        f"({'.'.join(map(str, TORCH_MIN))}): use an NVIDIA PyTorch container 25.01 or newer (docs/gpu.md)")
    on_gpu = bool(env.gpus) and env.device_setting != "cpu"
    if env.device_setting == "cuda" and not env.gpus:
        problems.append("LONGSKY_DEVICE=cuda but torch sees no CUDA device: check the allocation (srun --gpus) or "
                        "unset LONGSKY_DEVICE")
    if env.apex == "pypi-impostor":
        problems.append("the 'apex' installed is the unrelated PyPI package, not NVIDIA apex; megatron-core would "
                        "import it and fail: pip uninstall -y apex")
    te = release(env.transformer_engine)
    te_ok = te is not None and TE_RANGE[0] <= te[:2] < TE_RANGE[1]
    if env.transformer_engine is not None and not te_ok:
        problems.append(f"Transformer Engine {env.transformer_engine} is outside what megatron-core "
                        f"{MEGATRON_CORE_TESTED} supports (2.9-2.11): use a container with TE 2.9-2.11 or "
                        "pip install --no-build-isolation 'transformer_engine[pytorch]>=2.9,<2.12'")
    have_te = on_gpu and env.transformer_engine is not None
    capability = min((cap for _, cap in env.gpus), default=None)

    paths.append(("device", f"cuda ({len(env.gpus)} x {env.gpus[0][0]})" if on_gpu else
                  "cpu (megatron-core through the CPU compatibility layer)"))
    paths.append(("layer spec (transformer_impl: auto)", "Transformer Engine" if have_te else "megatron-core local"))
    paths.append(("attention", "TEDotProductAttention (cp_comm_type: p2p, a2a, all_gather, a2a+p2p; THD packed rows)"
                  if have_te else "LongSkyCoreAttention (blockwise; CP all-gathers K/V; packed rows)"))
    fp8 = have_te and capability is not None and capability >= FP8_MIN_CAPABILITY
    paths.append(("FP8 (model.fp8)", "available (Transformer Engine)" if fp8 else
                  "unavailable: needs Transformer Engine on an Ada/Hopper GPU (a config asking for it is refused)"))
    fp8_attn = fp8_attn_hardware = fp8 and capability >= FP8_ATTENTION_MIN_CAPABILITY
    if fp8_attn and cfg is not None and cfg.model.fp8 and cfg.model.fp8_attention == "dot_product":
        # TE's backend rules for this config's recipe on this GPU (attention/te_rules.py): e.g.
        # tensorwise (FP8 current scaling) attention has no backend below sm100.
        from megatron_longsky.attention import te_rules

        case = te_rules.case_for(cfg.model, cfg.parallel.context_parallel_size, _packed(cfg),
                                 capability=capability, te_version=te[:2] if te else None)
        fp8_attn = bool(te_rules.available_backends(case))
        paths.append(("FP8 attention (model.fp8_attention)",
                      f"available for fp8_recipe={cfg.model.fp8_recipe} ({', '.join(te_rules.available_backends(case))})"
                      if fp8_attn else f"unavailable for fp8_recipe={cfg.model.fp8_recipe} on sm{capability[0]}"
                      f"{capability[1]}: Transformer Engine has no attention backend for it"))
    else:
        paths.append(("FP8 attention (model.fp8_attention)",
                      "available (Hopper, TE fused attention; fp8_recipe=delayed, or tensorwise on sm100+)"
                      if fp8_attn else "unavailable: needs Transformer Engine on a Hopper GPU"))
    paths.append(("fused kernels (bias-activation, softmax, persistent norm)", "on" if on_gpu else "off (CPU)"))
    fused_wgrad = on_gpu and (have_te or env.apex == "nvidia")
    paths.append(("gradient-accumulation fusion", "available (TE / apex)" if fused_wgrad else "unavailable"))
    paths.append(("checkpoint.async_save", "asynchronous writes" if on_gpu else "synchronous (CPU)"))
    paths.append(("cp_comm_type a2a+p2p (hierarchical CP groups)",
                  "available" if env.einops else "unavailable: megatron-core needs einops (pip install einops)"))
    if env.gpus and env.transformer_engine is None:
        notes.append("CUDA without Transformer Engine: the local layer spec runs, FP8 is unavailable"
                     + (f" ({env.transformer_engine_error})" if env.transformer_engine_error else ""))
    if env.gpus and env.device_setting == "cpu":
        notes.append("LONGSKY_DEVICE=cpu: this process runs on CPU although CUDA is present")
    if env.einops is None:
        notes.append("einops is missing: cp_comm_type=a2a+p2p cannot create its CP groups (pip install einops)")
    if cfg is not None:
        _check_config(cfg, report, have_te, fp8, fp8_attn_hardware)
        if have_te and cfg.model.transformer_impl != "local":
            _check_attention_backends(cfg, report, capability, te, fp8_attention=fp8_attn_hardware)
    return report


def _packed(cfg) -> bool:
    return cfg.data.kind == "sft" and cfg.data.packed


def _check_attention_backends(cfg, report: Report, capability, te_release, fp8_attention: bool = True) -> None:
    """Transformer Engine's attention-backend and FP8-recipe rules (attention/te_rules.py) for
    this config on this GPU and TE version, as the trainer checks them before building.
    ``fp8_attention`` False: FP8 attention was already refused for this GPU (not said twice)."""
    import dataclasses

    from megatron_longsky.attention import te_rules

    model = cfg.model if fp8_attention else dataclasses.replace(cfg.model, fp8_attention="off")
    try:
        te_rules.check_model(model, cfg.parallel.context_parallel_size, _packed(cfg), capability=capability,
                             te_version=te_release[:2] if te_release else None)
    except te_rules.AttentionBackendError as exc:
        if str(exc) not in report.problems:
            report.problems.append(str(exc))


def _check_config(cfg, report: Report, have_te: bool, fp8: bool, fp8_attention: bool) -> None:
    """A training config that loads (its own checks passed) against what this machine has."""
    m, parallel = cfg.model, cfg.parallel
    if m.transformer_impl == "transformer_engine" and not have_te:
        report.problems.append("model.transformer_impl=transformer_engine but Transformer Engine is not usable here: "
                               "run in the NVIDIA PyTorch container on a GPU node, or set transformer_impl=auto")
    if m.fp8 and not fp8:
        report.problems.append(f"model.fp8={m.fp8} needs Transformer Engine on an Ada/Hopper GPU, not available here: "
                               "unset model.fp8 or run on H100 nodes in the container")
    if m.fp8_attention != "off" and not fp8_attention:
        report.problems.append(f"model.fp8_attention={m.fp8_attention} needs Transformer Engine on a Hopper GPU: "
                               "set model.fp8_attention=off")
    if parallel.hierarchical_cp_groups and report.environment.einops is None:
        report.problems.append("parallel.cp_comm_type=a2a+p2p needs einops for megatron-core's hierarchical CP "
                               "groups: pip install einops")
    if cfg.checkpoint.async_save and not have_te and not report.environment.gpus:
        report.notes.append("checkpoint.async_save is for GPU runs: saves are synchronous on CPU")
    report.paths.append(("this config", f"{'TE' if have_te and m.transformer_impl != 'local' else 'local'} layer spec, "
                         f"{m.resolved_dtype(on_gpu=bool(report.environment.gpus))}, fp8={m.fp8 or 'off'}, fp8_attention={m.fp8_attention}, "
                         f"CP={parallel.context_parallel_size} ({parallel.cp_comm_type})"))


def render(report: Report) -> str:
    env = report.environment
    lines = ["versions:"]
    versions = [
        ("python", env.python), ("torch", env.torch), ("CUDA (torch build)", env.cuda), ("cuDNN", env.cudnn),
        ("NCCL", env.nccl), ("Transformer Engine", env.transformer_engine or f"not importable"
                                                   f"{f' ({env.transformer_engine_error})' if env.transformer_engine_error else ''}"),
        ("apex", {"nvidia": "NVIDIA apex", "pypi-impostor": "the unrelated PyPI 'apex'"}.get(env.apex, "not installed")),
        ("megatron-core", env.megatron_core), ("megatron_longsky", env.longsky), ("einops", env.einops),
        ("GPUs", ", ".join(f"{n} (sm{c[0]}{c[1]})" for n, c in env.gpus) or "none"),
        ("LONGSKY_DEVICE", env.device_setting),
    ]
    width = max(len(k) for k, _ in versions)
    lines += [f"  {k.ljust(width)}  {v if v is not None else '-'}" for k, v in versions]
    lines.append("paths on this machine:")
    width = max(len(k) for k, _ in report.paths)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in report.paths]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"PROBLEM: {p}" for p in report.problems]
    lines.append("doctor: " + (f"{len(report.problems)} problem(s)" if report.problems else "ok"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="longsky doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a training config (YAML) to check against this machine")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of --config, as for longsky train")
    args = parser.parse_args(argv)
    cfg = None
    if args.config or args.overrides:
        from megatron_longsky.config import ConfigError
        from megatron_longsky.training.config import load_train_config

        try:
            cfg = load_train_config(args.config, args.overrides)
        except ConfigError as exc:
            print(f"longsky doctor: {exc}", file=sys.stderr)
            return 2
    report = diagnose(collect(), cfg)
    print(render(report))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
