"""BiomedCLIP weights in the Hugging Face port's key layout <-> open_clip's layout.

MedCLIP-SAMv2's fine-tuned BiomedCLIP is published as a state dict of the Hugging Face port of
BiomedCLIP (the `BiomedCLIPModel` of the chuhac/BiomedCLIP-vit-bert-hf remote code, also shipped in
the reference repository's saliency_maps/model/). That port renames every module and splits timm's
fused attention projection:

    open_clip (timm ViT + HF BERT)                        HF port
    visual.trunk.cls_token            [1, 1, D]           vision_model.embeddings.class_embedding [D]
    visual.trunk.pos_embed            [1, N, D]           vision_model.embeddings.position_embedding.weight [N, D]
    visual.trunk.patch_embed.proj.*                       vision_model.embeddings.patch_embedding.*
    visual.trunk.blocks.i.norm1 / norm2                   vision_model.encoder.layers.i.layer_norm1 / layer_norm2
    visual.trunk.blocks.i.attn.qkv    [3D, D] (q; k; v)   ....layers.i.self_attn.q_proj / k_proj / v_proj [D, D]
    visual.trunk.blocks.i.attn.proj                       ....layers.i.self_attn.out_proj
    visual.trunk.blocks.i.mlp.fc1 / fc2                   ....layers.i.mlp.fc1 / fc2
    visual.trunk.norm                                     vision_model.post_layernorm
    visual.head.proj.weight                               visual_projection.weight
    text.transformer.embeddings.word_embeddings           text_model.embeddings.token_embedding
      .position_embeddings / .token_type_embeddings         .position_embedding / .token_type_embedding
      .LayerNorm                                            .layer_norm
    text.transformer.encoder.layer.i.attention.self.query/key/value   text_model.encoder.layers.i.self_attn.q/k/v_proj
      .attention.output.dense / .attention.output.LayerNorm             .self_attn.out_proj / .layer_norm1
      .intermediate.dense / .output.dense / .output.LayerNorm           .mlp.fc1 / .mlp.fc2 / .layer_norm2
    text.proj.0.weight / text.proj.2.weight               text_projection.fc1.weight / text_projection.fc2.weight
    logit_scale                                           logit_scale

Buffers some library versions save (`*.position_ids`, `*.token_type_ids`) are dropped; any other
key that fits neither layout is an error, never silently ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mcs_batch.models.open_clip_folder import (
    MARKER_FILE,
    OPEN_CLIP_CONFIG,
    WEIGHTS_FILE,
    point_text_tower_at,
    read_marker,
)
from mcs_batch.models.weights import WeightsError, load_state_dict, sha256_file

IMPORT_RECORD = "mcs_batch_import.json"

# (open_clip name, HF port name); {i}: a layer index, {p}: weight | bias.
_OC_VIT, _HF_VIT = "visual.trunk.blocks.{i}.", "vision_model.encoder.layers.{i}."
_OC_EMB, _HF_EMB = "text.transformer.embeddings.", "text_model.embeddings."
_OC_BERT, _HF_BERT = "text.transformer.encoder.layer.{i}.", "text_model.encoder.layers.{i}."
_RENAMES: tuple[tuple[str, str], ...] = (
    ("visual.trunk.patch_embed.proj.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    (_OC_VIT + "norm1.{p}", _HF_VIT + "layer_norm1.{p}"),
    (_OC_VIT + "attn.proj.{p}", _HF_VIT + "self_attn.out_proj.{p}"),
    (_OC_VIT + "norm2.{p}", _HF_VIT + "layer_norm2.{p}"),
    (_OC_VIT + "mlp.fc1.{p}", _HF_VIT + "mlp.fc1.{p}"),
    (_OC_VIT + "mlp.fc2.{p}", _HF_VIT + "mlp.fc2.{p}"),
    ("visual.trunk.norm.{p}", "vision_model.post_layernorm.{p}"),
    ("visual.head.proj.weight", "visual_projection.weight"),
    (_OC_EMB + "word_embeddings.weight", _HF_EMB + "token_embedding.weight"),
    (_OC_EMB + "position_embeddings.weight", _HF_EMB + "position_embedding.weight"),
    (_OC_EMB + "token_type_embeddings.weight", _HF_EMB + "token_type_embedding.weight"),
    (_OC_EMB + "LayerNorm.{p}", _HF_EMB + "layer_norm.{p}"),
    (_OC_BERT + "attention.self.query.{p}", _HF_BERT + "self_attn.q_proj.{p}"),
    (_OC_BERT + "attention.self.key.{p}", _HF_BERT + "self_attn.k_proj.{p}"),
    (_OC_BERT + "attention.self.value.{p}", _HF_BERT + "self_attn.v_proj.{p}"),
    (_OC_BERT + "attention.output.dense.{p}", _HF_BERT + "self_attn.out_proj.{p}"),
    (_OC_BERT + "attention.output.LayerNorm.{p}", _HF_BERT + "layer_norm1.{p}"),
    (_OC_BERT + "intermediate.dense.{p}", _HF_BERT + "mlp.fc1.{p}"),
    (_OC_BERT + "output.dense.{p}", _HF_BERT + "mlp.fc2.{p}"),
    (_OC_BERT + "output.LayerNorm.{p}", _HF_BERT + "layer_norm2.{p}"),
    ("text.proj.0.weight", "text_projection.fc1.weight"),
    ("text.proj.2.weight", "text_projection.fc2.weight"),
    ("logit_scale", "logit_scale"),
)
_OC_QKV = _OC_VIT + "attn.qkv.{p}"
_HF_QKV = _HF_VIT + "self_attn.{which}_proj.{p}"
_OC_CLS, _HF_CLS = "visual.trunk.cls_token", "vision_model.embeddings.class_embedding"
_OC_POS, _HF_POS = "visual.trunk.pos_embed", "vision_model.embeddings.position_embedding.weight"
_BENIGN_BUFFERS = ("position_ids", "token_type_ids")


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    pattern = pattern.replace(r"\{which\}", r"(?P<which>[qkv])")
    return re.compile(pattern + "$")


_TO_HF = [(_regex(oc), hf) for oc, hf in _RENAMES]
_TO_OC = [(_regex(hf), oc) for oc, hf in _RENAMES]
_OC_QKV_RE, _HF_QKV_RE = _regex(_OC_QKV), _regex(_HF_QKV)


def _rename(key: str, table) -> str | None:
    for pattern, template in table:
        if match := pattern.match(key):
            return template.format(**match.groupdict())
    return None


def _unknown(keys: list[str], layout: str) -> WeightsError:
    return WeightsError(f"{len(keys)} keys do not belong to the {layout} layout, e.g. {sorted(keys)[:5]}")


def open_clip_to_hf(state_dict: dict) -> dict:
    """An open_clip BiomedCLIP state dict -> the HF port's key layout (tensors shared, not copied)."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith(_BENIGN_BUFFERS):
            continue
        if key == _OC_CLS:
            out[_HF_CLS] = value.reshape(value.shape[-1])
        elif key == _OC_POS:
            out[_HF_POS] = value.reshape(value.shape[-2], value.shape[-1])
        elif match := _OC_QKV_RE.match(key):
            for which, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[_HF_QKV.format(which=which, **match.groupdict())] = part
        elif (new := _rename(key, _TO_HF)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "open_clip BiomedCLIP")
    return out


