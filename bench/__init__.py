"""ptcore's benchmark suite: ``python -m bench`` (from the repo root); see bench/README.md.

Each benchmark is a module registered in :mod:`bench.registry`; every case of it runs in a fresh
subprocess (:mod:`bench.worker`) so that its peak memory is its own.
"""
