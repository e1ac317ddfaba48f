"""``make bench``: har-edge measured against its baselines, side by side in one run.

Sections (each a module): :mod:`bench.inference`, :mod:`bench.e2e`,
:mod:`bench.delivery`, :mod:`bench.memory`, :mod:`bench.swap`; :mod:`bench.run`
runs them and prints the table. See ``bench/README.md``.
"""
