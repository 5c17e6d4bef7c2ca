"""Model weights from anywhere, fetched once per node, pinned by digest, loaded without pickle risk.

Weight URIs:
    tiny, tiny:base          random-weight BiomedCLIP folders written by `mcs_batch.models.tiny`
                             (seed 0) into the cache; records carry `tiny=True`
    hf-hub:org/name[@rev]    a Hugging Face Hub snapshot (needs the network)
    /path, ./path, file://   a local file or folder, used in place (nothing is copied)
    s3://bucket/key          any other fsspec scheme: one object, or every object under a prefix
                             (gs://, az://, memory://, ...), with `storage_options` for the filesystem

Remote weights are downloaded once per node into `cache_dir`, keyed by a hash of the URI:

    cache_dir/<scheme>-<name>-<hash16>/     the entry (a folder; a single object keeps its file name)
    cache_dir/<scheme>-<name>-<hash16>.lock a `filelock` lock: one process downloads, the others wait
    cache_dir/.tmp-<...>/                   the download in progress, os.replace()d into place

So several processes (Ray actors) asking for one URI at once download it once, and nobody ever sees
a half-written entry. The cache is keyed by the URI only: an object replaced at the same URI is not
fetched again. Pin digests (`expected=`) to notice; a pinned cached copy that does not match is
removed so that the next fetch downloads it again.

The library never reads os.environ: credentials and endpoints come in through `storage_options`
(for s3fs: endpoint_url, key, secret, ...). Whether the Hugging Face Hub is reachable is the
environment's business (HF_HUB_OFFLINE is set by the CLI, not here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mcs_batch.errors import ConfigError
from mcs_batch.models.open_clip_folder import read_marker

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
TINY_URIS = {"tiny": "tiny", "tiny:tiny": "tiny", "tiny:base": "base"}
_CHUNK = 1 << 20
MANIFEST = ".mcs_batch_download.json"  # in each cache entry: uri, pid, time, kind


class WeightsError(ConfigError):
    """Weights that cannot be fetched, do not match their pinned digest, or are unsafe to load."""


@dataclass(frozen=True)
class WeightsRecord:
    """Where a model's weights came from and exactly which bytes they are (written into outputs).

    uri:        the URI as given
    local_path: the local file or folder (absolute)
    files:      relative posix name -> sha256 hex digest, for every file (a single file: its name)
    tiny:       random weights made by `mcs_batch.models.tiny`: masks made with them are meaningless
    """

    uri: str
    local_path: Path
    files: dict[str, str] = field(default_factory=dict)
    tiny: bool = False

    @property
    def is_folder(self) -> bool:
        return self.local_path.is_dir()

    @property
    def digest(self) -> str:
        """One sha256 for the whole record: the file's own digest, or a digest of the listing."""
        if not self.is_folder and len(self.files) == 1:
            return next(iter(self.files.values()))
        listing = "".join(f"{name}\t{sha}\n" for name, sha in sorted(self.files.items()))
        return hashlib.sha256(listing.encode()).hexdigest()

    def to_dict(self) -> dict:
        """JSON-ready form for job outputs and the catalog."""
        return {
            "uri": self.uri,
            "local_path": str(self.local_path),
            "digest": self.digest,
            "files": dict(sorted(self.files.items())),
            "tiny": self.tiny,
        }


# -- digests -----------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(path: str | os.PathLike) -> dict[str, str]:
    """{relative posix name: sha256} for a file (its own name) or every file in a folder.

    Hidden files and folders (".cache" from the Hub client, ".lock" files) are not part of the weights.
    """
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    files = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = Path(root) / name
            files[full.relative_to(path).as_posix()] = sha256_file(full)
    return files


