"""Ingest: storage access, discovery, and readers for DICOM, NIfTI and 2D images."""
