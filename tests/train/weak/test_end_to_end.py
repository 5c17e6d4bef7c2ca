"""Zero-shot with tiny models (the real cohort job) -> train-weak (selection, export, nnU-Net on Ray Train,
2 workers) -> refine, all through the command line, on a real local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcs_batch.cli import main
from mcs_batch.query import query
from mcs_batch.train.weak.synthetic import blob

TINY = [  # see test_train_refine.py
    "train.cycles=2", "train.epochs_per_cycle=2", "train.keep_per_cycle=1", "train.iterations_per_epoch=1",
    "train.val_iterations_per_epoch=1", "train.base_features=4", "run.num_workers=2", "run.cpus_per_worker=0.5",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_zero_shot_then_train_weak_then_refine_from_the_command_line(tmp_path: Path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray(blob(rng, 64)[0]).save(images / f"img{i}.png")
    out, work = tmp_path / "out", tmp_path / "work"
    cache = f"models.cache_dir={tmp_path.parent / 'model-cache'}"
    # ablation=components: the masks are the saliency's coarse masks (tiny random SAM weights leave
    # every mask of these images empty, and there would be nothing to train on)
    assert main(["segment", str(images), "--out", str(out), "--models", "tiny", "--prompt", "a bright blob",
                 "--target", "lesion", "--set", cache, "--set", "ablation=components"]) == 0  # fmt: skip
    sql = "SELECT count(*) FROM cases WHERE target = 'lesion' AND status = 'ok' AND mask_voxels > 0"
    _, rows = query(str(out), sql)
    with_mask = rows[0][0]
    assert with_mask == 8
    capsys.readouterr()

    sets = [arg for item in TINY for arg in ("--set", item)]
    code = main(["train-weak", "--from", str(out), "--target", "lesion", "--work", str(work), "--refine", *sets])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "checkpoint ensemble of 4 member checkpoint(s)" in printed and "refined target lesion@weak: 8 ok" in printed
    selection = json.loads((work / "selection.json").read_text())
    assert selection["cases"]["selected"] == with_mask and selection["filters"]["min_sam_score"] == 0.0
    _, rows = query(str(out), "SELECT target, count(*) FROM cases WHERE status = 'ok' GROUP BY target ORDER BY target")
    assert rows == [("lesion", 8), ("lesion@weak", 8)]
    _, rows = query(str(out), "SELECT count(*) FROM slices WHERE target = 'lesion@weak'")
    assert rows == [(8,)]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_train_and_refine_with_out_and_work_on_object_storage(tmp_path: Path, s3_server, s3_bucket):
    from mcs_batch.io.storage import StorageOptions
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.synthetic import write_pseudo_run
    from mcs_batch.train.weak.train import train_weak

    bucket, fs = s3_bucket
    storage = StorageOptions(**s3_server)
    out, work = f"s3://{bucket}/out", f"s3://{bucket}/weak"
    write_pseudo_run(tmp_path, out, n=4, storage=storage)
    scratch = tmp_path / "scratch"  # one node: both workers' scratch and the node cache under it
    scratch.mkdir()
    overrides = [*TINY, "train.cycles=1", f"run.scratch_dir={scratch}", "run.transfer_connections=4"]
    cfg = load_weak_config(source=out, target="lesion", work=work, overrides=overrides)
    ensemble = train_weak(cfg, storage=storage, progress=lambda m: None)
    assert [m["file"] for m in ensemble["members"]] == [f"member0{r}_cycle00_epoch0001.pt" for r in (0, 1)]
    # the two workers of this node downloaded the training's files once, and only those nnU-Net reads
    on_work = [p.split("/Dataset501_lesion/", 1)[1] for p in fs.find(f"{bucket}/weak/nnUNet_preprocessed")]
    needed = sorted(p for p in on_work if p.startswith("nnUNetPlans_2d/")
                    or p in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"))  # fmt: skip
    assert any(p.startswith("gt_segmentations/") for p in on_work) and len(needed) < len(on_work)
    first, second = sorted(ensemble["transfers"], key=lambda t: -t["transferred"])
    assert (first["files"], first["transferred"]) == (len(needed), len(needed))
    assert first["left_out"] == len(on_work) - len(needed)
    assert (second["transferred"], second["bytes"], second["skipped"]) == (0, 0, len(needed))
    (cache,) = (scratch / "mcs-weak-preprocessed").iterdir()
    cached = sorted(p.relative_to(cache / "nnUNet_preprocessed" / "Dataset501_lesion").as_posix()
                    for p in cache.rglob("*") if p.is_file() and p.name != ".lock")  # fmt: skip
    assert cached == needed
    assert fs.exists(f"{bucket}/weak/checkpoints/train-weak/checkpoint_000002/member_00/model.pt")
    assert fs.exists(f"{bucket}/weak/logs/member_00_from_epoch0000.txt")
    assert refine(cfg, storage=storage, progress=lambda m: None)["cases"] == {"ok": 4, "failed": 0}
    _, rows = query(out, "SELECT target, count(*) FROM cases GROUP BY target ORDER BY target", storage=storage)
    assert rows == [("lesion", 4), ("lesion@weak", 4)]
    for folder in fs.ls(f"{bucket}/out/masks"):
        assert fs.exists(f"{folder}/lesion@weak.nii.gz") and fs.exists(f"{folder}/lesion.nii.gz")
