"""Downloads of backbone weights into the cache: every cache path stays inside the cache, every file is checked.

* Confinement: an ``https://`` URL is kept at ``<cache>/urls/<host>[_<port>]/<path>`` and an ``hf://`` address at
  ``<cache>/huggingface/<owner>/<repo>[@revision]/<path>``. Whatever the address holds (``..``, ``%2e%2e``,
  backslashes, absolute parts, an odd host), the file it names is inside the cache, or the address is refused
  with one line naming the config key.
* Verification: a download is written to a temporary name unique to the process, its size is compared with the
  length the server announced and, where the address ends in ``#sha256=<64 hex digits>``, its SHA-256 with that
  one; only then is it renamed to its cache name. A short or wrong file is deleted, never cached.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from neco.errors import WeightsError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # Hugging Face owners, repositories and revisions
_CHECKSUM = re.compile(r"^sha256=([0-9a-fA-F]{64})$")


def split_checksum(address: str, key: str) -> tuple[str, str | None]:
    """``https://host/w.pth#sha256=<hex>`` -> (``https://host/w.pth``, ``<hex>``); no suffix: (address, None)."""
    source, hash_sign, fragment = address.partition("#")
    if not hash_sign:
        return source, None
    found = _CHECKSUM.match(fragment)
    if found is None:
        raise WeightsError(f"{key}={address}: the part after '#' must be sha256=<64 hex digits>.")
    return source, found.group(1).lower()


