"""Builds the single torch extension ``fastspec._C``.

CUDA sources (csrc/cuda/*.cu, csrc/torch/*_cuda.cpp) are compiled only when a CUDA
toolkit and a CUDA build of torch are both present; ``FASTSPEC_CUDA=0/1`` forces it.
Install with ``pip install --no-build-isolation .`` so the extension is compiled
against the torch already installed (see README).
"""
import glob
import os

from setuptools import find_packages, setup


def _sources(pattern):
    return sorted(glob.glob(pattern))


def _want_cuda():
    forced = os.environ.get("FASTSPEC_CUDA")
    if forced is not None:
        return forced.strip() == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _openmp_flags():
    """-fopenmp where torch's intra-op backend is OpenMP: at::parallel_for is a header template whose
    `#pragma omp parallel` is dropped without it, leaving every native op on one thread. Linking
    records libgomp.so.1, the soname torch's wheel already loaded, so both share one OpenMP runtime."""
    import sys

    import torch

    if sys.platform == "darwin" or not torch._C.has_openmp or os.environ.get("FASTSPEC_OPENMP", "1") == "0":
        return []
    return ["-fopenmp"]


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = (
        _sources("csrc/cpu/*.cpp")
        + _sources("csrc/runtime/*.cpp")
        + [s for s in _sources("csrc/torch/*.cpp") if not s.endswith("_cuda.cpp")]
    )
    include_dirs = [os.path.abspath("csrc/include")]
    openmp = _openmp_flags()
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"] + openmp
    if _want_cuda():
        cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/torch/*_cuda.cpp")
        arch_list = os.environ.get("FASTSPEC_CUDA_ARCHS", "80;90")
        gencode = []
        for arch in arch_list.split(";"):
            gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        return [
            CUDAExtension(
                "fastspec._C",
                cpu_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("FASTSPEC_WITH_CUDA", "1")],
                # No --use_fast_math: the verify kernels must match the CPU core bit for bit.
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"] + gencode},
                extra_link_args=openmp,
            )
        ]
    return [CppExtension("fastspec._C", cpu_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags,
                         extra_link_args=openmp)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="fastspec",
    version="0.1.0",
    description="Lossless speculative decoding for HF seq2seq (FLAN-T5) and causal targets",
    packages=find_packages(include=["fastspec", "fastspec.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "sentencepiece",
        "safetensors",
        "numpy",
        "tqdm",
        "matplotlib",
        "rouge-score",
        "sacremoses",
        "gguf",
        "accelerate",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "datasets"]},
    entry_points={"console_scripts": ["fastspec=fastspec.cli:main"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    zip_safe=False,
)
