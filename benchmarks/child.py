"""Child-process entry point: ``python -m benchmarks.child <task> '<json params>'``.

Each task imports only what it needs, runs, and prints one ``BENCHMARK-RESULT <json>`` line
(see :func:`benchmarks.common.run_child`).
"""

from __future__ import annotations

import importlib
import json
import sys

from benchmarks.common import emit_result

# task name -> (module, function) taking the params dict and returning a JSON-able dict
TASKS = {
    "extract": ("benchmarks.stage_extract", "child_extract"),
    "windows": ("benchmarks.stage_windows", "child_windows"),
    "train": ("benchmarks.stage_train", "child_train"),
    "edge": ("benchmarks.stage_edge", "child_edge"),
    "evaluation": ("benchmarks.stage_evaluation", "child_evaluation"),
    "lab": ("benchmarks.stage_lab", "child_lab"),
    "realtime": ("benchmarks.stage_realtime", "child_realtime"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in TASKS:
        raise SystemExit(f"usage: python -m benchmarks.child {{{','.join(TASKS)}}} '<json>'")
    module, function = TASKS[argv[0]]
    run = getattr(importlib.import_module(module), function)
    emit_result(run(json.loads(argv[1])))


if __name__ == "__main__":
    main()
