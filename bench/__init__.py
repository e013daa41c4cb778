"""ptcore's benchmark suite: ``ptcore bench`` (or ``python -m bench`` in a checkout); see
bench/README.md. Installed with the package as ``ptcore.bench``.

Each benchmark is declared in its module and listed in :mod:`.registry`; every case runs in a fresh
forked process (:mod:`.worker`) so that its peak memory is its own.
"""
