"""A header fuzzer: mutated real DICOM, NIfTI and PNG headers through the job's scan and load stages.

Every example runs the stage functions the job runs (probe -> grouper -> plan -> load, see
stage_harness.py) on a folder holding a small synthetic series with mutated slices and one mutated
file of pydicom's corpus (or a mutated NIfTI / PNG). No input may make a stage raise, lose an object
or count it twice, produce an `internal_error`, or give an ok row a non-finite or degenerate geometry.
Examples are derandomized (the same inputs in every CI run); `python -m tests.io.fuzz_survey N` runs N
random examples of each and counts the distinct findings instead of stopping at the first.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcs_batch.testdata.series import write_series
from tests.io.header_mutations import (
    TRANSFER_SYNTAXES,
    dicom_corpus,
    dicom_mutation,
    mutate_dicom,
    mutate_nifti,
    nifti_corpus,
    nifti_mutation,
    png_with_size,
    truncation,
)
from tests.io.stage_harness import run_stages

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@functools.cache
def series_bytes() -> tuple[bytes, ...]:
    """A 4-slice synthetic CT series, as file contents (written once)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_series(Path(tmp) / "s", rows=16, cols=12, n_slices=4, series_seed="fuzz")
        return tuple(p.read_bytes() for p in paths)


@functools.cache
def corpus_bytes(name: str) -> bytes:
    return Path(name).read_bytes()


@st.composite
def dicom_archive(draw) -> dict[str, bytes]:
    """{file name: bytes}: the series with some slices mutated, and one mutated corpus file."""
    files = {}
    for i, data in enumerate(series_bytes()):
        if draw(st.integers(0, 3)) == 0:
            data = mutate_dicom(data, draw(st.lists(dicom_mutation(), min_size=1, max_size=3)), None)
        files[f"series/slice{i}.dcm"] = data
    source = draw(st.sampled_from([str(p) for p in dicom_corpus()]))
    data = corpus_bytes(source)
    mutations = draw(st.lists(dicom_mutation(), max_size=4))
    syntax = draw(st.one_of(st.none(), st.none(), st.sampled_from(TRANSFER_SYNTAXES)))
    if mutations or syntax is not None:
        with contextlib.suppress(Exception):  # a corpus file pydicom cannot re-encode goes in as it is
            data = mutate_dicom(data, mutations, syntax)
    cut = draw(truncation(len(data)))
    files["corpus/" + Path(source).name] = data if cut is None else data[:cut]
    return files


def run_archive(files: dict[str, bytes], *, load: bool = True) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "archive"
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        return run_stages(folder, load=load).findings()


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(files=dicom_archive())
def test_mutated_dicom_headers_never_escape_a_stage(files):
    assert run_archive(files) == []


@st.composite
def nifti_file(draw) -> dict[str, bytes]:
    source = draw(st.sampled_from([str(p) for p in nifti_corpus()]))
    data = mutate_nifti(corpus_bytes(source), draw(st.lists(nifti_mutation(), min_size=1, max_size=4)),
                        draw(st.sampled_from([None, True, False])))  # fmt: skip
    cut = draw(truncation(len(data)))
    return {"nifti/" + Path(source).name: data if cut is None else data[:cut]}


@pytest.mark.filterwarnings("ignore")
@settings(FUZZ, max_examples=100)
@given(files=nifti_file())
def test_mutated_nifti_headers_never_escape_a_stage(files):
    assert run_archive(files) == []


@functools.cache
def small_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray((np.arange(24 * 16).reshape(16, 24) % 256).astype("uint8")).save(out, format="PNG")
    return out.getvalue()


SIZES = st.one_of(st.sampled_from([0, 1, 16, 24, 20000, 30000, 2**31 - 1]), st.integers(0, 2**31 - 1))


@st.composite
def png_file(draw) -> dict[str, bytes]:
    """A real PNG whose header claims any size (the pixels stay 24 x 16), maybe truncated."""
    data = png_with_size(small_png(), draw(SIZES), draw(SIZES))
    cut = draw(truncation(len(data)))
    return {"images/a.png": data if cut is None else data[:cut]}


@pytest.mark.filterwarnings("ignore")
@settings(FUZZ, max_examples=40)
@given(files=png_file())
def test_png_headers_claiming_any_size_never_escape_a_stage(files):
    assert run_archive(files) == []
