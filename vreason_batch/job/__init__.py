"""The batch job: the plan (what is left), Ray Data stages, the result sink, the lease, metrics, the pipeline, sweeps."""
