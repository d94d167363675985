"""Line and branch coverage of csrc/ops/cuda under the emulator (gcov), as a Markdown summary.

    APKERNELS_CUDA_EMULATION=1 APKERNELS_EMULATION_COVERAGE=1 python setup.py build_ext --inplace
    python -m pytest tests -k "cuda-cpu or cuda_emulation"      # writes the .gcda files
    python csrc/emulation/coverage_report.py OBJECT_DIR          # the directory of wrap_*.o

Per __global__ kernel (all template instances together): lines executed / lines, branch
outcomes taken / outcomes; then, per kernel, the lines with a branch outcome never taken; then
every line of the CUDA sources that never ran.
"""
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "ops", "cuda")


def gcov_json(object_dir):
    out, object_dir = [], os.path.abspath(object_dir)  # gcov runs in a temporary directory
    with tempfile.TemporaryDirectory() as tmp:
        # The mutant TUs too: the linker keeps one copy of each inline device helper (helpers.cuh),
        # possibly theirs, and its counts land in their .gcda.
        gcdas = [p for pattern in ("wrap_*.gcda", "mutant_*.gcda")
                 for p in glob.glob(os.path.join(object_dir, "**", pattern), recursive=True)]
        for gcda in sorted(gcdas):
            subprocess.run(["gcov", "-b", "-j", "-o", os.path.dirname(gcda), gcda], cwd=tmp, check=True,
                           capture_output=True)
        for path in sorted(glob.glob(os.path.join(tmp, "*.gcov.json.gz"))):
            with gzip.open(path) as fh:
                out.append(json.load(fh))
    return out


def kernels_by_line():
    """(file, line) ranges of each __global__ function's body, from the sources."""
    ranges = {}
    for path in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            if "__global__" not in line:
                continue
            head = re.sub(r"__launch_bounds__\([^)]*\)", " ", " ".join(lines[i:i + 4]))
            name = re.search(r"void\s+(\w+)\s*\(", head).group(1)
            depth, start, end = 0, None, None
            for j in range(i, len(lines)):
                for ch in lines[j]:
                    if ch == "{":
                        depth += 1
                        start = j if start is None else start
                    elif ch == "}":
                        depth -= 1
                if start is not None and depth == 0:
                    end = j
                    break
            ranges[name] = (os.path.basename(path), i + 1, end + 1)
    return ranges


def main(object_dir):
    lines = collections.defaultdict(lambda: [0, 0, 0])  # (file, line) -> [count, branches, taken]
    for report in gcov_json(object_dir):
        for f in report["files"]:
            name = os.path.basename(f["file"])
            if not os.path.abspath(os.path.join(ROOT, f["file"])).startswith(CUDA_DIR) and not f["file"].startswith(
                    "csrc/ops/cuda"):
                if not os.path.exists(os.path.join(CUDA_DIR, name)):
                    continue
            for ln in f["lines"]:
                entry = lines[(name, ln["line_number"])]
                entry[0] += ln["count"]
                branches = [b for b in ln["branches"] if not b["throw"]]  # not the exception edges of calls
                entry[1] = max(entry[1], len(branches))
                entry[2] = max(entry[2], sum(1 for b in branches if b["count"] > 0))
    print("| kernel | file | lines run | branch outcomes taken |")
    print("| --- | --- | --- | --- |")
    for kernel, (fname, first, last) in sorted(kernels_by_line().items()):
        keys = [(fname, n) for n in range(first, last + 1) if (fname, n) in lines]
        run = sum(1 for k in keys if lines[k][0] > 0)
        branches = sum(lines[k][1] for k in keys)
        taken = sum(lines[k][2] for k in keys)
        print(f"| `{kernel}` | {fname}:{first} | {run}/{len(keys)} | {taken}/{branches} |")
    print("\nBranch outcomes not taken, per kernel (line: outcomes taken / outcomes, best template instance):")
    for kernel, (fname, first, last) in sorted(kernels_by_line().items()):
        partial = [n for n in range(first, last + 1) if (fname, n) in lines and lines[(fname, n)][2] < lines[(fname, n)][1]]
        if partial:
            print(f"- `{kernel}`:")
        source = open(os.path.join(CUDA_DIR, fname)).read().splitlines()
        for n in partial:
            print(f"  - {fname}:{n} ({lines[(fname, n)][2]}/{lines[(fname, n)][1]}): `{source[n - 1].strip()[:100]}`")
    never = sorted(k for k, v in lines.items() if v[0] == 0)
    print(f"\nLines of csrc/ops/cuda never executed ({len(never)}):")
    for fname, n in never:
        text = open(os.path.join(CUDA_DIR, fname)).read().splitlines()[n - 1].strip()
        print(f"- {fname}:{n}: `{text[:100]}`")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
