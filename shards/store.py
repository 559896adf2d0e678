"""A folder on some filesystem: local paths, `file://`, `s3://`, `gs://`, `hdfs://` (pyarrow.fs), else fsspec.

    store = Store.of("s3://bucket/shards")          # or a local path, or "file:///data/shards"
    with store.publish("shard-000000.tar") as f:      # appears under its final name only when complete
        f.write(data)
    store.read_bytes("manifest.parquet"); store.list(); store.exists(name); store.delete(name)

Publication is "atomic enough" for every store:
- filesystems that rename (local, HDFS): write a hidden temporary `.{name}.tmp-{pid}` beside the final name,
  then rename it into place (local files are fsync'ed first). Locally the temporary is created by the write
  (`create_new`: whatever was left under its name is removed, never written through) and the rename replaces
  a link left under the final name, not the file it points to: an output is always a new file of ours;
- object stores (S3, GCS, anything else): the data is spooled to a local temporary file and uploaded under its
  final name in one PUT / multipart upload, which the store makes visible only when complete; our object
  names are write-once (a retried task writes the same bytes under the same name).
A failed write publishes nothing.

Credentials and endpoints come from the usual environment of each store (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` for S3-compatible servers,
`GOOGLE_APPLICATION_CREDENTIALS`, `HADOOP_HOME`/`CLASSPATH` for HDFS) or from pyarrow's URI query options
(`s3://bucket/path?endpoint_override=host:9000&scheme=http`); the query is kept on every derived URI.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

from .config import ConfigError
from .errors import NotRegular, UserError

RENAME_TYPES = ("local", "hdfs")
_CHUNK = 8 << 20


def is_uri(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location.split("?", 1)[0]


class Store:
    """A folder (`root`) on a pyarrow filesystem; names are '/'-separated paths relative to it."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, scheme: str | None = None, query: str = ""):
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.scheme = scheme       # None for plain local paths
        self.query = query
        self.local = fs.type_name == "local"
        self.renames = fs.type_name in RENAME_TYPES

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def of(cls, location: "str | os.PathLike | Store") -> "Store":
        """A store for a local path or a URI (`file://`, `s3://`, `gs://`, `hdfs://`, or any fsspec scheme)."""
        if isinstance(location, Store):
            return location
        if not is_uri(location):
            return cls(pafs.LocalFileSystem(), str(Path(location).resolve()))
        text = str(location)
        base, _, query = text.partition("?")
        scheme = base.split("://", 1)[0].lower()
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError, TypeError) as exc:
            fs, path = _fsspec(text, exc)
        if fs.type_name == "local":
            return cls(fs, str(Path(path).resolve()), scheme=scheme)
        return cls(fs, path, scheme=scheme, query=query)

    @classmethod
    def split(cls, location: str | os.PathLike) -> tuple["Store", str]:
        """(store of the parent folder, file name) for the location of one file."""
        if not is_uri(location):
            p = Path(location)
            return cls.of(p.parent), p.name
        base, sep, query = str(location).partition("?")
        parent, name = base.rstrip("/").rsplit("/", 1)
        return cls.of(parent + sep + query), name

    # ---- names --------------------------------------------------------------------------------------
    def path(self, name: str = "") -> str:
        """The filesystem path of `name` (what `self.fs` takes)."""
        if not name:
            return self.root
        return f"{self.root}/{name}" if self.root not in ("/", "") else f"{self.root}{name}"

    def uri(self, name: str = "") -> str:
        """A location string for `name` that `Store.of` / `Store.split` accept on any machine."""
        if self.scheme is None or self.local:
            return self.path(name)
        return f"{self.scheme}://{self.path(name)}" + (f"?{self.query}" if self.query else "")

    def sub(self, name: str) -> "Store":
        return Store(self.fs, self.path(name), scheme=self.scheme, query=self.query)

    def __repr__(self) -> str:
        return f"Store({self.uri()!r})"

    # ---- reading ------------------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int:
        return int(self.fs.get_file_info(self.path(name)).size)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The file's bytes, or its first `limit` (a downloaded folder's file may be of any size)."""
        with self.open_input(name) if self.local else self.fs.open_input_stream(self.path(name)) as f:
            return f.read(limit)

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def open_input(self, name: str) -> IO[bytes]:
        """A seekable binary reader (local: a plain file)."""
        if self.local:
            return open_regular(self.path(name))
        return self.fs.open_input_file(self.path(name))

    def list(self, sub: str = "", *, recursive: bool = False) -> list[str]:
        """Names of the files under `sub` (relative to the store's root), sorted; [] for a missing folder."""
        base = self.path(sub)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        root = self.path("").rstrip("/") + "/"
        names = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            p = info.path
            names.append(p[len(root):] if p.startswith(root) else p.rsplit("/", 1)[-1])
        return sorted(names)

    def download(self, name: str, dest: str | os.PathLike) -> None:
        """Copy `name` to a local file in chunks (bounded memory)."""
        with self.open_input(name) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    # ---- writing ------------------------------------------------------------------------------------
    def makedirs(self, sub: str = "") -> None:
        if self.local or self.renames:
            self.fs.create_dir(self.path(sub), recursive=True)
        # object stores have no folders: a name's prefix exists once an object is under it

    def publish(self, name: str) -> "Upload":
        """A writable file that appears under `name` only on successful close (see the module docstring); its
        `file` is a real file object for writers that want one (torch.save, pyarrow's ParquetWriter)."""
        return Upload(self, name)

    def write_bytes(self, name: str, data: bytes) -> int:
        with self.publish(name) as f:
            f.write(data)
        return len(data)

    def write_text(self, name: str, text: str) -> int:
        return self.write_bytes(name, text.encode())

    def delete(self, name: str, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except (FileNotFoundError, OSError):
            if not missing_ok or self.exists(name):
                raise

    def delete_dir_if_empty(self, sub: str) -> None:
        if (self.local or self.renames) and self.exists(sub) and not self.list(sub, recursive=True):
            try:
                self.fs.delete_dir(self.path(sub))
            except OSError:
                pass


NOT_REGULAR = "not a regular file (a FIFO, device or socket): only regular files are read"


def open_regular(path: str | os.PathLike, buffering: int = -1) -> IO[bytes]:
    """`path` opened for reading only if it is a regular file (a link to one is): a FIFO named `shard-000002.tar`
    would block its reader forever, a device would stream without end. The check is on the opened descriptor
    (opened non-blocking, so a FIFO without a writer does not block the open itself), not a racy stat before it.
    OSError (FileNotFoundError, ...) as `open` raises it; for anything but a regular file, one naming the path."""
    fd = regular_fd(path)
    try:
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def open_text(path: str | os.PathLike, newline: str | None = None) -> IO[str]:
    """`open_regular` as UTF-8 text: how a command opens a file argument (a CSV, a list, a config), so that a FIFO
    or device given as one is refused in one line rather than waited on. A byte-order mark is dropped: a list saved
    by a spreadsheet or Windows tool ("CSV UTF-8") starts with one, and it would stick to the first header cell
    (`\ufefflabel`) and lose that column, or the first path, without a word. (`newline=""` for the csv module.)"""
    return io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline=newline)


def regular_fd(path: str | os.PathLike) -> int:
    """A blocking read-only descriptor of `path` if it is a regular file (`open_regular`), for `os.pread`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            exc = OSError(f"{os.fspath(path)}: {NOT_REGULAR}")
            exc.strerror = NOT_REGULAR  # (for messages that name the path themselves: `exc.strerror or exc`)
            raise exc
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def regular_files(urls: list[str]) -> list[str]:
    """`urls` (a shard list) when every local one that exists is a regular file, else `NotRegular` naming the
    first that is not (a FIFO, device or socket named like a shard); checked where shards are listed, before any
    reader opens one and blocks."""
    for url in urls:
        if is_uri(url):
            continue
        try:
            mode = os.stat(url).st_mode
        except OSError:
            continue  # (the reader says it is missing)
        if not stat.S_ISREG(mode):
            raise NotRegular(f"{url}: {NOT_REGULAR}")
    return urls


def check_out_folder(out: str, flag: str = "--out") -> None:
    """A folder a command will write into (`--out DIR`): named (an empty name would be the current folder), and a
    folder or not there yet (a file there is an error, not a traceback). ConfigError, one line."""
    if not out:
        raise ConfigError(f"{flag} is empty: name the folder to write")
    if not is_uri(out) and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{flag} {out}: exists and is not a folder")


def check_out_file(out: str, flag: str = "--out") -> None:
    """A local file a command will write (`--out FILE`), checked before the work rather than failing after it:
    named, not an existing folder, FIFO or device, and under a folder (the nearest existing parent is not a file).
    A URI is its store's to judge. ConfigError, one line."""
    if not out:
        raise ConfigError(f"{flag} is empty: name the file to write")
    if is_uri(out):
        return
    path = Path(out).absolute()
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ConfigError(f"{flag} {out}: exists and is not a regular file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {out}: {parent} is not a folder")


def publish_file(location: str | os.PathLike) -> "Upload":
    """`Store.publish` of one file named by its location (a path or URI): how every command writes an output file,
    so that none is half-written or written through a link someone left under its name."""
    store, name = Store.split(location)
    return store.publish(name)


def create_new(path: str | os.PathLike) -> int:
    """A write descriptor of a file this call creates at `path` (O_EXCL, O_NOFOLLOW): whatever was left under the
    name (a link to a file elsewhere above all, or a FIFO) is removed first, never written through."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def open_append(path: str | os.PathLike) -> IO[str]:
    """A command's own log `path` (metrics.jsonl) opened to append text, kept across a resume when it is a regular
    file; a link or anything else left under its name is replaced by a new file (`create_new`), never followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO):  # (a link; a FIFO without a reader)
            raise
        fd = create_new(path)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        fd = create_new(path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")


def temp_name(name: str) -> str:
    """Hidden temporary name beside `name` (never matched by `*.tar` readers that skip dot files)."""
    head, _, base = name.rpartition("/")
    return (f"{head}/" if head else "") + f".{base}.tmp-{os.getpid()}"


def is_temp_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and ".tmp-" in base


class Upload:
    """File-like writer returned by `Store.publish`; use as a context manager, or call commit()/discard()."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.size: int | None = None
        self._tmp = temp_name(name)
        if store.local:
            Path(store.path(name)).parent.mkdir(parents=True, exist_ok=True)
            self.file = os.fdopen(create_new(store.path(self._tmp)), "wb")
        elif store.renames:
            self.file = store.fs.open_output_stream(store.path(self._tmp))
        else:
            self.file = tempfile.TemporaryFile(prefix="cavmae-upload-")

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self) -> int:
        s = self.store
        try:
            if s.local:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(s.path(self._tmp), s.path(self.name))
                self.size = os.stat(s.path(self.name)).st_size
            elif s.renames:
                self.file.close()
                s.fs.move(s.path(self._tmp), s.path(self.name))
                self.size = s.size(self.name)
            else:
                self.file.flush()
                self.size = self.file.tell()
                self.file.seek(0)
                with s.fs.open_output_stream(s.path(self.name)) as out:
                    shutil.copyfileobj(self.file, out, _CHUNK)
                self.file.close()
        except BaseException:
            self.discard()
            raise
        return self.size

    def discard(self) -> None:
        try:
            self.file.close()
        except Exception:
            pass
        if self.store.local or self.store.renames:
            self.store.delete(self._tmp)

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _fsspec(uri: str, first_error: Exception):
    """Any fsspec scheme pyarrow does not know (abfs://, az://, ...) through pyarrow's fsspec adapter."""
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        raise UserError(f"{uri}: unsupported storage URI ({first_error})") from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise UserError(f"{uri}: unsupported storage URI ({exc})") from None
    return PyFileSystem(FSSpecHandler(fs)), path
