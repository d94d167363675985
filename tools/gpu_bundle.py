"""The prebuilt extension a GPU lease carries: apkernels._C for sm_90, built here against the GPU
machines' torch, so that a lease spends no minutes compiling.

    python tools/gpu_bundle.py build      # `make gpu-bundle`: build into .gpu-bundle/ (or reuse it)
    python tools/gpu_bundle.py install    # on the GPU machine: put it in place, or say why it does not fit
    python tools/gpu_bundle.py source-sha # the commit the bundle's tree was at (for trees without .git)
    python tools/gpu_bundle.py copy-tree DEST   # the files a device call sends, copied to DEST

The bundle is `_C.abi3.so` (Python's stable ABI: _C uses only PyModule_Create, so one build loads
in the GPU image's CPython 3.12 and in any CPython >= 3.10 here) with its `_build_config.json`, and
`manifest.json`: the torch it was built against, the archs, and a fingerprint of the sources that
make the binary (csrc/ but its CPU emulator, and setup.py). `install` accepts it only when the running torch is that
torch and the fingerprint matches this tree; it then imports it in a fresh interpreter. Its one
output line says what happened; exit 0 = in place and loaded, 3 = does not fit (build instead).
"""
import argparse
import datetime
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(ROOT, ".gpu-bundle")
ARCH = "9.0"  # the H200 / H100 of the GPU machines
MAX_BUNDLE_BYTES = 40 * 2**20
DOES_NOT_FIT = 3


def source_files(root: str) -> list:
    """The files the binary is built from, relative to `root`, sorted."""
    files = [os.path.join(root, "setup.py")]
    files += [p for p in glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True) if os.path.isfile(p)]
    emulation = os.path.join(root, "csrc", "emulation") + os.sep  # the CPU emulator: not in the bundle
    files = [p for p in files if not p.startswith(emulation)]
    return sorted(os.path.relpath(p, root) for p in files)


