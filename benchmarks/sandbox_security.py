"""The code sandbox on hostile programs and on HumanEval → reports/security/sandbox.json.

    python -m benchmarks.sandbox_security

Every hostile program (tests/sandbox_cases.py) is judged in both test shapes between correct
neighbours while the host is watched (files outside, processes left, a bystander process, a listener
on loopback, a secret in the environment): contained when the host was untouched, the neighbours
passed and the program earned no reward. HumanEval's 164 canonical solutions must pass and a broken
variant of each must fail, through the same path the code reward uses; their per-item times give
`median_item_seconds` (sandbox start, program, tests; the replay process's start is shared by a chunk).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bayes_llm.io import write_json
from bayes_llm.rewards import sandbox
from bayes_llm.rewards.code import check_solutions
from tests.sandbox_cases import CASES, CORRECT, TESTS_HUMANEVAL, TESTS_PROJECT, human_eval_pairs, watched_host

REPORT = Path("reports/security/sandbox.json")


def hostile() -> dict:
    results = {}
    for name, (program, kind) in CASES.items():
        pairs = [(CORRECT, TESTS_PROJECT), (program, TESTS_PROJECT), (CORRECT, TESTS_PROJECT),
                 (CORRECT, TESTS_HUMANEVAL), (program, TESTS_HUMANEVAL), (CORRECT, TESTS_HUMANEVAL)]  # fmt: skip
        with watched_host() as violations:
            verdicts = check_solutions(pairs, item_seconds=1.0, progress=False, reuse=False)
        rewarded = verdicts[1] is None or verdicts[4] is None
        neighbours = all(verdicts[i] is None for i in (0, 2, 3, 5))
        results[name] = {"kind": kind, "rewarded": rewarded, "neighbours_passed": neighbours,
                         "host_violations": violations, "verdicts": [verdicts[1], verdicts[4]]}  # fmt: skip
        print(f"{name:<40} {'REWARDED' if rewarded else 'no reward'}  {violations or 'contained'}", flush=True)
    return results


def human_eval() -> dict:
    canonical, broken = human_eval_pairs()
    timings: list[float] = []
    started = time.perf_counter()
    passed = check_solutions(canonical, progress=False, timings=timings, reuse=False)
    wall = time.perf_counter() - started
    failed = check_solutions(broken, progress=False, reuse=False)
    return {
        "total": len(canonical),
        "canonical_pass": sum(v is None for v in passed),
        "broken_fail": sum(v is not None for v in failed),
        "median_item_seconds": round(statistics.median(timings), 4),
        "wall_seconds_per_item": round(wall / len(canonical), 4),
        "canonical_failures": {i: v for i, v in enumerate(passed) if v is not None},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sandbox_security", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    isolation = sandbox.require()
    cases = hostile()
    contained = [n for n, r in cases.items()
                 if not r["rewarded"] and r["neighbours_passed"] and not r["host_violations"]]  # fmt: skip
    hacks = {n: r for n, r in cases.items() if r["kind"] == "hack"}
    he = human_eval()
    report = {
        "hostile_total": len(cases),
        "hostile_contained": len(contained),
        "reward_hacks_total": len(hacks),
        "reward_hacks_rewarded": sum(r["rewarded"] for r in hacks.values()),
        "humaneval_total": he["total"],
        "humaneval_canonical_pass": he["canonical_pass"],
        "humaneval_broken_fail": he["broken_fail"],
        "median_item_seconds": he["median_item_seconds"],
        "wall_seconds_per_item": he["wall_seconds_per_item"],
        "layers": isolation.layers,
        "layers_missing": list(isolation.notes),
        "not_contained": sorted(set(cases) - set(contained)),
        "cases": cases,
    }
    write_json(args.out, report)
    print({k: v for k, v in report.items() if k != "cases"})
    return 0 if len(contained) == len(cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
