"""`reproduce`: the paper's zero-shot table (and ablation) on the four public datasets, with one command.

For each task: the job file of jobs/configs/ (the paper's per-task settings), inputs = the task's
test_images/, outputs = OUT/<task>/<ablation>/; then `evaluate` against test_masks/, and a table of our
numbers beside the paper's (METHOD.md) with the difference. A re-run resumes: committed cases are
skipped and only the evaluation is recomputed.

The weakly supervised row (issue 10): for each task whose training split is present too
(DIR/<task>/train_images/), the job segments it zero-shot into OUT/<task>/train/, `train_weak` trains the
checkpoint ensemble on those pseudo-labels (WORK = OUT/<task>/weak/), `refine` writes <target>@weak for
the test images of the full row, and `evaluate` scores it beside the paper's weakly supervised numbers.
Without train_images/ the row is skipped with a line saying what is missing and where it goes.

Settings that differ from the paper unless set (printed with every table):
- SAM: the paper uses vit_h; `--sam vit_h` (the default with real models) sets it, `--sam vit_b` is faster;
- BiomedCLIP: the paper's zero-shot rows use its DHN-NCE fine-tuned weights (`--set models.clip=FOLDER`
  after `mcs-batch import-biomedclip-hf`); the job files name the public base model;
- prompts: the job files hold descriptive prompts in the style of the paper's LLM-generated ones;
- NSD: boundary NSD (metrics.py); the reference's 2D evaluation counts the mask area as surface too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mcs_batch.config import ABLATIONS, MODEL_PRESETS, JobConfig, load_config
from mcs_batch.errors import ConfigError
from mcs_batch.eval.datasets import (
    PAPER_ABLATION,
    PAPER_ABLATION_NOTES,
    PAPER_DATASETS,
    PaperDataset,
    find_dataset_folder,
    list_truth,
    paper_dataset,
    subfolder,
)
from mcs_batch.eval.evaluate import EvaluationResult, evaluate
from mcs_batch.io.storage import StorageOptions, join, protocol_of
from mcs_batch.models.weights import cache_key, fetch

WEAK_ROW = "weak"  # the weakly supervised row of a report (not an ablation row)
PAPER_WEAK = {  # weakly supervised DSC / NSD (%), METHOD.md
    "breast_us": (78.87, 84.58),
    "brain_mri": (80.03, 88.25),
    "lung_xray": (80.77, 84.53),
    "lung_ct": (88.78, 91.95),
}
TINY_WEAK = (  # with tiny models (a pipeline check): a minute of training, not the paper's recipe
    "train.cycles=1", "train.epochs_per_cycle=2", "train.keep_per_cycle=1", "train.iterations_per_epoch=2",
    "train.val_iterations_per_epoch=1", "train.base_features=4",
)  # fmt: skip

SAM_CHECKPOINTS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",  # the paper's
}


def default_configs_dir() -> Path | None:
    """jobs/configs/ of the working directory (the container's /app) or of the source checkout."""
    for candidate in (Path.cwd() / "jobs" / "configs", Path(__file__).resolve().parents[2] / "jobs" / "configs"):
        if all((candidate / d.config).is_file() for d in PAPER_DATASETS):
            return candidate
    return None


def select_datasets(names: Sequence[str] | None) -> list[PaperDataset]:
    return [paper_dataset(n) for n in names] if names else list(PAPER_DATASETS)


def missing_data(data_dir: str, datasets: Sequence[PaperDataset], *, storage: StorageOptions | None = None):
    """({task: folder} found, [lines saying what is missing and where it goes])."""
    found, lines = {}, []
    for d in datasets:
        folder = find_dataset_folder(data_dir, d, storage=storage)
        if folder is None:
            where = join(data_dir, d.folders[0])
            lines.append(
                f"  {d.title:<11} {where}/test_images/ and {where}/test_masks/ ({d.source}, test split; "
                f"the folder may also be called {', '.join(d.folders[1:])})"
            )
        else:
            found[d.name] = folder
    return found, lines


def job_config(
    d: PaperDataset,
    *,
    configs_dir: Path,
    models: str,
    sam: str,
    images: str,
    out: str,
    ablation: str,
    overrides: Sequence[str] = (),
) -> JobConfig:
    """The task's job file with the model choice, inputs, outputs and ablation row; then --set."""
    settings: list[str] = []
    if models == "tiny":
        settings += [f"{k}={json.dumps(v)}" for k, v in MODEL_PRESETS["tiny"].items()]
    elif sam in SAM_CHECKPOINTS:
        settings += [f"models.sam={SAM_CHECKPOINTS[sam]}", f"models.sam_variant={sam}"]
    else:
        raise ConfigError(f"--sam {sam!r}: choose from {', '.join(SAM_CHECKPOINTS)}")
    settings += [f"inputs.uris={json.dumps([images])}", f"outputs.uri={json.dumps(out)}", f"ablation={ablation}"]
    return load_config(configs_dir / d.config, overrides=[*settings, *overrides])


def missing_weights(cfgs: Sequence[JobConfig], *, storage: StorageOptions | None = None) -> list[str]:
    """Fetch (once; from the cache when there) every model the jobs need; lines for those that fail."""
    lines, seen = [], set()
    for cfg in cfgs:
        m = cfg.models
        for key, uri in (("models.clip", m.clip), ("models.sam", m.sam)):
            if (key, uri) in seen or m.tiny:
                continue
            seen.add((key, uri))
            cache = Path(os.path.expanduser(m.cache_dir))
            try:
                fetch(
                    uri, cache_dir=cache, storage_options=(storage or StorageOptions()).fsspec_kwargs(protocol_of(uri))
                )
            except Exception as e:  # no network, no such file, wrong digest: say what and where
                lines.append(
                    f"  {key}={uri}: not available ({type(e).__name__}: {str(e)[:160]}); fetch it where the network "
                    f"allows (`mcs-batch weights fetch --set {key}={uri}`) into {cache / cache_key(uri)}, or point "
                    f"--set {key}= at a local copy"
                )
    return lines


@dataclass
class ReproduceRun:
    dataset: PaperDataset
    ablation: str
    out: str
    result: EvaluationResult | None = None
    tiny: bool = False


@dataclass
class ReproduceReport:
    runs: list[ReproduceRun] = field(default_factory=list)

    def result(self, dataset: str, ablation: str) -> EvaluationResult | None:
        for r in self.runs:
            if r.dataset.name == dataset and r.ablation == ablation:
                return r.result
        return None

    @property
    def datasets(self) -> list[PaperDataset]:
        return list(dict.fromkeys(r.dataset for r in self.runs))

    @property
    def ablations(self) -> list[str]:
        return [a for a in ABLATIONS if any(r.ablation == a for r in self.runs)]


def _cell(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _diff(ours: float | None, paper: float) -> str:
    return "-" if ours is None or not np.isfinite(ours) else f"{ours - paper:+.2f}"


def zero_shot_lines(report: ReproduceReport) -> list[str]:
    """Our zero-shot (ablation full) DSC / NSD per task beside the paper's, row by row, with the mean;
    then the weakly supervised table when that row ran."""
    lines = _score_table(
        report,
        "full",
        "Zero-shot segmentation, ours vs. the paper (MedCLIP-SAMv2, Medical Image Analysis 2025), "
        "% mean over cases: DSC, NSD at 2 px",
        {d.name: (d.paper_dsc, d.paper_nsd) for d in report.datasets},
    )
    if any(r.ablation == WEAK_ROW for r in report.runs):
        lines += ["", *weak_lines(report)]
    return lines


def weak_lines(report: ReproduceReport) -> list[str]:
    """Our weakly supervised DSC / NSD (refined masks, <target>@weak) beside the paper's, with the mean."""
    return _score_table(
        report,
        WEAK_ROW,
        "Weakly supervised segmentation (nnU-Net checkpoint ensemble on zero-shot pseudo-labels of the training "
        "split), ours vs. the paper, % mean over cases",
        PAPER_WEAK,
    )


def _score_table(report: ReproduceReport, row: str, title: str, paper: dict[str, tuple[float, float]]) -> list[str]:
    """One table: per task our DSC / NSD for `row` beside the paper's (`paper`: task -> (DSC, NSD)), then
    the mean over the tasks that ran."""
    lines = [
        title,
        f"  {'task':<12}{'n':>5}{'DSC ours':>10}{'paper':>8}{'diff':>8}{'NSD ours':>10}{'paper':>8}{'diff':>8}",
    ]
    ours_dsc, ours_nsd, paper_dsc, paper_nsd = [], [], [], []
    for d in report.datasets:
        result = report.result(d.name, row)
        if result is None:
            continue
        dsc, nsd = result.stat("dice"), result.stat("nsd")
        p_dsc, p_nsd = paper[d.name]
        ours_dsc.append(dsc.mean * 100)
        ours_nsd.append(nsd.mean * 100)
        paper_dsc.append(p_dsc)
        paper_nsd.append(p_nsd)
        lines.append(
            f"  {d.title:<12}{dsc.count:>5}{_cell(dsc.mean * 100):>10}{p_dsc:>8.2f}{_diff(dsc.mean * 100, p_dsc):>8}"
            f"{_cell(nsd.mean * 100):>10}{p_nsd:>8.2f}{_diff(nsd.mean * 100, p_nsd):>8}"
        )
    if ours_dsc:
        means = [float(np.mean(v)) for v in (ours_dsc, paper_dsc, ours_nsd, paper_nsd)]
        label = "Mean" if len(ours_dsc) == len(PAPER_DATASETS) else f"Mean ({len(ours_dsc)})"
        lines.append(
            f"  {label:<12}{'':>5}{_cell(means[0]):>10}{means[1]:>8.2f}{_diff(means[0], means[1]):>8}"
            f"{_cell(means[2]):>10}{means[3]:>8.2f}{_diff(means[2], means[3]):>8}"
        )
    return lines


def train_images_of(folder: str, *, storage: StorageOptions | None = None) -> str | None:
    """The task's train_images/ folder (any case), or None."""
    try:
        return subfolder(folder, "train_images", storage=storage)
    except (ConfigError, FileNotFoundError):
        return None


def run_weak(
    d: PaperDataset,
    cfg: JobConfig,
    folder: str,
    *,
    run_job: Callable,
    storage: StorageOptions | None = None,
    tolerance: float = 2.0,
    weak_overrides: Sequence[str] = (),
    progress: Callable[[str], None] = print,
) -> ReproduceRun | None:
    """The weakly supervised row of one task, after its full (zero-shot) row ran into cfg.outputs.uri;
    None (with a line saying what is missing) without the task's train_images/."""
    from mcs_batch.train.weak.config import load_weak_config
    from mcs_batch.train.weak.refine import refine
    from mcs_batch.train.weak.train import train_weak

    train_images = train_images_of(folder, storage=storage)
    if train_images is None:
        where = join(folder, "train_images")
        progress(f"{d.title}: weakly supervised row skipped: it needs the training split in {where}/ "
                 "(images only; their zero-shot masks are the pseudo-labels)")  # fmt: skip
        return None
    task = posixpath.dirname(cfg.outputs.uri.rstrip("/"))
    train_out, work = join(task, "train"), join(task, WEAK_ROW)
    train_cfg = dataclasses.replace(
        cfg, inputs=dataclasses.replace(cfg.inputs, uris=(train_images,)),
        outputs=dataclasses.replace(cfg.outputs, uri=train_out),
    )  # fmt: skip
    progress(f"{d.title}, weakly supervised: segmenting {train_images} into {train_out}")
    summary = run_job(train_cfg, storage=storage, progress=progress)
    if summary.aborted:
        raise ConfigError(f"{d.title} (weakly supervised, training split): job aborted: {summary.aborted}")
    target = cfg.targets[0].name
    overrides = [*(TINY_WEAK if cfg.models.tiny else ()), *weak_overrides]
    weak_cfg = load_weak_config(source=train_out, target=target, work=work, overrides=overrides)
    train_weak(weak_cfg, storage=storage, progress=progress)
    refine(dataclasses.replace(weak_cfg, source=cfg.outputs.uri), storage=storage, progress=progress)
    listing = list_truth(folder, storage=storage)
    result = evaluate(cfg.outputs.uri, listing.items, truth_root=folder, dataset=d.name,
                      target=weak_cfg.refined_target, storage=storage, tolerance=tolerance,
                      problems=listing.problems, progress=progress)  # fmt: skip
    return ReproduceRun(d, WEAK_ROW, cfg.outputs.uri, result, tiny=cfg.models.tiny)


def ablation_lines(report: ReproduceReport) -> list[str]:
    """Mean DSC of each ablation row over the tasks run, beside the paper's ablation means."""
    datasets = report.datasets
    header = "".join(f"{d.title:>12}" for d in datasets)
    lines = [
        "Ablation, mean DSC % over the tasks (the paper's means are over its four tasks)",
        f"  {'row':<13}{'ours':>8}{'paper':>8}{'diff':>8}{header}   paper's row",
    ]
    for ablation in report.ablations:
        per = []
        for d in datasets:
            result = report.result(d.name, ablation)
            per.append(result.stat("dice").mean * 100 if result is not None else float("nan"))
        finite = [v for v in per if np.isfinite(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        paper = PAPER_ABLATION[ablation]
        cells = "".join(f"{_cell(v):>12}" for v in per)
        lines.append(
            f"  {ablation:<13}{_cell(mean):>8}{paper:>8.2f}{_diff(mean, paper):>8}{cells}   "
            f"{PAPER_ABLATION_NOTES[ablation]}"
        )
    return lines


def settings_lines(cfgs: Sequence[JobConfig]) -> list[str]:
    """What in these runs differs from the paper's setting (said beside every table)."""
    if not cfgs:
        return []
    m = cfgs[0].models
    if m.tiny:
        return ["NOTE: TINY random models were used: these numbers are meaningless (a pipeline check only)"]
    lines = [f"models: BiomedCLIP {m.clip}; SAM {m.sam_variant} ({m.sam})"]
    if m.sam_variant != "vit_h":
        lines.append("  differs from the paper: SAM vit_h there (--sam vit_h)")
    if m.clip.startswith("hf-hub:"):
        lines.append("  differs from the paper: its zero-shot rows use DHN-NCE fine-tuned BiomedCLIP "
                     "(import with `mcs-batch import-biomedclip-hf`, then --set models.clip=FOLDER)")  # fmt: skip
    lines.append("  NSD: boundary NSD at 2 px; the reference's 2D evaluation also counts the mask area as surface "
                 "(higher NSD on the same masks)")  # fmt: skip
    return lines


def run_reproduce(
    plan: Sequence[tuple[PaperDataset, str, JobConfig, str]],
    *,
    run_job: Callable,
    storage: StorageOptions | None = None,
    tolerance: float = 2.0,
    weak: bool = True,
    progress: Callable[[str], None] = print,
) -> ReproduceReport:
    """Run and evaluate each (task, ablation row, job config, task folder) of the plan, in order; after
    each task's full row, its weakly supervised row where its training split is present (`weak`)."""
    report = ReproduceReport()
    for d, ablation, cfg, folder in plan:
        progress(f"{d.title}, ablation {ablation}: segmenting {cfg.inputs.uris[0]} into {cfg.outputs.uri}")
        summary = run_job(cfg, storage=storage, progress=progress)
        if summary.aborted:
            raise ConfigError(f"{d.title} ({ablation}): job aborted: {summary.aborted}")
        listing = list_truth(folder, storage=storage)
        result = evaluate(
            cfg.outputs.uri,
            listing.items,
            truth_root=folder,
            dataset=d.name,
            target=cfg.targets[0].name,
            storage=storage,
            tolerance=tolerance,
            problems=listing.problems,
            progress=progress,
        )
        report.runs.append(ReproduceRun(d, ablation, cfg.outputs.uri, result, tiny=cfg.models.tiny))
        if weak and ablation == "full":
            weak_run = run_weak(d, cfg, folder, run_job=run_job, storage=storage, tolerance=tolerance,
                                progress=progress)  # fmt: skip
            if weak_run is not None:
                report.runs.append(weak_run)
    return report


def plan_runs(
    data_dir: str,
    out: str,
    *,
    datasets: Sequence[PaperDataset],
    ablations: Sequence[str],
    configs_dir: Path,
    models: str,
    sam: str,
    overrides: Sequence[str] = (),
    storage: StorageOptions | None = None,
) -> tuple[list[tuple[PaperDataset, str, JobConfig, str]], list[str]]:
    """(the runs, [lines saying what data or weights are missing]); nothing runs here."""
    found, missing = missing_data(data_dir, datasets, storage=storage)
    plan = []
    for d in datasets:
        if d.name not in found:
            continue
        images = subfolder(found[d.name], "test_images", storage=storage)
        for ablation in ablations:
            cfg = job_config(d, configs_dir=configs_dir, models=models, sam=sam, images=images,
                             out=join(out, d.name, ablation), ablation=ablation, overrides=overrides)  # fmt: skip
            plan.append((d, ablation, cfg, found[d.name]))
    if models != "tiny" and plan and not missing:  # weights are fetched only once the data is all there
        weights = missing_weights([cfg for _, _, cfg, _ in plan], storage=storage)
        if weights:
            missing += ["  model weights:", *weights]
    return plan, missing