def verify(record_or_path: WeightsRecord | str | os.PathLike, expected: str | Mapping[str, str]) -> None:
    """Raise WeightsError unless the weights match the pinned digest(s).

    expected: a sha256 hex string for a single file, or {relative name: sha256} for files of a folder
              (files not named are not checked; a named file that is missing is a mismatch).
    A WeightsRecord is checked against the digests taken when it was fetched; a path is hashed now.
    """
    if isinstance(record_or_path, WeightsRecord):
        uri, files, is_folder = record_or_path.uri, record_or_path.files, record_or_path.is_folder
    else:
        path = Path(record_or_path)
        if not path.exists():
            raise WeightsError(f"{path}: no such file or folder to verify")
        uri, files, is_folder = str(path), digest_files(path), path.is_dir()
    if isinstance(expected, str):
        if is_folder:
            raise WeightsError(
                f"{uri}: a single sha256 pins a single file, but this is a folder of {len(files)} files; "
                "pin it with {file name: sha256}"
            )
        ((name, actual),) = files.items()
        _check_one(uri, name, expected, actual)
        return
    for name, want in sorted(expected.items()):
        if name not in files:
            raise WeightsError(f"{uri}: pinned file {name!r} is missing (files: {sorted(files)[:10]})")
        _check_one(uri, name, want, files[name])


def _check_one(uri: str, name: str, expected: str, actual: str) -> None:
    if expected.strip().lower() != actual:
        raise WeightsError(f"{uri}: sha256 mismatch for {name}: expected {expected}, actual {actual}")


# -- fetching ----------------------------------------------------------------------------------------


def fetch(
    uri: str,
    *,
    cache_dir: str | os.PathLike,
    storage_options: Mapping | None = None,
    expected: str | Mapping[str, str] | None = None,
) -> WeightsRecord:
    """Make the weights at `uri` available locally (once per node) and describe them.

    cache_dir:       local folder for downloads (created if missing); shared by all processes
    storage_options: fsspec filesystem options for remote URIs (s3fs: endpoint_url, key, secret, ...)
    expected:        pinned digest(s), see `verify`; a mismatch raises WeightsError naming the file
    """
    uri = str(uri).strip()
    if not uri:
        raise WeightsError("empty weights URI")
    cache_dir = Path(cache_dir).absolute()
    if uri in TINY_URIS:
        local, cached = _fetch_tiny(uri, cache_dir), True
    elif uri.startswith(HF_HUB_PREFIX):
        local, cached = _fetch_hf_hub(uri, cache_dir), True
    elif _scheme(uri) in ("", "file", "local"):
        local, cached = _local_path(uri), False
    else:
        local, cached = _fetch_fsspec(uri, cache_dir, dict(storage_options or {})), True

    marker = read_marker(local) if local.is_dir() else None
    record = WeightsRecord(
        uri=uri,
        local_path=local,
        files=digest_files(local),
        tiny=bool(marker and marker.get("tiny")),
    )
    if expected is not None:
        try:
            verify(record, expected)
        except WeightsError as e:
            if cached:
                _evict(cache_dir, uri)
                raise WeightsError(f"{e} (removed the cached copy; the next fetch downloads again)") from None
            raise
    return record


def is_cached(uri: str) -> bool:
    """Whether `fetch` keeps the weights of `uri` in a cache entry (tiny, hf-hub:, any remote scheme);
    local files and folders are used in place."""
    uri = str(uri).strip()
    return uri in TINY_URIS or uri.startswith(HF_HUB_PREFIX) or _scheme(uri) not in ("", "file", "local")


def _scheme(uri: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else ""


def _local_path(uri: str) -> Path:
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser().absolute()
    if not path.exists():
        raise WeightsError(f"{uri}: no such file or folder")
    return path


def cache_key(uri: str) -> str:
    """The cache entry name for a URI: readable prefix + 16 hex digits of sha256(uri)."""
    scheme = "tiny" if uri in TINY_URIS else "hf-hub" if uri.startswith(HF_HUB_PREFIX) else _scheme(uri)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1].split(":")[-1])[:64]
    return f"{scheme or 'local'}-{name.strip('-.') or 'x'}-{hashlib.sha256(uri.encode()).hexdigest()[:16]}"


def materialise(uri: str, cache_dir: Path, download) -> tuple[Path, dict]:
    """(cache entry, its manifest) for `uri`; download(tmp_dir) runs once per node, under a file lock.

    download may return a dict of facts to keep in the entry's manifest (e.g. {"file": name}).
    """
    from filelock import FileLock

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri)
    entry = cache_dir / key
    if entry.exists():
        return entry, _read_manifest(entry)
    with FileLock(str(cache_dir / f"{key}.lock")):
        if entry.exists():  # another process finished while we waited
            return entry, _read_manifest(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        try:
            logger.info("%s: downloading into %s", uri, entry)
            manifest = {"uri": uri, "pid": os.getpid(), "downloaded_at": time.time(), **(download(tmp) or {})}
            (tmp / MANIFEST).write_text(json.dumps(manifest) + "\n")
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry, manifest


def _read_manifest(entry: Path) -> dict:
    try:
        return json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _evict(cache_dir: Path, uri: str) -> None:
    from filelock import FileLock

    key = cache_key(uri)
    entry = cache_dir / key
    with FileLock(str(cache_dir / f"{key}.lock")):
        if entry.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".evict-{key}-", dir=cache_dir))
            os.replace(entry, trash / key)
            shutil.rmtree(trash, ignore_errors=True)


