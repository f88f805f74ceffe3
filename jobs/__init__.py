"""The job catalogue: one small file per job (config dataclass + JOB = JobSpec(...))."""
