"""Benchmarks as a product feature: ``sgl-ray bench offline`` (see :mod:`sgl_ray.bench.cli`).

>>> from sgl_ray.bench.offline import WORKLOADS
>>> WORKLOADS
('bs1', 'batch', 'shared-prefix')
"""
