"""The catalog's commit protocol: commits, repair of what a crash left, failed rows, mask paths."""

from __future__ import annotations

from pathlib import Path

from mcs_batch.outputs.catalog import Catalog


def row(case_id: str, status: str = "ok") -> dict:
    return {"case_id": case_id, "target": "t", "status": status}


def test_commit_repair_and_drop_failed(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("run1", 0, [row("a"), row("b", "failed")], [{"case_id": "a", "target": "t", "slice_index": 0}])
    assert catalog.committed() == {("a", "t"): "ok", ("b", "t"): "failed"}
    assert catalog.slices().num_rows == 1
    catalog.end_staging("run1")
    # the protocol before commit intents: a crash between the slices file and the cases file left an
    # orphan, and temporaries sat beside the files: repair removes both
    catalog.write_bytes(catalog.path("catalog/slices/part-run2-000000.parquet"), b"partial")
    (tmp_path / "catalog" / "cases" / ".tmp-x-part-run2-000000.parquet").write_bytes(b"half written")
    removed = catalog.repair()
    assert removed == ["removed part-run2-000000.parquet", "removed .tmp-x-part-run2-000000.parquet"]
    assert catalog.slices().num_rows == 1
    assert catalog.drop_failed() == [("b", "t")]
    assert catalog.committed() == {("a", "t"): "ok"}


def test_mask_paths_use_ids_only(tmp_path: Path):
    nifti, png = Catalog(str(tmp_path)).mask_paths("0123abcd", "lungs")
    assert nifti.endswith("/masks/0123abcd/lungs.nii.gz") and png.endswith("/masks/0123abcd/lungs.png")


def test_derived_targets_do_not_count_as_another_configuration(tmp_path: Path):
    catalog = Catalog(str(tmp_path))
    catalog.commit("seg", 0, [{**row("a"), "config_hash": "0bfcc494eaf02685"}], [])
    catalog.commit("refine", 0, [{"case_id": "a", "target": "t@weak", "status": "ok", "config_hash": "77aa"}], [])
    assert catalog.config_hashes() == {"0bfcc494eaf02685"}  # a refinement does not lock the folder
