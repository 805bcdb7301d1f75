"""Job entrypoint for `ray job submit`: a thin wrapper over `memshard sweep` (same arguments).

    ray job submit --working-dir . -- python jobs/sweep.py ARGS...

Outputs go to the run / sweep directory given in the arguments (local path or s3://), never
to the job's working directory, which Ray deletes with the job.
"""

from _entry import run

if __name__ == "__main__":
    run("sweep")
