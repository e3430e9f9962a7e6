"""Entrypoint for `ray job submit --working-dir . -- python jobs/vreason_job.py CONFIG [--set k=v ...] [--overwrite]`.

Thin on purpose: parse, validate (fail fast, exit 2), run. The same job as `vreason-batch run`.
"""

import sys

from vreason_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
