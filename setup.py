"""Build: the megatron_longsky package, its pybind11 extensions from csrc/, and `longsky`.

Each ``csrc/<name>.cpp`` becomes the extension module ``megatron_longsky._ext_<name>``
(``PYBIND11_MODULE(_ext_<name>, m)``). The pinned CPU set-up lives in requirements-cpu.txt.

Versions (``longsky doctor`` checks them on a machine and refuses the known-bad ones):
- megatron-core is pinned to 0.16.1: we patch some of its internals (training/checkpointing.py,
  runtime/cpu_compat.py) and test against that release only;
- torch is bounded below only (megatron-core 0.16.1 needs >= 2.6): cluster containers keep
  their own CUDA build (NVIDIA's ship pre-releases such as 2.10.0a0, which satisfy it);
- Transformer Engine 2.9-2.11 (megatron-core 0.16.1's bound) and NVIDIA apex come with the
  NVIDIA PyTorch container (docs/gpu.md); the ``te`` extra states the TE bound for other
  installs. Never the PyPI package named ``apex``: it is unrelated.
"""

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as exc:  # pragma: no cover - build requirement
    raise SystemExit("pybind11 is needed to build megatron_longsky: pip install pybind11") from exc

ext_modules = [
    Pybind11Extension(
        f"megatron_longsky._ext_{Path(src).stem}",
        [src],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
    for src in sorted(glob("csrc/*.cpp"))
]

setup(
    name="megatron_longsky",
    version="0.1.0",
    description="LongSkywork long-context training recipe on megatron-core",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_longsky", "megatron_longsky.*"]),
    package_data={"megatron_longsky": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "megatron-core==0.16.1",
        "torch>=2.6",
        "einops",
        "numpy",
        "nltk",
        "pybind11",
        "tokenizers",
        "sentencepiece",
        "transformers",
        "jinja2",
        "safetensors",
        "tqdm",
        "psutil",
        "pyyaml",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        "te": ["transformer_engine[pytorch]>=2.9,<2.12"],
    },
    entry_points={"console_scripts": ["longsky=megatron_longsky.cli:main"]},
    zip_safe=False,
)
