"""Group DICOM headers into cases: series of slices, multi-frame objects, 2D images, skips.

Within a series, slices are sorted by position along the slice normal; a series that mixes
orientations or image sizes is split into consistent parts; localizers are split off and skipped;
duplicate positions and gaps are detected (see geometry.layout_slices). Duplicate positions that the
acquisition / echo / temporal indices separate make one volume each; a part that still forms no
regular volume becomes one 2D case per image (warning `fallback_2d`), never a failure of decodable
images.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from mcs_batch.errors import CaseError, ErrorCode
from mcs_batch.io.dicom_header import DicomHeader, non_image_reason
from mcs_batch.io.geometry import (
    affine_from_dicom,
    check_affine,
    dicom_geometry_problem,
    layout_slices,
    positive,
    slice_normal,
)
from mcs_batch.records import SPACING_ASSUMED, CaseKind, CaseRecord, Status, make_case_id

# Projection and photographic modalities: each object is its own 2D case even when positioned.
PROJECTION_MODALITIES = {"CR", "DX", "MG", "XA", "RF", "IO", "PX", "US", "OP", "XC", "SM", "ES", "GM", "OT"}
_LOCALIZER_MAX_SLICES = 3  # a small differently oriented part of a series is a scout / localizer
# A series part that cannot form a regular volume (slices unevenly spread, two images at one position
# that no acquisition / echo / temporal index separates) loses nothing: its images become 2D cases,
# each row warning with FALLBACK_2D first.
IMAGES_INSTEAD = (ErrorCode.INCONSISTENT_SERIES, ErrorCode.DUPLICATE_POSITION)
FALLBACK_2D = "fallback_2d"


def _is_projection(h: DicomHeader) -> bool:
    """Radiographs, ultrasound, photos and derived projections (MIPs) are 2D images, never slices."""
    return h.modality.upper() in PROJECTION_MODALITIES or any("PROJECTION" in t.upper() for t in h.image_type)


def _base_fields(h: DicomHeader) -> dict:
    return {
        "modality": h.modality,
        "study_uid": h.study_uid,
        "series_uid": h.series_uid,
        "transfer_syntax": h.transfer_syntax,
        "photometric": h.photometric,
    }


def _geometry_fields(shape, affine: np.ndarray, name: str) -> dict:
    """shape, spacing and affine of a record; CaseError(bad_geometry) for an affine no reader could use
    (a last guard: the headers' values were checked before, dicom_geometry_problem)."""
    check_affine(affine, name=name)
    return {
        "shape": [int(s) for s in shape],
        "spacing_mm": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "affine": [float(v) for v in affine.reshape(-1)],
    }


def _spacing_warnings(h: DicomHeader) -> list[str]:
    """Nothing, or the warning that marks a record without physical pixel size (records.spacing_known)."""
    return [] if h.pixel_spacing else [f"no pixel spacing in the header: {SPACING_ASSUMED}"]


def _single_object_record(h: DicomHeader, identity: str, kind: CaseKind, **extra) -> CaseRecord:
    return CaseRecord(
        case_id=make_case_id(identity),
        kind=kind,
        source_uris=[h.uri],
        source_keys=[h.rel],
        bytes_read=h.bytes_read,
        **_base_fields(h),
        **extra,
    )


def _skip_or_fail(h: DicomHeader, kind: CaseKind, status: Status, code: ErrorCode, message: str) -> CaseRecord:
    identity = f"dicom-object:{h.sop_instance_uid}" if h.sop_instance_uid else f"file:{h.rel}"
    return _single_object_record(h, identity, kind, status=status, error_code=code, error_message=message)


def _image_record(h: DicomHeader, warnings: list[str] = ()) -> CaseRecord:
    """A 2D DICOM image (one frame) as a case of K = 1."""
    thickness = positive(h.slice_thickness) or 1.0
    affine = affine_from_dicom(h.orientation, h.pixel_spacing, h.position, None, slice_spacing=thickness)
    warnings = list(warnings) + _spacing_warnings(h)
    return _single_object_record(
        h,
        f"dicom-image:{h.sop_instance_uid or h.rel}",
        CaseKind.DICOM_IMAGE,
        **_geometry_fields((h.columns, h.rows, 1), affine, h.uri),
        warnings=warnings,
    )


def _multiframe_record(h: DicomHeader) -> CaseRecord:
    """One multi-frame object; frames positioned in space become slices of a volume."""
    identity = f"dicom-multiframe:{h.sop_instance_uid or h.rel}"
    warnings = _spacing_warnings(h)
    slice_index = list(range(h.frames))
    thickness = positive(h.slice_thickness) or 1.0
    origin, step = h.position, None
    if h.frame_positions and h.orientation and len(h.frame_positions) == h.frames:
        layout = layout_slices(h.frame_positions, h.orientation, fallback_spacing=thickness, name=h.uri)
        if layout.n_slices != h.frames:
            raise CaseError(f"{h.uri}: frames leave gaps along the normal", code=ErrorCode.INCONSISTENT_SERIES)
        slice_index = [0] * h.frames
        for k, i in zip(layout.k_index, layout.order, strict=True):
            slice_index[i] = k
        origin, step = layout.origin_lps, layout.step_lps
        warnings += layout.warnings
    else:
        warnings.append("frames without patient positions: k is the frame number")
    affine = affine_from_dicom(h.orientation, h.pixel_spacing, origin, step, slice_spacing=thickness)
    return _single_object_record(
        h,
        identity,
        CaseKind.DICOM_MULTIFRAME,
        **_geometry_fields((h.columns, h.rows, h.frames), affine, h.uri),
        slice_index=slice_index,
        warnings=warnings,
    )


def _signature(h: DicomHeader) -> tuple:
    """What must agree between the slices of one volume."""
    return (
        h.rows,
        h.columns,
        h.samples_per_pixel,
        tuple(np.round(h.orientation, 4).tolist()) if h.orientation else None,
        tuple(np.round(h.pixel_spacing, 4).tolist()) if h.pixel_spacing else None,
    )


def _series_record(slices: list[DicomHeader], identity: str, warnings: list[str]) -> CaseRecord:
    first = slices[0]
    thickness = positive(first.spacing_between_slices) or positive(first.slice_thickness) or 1.0
    layout = layout_slices(
        [h.position for h in slices], first.orientation, fallback_spacing=thickness, name=f"series {identity}"
    )
    ordered = [slices[i] for i in layout.order]
    affine = affine_from_dicom(first.orientation, first.pixel_spacing, layout.origin_lps, layout.step_lps)
    return CaseRecord(
        case_id=make_case_id(identity),
        kind=CaseKind.DICOM_SERIES,
        source_uris=[h.uri for h in ordered],
        source_keys=[h.rel for h in ordered],
        slice_index=layout.k_index,
        warnings=warnings + layout.warnings + _spacing_warnings(first),
        bytes_read=sum(h.bytes_read for h in slices),
        **_base_fields(first),
        **_geometry_fields((first.columns, first.rows, layout.n_slices), affine, f"series {identity}"),
    )


def _volume_cases(series_uid: str, slices: list[DicomHeader]) -> list[CaseRecord]:
    """Split one series' positioned slices into consistent volumes (and localizer skips)."""
    records: list[CaseRecord] = []
    localizers = [h for h in slices if h.is_localizer]
    rest = [h for h in slices if not h.is_localizer]
    parts: dict[tuple, list[DicomHeader]] = defaultdict(list)
    for h in rest:
        parts[_signature(h)].append(h)
    ranked = sorted(parts.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
    if len(ranked) > 1:
        main_normal = slice_normal(ranked[0][1][0].orientation)
        main_is_volume = len(ranked[0][1]) > _LOCALIZER_MAX_SLICES
        kept = [ranked[0]]
        for sig, part in ranked[1:]:
            tilted = abs(float(slice_normal(part[0].orientation) @ main_normal)) < 0.99
            if main_is_volume and tilted and len(part) <= _LOCALIZER_MAX_SLICES:
                localizers.extend(part)  # scouts without the LOCALIZER flag
            else:
                kept.append((sig, part))
        ranked = kept
    for h in localizers:
        records.append(
            _skip_or_fail(h, CaseKind.DICOM_IMAGE, Status.SKIPPED, ErrorCode.LOCALIZER, f"{h.uri}: localizer image")
        )
    split = len(ranked) > 1
    for sig, part in ranked:
        identity = f"dicom-series:{series_uid}"
        warnings = []
        if split:
            identity += ":" + hashlib.sha256(repr(sig).encode()).hexdigest()[:8]
            warnings.append(f"series split into {len(ranked)} parts with different size / orientation / spacing")
        part = sorted(part, key=lambda h: h.rel)
        try:
            records.extend(_split_acquisitions(part, identity, warnings))
        except CaseError as e:
            if e.code in IMAGES_INSTEAD:  # decodable images that form no volume: each one a 2D case
                note = f"{FALLBACK_2D}: {e.message}; each image segmented as a 2D case"
                records.extend(_image_record(h, warnings=[*warnings, note]) for h in part)
                continue
            records.append(
                CaseRecord(
                    case_id=make_case_id(identity),
                    kind=CaseKind.DICOM_SERIES,
                    source_uris=[h.uri for h in part],
                    source_keys=[h.rel for h in part],
                    status=Status.FAILED,
                    error_code=e.code,
                    error_message=e.message,
                    bytes_read=sum(h.bytes_read for h in part),
                    **_base_fields(part[0]),
                )
            )
    return records


def _split_acquisitions(part: list[DicomHeader], identity: str, warnings: list[str]) -> list[CaseRecord]:
    """One volume, or one per (acquisition, echo, temporal position) when those resolve duplicates."""
    try:
        return [_series_record(part, identity, warnings)]
    except CaseError as e:
        if e.code != ErrorCode.DUPLICATE_POSITION:
            raise
        groups: dict[tuple, list[DicomHeader]] = defaultdict(list)
        for h in part:
            groups[(h.acquisition_number, h.echo_number, h.temporal_position)].append(h)
        if len(groups) == 1:
            raise
        out = []
        for key, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            w = [*warnings, f"split by (acquisition, echo, temporal position) = {key}"]
            out.append(_series_record(members, f"{identity}:{key}", w))
        return out


def _dedupe(headers: list[DicomHeader]) -> tuple[list[DicomHeader], list[DicomHeader]]:
    """Drop repeated copies of one SOP instance (keep the first by key)."""
    seen: dict[str, DicomHeader] = {}
    kept, dropped = [], []
    for h in sorted(headers, key=lambda h: h.rel):
        if h.sop_instance_uid and h.sop_instance_uid in seen:
            dropped.append(h)
        else:
            seen[h.sop_instance_uid] = h
            kept.append(h)
    return kept, dropped


def header_problem(h: DicomHeader) -> tuple[str, str] | None:
    """(code, message) when this object's header cannot be used, else None: malformed or truncated
    (read_dicom_header), or geometry values that are not finite or not a geometry."""
    if h.error_code:
        return h.error_code, h.error_message
    problem = dicom_geometry_problem(
        position=h.position, orientation=h.orientation, pixel_spacing=h.pixel_spacing,
        frame_positions=h.frame_positions, slice_thickness=h.slice_thickness,
        spacing_between_slices=h.spacing_between_slices,
    )  # fmt: skip
    return (ErrorCode.BAD_GEOMETRY, f"{h.uri}: {problem}") if problem else None


def _unusable(h: DicomHeader, code: str, message: str) -> CaseRecord:
    """One object whose header cannot be used: a failure of its own (its key is its identity)."""
    kind = CaseKind.DICOM_MULTIFRAME if h.frames > 1 else CaseKind.DICOM_IMAGE
    return _single_object_record(h, f"file:{h.rel}", kind, status=Status.FAILED, error_code=code,
                                 error_message=message)  # fmt: skip


def _left_out_warning(left_out: list[tuple[DicomHeader, str]]) -> str:
    named = ", ".join(f"{h.rel} ({code})" for h, code in left_out[:3])
    more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
    return f"left out {len(left_out)} file(s) of the series that failed on their own: {named}{more}"


def cases_from_headers(headers: list[DicomHeader]) -> list[CaseRecord]:
    """All cases for headers that share a SeriesInstanceUID (or one header without one). An object
    whose header cannot be used fails on its own; the rest of its series is grouped as if it were
    absent, and the series' volumes name it in their warnings."""
    records: list[CaseRecord] = []
    left_out: list[tuple[DicomHeader, str]] = []
    usable = []
    for h in headers:
        problem = None if non_image_reason(h) else header_problem(h)  # a non-image object is skipped anyway
        if problem is None:
            usable.append(h)
            continue
        records.append(_unusable(h, *problem))
        left_out.append((h, problem[0]))
    volumes_at = len(records)
    records.extend(_usable_cases(usable))
    if left_out:
        for record in records[volumes_at:]:
            if record.kind == CaseKind.DICOM_SERIES and record.status == Status.OK:
                record.warnings = [*record.warnings, _left_out_warning(left_out)]
    return records


def _usable_cases(headers: list[DicomHeader]) -> list[CaseRecord]:
    records: list[CaseRecord] = []
    headers, copies = _dedupe(headers)
    for h in copies:
        original = next(x.rel for x in headers if x.sop_instance_uid == h.sop_instance_uid)
        kind = CaseKind.DICOM_OTHER if non_image_reason(h) else CaseKind.DICOM_IMAGE
        record = _skip_or_fail(
            h, kind, Status.SKIPPED, ErrorCode.DUPLICATE_INSTANCE,
            f"{h.uri}: another copy of the SOP instance in {original}",
        )  # fmt: skip
        record.case_id = make_case_id(f"file:{h.rel}")
        records.append(record)
    slices: list[DicomHeader] = []
    for h in headers:
        reason = non_image_reason(h)
        if reason:
            records.append(
                _skip_or_fail(h, CaseKind.DICOM_OTHER, Status.SKIPPED, ErrorCode.NON_IMAGE_OBJECT, f"{h.uri}: {reason}")
            )
        elif not h.has_pixel_data or not (h.rows and h.columns):
            records.append(
                _skip_or_fail(
                    h, CaseKind.DICOM_IMAGE, Status.FAILED, ErrorCode.NO_PIXEL_DATA, f"{h.uri}: no pixel data"
                )
            )
        elif h.frames > 1:
            try:
                records.append(_multiframe_record(h))
            except CaseError as e:
                records.append(_skip_or_fail(h, CaseKind.DICOM_MULTIFRAME, Status.FAILED, e.code, e.message))
        elif h.is_volume_slice and not _is_projection(h):
            slices.append(h)
        else:
            try:
                records.append(_image_record(h))
            except CaseError as e:
                records.append(_unusable(h, e.code, e.message))
    if slices:
        records.extend(_volume_cases(slices[0].series_uid or slices[0].rel, slices))
    return records
