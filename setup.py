"""Build apkernels and its compiled extension ``apkernels._C``.

The extension is compiled against the torch installed in the environment being installed into:
``pip install .`` (build isolation on; see build_backend/apkernels_backend.py), ``pip install
--no-build-isolation .`` and ``pip install -e .`` all do. Without torch there, the build installs
one that the target install's pip constraints allow (or APKERNELS_TORCH_REQUIREMENT) and the wheel
requires exactly that torch version.

Switches (environment variables, flash-attention style):
  APKERNELS_CUDA=1 / 0   force / skip the CUDA kernels (default: build them when the installed
                         torch is a CUDA build and nvcc is found, GPU or not)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default: the visible GPU's, else "8.0;9.0")
  MAX_JOBS               parallel compile jobs for ninja
  CUDA_HOME              CUDA toolkit root (default: found from nvcc on PATH, wrapper scripts too)
  APKERNELS_TORCH_REQUIREMENT
                         the torch a build gets when the target environment has none (default
                         torch>=2.11, within the target's pip constraints; build_backend/)
  APKERNELS_PY_LIMITED_API=1
                         build _C against Python's stable ABI (_C.abi3.so, loads in CPython >= 3.10):
                         `make gpu-bundle` uses it to build here for a machine with another Python
"""
import glob
import json
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def import_torch():
    """The torch to compile against: the one importable here, else the target environment's.

    Under pip's build isolation this process runs with the target environment's interpreter but its
    site-packages hidden; build_backend/apkernels_backend.py finds the target's torch (it then adds
    no torch to the build requirements), and compiling against it keeps _C matched to the torch
    it will run with.
    """
    try:
        import torch
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "build_backend"))
        from apkernels_backend import target_torch_site_dir

        site_dir = target_torch_site_dir()
        if site_dir is None:
            sys.exit(
                "apkernels: torch is neither in the build environment nor in the target environment; "
                "install torch first (pip install -r requirements.txt), or build with `pip install .`, "
                "which installs it"
            )
        # Appended: the build environment's setuptools and wheel keep precedence.
        sys.path.append(site_dir)
        import torch
    return torch


torch = import_torch()


def _is_toolkit_root(path):
    return bool(path) and os.path.exists(os.path.join(path, "bin", "nvcc")) and (
        glob.glob(os.path.join(path, "lib64", "libcudart.so*"))
        or glob.glob(os.path.join(path, "lib", "libcudart.so*"))
    )


def find_cuda_home():
    """The toolkit root holding lib64/libcudart.so, also when nvcc on PATH is a wrapper script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit_root(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _is_toolkit_root(root):
            return root
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "r", errors="ignore") as fh:
                head = fh.read(4096)
            for match in re.findall(r"(/[^\s'\"]+)/bin/nvcc", head):
                if _is_toolkit_root(match):
                    return match
        except OSError:
            pass
    for root in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if _is_toolkit_root(root):
            return root
    return None


def want_cuda(cuda_home):
    flag = os.environ.get("APKERNELS_CUDA", "").strip()
    if flag == "0":
        return False
    if torch.version.cuda is None or cuda_home is None:
        if flag == "1":
            sys.exit(
                "apkernels: APKERNELS_CUDA=1 but "
                + ("the installed torch is a CPU build" if torch.version.cuda is None else "nvcc was not found")
            )
        return False
    return True


CUDA_HOME = find_cuda_home()
WITH_CUDA = want_cuda(CUDA_HOME)
if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvidia_wheel_includes():
    """Headers shipped in the nvidia-* wheels a CUDA torch depends on (cusparse.h, cublas_v2.h...)."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def openmp_flags():
    """["-fopenmp"] when the C++ compiler builds an OpenMP program, else [] (at::parallel_for then
    runs on ATen's own thread pool, e.g. with Apple clang)."""
    import subprocess
    import tempfile

    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as fh:
            fh.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                    capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return []
    return ["-fopenmp"] if result.returncode == 0 else []


