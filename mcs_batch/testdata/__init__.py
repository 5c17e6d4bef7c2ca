"""Test and demo data made in code or from files the pinned packages ship: the sample archive
(`sample.py`), synthetic DICOM series with known geometry (`series.py`) and image-caption pairs
(`pairs.py`). Nothing in the library below this package imports it."""
