"""Builds fused_cbam._C: the C++ CPU kernels always, the CUDA kernels when asked for.

Environment:
  FORCE_CUDA=1                  build the CUDA kernels even without a visible GPU
  TORCH_CUDA_ARCH_LIST="8.0;9.0" architectures (setting it also turns the CUDA build on)
  FUSED_CBAM_SKIP_CUDA_BUILD=1  never build the CUDA kernels
  CUDA_HOME                     the CUDA toolkit (else /usr/local/cuda, else nvcc on PATH)
  MAX_JOBS                      parallel compile jobs (ninja)
  DEBUG=1                       -O0 -g
"""

import glob
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _find_cuda_home():
    """The CUDA toolkit root, resolved before torch.utils.cpp_extension reads CUDA_HOME."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG") == "1"
DEFAULT_ARCH_LIST = "8.0;9.0"

# kernels.cpp is compiled once per capability; ops_cpu.cpp picks one at run time.
CPU_CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}
CAPABILITY_SOURCE = os.path.join("csrc", "cpu", "kernels.cpp")


def _load_sources_module():
    """fused_cbam/_sources.py alone (the package itself is not built yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_cbam_sources", os.path.join(ROOT, "fused_cbam", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda():
    if os.environ.get("FUSED_CBAM_SKIP_CUDA_BUILD") == "1":
        return False, "FUSED_CBAM_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA support"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    if os.environ.get("FORCE_CUDA") == "1":
        return True, "FORCE_CUDA=1"
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return True, "TORCH_CUDA_ARCH_LIST is set"
    return False, "no GPU visible (set FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST to build anyway)"


WITH_CUDA, CUDA_REASON = _want_cuda()
if WITH_CUDA and not torch.cuda.is_available():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

OPT = ["-O0", "-g"] if DEBUG else ["-O3"]
CXX_FLAGS = OPT + ["-fopenmp"]
NVCC_FLAGS = OPT + ["--expt-relaxed-constexpr"]


def _cuda_math_includes():
    """torch's CUDA 13 wheels install the math-library headers beside torch, not in the toolkit."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _extension():
    names = ("ops.cpp", "autograd.cpp", "training.cpp", os.path.join("cpu", "ops_cpu.cpp"))
    sources = [os.path.join("csrc", name) for name in names]
    kwargs = dict(name="fused_cbam._C", extra_link_args=["-fopenmp"])
    if not WITH_CUDA:
        return CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **kwargs)
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    return CUDAExtension(
        sources=sources,
        include_dirs=_cuda_math_includes(),
        extra_compile_args={"cxx": CXX_FLAGS + ["-DFUSED_CBAM_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        **kwargs,
    )


class BuildExtensionWithCpuCapabilities(BuildExtension):
    """Adds the kernels compiled per CPU capability, and writes build info beside the library."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args

        def compile_for(capability):
            return self.compiler.compile(
                [CAPABILITY_SOURCE],
                output_dir=os.path.join(self.build_temp, f"cpu_{capability.lower()}"),
                include_dirs=ext.include_dirs,
                extra_postargs=[x for x in cxx if x != "-DFUSED_CBAM_WITH_CUDA"]
                + [f"-DCPU_CAPABILITY={capability}"] + CPU_CAPABILITIES[capability],
            )

        # At once (each is one compiler process in its own folder): one after another they took
        # about 60 s of a 140 s build on two cores, and as long on a 16-core GPU machine.
        with ThreadPoolExecutor(len(CPU_CAPABILITIES)) as pool:
            ext.extra_objects = [obj for objs in pool.map(compile_for, CPU_CAPABILITIES) for obj in objs]
        super().build_extension(ext)
        info = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if WITH_CUDA else None,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if WITH_CUDA else None,
            "cpu_capabilities": list(CPU_CAPABILITIES),
            "python": sys.version.split()[0],
            "sources": _load_sources_module().digest(Path(ROOT) / "csrc"),
        }
        # Beside the library in the build tree (wheels), and in the source package (editable
        # installs, whose library is copied out of a temporary build tree).
        for out_dir in {os.path.dirname(self.get_ext_fullpath(ext.name)), os.path.join(ROOT, "fused_cbam")}:
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=2)


print(
    "fused_cbam build: "
    f"torch={torch.__version__} CUDA_HOME={CUDA_HOME} with_cuda={WITH_CUDA} ({CUDA_REASON}) "
    f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') if WITH_CUDA else None} "
    f"cpu_capabilities={','.join(CPU_CAPABILITIES)} debug={DEBUG} MAX_JOBS={os.environ.get('MAX_JOBS')}",
    flush=True,
)

setup(
    packages=find_packages(include=["fused_cbam", "fused_cbam.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionWithCpuCapabilities},
)