# _C uses only the limited C API (csrc/apkernels.cpp: PyModule_Create, no pybind11, no
# libtorch_python), so one abi3 build serves every CPython >= 3.10; torch adds -DPy_LIMITED_API.
PY_LIMITED_API = os.environ.get("APKERNELS_PY_LIMITED_API", "").strip() == "1"


def extension():
    cpp_sources = sorted(f for f in glob.glob("csrc/**/*.cpp", recursive=True) if not f.startswith("csrc/emulation"))
    # Headers too, so that editing one relinks _C (ninja then recompiles only what includes it).
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    openmp = openmp_flags()
    cxx_flags = ["-O3", "-std=c++20", *openmp]
    define_macros = []
    extra_link_args = list(openmp)
    if WITH_CUDA:
        cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
        define_macros.append(("APKERNELS_WITH_CUDA", None))
        return CUDAExtension(
            "apkernels._C",
            cpp_sources + cu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_includes(),
            define_macros=define_macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=extra_link_args,
            depends=headers,
            py_limited_api=PY_LIMITED_API,
        )
    return CppExtension(
        "apkernels._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
        depends=headers,
        py_limited_api=PY_LIMITED_API,
    )


# ---- CUDA emulation: apkernels._C_emulated (APKERNELS_CUDA_EMULATION=1; `make test` sets it) ----
# The csrc/ops/cuda/*.cu sources compiled as host C++ (csrc/emulation/wrap_*.cpp) with
# -fsanitize=thread instrumentation but without libtsan: the emulator runtime (compiled here
# separately, uninstrumented) receives every load/store and checks it. See docs/cuda-kernels.md.
# APKERNELS_EMULATION_COVERAGE=1 adds gcov instrumentation (docs/cuda-kernels.md, coverage).
EMULATION_MUTANTS = {
    # name: (source, text, mutated text) -- compiled as ops apkernels::<op>_cuda_mutant_<name>
    "off_by_one": ("csrc/ops/cuda/pool_backward_kernel.cu", "const bool active = u < a.units;", "const bool active = u <= a.units;"),
    # patch_pool's cluster kernel with one buffer of partial scores instead of two: a block writes the
    # next image's partials while the others may still read the previous image's (a DSMEM race).
    "single_buffer": ("csrc/ops/cuda/patch_pool_kernel.cu", "float* my_part = part + (iteration & 1) * n;",
                      "float* my_part = part;"),
}


def emulation_extension():
    if os.environ.get("APKERNELS_CUDA_EMULATION", "0") != "1":
        return None
    import subprocess
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    out = os.path.join(ROOT, "build", "emulation")
    os.makedirs(out, exist_ok=True)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    includes = [os.path.join(ROOT, "csrc")] + include_paths() + [sysconfig.get_paths()["include"]]
    coverage = ["--coverage", "-fprofile-update=atomic"] if os.environ.get("APKERNELS_EMULATION_COVERAGE") == "1" else []
    runtime_src = os.path.join(ROOT, "csrc", "emulation", "runtime.cpp")
    runtime_obj = os.path.join(out, "runtime.o")
    deps = [runtime_src, os.path.join(ROOT, "csrc", "emulation", "cuda_emulation.h")]
    if not os.path.exists(runtime_obj) or os.path.getmtime(runtime_obj) < max(map(os.path.getmtime, deps)):
        cmd = [os.environ.get("CXX", "c++"), "-O2", "-g", "-std=c++20", "-fPIC", abi, "-c", runtime_src, "-o", runtime_obj]
        subprocess.check_call(cmd + [f"-I{d}" for d in includes])
    sources = sorted(glob.glob("csrc/emulation/wrap_*.cpp"))
    for name, (src, text, mutated) in EMULATION_MUTANTS.items():
        with open(os.path.join(ROOT, src)) as fh:
            code = fh.read()
        if text not in code:  # the kernel changed: tests/test_cuda_emulation.py reports the missing mutant
            continue
        mutant = os.path.join("build", "emulation", f"mutant_{name}.cpp")
        header = (
            f'#define APK_EMU_OP_SUFFIX "_cuda_mutant_{name}"\n#include "emulation/cuda_emulation.h"\n'
            "namespace apkernels::cuda {\nnamespace {\nAPK_EMU_DYNAMIC_SHARED(dyn_smem)\n}\n}\n"
        )
        new = header + code.replace(text, mutated)
        if not os.path.exists(mutant) or open(mutant).read() != new:
            with open(mutant, "w") as fh:
                fh.write(new)
        sources.append(mutant)
    return CppExtension(
        "apkernels._C_emulated",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "emulation", "shim"), os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O1", "-g", "-std=c++20", "-fsanitize=thread", "-fno-extern-tls-init", "-Wno-unknown-pragmas", abi] + coverage},
        extra_objects=[runtime_obj],
        extra_link_args=coverage,
    )


