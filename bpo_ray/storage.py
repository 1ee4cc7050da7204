"""One way to read and write local paths and ``s3://`` URIs, for every stage (pyarrow.fs).

S3 endpoint and credentials come from the environment only (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``), never
from configs or files in the repo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(IOError):
    """A read or write failed; the message names the URI."""


#: Non-secret S3 settings a stage forwards to its Ray workers (``worker_settings``); credentials
#: never travel: workers get them from their node (instance profile / node environment).
WORKER_SETTINGS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def worker_settings() -> dict[str, str]:
    """This process's non-secret S3 settings (endpoint, region), for every worker a stage starts."""
    return {k: os.environ[k] for k in WORKER_SETTINGS_ENV if os.environ.get(k)}


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path within it)`` for a local path, ``file://`` or ``s3://`` URI."""
    if uri.startswith("s3://"):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises several types here
            raise StorageError(f"unsupported URI {uri!r}: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(os.path.expanduser(uri)).absolute())


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/``."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str, max_bytes: Optional[int] = None) -> bytes:
    """Read a whole file; with ``max_bytes`` refuse files larger than that without reading them."""
    fs, path = filesystem(uri)
    try:
        if max_bytes is not None:
            size = fs.get_file_info(path).size
            if size is not None and size > max_bytes:
                raise StorageError(f"{uri}: {size} bytes is over the {max_bytes}-byte limit")
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"{uri}: {exc}") from exc


def file_size(uri: str) -> int:
    """Size in bytes of one file (``StorageError`` if it is not a file)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File or info.size is None:
        raise StorageError(f"{uri}: no such file")
    return int(info.size)


def read_range(uri: str, offset: int, nbytes: int) -> bytes:
    """``nbytes`` bytes of a file from ``offset`` (fewer at its end): one ranged GET on S3."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read_at(max(0, nbytes), offset)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: {exc}") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; local writes go through a temp file and an atomic rename."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def _files_below(fs: pafs.FileSystem, path: str, recursive: bool = True) -> list[tuple[str, pafs.FileInfo]]:
    """``(path relative to path, info)`` of every file below the directory ``path``, sorted; [] if none."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted((i.path[len(path):].lstrip("/"), i) for i in infos if i.type == pafs.FileType.File)


def list_files(uri: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """URIs of the files under ``uri`` (sorted), keeping the caller's scheme."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri] if uri.endswith(suffix) else []
    return [join(uri, rel) for rel, _ in _files_below(fs, path, recursive) if rel.endswith(suffix)]


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def iter_lines(uri: str) -> Iterator[str]:
    for line in read_bytes(uri).splitlines():
        yield line.decode("utf-8", errors="replace")


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or remote)."""
    local_dir = Path(local_dir)
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            write_bytes(join(uri, str(p.relative_to(local_dir))), p.read_bytes())


def copy_tree(src_uri: str, dst_uri: str) -> None:
    """Copy every file below ``src_uri`` to the same relative path below ``dst_uri`` (any schemes)."""
    fs, path = filesystem(src_uri)
    for rel, _ in _files_below(fs, path):
        write_bytes(join(dst_uri, rel), read_bytes(join(src_uri, rel)))


def localize(uri: str, cache_dir: str = "~/.cache/bpo-ray/models") -> str:
    """A local directory holding ``uri``'s files: the path itself if local, else a cached copy.

    Remote trees are downloaded into ``cache_dir/<hash of uri>``. The cache is keyed on the tree's
    listing too (path, size, modification time of every file, kept in the ``.complete`` marker), so
    a tree rewritten at the same URI (a second training run to the same ``--out``) is downloaded
    again rather than served stale. A download goes to a temporary directory that replaces the
    cached one only when complete, so an interrupted or concurrent download never leaves a
    half-written tree in use.
    """
    if not is_remote(uri):
        return str(Path(os.path.expanduser(uri[7:] if uri.startswith("file://") else uri)))
    dest = Path(os.path.expanduser(cache_dir)) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    listing = [(rel, int(i.size or 0), int(i.mtime_ns or 0)) for rel, i in _files_below(*filesystem(uri))]
    if not listing:
        raise StorageError(f"{uri}: nothing there to download")
    stamp = json.dumps({"uri": uri, "files": listing})
    marker = dest / ".complete"

    def cached() -> bool:
        return marker.exists() and marker.read_text() == stamp

    if cached():
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".partial-", dir=dest.parent))
    try:
        for rel, _, _ in listing:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(join(uri, rel)))
        (tmp / ".complete").write_text(stamp)
        if cached():  # another process on this node finished first
            return str(dest)
        if dest.exists():  # a stale tree of this URI
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put the same tree there first
            if not cached():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
