"""One place for paths: local or s3:// (fsspec/s3fs; pyarrow for Ray), and atomic publishing of outputs.

The S3 endpoint comes from `configure(endpoint_url=...)` (the job spec's `storage.endpoint_url`) or
$AWS_ENDPOINT_URL, so S3-compatible stores (MinIO, moto) work the same as AWS.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

__all__ = [
    "configure",
    "current",
    "download_dir",
    "exists",
    "file_in",
    "filesystem",
    "is_outage",
    "is_remote",
    "join",
    "listdir",
    "local_copy",
    "open_file",
    "publish_dir",
    "put_file_atomic",
    "pyarrow_filesystem",
    "read_text",
    "remove",
    "sync_dir",
    "write_text_atomic",
]

_options: dict[str, str | None] = {"endpoint_url": None, "region": None}


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set the S3 endpoint for this process. Also exported so Ray workers and pyarrow see it."""
    if endpoint_url:
        _options["endpoint_url"] = endpoint_url
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        _options["region"] = region
        os.environ["AWS_DEFAULT_REGION"] = region


def _endpoint() -> str | None:
    return _options["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL")


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path and the path as that filesystem spells it."""
    path = str(path)
    if path.startswith("s3://"):
        kw: dict = {}
        if _endpoint():
            kw["endpoint_url"] = _endpoint()
        region = _options["region"] or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["client_kwargs"] = {"region_name": region}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **kw)
        return fs, path[len("s3://") :]
    if is_remote(path):
        fs, p = fsspec.core.url_to_fs(path)
        return fs, p
    return fsspec.filesystem("file"), str(Path(path.removeprefix("file://")).expanduser())


def url_like(path: str, like: str) -> str:
    """A path that Ray reports without its scheme (a checkpoint's `.path` on the storage filesystem of
    `like`) as a URL again: `bucket/x` next to `s3://bucket/sweep` -> `s3://bucket/x`."""
    if "://" in like and "://" not in path:
        return like.split("://", 1)[0] + "://" + path.lstrip("/")
    return path


def pyarrow_filesystem(path: str):
    """(pyarrow filesystem, path) for Ray's `storage_path` and Ray Data I/O."""
    import pyarrow.fs as pafs

    if path.startswith("s3://"):
        kw = {}
        if _endpoint():
            kw["endpoint_override"] = _endpoint()
            kw["scheme"] = "https" if _endpoint().startswith("https") else "http"
        region = _options["region"] or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(region=region, **kw), path[len("s3://") :]
    if is_remote(path):
        fs, p = filesystem(path)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def is_outage(e: BaseException) -> bool:
    """An error that says the store could not be reached or did not answer (refused connection, timeout,
    5xx, throttling), as opposed to a path that is not there."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (OSError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return False
    return isinstance(e, (BotoCoreError, ClientError))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    try:
        return fs.exists(p)
    except (FileNotFoundError, PermissionError):
        return False


def stamp(path: str) -> str | None:
    """A version of one file: size, mtime and inode (local) or ETag (S3); None when it is absent.
    A rewrite (a new upload, or a folder renamed over the old one) changes it."""
    fs, p = filesystem(path)
    try:
        info = fs.info(p)
    except (FileNotFoundError, PermissionError):
        return None
    keys = ("size", "mtime", "ino", "ETag", "etag", "LastModified")
    return repr([str(info.get(k)) for k in keys])


def isdir(path: str) -> bool:
    fs, p = filesystem(path)
    try:
        return fs.isdir(p)
    except FileNotFoundError:
        return False


def listdir(path: str) -> list[str]:
    """Names (not paths) directly under a folder; [] when it does not exist."""
    fs, p = filesystem(path)
    try:
        return sorted(Path(e.rstrip("/")).name for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def open_file(path: str, mode: str = "rb"):
    fs, p = filesystem(path)
    return fs.open(p, mode)


def read_text(path: str) -> str:
    # One GET: s3fs's open() pins the object's ETag and a read after a rewrite (a published folder's `.complete`
    # marker switched to a new version) failed as FileExpired, which looks like an outage to its readers.
    fs, p = filesystem(path)
    return fs.cat_file(p).decode("utf-8")


def size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def remove(path: str) -> None:
    if not is_remote(path):
        # Not fsspec's LocalFileSystem.rm: it compares the path with os.getcwd(), which raises when the process's
        # working folder is gone (a Ray job driver whose runtime_env package a lost node's agent removed: the
        # node-loss test, on one machine, at the end of a job that had succeeded).
        local = Path(filesystem(path)[1])
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        elif local.exists() or local.is_symlink():
            local.unlink()
        return
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def write_text_atomic(path: str, text: str) -> None:
    """Readers see the old file or the new one, never half of one (S3 PUTs are atomic by nature)."""
    if is_remote(path):
        with open_file(path, "wb") as f:
            f.write(text.encode("utf-8"))
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them (a crash keeps old or new)
        os.replace(tmp, target)
    except BaseException:  # a full disk: leave no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)  # and the rename itself is durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


VERSIONS = ".v"  # an S3 folder published again keeps each version under VERSIONS/<id>/ (see publish_dir)


def current(folder: str) -> str:
    """Where the files of a published folder's current version are: the folder itself, or (an S3 folder
    published more than once) the version its `.complete` marker points at."""
    if not is_remote(folder):
        return folder
    try:
        marker = read_text(join(folder, ".complete")).strip()
    except FileNotFoundError:
        return folder
    return join(folder, marker[3:]) if marker.startswith("at ") else folder


def file_in(folder: str, name: str) -> str:
    """The path of `name` in the current version of a published folder."""
    return join(current(folder), name)


def _files(fs, p: str) -> dict[str, dict]:
    """Relative name -> info of every file under `p`, without the kept versions of a republished folder."""
    base = p.rstrip("/") + "/"
    out = {}
    for name, info in fs.find(p, detail=True).items():
        rel = name[len(base):] if name.startswith(base) else Path(name).name
        if rel and not rel.startswith(VERSIONS + "/"):
            out[rel] = info
    return out


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder`, and each folder's entries, on disk: what a rename then publishes is whole."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(d)
    _fsync_dir(folder)


def put_file_atomic(local_src: str | os.PathLike, dst: str) -> None:
    """Copy one finished local file to `dst` so that readers see the old file or the new one, whole."""
    if is_remote(dst):
        fs, p = filesystem(dst)
        fs.put_file(str(local_src), p)
        return
    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(local_src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def download_dir(src: str, dst: str | os.PathLike) -> Path:
    """A local copy of a folder (of its current version, when published: `current`)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if not is_remote(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return dst
    fs, p = filesystem(current(src))
    for rel in sorted(_files(fs, p)):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(p.rstrip("/") + "/" + rel, str(dst / rel))
    return dst


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local folder with the contents of `path` (the folder itself when it is local)."""
    if not is_remote(path):
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="ftray-dl-"))
    try:
        yield download_dir(path, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_copy(path: str) -> Path:
    """A local copy of a remote folder in ~/.cache/ftray/remote, reused while the remote is unchanged.

    Keyed by endpoint, path and the listing (names, sizes, ETags), so a re-upload is fetched again.
    Several processes may race to fill the same entry: each downloads aside and the first rename
    wins; a complete entry is never removed."""
    if not is_remote(path):
        return Path(path)
    import hashlib

    fs, p = filesystem(current(path))
    listing = sorted((n, e.get("size"), str(e.get("ETag", e.get("etag", "")))) for n, e in _files(fs, p).items())
    listing.append(p)  # which version
    key = hashlib.sha256(repr((_endpoint(), path, listing)).encode()).hexdigest()[:20]
    dst = Path(os.path.expanduser("~/.cache/ftray/remote")) / key
    if (dst / ".complete").exists():
        return dst
    tmp = dst.with_name(f"{key}.{uuid.uuid4().hex}.tmp")
    download_dir(path, tmp)
    (tmp / ".complete").write_text(path)
    try:
        os.rename(tmp, dst)
    except OSError:  # another process finished first (or a stale partial entry is in the way)
        if not (dst / ".complete").exists():
            shutil.rmtree(dst, ignore_errors=True)
            os.rename(tmp, dst)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def sync_dir(local_src: str | os.PathLike, dst: str, complete: bool = False) -> None:
    """Copy a local folder's files over `dst`'s, file by file, deleting nothing: for folders whose files
    only grow (TensorBoard events), where a reader that sees an older copy of one file is fine and a
    versioned publish would show each version as a run. `complete` writes the `.complete` marker."""
    local_src = Path(local_src)
    if not is_remote(dst):
        shutil.copytree(local_src, dst, dirs_exist_ok=True)
        if complete:
            Path(dst, ".complete").write_text("ok\n")
        return
    fs, p = filesystem(dst)
    _upload(fs, local_src, p.rstrip("/"))
    if complete:
        fs.pipe_file(p.rstrip("/") + "/.complete", b"ok\n")


def _upload(fs, local_src: Path, p: str, last: tuple[str, ...] = ()) -> None:
    files = sorted((f for f in local_src.rglob("*") if f.is_file()), key=lambda f: (f.name in last, str(f)))
    for f in files:
        fs.put_file(str(f), p + "/" + f.relative_to(local_src).as_posix())


def is_complete(folder: str) -> bool:
    """A folder written by `publish_dir` is whole once its `.complete` marker exists."""
    return exists(join(folder, ".complete"))


def publish_dir(local_src: str | os.PathLike, dst: str, last: tuple[str, ...] = ()) -> None:
    """Put a finished local folder at `dst` so that `dst` is either absent/old or complete.

    Local: copied aside, then renamed over the target. S3 (no rename of a prefix): uploaded file by file
    with `.complete` written last as the commit marker (`is_complete`). Over a complete S3 folder the
    new version is uploaded beside the current one, to `.v/<id>/`, and the marker is then rewritten to
    point at it (`at .v/<id>`, one PUT: the switch); readers go through `current` / `file_in`. A publish
    interrupted at any point leaves the previous version whole and current. The version before the new
    one is kept (a reader may still be downloading it); older ones are deleted. `last`: file names uploaded
    after the others on an S3 folder's first publish, for readers that take one file as the sign of a folder
    without reading the marker (the adapter registry: adapter_config.json).
    """
    local_src = Path(local_src)
    if is_remote(dst):
        fs, p = filesystem(dst)
        p = p.rstrip("/")
        # One client for the whole publish (a new one costs a session and a connection before its first request).
        marker = fs.cat_file(p + "/.complete").decode().strip() if fs.exists(p + "/.complete") else None
        if marker is None:  # nothing published here (or an interrupted first publish): write in place
            if fs.exists(p):
                fs.rm(p, recursive=True)
            _upload(fs, local_src, p, last)
            fs.pipe_file(p + "/.complete", b"ok\n")
            return
        previous = join(dst, marker[3:]) if marker.startswith("at ") else dst  # as `current`
        vid = f"{VERSIONS}/{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        _upload(fs, local_src, f"{p}/{vid}")
        fs.pipe_file(f"{p}/{vid}/.complete", b"ok\n")
        fs.pipe_file(p + "/.complete", f"at {vid}\n".encode())  # the switch
        keep = {vid, previous[len(dst.rstrip("/")) + 1 :] if previous != dst else ""}
        for e in fs.ls(p, detail=False):  # the in-place version, unless it is the previous one
            rel = e.rstrip("/")[len(p) + 1 :]
            if rel not in (".complete", VERSIONS) and "" not in keep:
                fs.rm(e, recursive=True)
        for e in fs.ls(f"{p}/{VERSIONS}", detail=False):
            if e.rstrip("/")[len(p) + 1 :] not in keep:
                fs.rm(e, recursive=True)
        return
    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(local_src, tmp)
    (tmp / ".complete").write_text("ok\n")
    _fsync_tree(tmp)  # the bytes are on disk before the name points at them
    if target.exists() and _exchange(tmp, target):  # tmp now holds the old version
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`), so that `b` is never absent: a reader
    polling a folder that is republished (a served adapter: `train/publish.py`) finds the old or the new one.
    False where the system or filesystem has no such call; then the target is moved aside and replaced (two
    renames: absent for an instant)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
