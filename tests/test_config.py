"""Job configuration: defaults, YAML, --set precedence, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcs_batch.config import BIOMEDCLIP_HF, Code, JobConfig, load_config
from mcs_batch.errors import ConfigError
from mcs_batch.io.window import CTWindow
from mcs_batch.models.visual_prompts import CoarseMethod

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_method_defaults():
    cfg = load_config()
    assert (cfg.m2ib.layer, cfg.m2ib.beta, cfg.m2ib.steps, cfg.m2ib.samples, cfg.m2ib.lr) == (9, 1.0, 10, 10, 1.0)
    assert cfg.targets[0].coarse.method == CoarseMethod.KMEANS
    assert cfg.models.clip == "tiny" and cfg.seed == 0


def test_yaml_then_set_overrides(tmp_path: Path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "models: {clip: /models/biomedclip, sam: /models/sam_vit_b.pth}\n"
        "m2ib: {beta: 2.0}\n"
        "window: {ct_window: lung}\n"
        "targets:\n"
        "  - name: lungs\n"
        "    prompts: [a lung, both lungs on a chest CT]\n"
        "    coarse: {k_components: 2}\n"
    )
    cfg = load_config(job, overrides=["m2ib.beta=3", "targets.0.coarse.method=otsu", "seed=7"])
    assert cfg.models.clip == "/models/biomedclip"
    assert cfg.m2ib.beta == 3.0  # --set wins over the file
    assert cfg.window.ct_window == CTWindow.LUNG
    (target,) = cfg.targets
    assert target.prompts == ("a lung", "both lungs on a chest CT")
    assert (target.coarse.k_components, target.coarse.method) == (2, CoarseMethod.OTSU)
    assert cfg.seed == 7


def test_presets_and_prompt_flags():
    cfg = load_config(preset="real", prompts=["a brain tumour"], target="tumour")
    assert cfg.models.clip == BIOMEDCLIP_HF and cfg.m2ib.layer == 9
    assert [(t.name, t.prompts) for t in cfg.targets] == [("tumour", ("a brain tumour",))]
    assert load_config(preset="tiny").m2ib.layer == 4  # the tiny tower has 6 blocks
    assert load_config(preset="tiny", overrides=["m2ib.layer=2"]).m2ib.layer == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["m2ib.lyer=3"], "unknown config key m2ib.lyer"),
        (["m2ib.layer=abc"], "m2ib.layer: expected an integer"),
        (["window.ct_window=soft"], r"window\.ct_window: 'soft' is not one of lung"),
        (["targets.0.coarse.k_components=0"], "k_components must be >= 1"),
        (["slice_axis=5"], "slice_axis"),
        (["nonsense"], "expected key=value"),
        (["targets=[{name: a b, prompts: [x]}]"], "name 'a b'"),
        (["targets=[{name: a, prompts: [x]}, {name: a, prompts: [y]}]"], "names must be unique"),
        # every string setting is an enum, checked at load (not deep inside a run)
        (["clip.resize=crop"], r"clip\.resize: 'crop' is not one of resize, pad"),
        (["models.sam_precision=fp8"], r"models\.sam_precision: 'fp8' is not one of fp32, bf16, fp16"),
        (["models.sam_variant=vit_x"], r"models\.sam_variant: 'vit_x' is not one of vit_b"),
        (["models.device=gpu"], "models.device 'gpu'"),
        (["m2ib.precision=int8"], r"m2ib\.precision: 'int8'"),
        (["ablation=most"], r"ablation: 'most' is not one of saliency, postprocess, components, full"),
        (["targets.0.coarse.method=watershed"], r"targets\[0\]\.coarse\.method: 'watershed'"),
        (["targets.0.coarse.box_mode=all"], r"targets\[0\]\.coarse\.box_mode: 'all'"),
        (["resources.block_rows=0"], r"resources\.block_rows: must be >= 1"),
        (["resources.block_rows=many"], r"resources\.block_rows: expected 'auto' or an integer"),
        (["resources.models_together=sometimes"], r"resources\.models_together: expected 'auto', true or false"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_bad_files_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("m2ib: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--models 'huge'"):
        load_config(preset="huge")


def test_hash_is_pinned():
    """Outputs record the hash and refuse to mix configurations: a refactor must not change it."""
    assert JobConfig().hash() == "40bd380103e3e046"
    assert load_config(preset="tiny").hash() == "603cb583a52abbf9"
    assert load_config(preset="real", prompts=["a lung"], target="lungs").hash() == "66fe9e584f405ebc"


def test_weight_cache_and_device_do_not_change_the_hash():
    base = load_config(preset="tiny")
    moved = load_config(preset="tiny", overrides=["models.cache_dir=/elsewhere", "models.device=cpu"])
    assert moved.models.cache_dir == "/elsewhere" and moved.hash() == base.hash() == "603cb583a52abbf9"
    assert load_config(preset="tiny", overrides=["models.sam_precision=bf16"]).hash() != base.hash()
    assert load_config(preset="tiny", overrides=["models.sam_sha256=" + "ab" * 32]).hash() != base.hash()


def test_dicom_seg_settings_label_the_result_and_leave_the_hash(tmp_path):
    """outputs.dicom_seg and targets[].dicom_seg (SEG segment codes) do not change the results."""
    base = load_config(preset="tiny")
    assert base.outputs.dicom_seg is False
    assert base.targets[0].dicom_seg.category == base.targets[0].dicom_seg.type == Code("85756007", "SCT", "Tissue")
    (tmp_path / "job.yaml").write_text(
        "outputs: {dicom_seg: true}\n"
        "targets:\n  - name: nodule\n    prompts: [a lung nodule]\n    dicom_seg:\n"
        "      category: {value: 49755003, meaning: Morphologically abnormal structure}\n"
        "      type: {value: 27925004, scheme: SCT, meaning: Nodule}\n"
    )  # fmt: skip
    cfg = load_config(tmp_path / "job.yaml", preset="tiny", overrides=["targets.0.dicom_seg.type.value=108369006"])
    codes = cfg.targets[0].dicom_seg
    assert cfg.outputs.dicom_seg and codes.category == Code("49755003", "SCT", "Morphologically abnormal structure")
    assert codes.type == Code("108369006", "SCT", "Nodule")  # numbers from YAML and --set become strings
    same_method = load_config(preset="tiny", prompts=["a lung nodule"], target="nodule")
    assert cfg.hash() == same_method.hash()
    with pytest.raises(ConfigError, match=r"targets\.dicom_seg: code"):
        load_config(overrides=["targets.0.dicom_seg.type.meaning="])


def test_command_line_inputs_and_out_are_config_fields():
    cfg = load_config(prompts=["a lung"], inputs=["s3://a/", "/b"], out="s3://c/out")
    assert cfg.inputs.uris == ("s3://a/", "/b") and cfg.outputs.uri == "s3://c/out"
    assert load_config(inputs=["/b"], overrides=["inputs.uris=[/x]"]).inputs.uris == ("/x",)  # --set wins


def test_hash_is_stable_and_sensitive():
    a, b = load_config(overrides=["seed=1"]), load_config(overrides=["seed=1"])
    assert a.hash() == b.hash() and len(a.hash()) == 16
    assert load_config(overrides=["seed=2"]).hash() != a.hash()
    assert isinstance(JobConfig().to_dict()["m2ib"]["precision"], str)  # plain JSON-able values


def test_scientific_notation_without_a_dot_is_a_number(tmp_path: Path):
    """YAML 1.1 reads 1e-7 as a string; float fields accept it (in files and in --set)."""
    (tmp_path / "job.yaml").write_text("m2ib: {cos_eps: 1e-7}\n")
    assert load_config(tmp_path / "job.yaml").m2ib.cos_eps == 1e-7
    assert load_config(overrides=["m2ib.lr=2e-1"]).m2ib.lr == 0.2
    with pytest.raises(ConfigError, match=r"m2ib\.lr: expected a number"):
        load_config(overrides=["m2ib.lr=fast"])


def test_an_explicit_model_preset_wins_over_the_config_file(tmp_path):
    shipped = REPO / "jobs" / "configs" / "lung_ct.yaml"  # names the real weights
    assert load_config(shipped).models.clip != "tiny"
    cfg = load_config(shipped, preset="tiny")  # `--config lung_ct.yaml --models tiny`: a smoke run, not a download
    assert (cfg.models.clip, cfg.models.sam, cfg.m2ib.layer) == ("tiny", "tiny", 4)
    assert load_config(shipped, preset="tiny", overrides=["m2ib.layer=2"]).m2ib.layer == 2  # --set still last


def test_a_pacs_store_is_checked_when_the_config_is_loaded():
    store = "outputs.dicomweb_store=dicomweb://pacs.example:8042/dicom-web"
    cfg = load_config(overrides=["outputs.dicom_seg=true", store])
    assert cfg.outputs.dicomweb_store == "dicomweb://pacs.example:8042/dicom-web"
    assert cfg.hash() == load_config(overrides=["outputs.dicom_seg=true"]).hash()  # where results go, not what
    with pytest.raises(ConfigError, match=r"needs outputs\.dicom_seg=true"):
        load_config(overrides=[store])
    with pytest.raises(ConfigError, match="no query, study or series"):
        load_config(overrides=["outputs.dicom_seg=true", store + "?Modality=CT"])
    with pytest.raises(ConfigError, match="not a DICOMweb URI"):
        load_config(overrides=["outputs.dicom_seg=true", "outputs.dicomweb_store=https://pacs.example/dicom-web"])
