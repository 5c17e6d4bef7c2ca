"""Random-weight BiomedCLIP folders, built offline: for tests ("tiny") and benchmarks ("base").

`write_tiny_biomedclip(folder)` writes exactly the open_clip `local-dir:` layout the real BiomedCLIP
uses, so that every code path (open_clip factory, HF text tower, HF tokenizer, weight loading) is the
one production runs:

    folder/
      open_clip_config.json        model_cfg (timm ViT + HF BERT, MLP text projection) + preprocess_cfg
      open_clip_pytorch_model.bin  torch.save(state_dict), open_clip key layout
      config.json                  the HF text tower's BertConfig
      vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json
      mcs_batch_model.json         marker: {"tiny": true, "seed": ..., "size": ..., depths, ...}

The marker's `"tiny": true` means "random weights made here": masks made with such a model are
meaningless, whatever its size. Every output made with it must say so (see `WeightsRecord.tiny`).

Sizes (all numbers visible in `SIZES`):
- "tiny": timm `test_vit` (patch 16, width 64, 6 blocks, 2 heads; natively 160x160, run at 224 by
  `load_biomedclip`, which resamples its position embedding to 197 tokens), 2-layer BERT of width 32
  over a made-up ~370-token medical wordpiece vocabulary, embed_dim 32: ~0.3 M parameters.
- "base": BiomedCLIP's own architecture (ViT-B/16 at 224, 12 blocks of width 768; BERT-base, 12
  layers of width 768, vocabulary of 30522 made-up tokens; projection MLP 768 -> 640 -> 512 with
  GELU; embed_dim 512): 196 M parameters, ~750 MiB on disk, a few seconds to build.

Weights are a pure function of (size, seed): library initialisation under a seeded, forked RNG, then
every floating-point tensor perturbed by N(0, 0.02) noise from a seeded generator (so that biases and
norms are not all 0 / 1, which would hide layout bugs in weight conversions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mcs_batch.models.open_clip_folder import (
    CLIP_MEAN,
    CLIP_STD,
    MARKER_FILE,
    OPEN_CLIP_CONFIG,
    WEIGHTS_FILE,
    quiet_open_clip_random_init,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# A few hundred lowercase medical words for the tiny vocabulary (made up for tests, not a real vocab).
_MEDICAL_TEXT = """
a an the of in on at with without and or no not is are this that to from by for as left right
bilateral upper lower middle anterior posterior medial lateral central peripheral superior inferior
image scan photo view slice axial coronal sagittal frontal chest head neck abdomen pelvis breast
brain lung lungs heart liver kidney kidneys spleen pancreas stomach bowel colon rectum bladder
prostate uterus ovary thyroid adrenal aorta artery vein vessel vessels bone bones spine rib ribs
skull femur pleura pleural mediastinum trachea bronchus bronchi airway diaphragm muscle fat skin
tissue organ organs cell cells tumor tumour tumors mass masses lesion lesions nodule nodules cyst
cysts polyp polyps cancer carcinoma adenoma glioma glioblastoma meningioma pituitary metastasis
metastases benign malignant normal abnormal healthy disease infection pneumonia covid opacity
opacities consolidation effusion edema fibrosis emphysema atelectasis pneumothorax fracture
hemorrhage haemorrhage infarct stroke ischemia calcification necrosis inflammation abscess scar
ultrasound sonography mri ct xray x ray radiograph radiography mammogram mammography pet spect
endoscopy dermoscopy histology microscopy contrast enhanced enhancing weighted flair t1 t2 dwi
hypoechoic hyperechoic anechoic isoechoic echogenic hypodense hyperdense isodense hypointense
hyperintense isointense heterogeneous homogeneous irregular regular round oval lobulated spiculated
circumscribed ill defined well margin margins border borders boundary shape shaped size small large
tiny big solid cystic complex simple dense diffuse focal multifocal solitary single multiple region
area zone part portion field field segment segmentation mask outline contour shadow shadowing
acoustic posterior enhancement vascular avascular flow doppler white gray grey dark bright black
light intensity signal texture pattern appearance visible seen shows showing shown appears located
present absent suspicious typical atypical likely possible probable finding findings patient case
study exam examination scan scanning region interest target structure structures anatomy anatomical
ventricle ventricles cortex cortical white matter gray matter cerebellum brainstem hippocampus
thalamus frontal temporal parietal occipital lobe lobes hemisphere midline shift compression
swelling invasion infiltration node nodes lymph lymphadenopathy gland glands duct ducts lumen wall
walls thick thickening thin thinning volume volumes density densities attenuation air fluid blood
water calcified
"""


@dataclass(frozen=True)
class TinySize:
    """Every number of one random-weight BiomedCLIP variant."""

    timm_model_name: str  # a registered timm ViT (its own depth / width / heads)
    vision_layers: int  # blocks of that ViT (recorded so that M2IB callers know the depth)
    vision_width: int
    text_layers: int
    text_width: int
    text_heads: int
    text_intermediate: int
    vocab_size: int  # 0: exactly the made-up vocabulary; else padded (or cut) to this many tokens
    embed_dim: int
    image_size: int = 224
    context_length: int = 256  # BiomedCLIP's context length
    max_position_embeddings: int = 512  # BERT's


SIZES: dict[str, TinySize] = {
    # timm test_vit: patch 16, width 64, 6 blocks, 2 heads, mlp ratio 3 (timm 1.0.22).
    "tiny": TinySize(
        timm_model_name="test_vit",
        vision_layers=6,
        vision_width=64,
        text_layers=2,
        text_width=32,
        text_heads=2,
        text_intermediate=64,
        vocab_size=0,  # 0: exactly the made-up medical vocabulary
        embed_dim=32,
    ),
    # BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (METHOD.md "Model architectures").
    "base": TinySize(
        timm_model_name="vit_base_patch16_224",
        vision_layers=12,
        vision_width=768,
        text_layers=12,
        text_width=768,
        text_heads=12,
        text_intermediate=3072,
        vocab_size=30522,
        embed_dim=512,
    ),
}


def write_tiny_biomedclip(folder: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight BiomedCLIP folder (open_clip `local-dir:` layout) and return it.

    folder: created if missing; files in it with the same names are overwritten.
    seed:   weights (and nothing else) depend on it; same (size, seed) -> byte-identical weights.
    size:   "tiny" (~0.3 M parameters, for fast tests) or "base" (BiomedCLIP size, 196 M).
    """
    if size not in SIZES:
        raise ValueError(f"unknown tiny BiomedCLIP size {size!r}; expected one of {sorted(SIZES)}")
    spec = SIZES[size]
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)

    vocab = _make_vocab(spec.vocab_size)
    _write_text_tower(folder, spec, vocab)
    _write_open_clip_config(folder, spec)
    state_dict = _random_state_dict(folder, spec, seed)

    import torch

    torch.save(state_dict, folder / WEIGHTS_FILE)
    marker = {
        "tiny": True,
        "note": "random weights made by mcs_batch.models.tiny: masks made with this model are meaningless",
        "size": size,
        "seed": int(seed),
        "vision_layers": spec.vision_layers,
        "vision_width": spec.vision_width,
        "text_layers": spec.text_layers,
        "embed_dim": spec.embed_dim,
        "vocab_size": len(vocab),
        "format": 1,
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return folder


# -- the parts -------------------------------------------------------------------------------------


def _make_vocab(vocab_size: int) -> list[str]:
    """Special tokens, single characters (and their ## continuations), then medical words.

    Single characters make every lowercase ASCII word tokenisable without [UNK]. For a fixed size the
    list is padded with made-up tokens ("tok00123") or cut (never below the characters).
    """
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punct = list(".,;:-()/'%+")
    tokens = [*SPECIAL_TOKENS, *punct, *chars, *("##" + c for c in chars)]
    seen = set(tokens)
    for word in _MEDICAL_TEXT.split():
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    if vocab_size:
        if vocab_size < len(tokens):
            tokens = tokens[:vocab_size]
        n = 0
        while len(tokens) < vocab_size:
            tokens.append(f"tok{n:05d}")
            n += 1
    return tokens


def _write_text_tower(folder: Path, spec: TinySize, vocab: list[str]) -> None:
    """BERT config.json, vocab.txt and the tokenizer files (loadable offline)."""
    from transformers import BertConfig, BertTokenizer

    BertConfig(
        vocab_size=len(vocab),
        hidden_size=spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        intermediate_size=spec.text_intermediate,
        max_position_embeddings=spec.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=0,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    ).save_pretrained(folder)
    vocab_path = folder / "vocab.txt"
    vocab_path.write_text("\n".join(vocab) + "\n")
    # transformers 5: `vocab=` (a path or dict); `vocab_file=` silently builds a 5-token vocabulary.
    tokenizer = BertTokenizer(vocab=str(vocab_path), do_lower_case=True, model_max_length=512)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer built {len(tokenizer)} tokens from a {len(vocab)}-token vocab.txt")
    tokenizer.save_pretrained(folder)
    # save_pretrained may not rewrite vocab.txt (fast tokenizers write tokenizer.json): keep ours.
    vocab_path.write_text("\n".join(vocab) + "\n")
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    special |= {"cls_token": "[CLS]", "mask_token": "[MASK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _write_open_clip_config(folder: Path, spec: TinySize) -> None:
    """The same structure and keys as BiomedCLIP's hub `open_clip_config.json`."""
    config = {
        "model_cfg": {
            "embed_dim": spec.embed_dim,
            "vision_cfg": {
                "timm_model_name": spec.timm_model_name,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": spec.image_size,
            },
            "text_cfg": {
                "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder),
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": spec.context_length,
            },
        },
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
    }
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _random_state_dict(folder: Path, spec: TinySize, seed: int) -> dict:
    """Build the architecture from the folder's config and return seeded random weights (CPU)."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]), quiet_open_clip_random_init():
        torch.manual_seed(int(seed))
        model = open_clip.create_model(
            "local-dir:" + str(folder), load_weights=False, pretrained_text=False, device="cpu"
        )
    depth = len(model.visual.trunk.blocks)
    if depth != spec.vision_layers:
        raise RuntimeError(f"{spec.timm_model_name} has {depth} blocks, SIZES says {spec.vision_layers}")
    generator = torch.Generator().manual_seed(int(seed) + 1)
    state = model.state_dict()
    out = {}
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name].detach().clone()
            if tensor.is_floating_point() and name != "logit_scale":
                tensor += 0.02 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            out[name] = tensor.contiguous()
    return out