def fingerprint(root: str = ROOT) -> str:
    digest = hashlib.sha256()
    for rel in source_files(root):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as fh:
            digest.update(fh.read())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def copy_tree(dest: str) -> None:
    """The files a device call sends: tracked and untracked-but-not-ignored (no build outputs)."""
    listing = git("ls-files", "-co", "--exclude-standard", "-z")
    if listing is None:
        raise SystemExit("gpu_bundle: `git ls-files` failed: run from a git checkout")
    for rel in filter(None, listing.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):  # deleted but still tracked: skip
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def read_manifest(bundle: str = BUNDLE) -> dict | None:
    try:
        with open(os.path.join(bundle, "manifest.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_source(bundle: str = BUNDLE) -> None:
    """The commit this tree is at, for the results JSON of a run on a copy without .git."""
    status = git("status", "--porcelain", "--untracked-files=no")
    info = {"git_sha": git("rev-parse", "HEAD"), "dirty": bool(status), "written": _now()}
    with open(os.path.join(bundle, "source.json"), "w") as fh:
        json.dump(info, fh, indent=1)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_import(root: str, python: str = sys.executable) -> str | None:
    """None when `import apkernels` in `root` loads _C with a CUDA kernel for every op, else why not."""
    code = (
        "import json, apkernels\n"
        "from apkernels import _extension as e\n"
        "from apkernels._library import OP_TABLE\n"
        "print(json.dumps({'error': None if e._C is not None else str(e.LOAD_ERROR), 'cuda': sorted(e.NATIVE['CUDA']),\n"
        "                  'ops': [op.name for op in OP_TABLE]}))\n"
    )
    env = dict(os.environ, APKERNELS_QUIET="1", PYTHONPATH=root)
    try:
        out = subprocess.run([python, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "importing apkernels took over 300 s"
    if out.returncode != 0:
        return "importing apkernels failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    if info["error"]:
        return f"apkernels._C did not load: {info['error']}"
    missing = [op for op in info["ops"] if op not in info["cuda"]]  # every op of the registry has a CUDA kernel
    if missing:
        return f"apkernels._C has no CUDA kernel for {', '.join(missing)}"
    return None


# -------------------------------------------------------------------------------------- build
def build(args) -> int:
    import torch

    os.makedirs(BUNDLE, exist_ok=True)
    write_source()
    manifest = read_manifest()
    want = fingerprint()
    so_path = os.path.join(BUNDLE, "apkernels", "_C.abi3.so")
    if (
        not args.force
        and manifest
        and manifest.get("fingerprint") == want
        and manifest.get("torch") == torch.__version__
        and os.path.isfile(so_path)
    ):
        print(f"gpu bundle: up to date (torch {torch.__version__}, sm_{ARCH.replace('.', '')}, sources {want})")
        return 0
    if torch.version.cuda is None:
        raise SystemExit(f"gpu_bundle: torch {torch.__version__} is a CPU build; the bundle needs a CUDA torch")
    work = os.path.join(ROOT, "build", "gpu-bundle")
    shutil.rmtree(work, ignore_errors=True)
    src = os.path.join(work, "src")
    copy_tree(src)
    env = dict(
        os.environ,
        APKERNELS_CUDA="1",
        APKERNELS_PY_LIMITED_API="1",
        APKERNELS_CUDA_EMULATION="0",
        TORCH_CUDA_ARCH_LIST=ARCH,
        MAX_JOBS=os.environ.get("MAX_JOBS", "1"),
    )
    if shutil.which("ccache"):  # rebuilding unchanged files is then free (CI on this machine)
        env.setdefault("PYTORCH_NVCC", "ccache nvcc")
        if os.path.isdir("/usr/lib/ccache"):
            env["PATH"] = "/usr/lib/ccache:" + env.get("PATH", "")
    print(f"gpu bundle: building apkernels._C for sm_{ARCH.replace('.', '')} against torch {torch.__version__} "
          f"(MAX_JOBS={env['MAX_JOBS']}) in {os.path.relpath(src, ROOT)}", flush=True)
    log = os.path.join(work, "build.log")
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        raise SystemExit(f"{tail}\ngpu_bundle: the build failed (rc={rc}); full log: {os.path.relpath(log, ROOT)}")
    built = os.path.join(src, "apkernels", "_C.abi3.so")
    if not os.path.isfile(built):
        raise SystemExit(f"gpu_bundle: the build made no {os.path.relpath(built, src)} (py_limited_api not honoured?)")
    # -g comes from Python's CFLAGS: drop the debug sections, the lease carries at most 64 MiB in all.
    subprocess.run(["strip", "--strip-debug", built], check=False)
    size = os.path.getsize(built)
    if size > MAX_BUNDLE_BYTES:
        raise SystemExit(f"gpu_bundle: {size / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES // 2**20} MiB a lease may carry for it")
    why = check_import(src)
    if why:
        raise SystemExit(f"gpu_bundle: the new build does not load here: {why}")
    shutil.rmtree(os.path.join(BUNDLE, "apkernels"), ignore_errors=True)
    os.makedirs(os.path.join(BUNDLE, "apkernels"))
    shutil.copy2(built, so_path)
    shutil.copy2(os.path.join(src, "apkernels", "_build_config.json"), os.path.join(BUNDLE, "apkernels", "_build_config.json"))
    manifest = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_archs": ARCH,
        "python_abi": "abi3 (CPython >= 3.10)",
        "fingerprint": want,
        "fingerprint_of": "setup.py and csrc/**",
        "built": _now(),
        "built_with_python": sys.version.split()[0],
        "bytes": size,
    }
    with open(os.path.join(BUNDLE, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    print(f"gpu bundle: {os.path.relpath(so_path, ROOT)} {size / 2**20:.1f} MiB, torch {torch.__version__}, "
          f"sm_{ARCH.replace('.', '')}, sources {want}; loads here (a CUDA kernel for every op)")
    return 0


# ------------------------------------------------------------------------------------ install
def misfit(manifest: dict | None, bundle: str) -> str | None:
    """Why the bundle cannot serve this tree and this torch, or None."""
    import torch

    if manifest is None:
        return f"no bundle ({os.path.relpath(bundle, ROOT)}/manifest.json missing: run `make gpu-bundle` and carry .gpu-bundle)"
    if not os.path.isfile(os.path.join(bundle, "apkernels", "_C.abi3.so")):
        return "the bundle has no apkernels/_C.abi3.so"
    if manifest.get("torch") != torch.__version__:
        return f"built for torch {manifest.get('torch')}, running torch {torch.__version__}"
    if sys.version_info < (3, 10):
        return f"an abi3 build needs CPython >= 3.10, running {sys.version.split()[0]}"
    if manifest.get("fingerprint") != fingerprint():
        return f"built from other sources (csrc/ or setup.py changed since: {manifest.get('fingerprint')} != {fingerprint()})"
    if torch.cuda.is_available():
        cap = "%d.%d" % torch.cuda.get_device_capability()
        if cap not in manifest.get("cuda_archs", "").split(";"):
            return f"built for sm_{manifest.get('cuda_archs')}, the GPU is sm_{cap.replace('.', '')}"
    return None


def install(args) -> int:
    manifest = read_manifest(args.bundle)
    why = misfit(manifest, args.bundle)
    if why is None:
        pkg = os.path.join(ROOT, "apkernels")
        for stale in glob.glob(os.path.join(pkg, "_C*.so")):  # another build would win the import
            os.remove(stale)
        for name in ("_C.abi3.so", "_build_config.json"):
            shutil.copy2(os.path.join(args.bundle, "apkernels", name), os.path.join(pkg, name))
        why = check_import(ROOT)
        if why is None:
            print(f"gpu bundle: loaded (torch {manifest['torch']}, sm_{manifest['cuda_archs'].replace('.', '')}, "
                  f"sources {manifest['fingerprint']}, built {manifest['built']})")
            return 0
        for name in ("_C.abi3.so", "_build_config.json"):
            os.remove(os.path.join(pkg, name))
    print(f"gpu bundle: does not fit: {why}")
    return DOES_NOT_FIT


def source_sha(args) -> int:
    try:
        with open(os.path.join(args.bundle, "source.json")) as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        return 1
    if not info.get("git_sha"):
        return 1
    print(info["git_sha"] + ("-dirty" if info.get("dirty") else ""))
    return 0


def copy_tree_command(args) -> int:
    copy_tree(args.dest)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build .gpu-bundle/ (skipped when it is up to date)")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.set_defaults(fn=build)
    for name, fn in (("install", install), ("source-sha", source_sha)):
        p = sub.add_parser(name)
        p.add_argument("--bundle", default=BUNDLE, help="bundle folder (default .gpu-bundle)")
        p.set_defaults(fn=fn)
    c = sub.add_parser("copy-tree", help="copy the files a device call sends (tracked + untracked-not-ignored) to DEST")
    c.add_argument("dest")
    c.set_defaults(fn=copy_tree_command)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
