"""Weight caches filled from a mirror in object storage, for nodes that have no internet access.

A mirror is a copy of cache entries (see `weights.py`) under one prefix of any fsspec store:

    s3://bucket/models/<cache_key(uri)>/...     the entry of `uri` exactly as `fetch` wrote it,
                                                 its manifest (.mcs_batch_download.json) included

`mirror` writes it where the weights can be downloaded (`mcs-batch weights mirror --to PREFIX`);
`prefill` copies the entries a job needs into `cache_dir` before the job starts (`mcs-batch weights
prefill --from PREFIX`, the Ray pods' init step). The job then asks for the weights by the URIs of its
config (`hf-hub:...`, `https://...`) and finds them in the cache: nothing contacts the Hub or the web.

A prefill is idempotent: an entry already in the cache is not copied again (its pinned digests are
checked all the same). Entries are written under the cache's own lock and moved into place whole,
so a pod that starts while another fills the cache waits, and nobody sees half an entry.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mcs_batch.models.weights import (
    MANIFEST,
    TINY_URIS,
    WeightsError,
    WeightsRecord,
    cache_key,
    fetch,
    is_cached,
    materialise,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prefilled:
    """What `prefill` did for one URI.

    record: the weights in the cache (digests of every file), as `fetch` describes them
    copied:  files copied from the mirror (0: the entry was there already, or nothing is cached)
    source:  the mirror folder they came from (None when nothing was copied)
    """

    record: WeightsRecord
    copied: int
    source: str | None


def mirror_path(mirror: str, uri: str) -> str:
    """The mirror folder of `uri`'s cache entry: PREFIX/<cache_key(uri)>."""
    return f"{str(mirror).rstrip('/')}/{cache_key(uri)}"


def _filesystem(uri: str, storage_options: Mapping | None):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise WeightsError(f"{uri}: no filesystem for this URI ({e})") from e


def prefill(
    uri: str,
    *,
    mirror: str,
    cache_dir: str | os.PathLike,
    storage_options: Mapping | None = None,
    expected: str | Mapping[str, str] | None = None,
) -> Prefilled:
    """Copy the cache entry of `uri` from `mirror` into `cache_dir`, unless it is there already.

    uri:             the weights URI as the job config names it (hf-hub:..., https://..., s3://...)
    mirror:          the mirror's prefix (s3://bucket/models/), see the module docstring
    storage_options: fsspec options for the mirror's filesystem (s3fs: endpoint_url, key, ...)
    expected:        pinned digest(s), see `weights.verify`; a mismatch removes the copy and raises
    Local paths and tiny models have no cache entry to fill: they are described, nothing is copied.
    Raises WeightsError naming the URI and the mirror folder when the mirror lacks the entry.
    """
    uri = str(uri).strip()
    cache_dir = Path(cache_dir).absolute()
    if not is_cached(uri) or uri in TINY_URIS:
        return Prefilled(fetch(uri, cache_dir=cache_dir, expected=expected), 0, None)
    source = mirror_path(mirror, uri)
    counted: list[int] = []

    def download(tmp: Path) -> dict:
        fs, root = _filesystem(source, storage_options)
        try:
            remote = sorted(fs.find(root))
        except Exception as e:
            raise WeightsError(f"{uri}: cannot list the mirror {source}/ ({type(e).__name__}: {e})") from e
        if not remote:
            raise WeightsError(
                f"{uri}: not in the mirror: no objects under {source}/ "
                "(write it with `mcs-batch weights mirror --to PREFIX` where the weights can be downloaded)"
            )
        for path in remote:
            local = tmp / path[len(root) :].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(path, str(local))
            except Exception as e:
                raise WeightsError(f"{uri}: copy of {path} from the mirror failed ({type(e).__name__}: {e})") from e
        counted.append(len(remote))
        facts = _read_json(tmp / MANIFEST)
        return {"mirror": source, **({"file": facts["file"]} if facts.get("file") else {})}

    materialise(uri, cache_dir, download)
    record = fetch(uri, cache_dir=cache_dir, expected=expected)  # the cache only: verifies the pins
    return Prefilled(record, sum(counted), source if counted else None)


def mirror(
    uri: str,
    *,
    to: str,
    cache_dir: str | os.PathLike,
    storage_options: Mapping | None = None,
    source_storage_options: Mapping | None = None,
    expected: str | Mapping[str, str] | None = None,
) -> tuple[WeightsRecord, str]:
    """Fetch `uri` into `cache_dir` (downloads it if needed) and copy its cache entry to the mirror `to`.

    storage_options:        fsspec options for the mirror's filesystem
    source_storage_options: fsspec options for `uri` itself when it is in object storage
    Returns the record and the mirror folder written. Local paths and tiny models are refused: the
    pods use local paths in place, and make tiny models themselves.
    """
    uri = str(uri).strip()
    if not is_cached(uri) or uri in TINY_URIS:
        raise WeightsError(f"{uri}: only downloaded weights are mirrored (local paths and tiny models are not)")
    cache_dir = Path(cache_dir).absolute()
    record = fetch(uri, cache_dir=cache_dir, storage_options=source_storage_options, expected=expected)
    entry = cache_dir / cache_key(uri)
    target = mirror_path(to, uri)
    fs, root = _filesystem(target, storage_options)
    for local in sorted(p for p in entry.rglob("*") if p.is_file()):
        remote = f"{root}/{local.relative_to(entry).as_posix()}"
        try:
            fs.put_file(str(local), remote)
        except Exception as e:
            raise WeightsError(f"{uri}: upload of {local.name} to {target}/ failed ({type(e).__name__}: {e})") from e
    logger.info("%s: mirrored to %s", uri, target)
    return record, target


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
