"""The README's reader examples (deltalake to pandas, Polars, DuckDB over the snapshot's Arrow dataset)
run as written, on a catalog on local disk and on the S3 test endpoint, and see committed rows only."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcs_batch.io.storage import StorageOptions
from mcs_batch.outputs.catalog import Catalog
from mcs_batch.outputs.delta import delta_options


def readme_blocks() -> list[str]:
    """The Python blocks of the README's readers section."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("**Readers of curators' own tools**", 1)[1].split("Curation queries", 1)[0]
    return [part.split("```", 1)[0] for part in section.split("```python")[1:]]


def fill(catalog: Catalog) -> None:
    """Two runs: r1 commits a, b (b failed); r2 loses the race to a (its rows and slices are not the
    catalog's) and commits c."""
    rows = [{"case_id": "a", "target": "t", "status": "ok", "run_id": "r1"},
            {"case_id": "b", "target": "t", "status": "failed", "error_code": "truncated", "run_id": "r1"}]  # fmt: skip
    catalog.commit("r1", 0, rows, [{"case_id": "a", "target": "t", "slice_index": k, "run_id": "r1", "sam_score": 0.5}
                                   for k in range(3)])  # fmt: skip
    catalog.commit("r2", 0, [{"case_id": c, "target": "t", "status": "ok", "run_id": "r2"} for c in ("a", "c")],
                   [{"case_id": c, "target": "t", "slice_index": 0, "run_id": "r2", "sam_score": 0.9} for c in "ac"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_readmes_readers_run_and_see_committed_rows_only(tmp_path: Path, where, request):
    blocks = readme_blocks()
    assert len(blocks) == 3
    storage = None
    out = str(tmp_path / "out")
    if where == "s3":
        bucket, _ = request.getfixturevalue("s3_bucket")
        storage = StorageOptions(**request.getfixturevalue("s3_server"))
        out = f"s3://{bucket}/out"
    fill(Catalog(out, storage=storage))
    namespaces = []
    for block in blocks:
        namespace = {"OUT": out, "storage_options": delta_options(out, storage)}
        exec(compile(block, "README.md", "exec"), namespace)
        namespaces.append(namespace)
    pandas_, polars_, duck = namespaces
    assert sorted(pandas_["cases"].case_id) == ["a", "b", "c"] and pandas_["failed"].to_dict() == {"truncated": 1}
    best = polars_["best"]
    assert sorted(zip(best["case_id"].to_list(), best["run_id"].to_list(), strict=True)) == [
        ("a", "r1"), ("a", "r1"), ("a", "r1"), ("c", "r2")]  # r2's slice row of a is not the catalog's  # fmt: skip
    assert sorted(duck["per_status"]) == [("failed", 1), ("ok", 2)]
