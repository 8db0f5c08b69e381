"""Build: the megatron_longsky package, its pybind11 extensions from csrc/, and `longsky`.

Each ``csrc/<name>.cpp`` becomes the extension module ``megatron_longsky._ext_<name>``
(``PYBIND11_MODULE(_ext_<name>, m)``). Requirements are loose so cluster containers
keep their own CUDA torch; the pinned CPU set-up lives in requirements-cpu.txt.
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
        "megatron-core>=0.16.1",
        "torch",
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
    extras_require={"test": ["pytest", "pytest-timeout", "hypothesis"]},
    entry_points={"console_scripts": ["longsky=megatron_longsky.cli:main"]},
    zip_safe=False,
)
