"""Fixtures for model tests: a tiny random-weight BiomedCLIP folder and the model loaded from it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_biomedclip_folder(tmp_path_factory):
    """A tiny BiomedCLIP folder (open_clip local-dir layout, seed 0), written once per session."""
    from mcs_batch.models.tiny import write_tiny_biomedclip

    return write_tiny_biomedclip(tmp_path_factory.mktemp("tiny-biomedclip") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_biomedclip(tiny_biomedclip_folder):
    """The tiny BiomedCLIP, loaded once per session (eval mode, frozen). Do not mutate it."""
    from mcs_batch.models.biomedclip import load_biomedclip

    return load_biomedclip(tiny_biomedclip_folder)
