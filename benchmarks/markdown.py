"""Markdown tables of a benchmark report: ``python -m benchmarks.markdown [latest.json]``.

Prints the machine, the command, the measurements and the targets of a report written by the
runner, ready to paste into ``benchmarks/RESULTS.md`` (so the numbers there are not retyped).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    value = float(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.{max(digits - 1, 1)}f}"
    return f"{value:.{digits}g}"


def machine_lines(report: dict[str, Any]) -> list[str]:
    m = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    load0 = ", ".join(f"{x:.2f}" for x in m.get("load_average_start") or [])
    load1 = ", ".join(f"{x:.2f}" for x in m.get("load_average_end") or [])
    return [
        f"- command: `{report['command']}`",
        f"- date: {report['date_utc']} (UTC); total wall time {report['total_wall_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable), "
        f"{m['ram_gb']} GB RAM, GPU: {m['gpu'] or 'none'}; {m['platform']}, Python {m['python']}",
        f"- load average (1, 5, 15 min): {load0} at start, {load1} at end",
        f"- thread settings: {m.get('thread_env')}",
        f"- versions: {versions}",
    ]


def measurement_table(report: dict[str, Any]) -> list[str]:
    rows = [
        "| stage | measurement | best s | median s | N | peak MiB | rate (best) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for stage, res in report["stages"].items():
        if "error" in res:
            rows.append(f"| {stage} | ERROR: {res['error']} | | | | | |")
            continue
        for m in res["measurements"]:
            rate = f"{m['rate']:,.0f} {m['rate_unit']}" if m.get("rate") else ""
            rows.append(
                f"| {stage} | {m['name']} | {_num(m['best_s'])} | {_num(m['median_s'])} | "
                f"{m['n_repeats']} | {_num(m.get('peak_mem_mb'), 2)} | {rate} |"
            )
    return rows


def target_table(report: dict[str, Any]) -> list[str]:
    rows = [
        "| stage | target | measured | goal | ratio | result | goal set by |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for stage, res in report["stages"].items():
        for t in res.get("targets", []):
            goal = f"{'≤' if t['kind'] == 'max' else '≥'} {_num(t['goal'])} {t['unit']}"
            verdict = {True: "**pass**", False: "**miss**"}.get(t["passed"], "n/a")
            rows.append(
                f"| {stage} | {t['name']} | {_num(t['measured'])} | {goal} | "
                f"{_num(t['ratio'])} | {verdict} | {t['source'].split(' (')[0]} |"
            )
    return rows


def render(report: dict[str, Any]) -> str:
    lines = [*machine_lines(report), "", *measurement_table(report), "", *target_table(report)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else REPO_ROOT / "benchmarks" / "results" / "latest.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no benchmark report (run python -m benchmarks first)")
    sys.stdout.write(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
