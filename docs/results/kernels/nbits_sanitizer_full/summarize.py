"""Summary of run.sh's logs (and of reruns named <tool>_<file>_rerun<k>.log / _alone<k>.log in the same folder): per
tool and test file, tests passed / failed / not run, the sanitizer's totals, and every
report grouped by kernel (project: a name with "acttail"; cuBLAS: nvjet / gemm kernels; process: the sanitizer's notes
on the target process, e.g. "Target application returned an error", which is its exit status, not a finding) with the
tests that were running.

    python docs/results/kernels/nbits_sanitizer_full/summarize.py LOGDIR [--only memcheck_test_ops_nbits_harness] [--md]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

TEST = re.compile(r"^(tests/\S+::\S+)")
STATUS = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b\s+\[\s*\d+%\]")
FINAL = re.compile(r"^=+ (.*\b(?:passed|failed|error|errors|skipped)\b.*) in ([\d.]+)s")
ERRSUM = re.compile(r"^========= ERROR SUMMARY: (\d+) error")
RACESUM = re.compile(r"^========= RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
SHARD = re.compile(r"^== shard (\w+): (\d+) tests, exit (\d+), (\d+) s")
RACE = re.compile(r"^========= (Error|Warning): Race reported between (\w+) access at (.*?)\+0x[0-9a-f]+(?: in (\S+))?")
RACE2 = re.compile(r"^=========\s+and (\w+) access at (.*?)\+0x[0-9a-f]+(?: in (\S+))?(?: \[(\d+) hazards?\])?")
REPORT = re.compile(r"^========= (?!ERROR SUMMARY|RACECHECK SUMMARY|COMPUTE-SANITIZER|\s)(\S.*)")
NOKERNEL = "(no kernel)"
AT = re.compile(r"^=========\s+at (.*?)\+0x[0-9a-f]+(?: in (\S+))?")


def short(kernel: str) -> str:
    """Kernel name without 'void ' and without its argument list (templates kept)."""
    k = kernel.strip()
    k = k.removeprefix("void ")
    depth = 0
    for i, c in enumerate(k):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and i > 0:
            return k[:i]
    return k


def category(kernel: str) -> str:
    if kernel == NOKERNEL:
        return "process"
    if "acttail" in kernel:
        return "project"
    if re.search(r"nvjet|cublas|gemm|gemv|xmma|cutlass", kernel, re.I):
        return "cuBLAS"
    return "other"


def parse(log: Path) -> dict:
    tests, order = {}, []
    cur = None
    reports = []  # (test, kind, kernel, where, hazards)
    out = {"final": None, "errsum": None, "racesum": None, "shard": None}
    lines = []
    for raw in log.read_text(errors="replace").splitlines():
        # pytest -v prints a test's id before it runs: a sanitizer report or run.sh's end line can follow on the same line
        m = re.search(r" (=========|== shard)", raw) if raw.startswith("tests/") else None
        lines += [raw[: m.start() + 1], raw[m.start() + 1 :]] if m else [raw]
    i = 0
    while i < len(lines):
        line = lines[i]
        m = TEST.match(line)
        if m and not line.startswith("FAILED") and not line.startswith("ERROR"):
            cur = m.group(1)
            if cur not in tests:
                order.append(cur)
                tests[cur] = None
        s = STATUS.search(line)
        if s and cur is not None and tests.get(cur) is None:
            tests[cur] = s.group(1)
        if m := FINAL.match(line):
            out["final"] = (m.group(1), float(m.group(2)))
        if m := ERRSUM.match(line):
            out["errsum"] = int(m.group(1))
        if m := RACESUM.match(line):
            out["racesum"] = tuple(int(g) for g in m.groups())
        if m := SHARD.match(line):
            out["shard"] = (m.group(1),) + tuple(int(g) for g in m.groups()[1:])
        if m := RACE.match(line):
            kind, acc, k1, w1 = m.groups()
            haz, k2, w2, acc2 = 1, k1, None, "?"
            if i + 1 < len(lines) and (m2 := RACE2.match(lines[i + 1])):
                acc2, k2, w2, h = m2.groups()
                haz = int(h) if h else 1
                i += 1
            reports.append((cur, f"race {kind} ({acc}/{acc2})", short(k1), " / ".join(w for w in (w1, w2) if w), haz))
        elif (m := REPORT.match(line)) and not line.startswith("========= Error: Race"):
            what = m.group(1).strip()
            kernel, where = NOKERNEL, ""
            for j in range(i + 1, min(i + 6, len(lines))):
                if a := AT.match(lines[j]):
                    kernel, where = short(a.group(1)), a.group(2) or ""
                    break
                if not lines[j].startswith("=========  "):
                    break
            if what.startswith("Program hit"):
                kernel = "(CUDA API call)"
            reports.append((cur, what, kernel, where, 1))
        i += 1
    out["tests"] = tests
    out["order"] = order
    out["reports"] = reports
    return out


def summarize(logdir: Path, only: str | None) -> str:
    groups = defaultdict(list)
    for log in sorted(logdir.glob("*_*.log")):
        if not re.search(r"_(shard|rerun|alone)\d+\.log$", log.name):
            continue
        name = re.sub(r"_(shard|rerun|alone)\d+\.log$", "", log.name)
        if only and name != only:
            continue
        groups[name].append(log)
    lines = []
    for name, logs in groups.items():
        ids_file = logdir / f"{name}.ids"
        collected = ids_file.read_text().split() if ids_file.exists() else []
        status, reports, shards = {}, [], []
        errsum, racesum = 0, [0, 0, 0]

        def order(p: Path) -> tuple:
            m = re.search(r"_(shard|rerun|alone)(\d+)\.log$", p.name)
            return ({"shard": 0, "rerun": 1, "alone": 2}[m.group(1)], int(m.group(2)))

        for log in sorted(logs, key=order):  # shards first, then reruns: a later result replaces an unfinished one
            p = parse(log)
            for t, st in p["tests"].items():
                if st is not None or t not in status:
                    status[t] = st
            reports += p["reports"]
            errsum += p["errsum"] or 0
            if p["racesum"]:
                racesum = [a + b for a, b in zip(racesum, p["racesum"])]
            shards.append((log.name, p["shard"], p["final"], p["errsum"], p["racesum"]))
        counts = Counter(v for v in status.values() if v)
        not_run = [t for t in collected if status.get(t) is None]
        lines.append(f"## {name}")
        results = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))
        lines.append(f"collected {len(collected)}; results (last run of each test) " + results + f"; not run / unfinished {len(not_run)}")
        tool = name.split("_")[0]
        if tool == "racecheck":
            lines.append(
                f"RACECHECK SUMMARY (sum over shards that printed one): {racesum[0]} hazards displayed ({racesum[1]} errors, {racesum[2]} warnings)"
            )
        else:
            lines.append(f"ERROR SUMMARY (sum over shards that printed one): {errsum} errors")
        lines.append("")
        lines.append("| log | tests | exit | wall s | pytest | sanitizer summary |")
        lines.append("|---|---:|---:|---:|---|---|")
        for lname, sh, final, es, rs in shards:
            tests, rc, wall = (sh[1], sh[2], sh[3]) if sh else ("?", "none (stopped)", "?")
            summ = f"{rs[0]} hazards ({rs[1]} errors, {rs[2]} warnings)" if rs else f"{es} errors" if es is not None else "none printed"
            lines.append(f"| {lname} | {tests} | {rc} | {wall} | {final[0] + f' in {final[1]:.0f} s' if final else 'no final line'} | {summ} |")
        bad = [(t, s) for t, s in status.items() if s in ("FAILED", "ERROR")]
        if bad:
            lines.append("")
            lines.append("Failed: " + "; ".join(f"`{t.split('::', 1)[1]}` ({s})" for t, s in bad))
        if not_run:
            lines.append("")
            lines.append(f"Not run or unfinished ({len(not_run)}): " + ", ".join(f"`{t.split('::', 1)[1]}`" for t in not_run))
        if reports:
            agg = defaultdict(lambda: [0, 0, set(), set()])
            for test, what, kernel, where, haz in reports:
                key = (category(kernel), kernel, what)
                agg[key][0] += 1
                agg[key][1] += haz
                if where:
                    agg[key][2].add(where)
                agg[key][3].add(test.split("::", 1)[1] if test else "(before the first test)")
            lines.append("")
            lines.append("| kind | kernel | report | reports | hazards | source | tests |")
            lines.append("|---|---|---|---:|---:|---|---|")
            for (cat, kernel, what), (nrep, nhaz, where, tests) in sorted(agg.items()):
                t = sorted(tests)
                tl = ", ".join(t[:4]) + (f" and {len(t) - 4} more" if len(t) > 4 else "")
                haz = nhaz if what.startswith("race") else "-"
                lines.append(f"| {cat} | `{kernel}` | {what} | {nrep} | {haz} | {', '.join(sorted(where)) or '-'} | {tl} |")
        else:
            lines.append("")
            lines.append("No sanitizer report in any shard.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("logdir", type=Path)
    ap.add_argument("--only")
    a = ap.parse_args()
    print(summarize(a.logdir, a.only))
