"""Output writers: Parquet catalog, NIfTI masks, QC overlays."""
