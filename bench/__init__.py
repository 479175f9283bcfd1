"""Benchmarks. ``python -P bench/suite.py`` runs every scenario in one run (see bench/README
section in the top-level README); ``stream_bench.py``, ``ort_options.py`` and ``soak.py`` are
narrower tools."""
