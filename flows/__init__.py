"""The application layer of vq-pipeline, imported as ``vq_flows``: the ``vq`` command, the Prefect
flows, the Dask cluster lifecycle and deployments.

Every entry point here runs in a process that computes, so the runtime policy is applied once, here,
before any module loads torch: the OpenMP wait policy (:func:`vq_pipeline.runtime.apply_omp_waits`).
The library itself (``import vq_pipeline``) changes nothing in the environment.
"""

from vq_pipeline.runtime import apply_omp_waits

apply_omp_waits()
