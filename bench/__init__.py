"""Benchmarks: each measures the product against a raw baseline measured in the same run.

    python -m bench.ingest    # HTTP ingest, end to end, vs plain sqlite3 executemany
    python -m bench.rollup    # the rollup job vs a plain GROUP BY over the same rows

See docs/benchmarks.md.
"""
