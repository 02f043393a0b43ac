"""The machinery of the ICP metrics (:mod:`v2m_bench.metrics.icp` holds the definition and the API).

A private package, one unit: its modules share names freely, nothing outside
``v2m_bench.metrics`` imports them.

- :mod:`.plan`: the topology work (walk graph, iteration vertices, breadth-first score order, part
  layouts), once per triangles + regions.
- :mod:`.algebra`: the small float64 algebra (elementwise 3x3 products, the fixed-order row sum,
  the closed-form fit, Rodrigues).
- :mod:`.walk`: the numpy path's per-reference tables, the array backends (numpy, torch) and the
  greedy nearest-vertex walk.
- :mod:`.search`: the exhaustive nearest-vertex searches (scipy k-d trees or the compiled grids)
  and the choice of engine.
- :mod:`.numpy_engine`: the ICP iterations and the score of the numpy path.
- :mod:`.compiled_engine`: the same steps through the compiled kernels.
- :mod:`.driver`: chunks of references, the one chunk procedure both engines run, the results.
- :mod:`.kernels` (with :mod:`.grid_kernels` and :mod:`.score_kernels`): the numba kernels,
  imported only by :mod:`.search` inside the function that picks the engine, so
  ``import v2m_bench.metrics`` needs no numba.
"""