def _segments(path: str, address: str, key: str) -> list[str]:
    """The folder and file names of a path, each a plain name: no ``..``, drive, backslash or control code."""
    parts = [p for p in unquote(path).split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or any(c in part for c in "\\:") or any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise WeightsError(f"{key}={address}: the path holds '{part}'; only plain folder and file names "
                               "are allowed in a weights address (no '..', backslash, ':' or control characters).")
    return parts


def confine(path: Path, cache: Path, address: str, key: str) -> Path:
    """``path`` if it lies inside ``cache`` (compared after normalising ``..``), else a ``WeightsError``."""
    root = os.path.normpath(os.path.abspath(cache))
    target = os.path.normpath(os.path.abspath(path))
    if target == root or os.path.commonpath([root, target]) != root:
        raise WeightsError(f"{key}={address}: names a file outside the weights cache {root}; give the address "
                           "of a file (or download it yourself and give its path).")
    return Path(target)


def url_cache_path(url: str, cache: Path, flat: bool, key: str) -> Path:
    """Where ``url`` (without its ``#sha256=`` suffix) is kept in ``cache``."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise WeightsError(f"{key}={url}: only http:// and https:// addresses are downloaded.")
    try:
        port = parsed.port
    except ValueError:
        raise WeightsError(f"{key}={url}: the port is not a number from 0 to 65535.") from None
    host = parsed.hostname or ""
    if not _HOST.match(host):
        raise WeightsError(f"{key}={url}: '{host}' is not a host name (letters, digits, '-' and '.').")
    parts = _segments(parsed.path, url, key)
    if not parts or parsed.path.endswith("/"):
        raise WeightsError(f"{key}={url}: the URL does not end in a file name.")
    if flat:  # official files keep their own name, as torch.hub stores them
        return confine(cache / parts[-1], cache, url, key)
    # Host and path keep two releases with the same file name apart (e.g. the ViT-S and ViT-B files of a
    # project are often both called model.ckpt); a query string (download tokens) gets its own folder.
    folder = cache / "urls" / (host if port is None else f"{host}_{port}")
    folder = folder.joinpath(*parts[:-1])
    if parsed.query:
        folder = folder / hashlib.sha256(parsed.query.encode()).hexdigest()[:12]
    return confine(folder / parts[-1], cache, url, key)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_cached(dst: Path, expected: str | None, address: str, key: str) -> Path:
    if expected and sha256_of(dst) != expected:
        raise WeightsError(f"{key}={address}: the cached file {dst} has another SHA-256 than the address gives; "
                           "delete it to download it again, or correct the #sha256= value.")
    return dst


def _fetch(url: str, dst: Path, expected: str | None, address: str, key: str) -> None:
    """Stream ``url`` into a temporary file next to ``dst``, check it, then rename it to ``dst``."""
    from tqdm.auto import tqdm

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        # Looked up at call time so that tests can stand in for the network.
        with urllib.request.urlopen(url, timeout=60) as response:
            announced = response.headers.get("Content-Length")
            total = int(announced) if announced and announced.strip().isdigit() else None
            digest, size = hashlib.sha256(), 0
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dst.name,
                                            disable=None) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        if total is not None and size != total:
            raise WeightsError(f"{key}={address}: the download stopped after {size} of {total} bytes; nothing "
                               "was cached. Run again to retry, or download the file yourself and give its path.")
        if expected and digest.hexdigest() != expected:
            raise WeightsError(f"{key}={address}: the downloaded file's SHA-256 is {digest.hexdigest()}, not "
                               f"{expected}; nothing was cached. Check the address and its #sha256= value.")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def download(address: str, backbone: str, cache: Path, key: str = "backbone.weights", flat: bool = False) -> Path:
    """Fetch ``address`` into ``cache`` once (with a progress bar); later calls reuse the file, also offline."""
    url, expected = split_checksum(address, key)
    dst = url_cache_path(url, cache, flat, key)
    if dst.is_file():
        return _check_cached(dst, expected, address, key)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        from filelock import FileLock

        # Several processes (DDP ranks, array jobs) sharing a cache download the file once.
        with FileLock(str(dst) + ".lock"):
            if not dst.is_file():
                log.info("Downloading weights of backbone '%s' from %s to %s", backbone, url, dst)
                _fetch(url, dst, expected, address, key)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(
            f"Could not download the weights of backbone '{backbone}' from {url} ({reason}). Download the file "
            f"yourself and put it at {dst}, or set {key}=/path/to/file "
            f"({key}=random starts from random weights)."
        ) from None
    return _check_cached(dst, None, address, key)


def parse_hf(spec: str, key: str) -> tuple[str, str | None, str]:
    """``hf://<owner>/<repo>[@revision]/<path>`` -> (``owner/repo``, revision, path), each part a plain name."""
    parts = spec[len("hf://"):].split("/")
    if len(parts) < 3 or not parts[0] or not parts[1]:
        raise WeightsError(f"{key}={spec}: expected hf://<owner>/<repo>[@revision]/<path/in/repo>.")
    repo, _, revision = parts[1].partition("@")
    for name in (parts[0], repo) + ((revision,) if revision else ()):
        if not _HF_NAME.match(name) or ".." in name:
            raise WeightsError(f"{key}={spec}: '{name}' is not a Hugging Face owner, repository or revision name.")
    path = _segments("/".join(parts[2:]), spec, key)
    if not path:
        raise WeightsError(f"{key}={spec}: expected hf://<owner>/<repo>[@revision]/<path/in/repo>.")
    return f"{parts[0]}/{repo}", revision or None, "/".join(path)


def download_hf(address: str, backbone: str, cache: Path, key: str = "backbone.weights") -> Path:
    """Fetch ``hf://<owner>/<repo>[@revision]/<file>`` once into ``<cache>/huggingface/...``."""
    spec, expected = split_checksum(address, key)
    repo_id, revision, filename = parse_hf(spec, key)
    local_dir = confine(cache / "huggingface" / (repo_id + (f"@{revision}" if revision else "")), cache, spec, key)
    dst = confine(local_dir / filename, cache, spec, key)
    if dst.is_file():  # once fetched, no network call at all (works offline and on compute nodes)
        return _check_cached(dst, expected, address, key)
    log.info("Downloading weights of backbone '%s' from the Hugging Face Hub (%s) to %s", backbone, spec, dst)
    try:
        import huggingface_hub

        # Looked up at call time so tests can stand in for the network; it shows its own progress bar.
        got = Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_dir=local_dir))
    except Exception as e:  # noqa: BLE001 - the hub's error classes differ between versions; all mean "not here"
        raise WeightsError(
            f"Could not fetch {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Download the file (hf download {repo_id} {filename} --local-dir {local_dir}) so that "
            f"it is at {dst}, or set {key}=/path/to/file."
        ) from None
    got = confine(got, cache, spec, key)
    if not got.is_file():
        raise WeightsError(f"Fetching {spec} gave no file at {got}. Put the file at {dst} or set {key}.")
    if expected and sha256_of(got) != expected:
        got.unlink(missing_ok=True)
        raise WeightsError(f"{key}={address}: the fetched file's SHA-256 is not {expected}; it was deleted. "
                           "Check the address and its #sha256= value.")
    return got
