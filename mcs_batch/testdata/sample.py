"""A small real sample archive, assembled from files that the pinned packages ship.

ct_series/      a real multi-file CT series (pydicom's DICOMDIR test series, 5 slices)
phantom_ct/     a synthetic CT series with known geometry (shuffled file names)
chest_cr/       a real chest radiograph (CR, MONOCHROME1, JPEG 2000 lossless; pydicom-data)
ultrasound/     a real ultrasound image (RGB, JPEG 2000; pydicom-data)
mr/             a real multi-frame MR object (pydicom-data)
nifti/          a real NIfTI-1 volume (nibabel's test data)
png/            a PNG made from the ultrasound frame (the public benchmarks ship PNG)
broken/         a truncated DICOM, a shifted-bytes file, an RT structure set, a text file,
                a truncated PNG: each must end in the manifest as failed or skipped
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
from PIL import Image

from mcs_batch.testdata.series import write_series


def _pydicom_file(name: str) -> Path:
    return Path(pydicom.__file__).parent / "data" / "test_files" / name


def _pydicom_data_file(name: str) -> Path:
    import data_store  # the pydicom-data package

    return Path(data_store.__file__).parent / "data" / name


def build_sample_archive(dest: Path) -> Path:
    """Write the sample archive under `dest` (replacing what is there); returns `dest`."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "ct_series").mkdir(parents=True)
    for f in sorted(_pydicom_file("dicomdirtests/98892001/CT5N").iterdir()):
        shutil.copy(f, dest / "ct_series" / f"IM{f.name}")
    write_series(dest / "phantom_ct", rows=64, cols=64, n_slices=16, pixel_spacing=(0.8, 0.8), slice_spacing=2.0)
    for folder, source in [
        ("chest_cr", _pydicom_data_file("RG1_J2KR.dcm")),
        ("ultrasound", _pydicom_data_file("US1_J2KR.dcm")),
        ("mr", _pydicom_data_file("emri_small.dcm")),
        ("nifti", Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"),
    ]:
        (dest / folder).mkdir()
        shutil.copy(source, dest / folder / source.name)
    (dest / "png").mkdir()
    frame = pydicom.dcmread(_pydicom_data_file("US1_J2KR.dcm")).pixel_array  # RGB [480, 640, 3]
    gray = np.asarray(Image.fromarray(frame).convert("L"))
    Image.fromarray(gray).save(dest / "png" / "us_frame.png")
    broken = dest / "broken"
    broken.mkdir()
    shutil.copy(_pydicom_file("MR_truncated.dcm"), broken / "MR_truncated.dcm")
    shutil.copy(_pydicom_file("no_meta.dcm"), broken / "shifted_bytes.dcm")
    shutil.copy(_pydicom_file("rtstruct.dcm"), broken / "rtstruct.dcm")
    (broken / "README.txt").write_text("Files in this folder are broken or are not images, on purpose.\n")
    png = (dest / "png" / "us_frame.png").read_bytes()
    (broken / "truncated.png").write_bytes(png[: len(png) // 3])
    return dest
