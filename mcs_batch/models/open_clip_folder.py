"""The open_clip model folder: the on-disk format that `load_biomedclip` reads and every writer of
model folders (the tiny-model builder, the HF import, fine-tuning) produces.

    folder/
      open_clip_config.json        model_cfg (timm ViT + HF BERT, projection) + preprocess_cfg
      open_clip_pytorch_model.bin  torch.save(state_dict), open_clip key layout (loaded weights_only)
      config.json, vocab.txt, tokenizer files   the HF text tower and its tokenizer
      mcs_batch_model.json         optional marker written by mcs-batch: {"tiny": true, ...} for random
                                   weights, a model card for fine-tuned ones

open_clip's `local-dir:` loading reads the HF text tower from `hf_model_name`, so a folder must name
itself there (`point_text_tower_at`) wherever it finally lives.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
MARKER_FILE = "mcs_batch_model.json"

# METHOD.md step 2 (OpenAI CLIP statistics; BiomedCLIP's preprocess_cfg).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_marker(folder: Path) -> dict | None:
    """The `mcs_batch_model.json` marker of a folder, or None for real (non-tiny) weights."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def point_text_tower_at(folder: Path, target: Path | None = None) -> None:
    """Rewrite `hf_model_name` / `hf_tokenizer_name` in folder's open_clip config to `target`.

    target defaults to the folder itself. Needed whenever a folder is written in one place and used
    in another (atomic temp-dir publishing, `import_biomedclip_hf` copying a base folder's config).
    """
    folder = Path(folder)
    path = folder / OPEN_CLIP_CONFIG
    config = json.loads(path.read_text())
    where = str(Path(target if target is not None else folder).absolute())
    text_cfg = config["model_cfg"]["text_cfg"]
    text_cfg["hf_model_name"] = where
    text_cfg["hf_tokenizer_name"] = where
    path.write_text(json.dumps(config, indent=2) + "\n")


class _DropRandomInitWarnings(logging.Filter):
    """open_clip warns "initialized randomly" when built with load_weights=False; callers load next."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("initialized randomly" in message or "no CLIP weights found" in message)


@contextlib.contextmanager
def quiet_open_clip_random_init() -> Iterator[None]:
    """Drop open_clip's (root logger) warnings about random initialisation while building a model."""
    root = logging.getLogger()
    quiet = _DropRandomInitWarnings()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
