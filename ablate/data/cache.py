"""A node-local disk cache of decoded, resized images (``data.cache: disk``).

One file per dataset fingerprint and image size holds every image of a split as ``uint8``
``[3, h_i, w_i]`` pixels. It is built once per node, by whichever process gets the lock
first (:func:`open_or_build`), and then memory-mapped read-only by every trial and DataLoader
worker on the node, which thus share one copy of the pixels in the page cache.

File format (little-endian; ``cache_file`` names it ``<fingerprint[:24]>-<image_size>.u8img``)::

    offset            size        field
    0                 8           magic b"ABLATEU8"
    8                 4           format version (u32, 1)
    12                4           header_len (u32): bytes before the pixels, a multiple of 4096
    16                4           image_size (u32)
    20                4           n, byte length of the fingerprint (u32, at most 1024)
    24                8           count, number of images (u64)
    32                8           data_len (u64) = sum of 3 * h_i * w_i
    40                32          SHA-256 of the index bytes (the "shapes digest")
    72                n           the full fingerprint, UTF-8
    72 + n            8 * count   index: (h_i, w_i) as two u32 per image
    ...                           zero padding up to header_len
    header_len        data_len    pixels: image i at header_len + sum_{j<i} 3*h_j*w_j, [3, h_i, w_i] C order
    header_len+data_len  16       footer: b"ABLU8END", data_len (u64), written last

Validity: a file is used only if the magic, version, fingerprint, image size, count and
shapes digest equal what the caller expects, the index hashes to the stored digest and
agrees with ``data_len``, the file is exactly ``header_len + data_len + 16`` bytes long and
the footer is in place at that offset. Anything else (a truncated or extended file, another
dataset's or size's file, garbage, a build that never reached its footer) is invalid:
:func:`open_or_build` says why in one progress line and rebuilds it; a reader
(:class:`DiskImageCache`) raises :class:`CacheError` and never returns its bytes.

The pixels themselves carry no checksum and are not verified: that would mean reading the
whole file (up to ~100 GB for COCO train2017) on every open, or hashing every image on every
read. So a file whose pixel bytes were changed in place, at the same length (bit rot, another
program writing into it), is not detected; nor are pixels that are stale because the decode
or resize code changed while the fingerprint did not (put a version of that code into the
fingerprint). Files are written only through a temporary file in the same directory,
fsynced and renamed into place, so a crash or a failed build never leaves a partial file
under the final name.

Locking uses ``fcntl.flock`` on a sibling ``<name>.lock`` file (kept, never deleted), which
assumes a node-local file system (not NFS). Nothing is evicted: old fingerprints' files stay
until the directory is cleared. A file truncated in place while a process has it mapped
makes that process's reads fail with SIGBUS; the cache itself never does that (rebuilds
replace the file by rename, and existing maps keep the old file).

Errors that are the user's (directory not creatable or not writable, too little free space,
a write failing with a full disk) raise :class:`CacheError`, a
:class:`~ablate.data.coco.DatasetError`, in one line naming the path; temporary files are
removed on any failure. Exceptions raised by the caller's ``load`` propagate unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import operator
import os
import re
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .coco import DatasetError

__all__ = ["CacheError", "DiskImageCache", "cache_file", "default_cache_dir", "open_or_build"]

MAGIC = b"ABLATEU8"
END_MAGIC = b"ABLU8END"
VERSION = 1
ALIGN = 4096  # header_len is a multiple of it, so the pixels start on a page
MAX_FINGERPRINT = 1024  # bytes
SUFFIX = ".u8img"

_FIXED = struct.Struct("<8sIIIIQQ32s")  # magic, version, header_len, image_size, n, count, data_len, shapes digest
_FOOTER = struct.Struct("<8sQ")  # END_MAGIC, data_len
_NAME_OK = re.compile(r"[0-9A-Za-z_.-]+")


class CacheError(DatasetError):
    """An image cache that cannot be built or read (directory not writable, disk full, invalid
    file met by a reader), in one line naming the path."""


class _Invalid(Exception):
    """Internal: the file at hand is not a valid cache for what is expected; ``args[0]`` says why."""


class _Expected(NamedTuple):
    """What a valid file's header must hold: the pickled state of a :class:`DiskImageCache`."""

    fingerprint: str
    image_size: int
    count: int
    shapes_digest: bytes  # SHA-256 of the index bytes


