"""painnet benchmarks: speed and memory of every stage of the data flow.

Run ``python -m benchmarks`` (``--quick`` for a seconds-long smoke run); see
``benchmarks/README.md`` for what each stage measures and ``benchmarks/RESULTS.md`` for results.
Every stage runs in its own child process (``benchmarks.child``) so that its peak memory is its
own; the parent only orchestrates, prints the tables and writes ``<out>/latest.json``.
"""