def _fetch_tiny(uri: str, cache_dir: Path) -> Path:
    from mcs_batch.models.open_clip_folder import point_text_tower_at
    from mcs_batch.models.tiny import write_tiny_biomedclip

    size = TINY_URIS[uri]
    entry = cache_dir / cache_key(uri)

    def write(tmp: Path) -> None:
        write_tiny_biomedclip(tmp, seed=0, size=size)
        point_text_tower_at(tmp, entry)  # the folder's final place, after os.replace

    return materialise(uri, cache_dir, write)[0]


def _fetch_hf_hub(uri: str, cache_dir: Path) -> Path:
    repo = uri[len(HF_HUB_PREFIX) :]
    repo_id, _, revision = repo.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise WeightsError(f"{uri}: expected hf-hub:org/name or hf-hub:org/name@revision")

    def download(tmp: Path) -> None:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(repo_id, revision=revision or None, local_dir=tmp)
        except Exception as e:
            cause = (str(e).strip().splitlines() or [""])[0]
            raise WeightsError(
                f"{uri}: could not download from the Hugging Face Hub ({type(e).__name__}: {cause}). "
                "Without network access, copy the files to local disk or object storage and give that "
                "path or s3:// URI instead"
            ) from e
        shutil.rmtree(tmp / ".cache", ignore_errors=True)

    return materialise(uri, cache_dir, download)[0]


def _fetch_fsspec(uri: str, cache_dir: Path, storage_options: dict) -> Path:
    """One object (-> cached file) or every object under a prefix (-> cached folder).

    The remote store is only contacted when the entry is not in the cache yet.
    """

    def download(tmp: Path) -> dict:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        except (ImportError, ValueError) as e:
            raise WeightsError(f"{uri}: no filesystem for this URI ({e})") from e
        path = path.rstrip("/")
        try:
            is_file = fs.isfile(path)
            remote_files = [] if is_file else sorted(fs.find(path))
        except Exception as e:
            raise WeightsError(f"{uri}: cannot list ({type(e).__name__}: {e})") from e
        if not is_file and not remote_files:
            raise WeightsError(f"{uri}: no such object or prefix")
        name = path.rsplit("/", 1)[-1]
        pairs = [(path, tmp / name)] if is_file else [(f, tmp / f[len(path) :].lstrip("/")) for f in remote_files]
        for remote, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(remote, str(local))
            except Exception as e:
                raise WeightsError(f"{uri}: download of {remote} failed ({type(e).__name__}: {e})") from e
        return {"file": name} if is_file else {}

    entry, manifest = materialise(uri, cache_dir, download)
    return entry / manifest["file"] if manifest.get("file") else entry


# -- loading -----------------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike) -> dict:
    """A state dict {name: tensor} on the CPU, loaded without executing pickled code.

    `.safetensors` via safetensors; anything else via torch.load(weights_only=True), which refuses
    pickles of arbitrary objects: those raise WeightsError. A checkpoint dict holding a "state_dict"
    entry (open_clip training checkpoints) is unwrapped.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            detail = _unpickler_detail(str(e))
            if "Unsupported global" in detail:
                raise WeightsError(
                    f"{path}: refused to load: the pickle holds objects other than tensors and plain "
                    f"containers ({detail}). Only state dicts (or .safetensors) are loaded"
                ) from e
            raise WeightsError(f"{path}: not a readable torch weights file ({detail})") from e
        except Exception as e:
            raise WeightsError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return dict(state)


def _unpickler_detail(message: str) -> str:
    """The useful part of torch's weights_only error ("Unsupported global: GLOBAL os.system ...")."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    text = rest if found else message
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line.split(" was not an allowed global")[0] if "Unsupported global" in line else line
    return "unpickling failed"
