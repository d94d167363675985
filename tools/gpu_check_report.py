"""Checks of what tools/gpu_check.sh returns, against the device call's limits and the results
format (CI runs it through `tools/gpu_check.sh --rehearse`).

    python tools/gpu_check_report.py files OUT [--rehearsal] [--budget S --elapsed S]

OUT is the folder whose contents come back ($OUT on the GPU machine): at most 8 files, at most
2 folders down, names of letters, digits, '.', '_' and '-', each file <= 16 MiB, 64 MiB together;
summary.txt names every step; the results JSON has the benchmarks format (device, versions, git
SHA, tests {passed, failed}, rows with bandwidth_fraction, speedup_vs_compile, paper_scale); the
junit XML parses. --rehearsal adds what a rehearsal must show: the torch 2.11 venv, the bundle
loaded, rows present, the run inside its budget. Exit 1 with one line per problem.
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

MAX_FILES = 8
MAX_FOLDERS_DOWN = 2
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
STEPS = ("bundle", "smoke", "pytest", "sanitizer", "bench", "ncu")
JSON_KEYS = ("device", "torch", "triton", "cuda", "git_sha", "date", "rows", "skipped", "copy_bandwidth_gbps")
ROW_KEYS = ("op", "shape", "dtype", "pass", "provider", "ms", "gbps", "bandwidth_fraction", "speedup_vs_eager",
            "speedup_vs_compile", "paper_scale")


def check_files(out: str, rehearsal: bool = False, budget: float | None = None, elapsed: float | None = None) -> list:
    problems = []
    files = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel_dir = os.path.relpath(dirpath, out)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        for part in parts:
            if not NAME.match(part):
                problems.append(f"folder name {part!r} has characters other than letters, digits, '.', '_', '-'")
        if len(parts) > MAX_FOLDERS_DOWN and filenames:
            problems.append(f"{rel_dir}: more than {MAX_FOLDERS_DOWN} folders down (would not come back)")
        for name in filenames:
            path = os.path.join(dirpath, name)
            files.append(path)
            if not NAME.match(name):
                problems.append(f"file name {name!r} has characters other than letters, digits, '.', '_', '-'")
            if os.path.islink(path) or not os.path.isfile(path):
                problems.append(f"{name}: not a plain file")
            elif os.path.getsize(path) > MAX_FILE_BYTES:
                problems.append(f"{name}: {os.path.getsize(path) / 2**20:.1f} MiB, over {MAX_FILE_BYTES // 2**20} MiB")
    total = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, at most {MAX_FILES} come back: " + ", ".join(sorted(os.path.basename(f) for f in files)))
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all, over {MAX_TOTAL_BYTES // 2**20} MiB")

    by_name = {}
    for f in files:
        by_name.setdefault(os.path.basename(f), []).append(f)
    summary = _one(by_name, "summary.txt", problems)
    if summary:
        text = open(summary, errors="replace").read()
        for step in STEPS:
            if not re.search(rf"^{step}( |:)", text, re.M):
                problems.append(f"summary.txt says nothing of step {step}")
        if "gpu_check:" not in text:
            problems.append("summary.txt has no closing 'gpu_check:' line (the run did not finish)")
        if rehearsal and "gpu bundle: loaded" not in text:
            problems.append("summary.txt: the prebuilt bundle was not loaded (run `make gpu-bundle` first)")
    results = [f for f in files if f.endswith(".json")]
    if len(results) != 1:
        problems.append(f"{len(results)} results JSON files, expected 1")
    else:
        problems += check_results(results[0], rehearsal)
    junit = _one(by_name, "junit.xml", problems)
    if junit:
        try:
            ET.parse(junit)
        except ET.ParseError as exc:
            problems.append(f"junit.xml does not parse: {exc}")
    if rehearsal and budget is not None and elapsed is not None and elapsed > budget:
        problems.append(f"the run took {elapsed:g} s, over its {budget:g} s budget")
    if not problems:
        print(f"gpu_check files: ok ({len(files)} files, {total / 2**20:.2f} MiB, in {out})")
    return problems


def _one(by_name: dict, name: str, problems: list) -> str | None:
    found = by_name.get(name, [])
    if len(found) != 1:
        problems.append(f"{len(found)} files named {name}, expected 1")
        return None
    return found[0]


def check_results(path: str, rehearsal: bool) -> list:
    name = os.path.basename(path)
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        return [f"{name} does not parse: {exc}"]
    problems = [f"{name}: no {key!r}" for key in JSON_KEYS if key not in doc]
    if not doc.get("git_sha"):
        problems.append(f"{name}: git_sha is empty (no .git and no .gpu-bundle/source.json?)")
    tests = doc.get("tests")
    if not isinstance(tests, dict) or not {"passed", "failed"} <= set(tests):
        problems.append(f"{name}: no tests {{passed, failed}} (was the junit XML passed to the benchmarks?)")
    for i, row in enumerate(doc.get("rows", [])):
        missing = [k for k in ROW_KEYS if k not in row and not (row.get("kind") == "model" and k == "bandwidth_fraction")]
        if missing:
            problems.append(f"{name}: row {i} ({row.get('op')} {row.get('provider')}) lacks {', '.join(missing)}")
            break
    if rehearsal:
        if not str(doc.get("torch", "")).startswith("2.11."):
            problems.append(f"{name}: torch {doc.get('torch')}, the rehearsal runs on the GPU image's torch 2.11")
        if not doc.get("rows"):
            problems.append(f"{name}: no rows")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("files", help="check the folder that comes back from a run")
    f.add_argument("out")
    f.add_argument("--rehearsal", action="store_true")
    f.add_argument("--budget", type=float)
    f.add_argument("--elapsed", type=float)
    args = parser.parse_args(argv)
    problems = check_files(args.out, args.rehearsal, args.budget, args.elapsed)
    for p in problems:
        print(f"gpu_check files: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