class _Layout(NamedTuple):
    header_len: int
    data_len: int
    shapes: np.ndarray  # int64 [count, 2]: (h, w) of each image
    offsets: np.ndarray  # int64 [count]: where each image starts within the pixels


def default_cache_dir() -> Path:
    """``$ABLATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ablate/images``, else ``~/.cache/ablate/images``.

    Empty variables count as unset. The directory should be on a node-local disk.
    """
    explicit = os.environ.get("ABLATE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ablate" / "images"


def cache_file(cache_dir: Path, fingerprint: str, image_size: int) -> Path:
    """``cache_dir / "<fingerprint[:24]>-<image_size>.u8img"`` (the header holds the full fingerprint)."""
    if not fingerprint or not _NAME_OK.fullmatch(fingerprint[:24]):
        raise ValueError(f"fingerprint must start with 1-24 characters from [0-9A-Za-z_.-], got {fingerprint!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return Path(cache_dir) / f"{fingerprint[:24]}-{image_size}{SUFFIX}"


def _index_bytes(shapes: Sequence[tuple[int, int]]) -> bytes:
    """The index: ``(h, w)`` per image as little-endian u32 pairs; ValueError on a bad shape."""
    arr = np.asarray(shapes, dtype=np.int64).reshape(-1, 2) if len(shapes) else np.zeros((0, 2), np.int64)
    if arr.shape[0] != len(shapes):
        raise ValueError(f"shapes must be (height, width) pairs, got {len(shapes)} entries that make {arr.shape}")
    bad = np.flatnonzero((arr < 1).any(axis=1) | (arr >= 2**31).any(axis=1))
    if bad.size:
        raise ValueError(f"shapes[{bad[0]}] = {tuple(arr[bad[0]].tolist())}: height and width must be positive")
    return arr.astype("<u4").tobytes()


def _expected(fingerprint: str, image_size: int, index: bytes) -> _Expected:
    if len(fingerprint.encode()) > MAX_FINGERPRINT:
        raise ValueError(f"fingerprint is longer than {MAX_FINGERPRINT} bytes")
    return _Expected(fingerprint, int(image_size), len(index) // 8, hashlib.sha256(index).digest())


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, or fewer only at the end of the file."""
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, min(size - got, 1 << 30), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _short(fingerprint: str) -> str:
    return fingerprint if len(fingerprint) <= 16 else fingerprint[:16] + "..."


def _inspect(fd: int, expected: _Expected) -> _Layout:
    """The layout of the open file ``fd`` if it is a valid cache for ``expected``, else :class:`_Invalid`."""
    size = os.fstat(fd).st_size
    head = _pread_all(fd, _FIXED.size, 0)
    if len(head) < _FIXED.size:
        raise _Invalid(f"truncated: {size} bytes, shorter than the header")
    magic, version, header_len, image_size, n, count, data_len, digest = _FIXED.unpack(head)
    if magic != MAGIC:
        raise _Invalid("not an ablate image cache (wrong magic bytes)")
    if version != VERSION:
        raise _Invalid(f"format version {version}, this ablate reads version {VERSION}")
    if n > MAX_FINGERPRINT or header_len % ALIGN or header_len < _FIXED.size + n + 8 * count:
        raise _Invalid("corrupt header (inconsistent lengths)")
    if size < header_len:
        raise _Invalid(f"truncated: {size} bytes, shorter than its {header_len}-byte header")
    try:
        fingerprint = _pread_all(fd, n, _FIXED.size).decode()
    except UnicodeDecodeError:
        raise _Invalid("corrupt header (fingerprint is not UTF-8)") from None
    if fingerprint != expected.fingerprint:
        raise _Invalid(f"stale: built for dataset fingerprint {_short(fingerprint)}, "
                       f"expected {_short(expected.fingerprint)}")
    if image_size != expected.image_size:
        raise _Invalid(f"stale: built for image size {image_size}, expected {expected.image_size}")
    if count != expected.count:
        raise _Invalid(f"stale: holds {count} images, expected {expected.count}")
    if digest != expected.shapes_digest:
        raise _Invalid("stale: its image shapes differ from the dataset's")
    index = _pread_all(fd, 8 * count, _FIXED.size + n)
    if hashlib.sha256(index).digest() != digest:
        raise _Invalid("corrupt header (index does not match its checksum)")
    shapes_arr = np.frombuffer(index, dtype="<u4").reshape(count, 2).astype(np.int64)
    sizes = 3 * shapes_arr[:, 0] * shapes_arr[:, 1]
    if int(sizes.sum()) != data_len:
        raise _Invalid("corrupt header (pixel length does not match the index)")
    want = header_len + data_len + _FOOTER.size
    if size != want:
        raise _Invalid(f"{'truncated' if size < want else 'extended'}: {size} bytes, expected {want}")
    if _pread_all(fd, _FOOTER.size, header_len + data_len) != _FOOTER.pack(END_MAGIC, data_len):
        raise _Invalid("incomplete: no end marker (its build did not finish)")
    offsets = np.cumsum(sizes) - sizes
    return _Layout(header_len, data_len, shapes_arr, offsets)


class DiskImageCache:
    """``uint8 Tensor[3, h_i, w_i]`` images of one dataset split, read from a validated cache file.

    ``DiskImageCache(path, fingerprint, image_size, shapes)`` opens ``path`` and checks it
    against what is expected (:class:`CacheError` if missing or invalid); :func:`open_or_build`
    makes one, building the file first if needed. ``cache[i]`` is a private, writable,
    C-contiguous copy of image ``i``. The file is memory-mapped read-only on first use in each
    process; a pickle holds only the path and the expected header (fingerprint, image size,
    count, shapes digest), so DataLoader workers (fork or spawn) reopen and re-check it lazily.
    """

    path: Path

    def __init__(self, path: Path, fingerprint: str, image_size: int, shapes: Sequence[tuple[int, int]]) -> None:
        self._setup(Path(path), _expected(fingerprint, image_size, _index_bytes(shapes)))
        self._open()

    def _setup(self, path: Path, expected: _Expected) -> None:
        self.path = path
        self._expected = expected
        self._map: mmap.mmap | None = None
        self._pixels: np.ndarray | None = None  # uint8 [data_len], a view of the map
        self._layout: _Layout | None = None

    @classmethod
    def _unopened(cls, path: Path, expected: _Expected) -> DiskImageCache:
        cache = cls.__new__(cls)
        cache._setup(path, expected)
        return cache

    def _map_checked(self) -> None:
        """Map the file if valid, else :class:`_Invalid` (the reason) or OSError from opening it."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            layout = _inspect(fd, self._expected)  # checks through this fd: the inode mapped below
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._map, self._layout = mapped, layout
        self._pixels = np.frombuffer(mapped, dtype=np.uint8, count=layout.data_len, offset=layout.header_len)

    def _open(self) -> None:
        try:
            self._map_checked()
        except _Invalid as e:
            raise CacheError(f"{self.path}: invalid image cache ({e}); run again to rebuild it") from None
        except FileNotFoundError:
            raise CacheError(f"{self.path}: image cache not found") from None
        except OSError as e:
            raise CacheError(f"{self.path}: cannot read the image cache ({e.strerror})") from None

    def __len__(self) -> int:
        return self._expected.count

    def __getitem__(self, index: int) -> Tensor:
        i = operator.index(index)
        count = self._expected.count
        if not -count <= i < count:
            raise IndexError(f"image index {index} out of range for {count} images in {self.path}")
        if self._pixels is None:
            self._open()
        assert self._pixels is not None and self._layout is not None
        i %= count
        h, w = self._layout.shapes[i].tolist()
        start = int(self._layout.offsets[i])
        return torch.from_numpy(self._pixels[start : start + 3 * h * w].reshape(3, h, w).copy())  # [3, h, w]

    def close(self) -> None:
        """Unmap the file (reopened on the next access)."""
        self._pixels, self._layout = None, None
        if self._map is not None:
            with suppress(BufferError):  # a view still exported somewhere: leave it to the GC
                self._map.close()
            self._map = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "expected": self._expected}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["path"], _Expected(*state["expected"]))

    def __repr__(self) -> str:
        return f"DiskImageCache({self.path}, {len(self)} images, size {self._expected.image_size})"


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _os_error(path: Path, doing: str, e: OSError) -> CacheError:
    hint = "; set $ABLATE_CACHE_DIR to a writable node-local directory" if e.errno in (
        errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST) else ""
    return CacheError(f"{path}: cannot {doing} ({e.strerror or e}){hint}")


@contextmanager
def _exclusive(lock_path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``lock_path`` (created if needed; released on exit or process death)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise _os_error(lock_path.parent, f"create the image cache lock {lock_path.name}", e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"image cache: waiting for another process's build (lock {lock_path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _leftovers(path: Path) -> list[Path]:
    """Temporary files of builds of ``path`` that died (only the lock holder may call this)."""
    return sorted(path.parent.glob(f"{path.name}.*.tmp"))


def _build(path: Path, expected: _Expected, index: bytes, load: Callable[[int], Tensor],
           say: Callable[[str], None], threads: int) -> None:
    """Write the cache into a temporary file next to ``path`` and rename it into place."""
    fingerprint = expected.fingerprint.encode()
    count = expected.count
    shapes = np.frombuffer(index, dtype="<u4").reshape(count, 2).astype(np.int64)
    sizes = (3 * shapes[:, 0] * shapes[:, 1]).tolist()
    header_len = -(-(_FIXED.size + len(fingerprint) + len(index)) // ALIGN) * ALIGN
    data_len = int(sum(sizes))
    total = header_len + data_len + _FOOTER.size
    try:
        stat = os.statvfs(path.parent)
    except OSError as e:
        raise _os_error(path.parent, "use the image cache directory", e) from e
    if stat.f_bavail * stat.f_frsize < total:
        raise CacheError(f"{path}: cannot write the image cache (it needs {_human(total)}, "
                         f"{_human(stat.f_bavail * stat.f_frsize)} free in {path.parent})")
    say(f"image cache: building {count} images ({_human(total)}) with {threads} thread(s) -> {path}")
    started = time.perf_counter()
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise _os_error(path.parent, "create a file in the image cache directory", e) from e
    tmp = Path(tmp_name)
    header = _FIXED.pack(MAGIC, VERSION, header_len, expected.image_size, len(fingerprint), count, data_len,
                         expected.shapes_digest) + fingerprint + index
    starts = [header_len]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)

    def write(data: memoryview, offset: int) -> None:
        try:
            _pwrite_all(fd, data, offset)
        except OSError as e:
            raise _os_error(path, "write the image cache", e) from e

    def one(i: int) -> None:
        image = load(i)
        h, w = shapes[i].tolist()
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or tuple(image.shape) != (3, h, w):
            got = f"{image.dtype} {list(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"load({i}) returned {got}, expected a uint8 tensor [3, {h}, {w}]")
        write(memoryview(image.detach().cpu().contiguous().numpy()).cast("B"), starts[i])

    step = max(1, -(-count // 10))

    def done(k: int) -> None:
        if k % step == 0 and k < count:
            say(f"image cache: {k}/{count} images -> {path}")

    try:
        write(memoryview(header.ljust(header_len, b"\0")), 0)
        if threads <= 1:
            for i in range(count):
                one(i)
                done(i + 1)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="image-cache") as pool:  # waits for running loads
                pending: deque[Future[None]] = deque()
                finished = 0
                try:
                    for i in range(count + 1):
                        while pending and (len(pending) >= 2 * threads or i == count):
                            pending.popleft().result()
                            finished += 1
                            done(finished)
                        if i < count:
                            pending.append(pool.submit(one, i))
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
        write(memoryview(_FOOTER.pack(END_MAGIC, data_len)), header_len + data_len)
        try:
            os.fsync(fd)
            os.fchmod(fd, 0o644)
        except OSError as e:
            raise _os_error(path, "write the image cache", e) from e
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _os_error(path, "move the built image cache into place", e) from e
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with suppress(OSError):  # make the rename durable; some file systems refuse fsync on a directory
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    say(f"image cache: built {count} images, {_human(total)} in {time.perf_counter() - started:.1f} s -> {path}")


def _try_open(path: Path, expected: _Expected) -> DiskImageCache | str:
    """An open cache if ``path`` is valid, else why not (``"missing"`` if there is no file)."""
    cache = DiskImageCache._unopened(path, expected)
    try:
        cache._map_checked()
    except FileNotFoundError:
        return "missing"
    except _Invalid as e:
        return str(e)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return cache


def open_or_build(cache_dir: Path, fingerprint: str, image_size: int, shapes: Sequence[tuple[int, int]],
                  load: Callable[[int], Tensor], progress: Callable[[str], None] | None = None,
                  threads: int = 1) -> DiskImageCache:
    """The cache of ``len(shapes)`` images in ``cache_dir``, built first unless a valid file exists.

    ``shapes[i] = (h_i, w_i)``: the size of image ``i`` after resizing; ``load(i)`` returns it
    decoded and resized, ``uint8 Tensor[3, h_i, w_i]`` (called only when building, from
    ``threads`` threads). Builds run under an exclusive lock on ``<file>.lock``, re-check the
    file once they hold it (another process may have built it meanwhile), write a temporary
    file, fsync it and rename it into place; a failed build (an exception from ``load``, a full
    disk) leaves neither a partial file nor a temporary one. ``progress`` gets one-line
    messages: why an existing file is rebuilt, a wait for another process's build, about every
    10% of a build, and the build's size and time.

    Raises :class:`CacheError` (one line naming the path) if the directory cannot be created
    or written or the disk is full; exceptions from ``load`` propagate unchanged.
    """
    path = cache_file(Path(cache_dir), fingerprint, image_size)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    index = _index_bytes(shapes)
    expected = _expected(fingerprint, image_size, index)
    say = progress or (lambda message: None)
    found = _try_open(path, expected)
    if isinstance(found, DiskImageCache):
        return found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(path.parent, "create the image cache directory", e) from e
    with _exclusive(path.with_name(path.name + ".lock"), say):
        found = _try_open(path, expected)  # built by another process while we waited?
        if isinstance(found, DiskImageCache):
            return found
        if found != "missing":
            say(f"image cache: {path} is invalid ({found}); rebuilding it")
            try:
                path.unlink()  # frees its space before the rebuild; maps elsewhere keep the old file
            except FileNotFoundError:
                pass
            except OSError as e:
                raise _os_error(path, "remove the invalid image cache", e) from e
        for leftover in _leftovers(path):
            say(f"image cache: removing {leftover.name}, left by an interrupted build")
            with suppress(FileNotFoundError):
                leftover.unlink()
        _build(path, expected, index, load, say, threads)
        found = _try_open(path, expected)
    if not isinstance(found, DiskImageCache):
        raise CacheError(f"{path}: the image cache just built is invalid ({found})")
    return found
