"""The archive side of a job: parallel listing into waves, the archive index, header probing and the
streaming grouping of objects into cases. Used by the cohort job (mcs_batch.pipeline) and `scan`.

    listing.py   top-level prefixes (driver), each listed in a Ray task into sorted waves of objects
    index.py     OUT/index: each object's key, size, version, header and case, so that a nightly run
                 reads headers only of new or changed objects
    probe.py     header probing of a block of objects (tasks), reusing indexed headers
    grouping.py  CaseGrouper: the one actor that groups DICOM headers into series, releasing a series
                 once the wave after its last file has been probed
    board.py     JobBoard: a small named actor with the job's live counters and the model actors' records
    source.py    the Ray Data graph from waves to case rows
"""
