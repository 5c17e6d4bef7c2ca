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
    assert main(["segment", str(images), "--out", str(out), "--models", "tiny", "--prompt", "a bright blob",
                 "--target", "lesion", "--set", cache]) == 0  # fmt: skip
    sql = "SELECT count(*) FROM cases WHERE target = 'lesion' AND status = 'ok' AND mask_voxels > 0"
    _, rows = query(str(out), sql)
    with_mask = rows[0][0]
    if with_mask < 2:
        pytest.skip(f"the tiny random models left {with_mask} non-empty mask(s): nothing to train on")
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
