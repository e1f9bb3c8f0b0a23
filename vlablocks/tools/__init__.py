"""Tools around the library: benchmarks, run reports and the docs generators."""
