"""Build of the `hps_core._C` torch extension from cuda_ext/.

Variant selection (HPS_WITH_CUDA):
  auto (default)  CUDA sources are compiled iff torch itself was built with CUDA (torch.version.cuda),
                  never "a GPU is visible": CI builds the CUDA variant on a GPU-less machine.
  0               CPU sources only.
  1               CPU + CUDA sources; an error if torch has no CUDA.

Install with `pip install --no-build-isolation -e .` (build isolation would hide the pinned torch).
Next to the built library a `_build_info.py` records the variant, torch and CUDA versions.
"""

from __future__ import annotations

import datetime
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit when installing without torch
    sys.exit(
        "hps needs torch installed before it is built (pip install torch==2.13.0), and the build must see it: "
        f"use `pip install --no-build-isolation -e .` ({exc})"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("cuda_ext", "csrc")


def _variant() -> str:
    choice = os.environ.get("HPS_WITH_CUDA", "auto").strip().lower()
    if choice not in ("auto", "0", "1"):
        sys.exit(f"HPS_WITH_CUDA must be auto, 0 or 1; found {choice!r}")
    torch_has_cuda = torch.version.cuda is not None
    if choice == "1" and not torch_has_cuda:
        sys.exit(f"HPS_WITH_CUDA=1 but torch {torch.__version__} was built without CUDA")
    if choice == "auto":
        return "cuda" if torch_has_cuda else "cpu"
    return "cuda" if choice == "1" else "cpu"


def _cuda_extra_includes() -> list[str]:
    """Headers the CUDA toolkit here lacks but torch's nvidia wheels ship (ATen's CUDA headers need cusparse.h)."""
    dirs = []
    for path in sys.path:
        for sub in ("cu13", "cu12", "cusparse", "cublas", "cuda_runtime"):
            inc = os.path.join(path, "nvidia", sub, "include")
            if os.path.isdir(inc):
                dirs.append(inc)
    return sorted(set(dirs))


def _sanitizer() -> str:
    """HPS_SANITIZE=address|thread: a CPU build instrumented with AddressSanitizer / ThreadSanitizer (CI's
    `make sanitize-check` builds one beside the normal build and loads it with HPS_EXTENSION_PATH)."""
    choice = os.environ.get("HPS_SANITIZE", "").strip().lower()
    if choice not in ("", "address", "thread"):
        sys.exit(f"HPS_SANITIZE must be empty, address or thread; found {choice!r}")
    return choice


VARIANT = _variant()
SANITIZE = _sanitizer()
if SANITIZE and VARIANT == "cuda":
    sys.exit("HPS_SANITIZE builds the CPU variant only: set HPS_WITH_CUDA=0")
print(f"[hps] building hps_core._C, variant={VARIANT} (torch {torch.__version__}, cuda {torch.version.cuda})")

# csrc/*.cpp: the schema file and device-generic ops; cpu/*.cpp: the CPU kernels.
sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
include_dirs = [os.path.join(ROOT, CSRC)]
# -ffp-contract=off: the row codecs (row_codec.h) rely on every float operation being rounded on its own, as on
# the device (a host build for an FMA target would otherwise fuse them and change the stored bits).
cxx_flags = ["-O3", "-g0", "-Wall", "-Wno-unused-function", "-ffp-contract=off"]
# NOTE: at::parallel_for is an inline template that runs its body serially unless the including code is compiled
# with OpenMP (ATen/ParallelOpenMP.h). Without -fopenmp every CPU op of ours ran on one thread (measured: a 26,624-key
# CPU lookup used 1.0 CPU-second per wall-second with 2 threads). The library then needs libgomp.so.1, which torch
# has already loaded (torch/lib/libgomp.so.1): one OpenMP runtime in the process. Sanitizer builds stay serial
# (libgomp is not instrumented: ThreadSanitizer cannot see its barriers).
openmp_flags = [] if SANITIZE else ["-fopenmp"]
cxx_flags += openmp_flags
define_macros = []

if VARIANT == "cuda":
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    include_dirs += _cuda_extra_includes()
    define_macros.append(("HPS_WITH_CUDA", "1"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DHPS_WITH_CUDA=1"]
    ext = CUDAExtension(
        "hps_core._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp_flags,
    )
else:
    link_flags = list(openmp_flags)
    if SANITIZE:
        cxx_flags = [f for f in cxx_flags if f not in ("-O3", "-g0")] + [
            "-O1", "-g", f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
        link_flags = [f"-fsanitize={SANITIZE}"]
    ext = CppExtension(
        "hps_core._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


class BuildWithInfo(BuildExtension):
    """Writes `_build_info.py` beside the built library, so the loader can report what was built."""

    def run(self):
        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("hps_core._C"))
        os.makedirs(out_dir, exist_ok=True)
        info = {
            "variant": VARIANT,
            "sanitize": SANITIZE or None,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if VARIANT == "cuda" else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if VARIANT == "cuda" else None,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
        }
        with open(os.path.join(out_dir, "_build_info.py"), "w") as f:
            f.write('"""Generated by setup.py: what hps_core._C was built as."""\n')
            for key, value in info.items():
                f.write(f"{key.upper()} = {value!r}\n")


setup(
    name="hps",
    version="0.1.0",
    description="Hierarchical parameter server for recommender inference: GPU embedding cache over host, "
    "Redis Cluster and RocksDB tiers, with torch and TensorFlow front ends",
    packages=find_packages(include=["hps_core", "hps_core.*", "interop", "interop.*", "benchmarks", "benchmarks.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True)},
    python_requires=">=3.10",
    zip_safe=False,
)
