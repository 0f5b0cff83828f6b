"""viq's benchmarks, run from the repository root as modules: ``python -m bench.<name> ...``
(records in ``bench/results/``, tables in ``docs/benchmarks.md``)."""
