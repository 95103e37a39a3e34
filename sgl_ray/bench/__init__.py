"""Benchmarks as a product feature (see :mod:`sgl_ray.bench.cli`):

- ``sgl-ray bench offline``: the in-process engine side by side with transformers ``generate``;
- ``sgl-ray bench serving``: TTFT/ITL/TPOT/E2E percentiles and throughput against any OpenAI-compatible server
  (or sgl_ray's native ``/generate``), random or shared-prefix datasets, JSONL records and a PNG plot.

>>> from sgl_ray.bench.offline import WORKLOADS
>>> WORKLOADS
('bs1', 'batch', 'shared-prefix')
"""
