"""Benchmarks: scripts (``python bench/NAME.py``) and the modules they share; nothing here ships in the wheel.

``noodle bench ...`` runs them from a source checkout (see :func:`noodle.cli.bench.bench_module`);
tests import the instance generators from :mod:`bench.generate`.
"""
