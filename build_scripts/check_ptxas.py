#!/usr/bin/env python3
"""Check the ptxas reports of the CUDA kernels: no register spills, no stack frame, every arch.

cpp/tools/ptxas_log.sh keeps each CUDA object's `-Xptxas -v` report in BUILD/ptxas/. This script
parses them, prints one row per kernel (registers per arch, shared memory, stack, spills) and
exits 1 when any kernel spills, has a stack frame, misses an arch, or a report is missing.

Usage: check_ptxas.py BUILD_DIR [--archs 80,86,89,90] [--objects beam_search,tree_pack,...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout
    pretty = {}
    for name, dem in zip(names, out.splitlines()):
        dem = dem.replace("(anonymous namespace)::", "").replace("redrafter::", "")
        dem = re.sub(r"^void ", "", dem.split("(")[0])
        pretty[name] = dem.replace("__nv_bfloat16", "bf16").replace("__half", "half")
    return pretty


def parse(log: Path) -> dict[tuple[str, int], dict]:
    """(mangled kernel, arch) -> {regs, smem, stack, spill_st, spill_ld}."""
    result: dict[tuple[str, int], dict] = {}
    current = None
    props_for = None
    for line in log.read_text(errors="replace").splitlines():
        m = ENTRY.search(line)
        if m:
            current = (m.group(1), int(m.group(2)))
            result[current] = {"regs": None, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
            continue
        m = PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = FRAME.search(line)
        if m and current and props_for == current[0]:
            rec = result[current]
            rec["stack"], rec["spill_st"], rec["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = USED.search(line)
        if m and current and result[current]["regs"] is None:
            result[current]["regs"] = int(m.group(1))
            result[current]["smem"] = int(m.group(2) or 0)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("build_dir", type=Path)
    ap.add_argument("--archs", default="80,86,89,90")
    ap.add_argument("--objects", default="beam_search,tree_pack,accept,kv_relocate")
    args = ap.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    logdir = args.build_dir / "ptxas"
    problems = []
    records: dict[tuple[str, int], dict] = {}
    for obj in args.objects.split(","):
        log = logdir / f"{obj}.cu.o.ptxas.log"
        if (logdir / f"{obj}.cu.o.ptxas.log.failed").exists() and not log.exists():
            problems.append(f"{obj}.cu failed to compile (see {log}.failed)")
        if not log.exists():
            problems.append(
                f"missing ptxas report {log}: rebuild cpp with build_scripts/build_cpp.sh"
            )
            continue
        found = parse(log)
        if not found:
            problems.append(f"no kernel in {log}")
        records.update(found)
    kernels = sorted({k for k, _ in records})
    names = demangle(kernels)
    width = max([len(names[k]) for k in kernels] + [6])
    head = (
        f"{'kernel':<{width}}  "
        + "  ".join(f"regs sm_{a}" for a in archs)
        + "  smem B  stack B  spill B"
    )
    print(head)
    print("-" * len(head))
    for k in sorted(kernels, key=lambda k: names[k]):
        regs, smem, stack, spill = [], 0, 0, 0
        for a in archs:
            rec = records.get((k, a))
            if rec is None:
                problems.append(f"{names[k]}: not compiled for sm_{a}")
                regs.append("-")
                continue
            regs.append(str(rec["regs"]))
            smem = max(smem, rec["smem"])
            stack = max(stack, rec["stack"])
            spill = max(spill, rec["spill_st"] + rec["spill_ld"])
            if rec["stack"] or rec["spill_st"] or rec["spill_ld"]:
                problems.append(
                    f"{names[k]} on sm_{a}: {rec['stack']} B stack frame, "
                    f"{rec['spill_st']} B spill stores, {rec['spill_ld']} B spill loads"
                )
        print(
            f"{names[k]:<{width}}  "
            + "  ".join(f"{r:>10}" for r in regs)
            + f"  {smem:>6}  {stack:>7}  {spill:>7}"
        )
    print(
        f"{len(kernels)} kernels x {len(archs)} archs checked; dynamic shared memory (tree_pack) is not in the "
        f"smem column"
    )
    if problems:
        print("ptxas check FAILED:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print("ptxas check passed: no spills, no stack frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