EMULATION_EXTENSION = emulation_extension()


def build_config():
    """What _C is built with; `import apkernels` compares it with the running torch."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if WITH_CUDA else None,
        "cuda_home": CUDA_HOME if WITH_CUDA else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU") if WITH_CUDA else None,
        # "0" records a deliberate CPU-only build, so the build check does not demand CUDA kernels.
        "APKERNELS_CUDA": os.environ.get("APKERNELS_CUDA", "").strip() or "auto",
        "python_abi": "abi3" if PY_LIMITED_API else sys.implementation.cache_tag,
    }


class BuildExtensionKeepObjects(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with a persistent object directory, and the build record next to _C.

    pip's editable and wheel builds point build_temp at a fresh temporary folder, so every
    `pip install` recompiled everything; build/temp.<platform>-<python>-torch<version>-<cpu|cuda>
    keeps ninja's objects between builds, so only changed sources recompile.
    """

    def finalize_options(self):
        super().finalize_options()
        flavour = "cuda" if WITH_CUDA else "cpu"
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}-{flavour}"
        self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")

    def run(self):
        super().run()
        # Written by the build only, beside the built _C (the source tree for in-place and
        # editable builds, the wheel's folder otherwise).
        with open(os.path.join(os.path.dirname(self.get_ext_fullpath("apkernels._C")), "_build_config.json"), "w") as fh:
            json.dump(build_config(), fh, indent=1)


def read_version():
    """apkernels/_version.py's __version__ (the one place the version is written)."""
    with open(os.path.join(ROOT, "apkernels", "_version.py")) as fh:
        return re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)


# What apkernels.models and apkernels.benchmarks import besides torch.
MODEL_REQUIREMENTS = ["torchvision", "numpy", "tqdm", "pillow", "matplotlib"]
BUNDLED_PACKAGES = {"apkernels.models": "models", "apkernels.benchmarks": "benchmarks"}
# The installed commands; each takes the options of its `python -m` form.
COMMANDS = [
    "apkernels-train = apkernels.models.train:command",
    "apkernels-evaluate = apkernels.models.evaluate:command",
    "apkernels-predict = apkernels.models.predict:command",
    "apkernels-bench = apkernels.benchmarks.__main__:command",
    "apkernels-export = apkernels.models.export:main",
]

setup(
    name="apkernels",
    version=read_version(),
    description="Fused attentive pooling (APViT) and multi-head cross attention (DAN) kernels for PyTorch",
    # models/ and benchmarks/ stay where they are (`python -m models.train` from the source tree) and
    # install as apkernels.models / apkernels.benchmarks: no generic top-level `models` package.
    packages=find_packages(include=["apkernels", "apkernels.*"]) + list(BUNDLED_PACKAGES),
    package_dir=BUNDLED_PACKAGES,
    entry_points={"console_scripts": COMMANDS},
    ext_modules=[extension()] + ([EMULATION_EXTENSION] if EMULATION_EXTENSION else []),
    cmdclass={"build_ext": BuildExtensionKeepObjects},
    python_requires=">=3.10",
    # The torch _C is compiled against (without a local label such as +cu130), as torchvision pins.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", *MODEL_REQUIREMENTS],
    zip_safe=False,
)
