"""The cohort segmentation job (`mcs-batch segment`, jobs/segment_cohort.py).

job.py     run_job: list, scan, build the graph, drive it into the writer, the run record
graph.py   the Ray Data graph of the stages (mcs_batch.stages) with their resources
writer.py  the sink: slices back into cases, masks written, catalog rows committed
"""

from mcs_batch.pipeline.job import run_job
from mcs_batch.pipeline.writer import JobAborted, JobSummary

__all__ = ["JobAborted", "JobSummary", "run_job"]