def hf_to_open_clip(state_dict: dict) -> dict:
    """A state dict in the HF port's key layout -> open_clip BiomedCLIP keys (q/k/v fused again)."""
    import torch

    out, unknown, qkv = {}, [], {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith(_BENIGN_BUFFERS):
            continue
        if key == _HF_CLS:
            out[_OC_CLS] = value.reshape(1, 1, value.shape[-1])
        elif key == _HF_POS:
            out[_OC_POS] = value.reshape(1, value.shape[-2], value.shape[-1])
        elif match := _HF_QKV_RE.match(key):
            groups = match.groupdict()
            qkv.setdefault((int(groups["i"]), groups["p"]), {})[groups["which"]] = value
        elif (new := _rename(key, _TO_OC)) is not None:
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "HF BiomedCLIP port")
    for (i, p), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise WeightsError(f"vision layer {i}: {p} of {'/'.join(missing)}_proj missing, cannot fuse qkv")
        out[_OC_QKV.format(i=i, p=p)] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def import_biomedclip_hf(src: str | os.PathLike, dst: str | os.PathLike, *, base_folder: str | os.PathLike) -> Path:
    """Write a complete open_clip BiomedCLIP folder at `dst` from HF-port weights in `src`.

    src:         the HF-layout state dict file (.bin / .pt / .safetensors), loaded safely
    base_folder: an open_clip BiomedCLIP folder of the same architecture: its config, tokenizer and
                 text tower config are copied (its weights are not)
    dst:         must not exist; written in a temporary sibling, checked by a strict load, renamed
    A tiny-size base passes its tiny marker on (such an architecture cannot hold real weights); the
    import is recorded in `mcs_batch_import.json` (source path and sha256).
    """
    from mcs_batch.models.biomedclip import WEIGHT_FILE_NAMES, load_biomedclip

    src, dst, base_folder = Path(src), Path(dst).absolute(), Path(base_folder)
    if not (base_folder / OPEN_CLIP_CONFIG).is_file():
        raise WeightsError(f"{base_folder}: not an open_clip folder (no {OPEN_CLIP_CONFIG})")
    if dst.exists():
        raise WeightsError(f"{dst}: already exists; import into a new folder")
    state = load_state_dict(src)
    try:
        state = hf_to_open_clip(state)
    except WeightsError as e:
        raise WeightsError(f"{src}: {e}") from e

    import torch

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-import-{dst.name}-", dir=dst.parent))
    try:
        marker = read_marker(base_folder)
        skip = set(WEIGHT_FILE_NAMES) | {IMPORT_RECORD}
        if not (marker and marker.get("size") == "tiny"):
            skip.add(MARKER_FILE)
        for path in sorted(base_folder.iterdir()):
            if path.is_file() and path.name not in skip and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
        if (tmp / "config.json").is_file():
            point_text_tower_at(tmp, dst)
        torch.save(state, tmp / WEIGHTS_FILE)
        record = {"source": str(src.absolute()), "source_sha256": sha256_file(src), "layout": "hf"}
        record["base_folder"] = str(base_folder.absolute())
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            load_biomedclip(tmp)  # strict: every key and shape must fit the base architecture
        except WeightsError as e:
            raise WeightsError(f"{src}: does not fit the architecture of {base_folder}: {e}") from e
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
