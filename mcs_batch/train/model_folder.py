"""The fine-tuned model as a folder the segmentation job loads as it is (open_clip `local-dir:` layout).

    OUT/open_clip_config.json        copied from the base folder (text tower pointed at OUT when local)
    OUT/open_clip_pytorch_model.bin  the fine-tuned open_clip state dict
    OUT/config.json, vocab.txt, tokenizer*.json, special_tokens_map.json   copied from the base folder
    OUT/mcs_batch_model.json         copied when the base has it (a tiny random base stays "tiny")
    OUT/model_card.json              base model and digest, data listing and digest, loss, metrics
    OUT/MODEL_CARD.md                the same, for people

The folder is assembled in a temporary directory, loaded once with `load_biomedclip` (strict: every
weight must fit the configuration), then published: a local folder by rename, an object-store prefix
file by file (the weights last, after the small files).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.io.storage import StorageOptions, filesystem_for, protocol_of
from mcs_batch.models.biomedclip import WEIGHT_FILE_NAMES, load_biomedclip
from mcs_batch.models.open_clip_folder import MARKER_FILE, WEIGHTS_FILE, point_text_tower_at
from mcs_batch.models.weights import sha256_file

CARD_JSON, CARD_MD = "model_card.json", "MODEL_CARD.md"
_NOT_COPIED = {*WEIGHT_FILE_NAMES, CARD_JSON, CARD_MD}


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().absolute()


def check_output(uri: str, *, overwrite: bool, storage: StorageOptions | None) -> None:
    """Refuse (before any training) to replace an existing model folder unless asked to."""
    if overwrite:
        return
    if is_local(uri):
        path = _local_path(uri)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"output.uri {uri}: already exists; choose another or set output.overwrite=true")
        return
    fs, path = filesystem_for(uri, storage)
    try:
        fs.invalidate_cache(path)  # fsspec instances are shared: never trust an old listing here
        taken = bool(fs.find(path))
    except Exception as e:
        raise ConfigError(f"output.uri {uri}: cannot reach it ({type(e).__name__}: {e})") from e
    if taken:
        raise ConfigError(f"output.uri {uri}: already holds objects; choose another or set output.overwrite=true")


def assemble(stage: Path, *, base_folder: Path, weights_file: Path, card: dict) -> dict:
    """Write the folder's files into `stage`; returns the card with the new weights' sha256 added."""
    stage.mkdir(parents=True, exist_ok=True)
    for source in sorted(base_folder.rglob("*")):
        rel = source.relative_to(base_folder)
        if any(part.startswith(".") for part in rel.parts) or not source.is_file() or rel.name in _NOT_COPIED:
            continue
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, stage / rel)
    shutil.copyfile(weights_file, stage / WEIGHTS_FILE)
    card = {**card, "weights_sha256": sha256_file(stage / WEIGHTS_FILE)}
    marker_path = stage / MARKER_FILE
    if marker_path.is_file():
        marker = json.loads(marker_path.read_text())
        marker["finetuned"] = {"from": card["base_model"]["uri"], "base_digest": card["base_model"]["digest"]}
        marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    (stage / CARD_JSON).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (stage / CARD_MD).write_text(render_card(card))
    return card


def publish(stage: Path, uri: str, *, overwrite: bool, storage: StorageOptions | None) -> str:
    """Move the assembled folder to `uri` (local rename or upload); returns the final location."""
    if is_local(uri):
        final = _local_path(uri)
        if (stage / "config.json").is_file():
            point_text_tower_at(stage, final)  # the HF text tower config lives in the folder itself
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            if not overwrite and (not final.is_dir() or any(final.iterdir())):
                raise ConfigError(f"output.uri {uri}: appeared during training; set output.overwrite=true")
            old = Path(tempfile.mkdtemp(prefix=".replaced-", dir=final.parent))
            os.replace(final, old / final.name)
        incoming = final.parent / f".{final.name}.incoming"
        shutil.rmtree(incoming, ignore_errors=True)  # left over from an interrupted publish
        shutil.copytree(stage, incoming)
        os.replace(incoming, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return str(final)
    fs, path = filesystem_for(uri, storage)
    path = path.rstrip("/")
    fs.invalidate_cache(path)
    if overwrite and fs.exists(path):
        fs.rm(path, recursive=True)
    files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.name == WEIGHTS_FILE, str(p)))
    for local in files:
        fs.put_file(str(local), f"{path}/{local.relative_to(stage).as_posix()}")
    return uri


def write_model_folder(
    uri: str,
    *,
    base_folder: Path,
    weights_file: Path,
    card: dict,
    overwrite: bool,
    storage: StorageOptions | None = None,
) -> tuple[str, dict]:
    """Assemble, check (load it), publish; returns (final location, card as written)."""
    with tempfile.TemporaryDirectory(prefix="mcs-finetuned-") as tmp:
        stage = Path(tmp) / "model"
        card = assemble(stage, base_folder=base_folder, weights_file=weights_file, card=card)
        load_biomedclip(stage)  # strict: raises WeightsError if anything does not fit
        return publish(stage, uri, overwrite=overwrite, storage=storage), card


def render_card(card: dict) -> str:
    """MODEL_CARD.md from the card dict."""
    base, data, loss = card["base_model"], card["data"], card["loss"]
    final = card["metrics"].get("final") or {}
    before = card["metrics"].get("base_model") or {}

    def pct(record: dict, key: str) -> str:
        return f"{100 * record[key]:.1f}%" if isinstance(record.get(key), int | float) else "n/a"

    lines = [
        "# BiomedCLIP fine-tuned with a contrastive loss (mcs-batch finetune-clip)",
        "",
        f"- Base model: `{base['uri']}` (sha256 of the file listing {base['digest']}; tiny random: {base['tiny']})",
        f"- Weights: `open_clip_pytorch_model.bin`, sha256 {card['weights_sha256']}",
        f"- Data: {', '.join(f'`{u}`' for u in data['listing'])} (listing sha256 {data['listing_digest']})",
        f"- Pairs: {data['pairs']}",
        f"- Loss: {loss['kind']} (temperature {loss['temperature']}, beta1 {loss['beta1']}, beta2 {loss['beta2']})",
        f"- Trained towers: {card['optim']['towers']}; steps: {card['training']['steps']}; "
        f"workers: {card['training']['workers']}; config hash {card['config_hash']}",
        "",
        "| Validation retrieval | i2t top-1 | i2t top-2 | t2i top-1 | t2i top-2 | pairs | chance top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in (("base model", before), ("fine-tuned", final)):
        if record:
            cells = [pct(record, k) for k in ("i2t_top1", "i2t_top2", "t2i_top1", "t2i_top2")]
            lines.append(f"| {name} | {' | '.join(cells)} | {record.get('n', 'n/a')} | {pct(record, 'chance_top1')} |")
    if base["tiny"]:
        lines += ["", "Made from TINY random weights: for tests only; masks made with it are meaningless."]
    return "\n".join(lines) + "\n"
