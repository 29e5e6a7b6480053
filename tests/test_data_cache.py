"""Tests of ``ablate.data.cache``: the node-local disk cache of decoded, resized images."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import multiprocessing as mp
import os
import pickle
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import ablate.data.cache as cache_module
from ablate.data import DatasetError
from ablate.data.cache import CacheError, DiskImageCache, cache_file, default_cache_dir, open_or_build

FP = hashlib.sha256(b"dataset").hexdigest()
SIZE = 32
SHAPES = [(5, 7), (16, 3), (1, 1), (9, 12), (4, 4), (32, 20), (20, 32), (2, 9)]


def image(i: int, h: int, w: int, salt: int = 0) -> torch.Tensor:
    """Deterministic uint8 [3, h, w] pixels of image ``i`` (another ``salt``, other pixels)."""
    g = torch.Generator().manual_seed(1000 * salt + i)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


class Loader:
    """``load(i)`` for ``shapes``: records its calls; optionally fails at one image or sleeps."""

    def __init__(self, shapes=SHAPES, salt=0, fail_at=None, delay=0.0, record: Path | None = None):
        self.shapes, self.salt, self.fail_at, self.delay, self.record = shapes, salt, fail_at, delay, record
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, i: int) -> torch.Tensor:
        with self._lock:
            self.calls.append(i)
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(f"{i}\n")
        if self.delay:
            time.sleep(self.delay)
        if i == self.fail_at:
            raise DatasetError(f"image {i}: cannot decode (test)")
        return image(i, *self.shapes[i], salt=self.salt)


def digest(cache: DiskImageCache) -> str:
    h = hashlib.sha256()
    for i in range(len(cache)):
        h.update(cache[i].numpy().tobytes())
    return h.hexdigest()


def assert_holds(cache: DiskImageCache, shapes=SHAPES, salt=0) -> None:
    assert len(cache) == len(shapes)
    for i, (h, w) in enumerate(shapes):
        got = cache[i]
        assert got.dtype == torch.uint8 and got.shape == (3, h, w) and got.is_contiguous()
        assert torch.equal(got, image(i, h, w, salt)), i


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def build(cache_dir: Path, fingerprint=FP, size=SIZE, shapes=SHAPES, salt=0, threads=1, lines=None):
    load = Loader(shapes, salt)
    cache = open_or_build(cache_dir, fingerprint, size, shapes, load, progress=lines.append if lines is not None
                          else None, threads=threads)
    return cache, load


# -- names and locations ---------------------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ABLATE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("ABLATE_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "xdg" / "ablate" / "images"
    monkeypatch.delenv("ABLATE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "ablate" / "images"


def test_cache_file_name(tmp_path):
    assert cache_file(tmp_path, FP, 640) == tmp_path / f"{FP[:24]}-640.u8img"
    with pytest.raises(ValueError, match="fingerprint"):
        cache_file(tmp_path, "../etc/passwd", 640)
    with pytest.raises(ValueError, match="image_size"):
        cache_file(tmp_path, FP, 0)


# -- build and read --------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_build_reads_back_what_load_gave(tmp_path, threads):
    lines: list[str] = []
    cache, load = build(tmp_path / "cache", threads=threads, lines=lines)
    assert sorted(load.calls) == list(range(len(SHAPES)))
    assert_holds(cache)
    assert torch.equal(cache[-1], image(len(SHAPES) - 1, *SHAPES[-1]))
    with pytest.raises(IndexError):
        cache[len(SHAPES)]
    copy = cache[0]
    copy.fill_(0)  # a private, writable copy: the file is untouched
    assert torch.equal(cache[0], image(0, *SHAPES[0]))
    path = cache_file(tmp_path / "cache", FP, SIZE)
    assert cache.path == path
    assert files(tmp_path / "cache") == [path.name, path.name + ".lock"]  # no temporary file left
    assert any(line.startswith("image cache: building 8 images") for line in lines)
    assert any(line.startswith(f"image cache: 4/8 images -> {path}") for line in lines)
    assert lines[-1].startswith("image cache: built 8 images") and lines[-1].endswith(str(path))
    # the file is exactly header + pixels + footer
    header_len = struct.unpack_from("<I", path.read_bytes(), 12)[0]
    assert path.stat().st_size == header_len + sum(3 * h * w for h, w in SHAPES) + 16


def test_second_open_does_not_load(tmp_path):
    first, _ = build(tmp_path)
    lines: list[str] = []
    again = open_or_build(tmp_path, FP, SIZE, SHAPES, Loader(fail_at=-1, delay=1e9), progress=lines.append)
    assert lines == []
    assert_holds(again)
    assert digest(again) == digest(first)
    assert_holds(DiskImageCache(first.path, FP, SIZE, SHAPES))  # the read side alone opens it too


def test_empty_split(tmp_path):
    cache, load = build(tmp_path, shapes=[])
    assert len(cache) == 0 and load.calls == []
    assert len(open_or_build(tmp_path, FP, SIZE, [], Loader(shapes=[]))) == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"shapes\[1\]"):
        open_or_build(tmp_path, FP, SIZE, [(2, 2), (0, 3)], Loader())
    with pytest.raises(ValueError, match="threads"):
        open_or_build(tmp_path, FP, SIZE, SHAPES, Loader(), threads=0)
    with pytest.raises(ValueError, match=r"load\(0\) returned torch.uint8 \[3, 7, 5\], expected a uint8 tensor "
                                         r"\[3, 5, 7\]"):
        open_or_build(tmp_path, FP, SIZE, SHAPES, lambda i: image(i, *SHAPES[i]).transpose(1, 2))
    assert files(tmp_path) == [cache_file(tmp_path, FP, SIZE).name + ".lock"]


# -- invalid files are detected and rebuilt ------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def _truncate_header(path: Path) -> None:
    os.truncate(path, 40)


def _extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 10)


def _no_footer(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\0" * 16)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _version(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 99))


def _index(path: Path) -> None:
    """Swap h and w of image 0 in the index (the stored shapes digest left as it was)."""
    data = bytearray(path.read_bytes())
    at = 72 + len(FP)
    data[at : at + 8] = data[at + 4 : at + 8] + data[at : at + 4]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [
    (_truncate, "truncated: "),
    (_truncate_header, "truncated: 40 bytes, shorter than the header"),
    (_extend, "extended: "),
    (_no_footer, "no end marker"),
    (_garbage, "wrong magic bytes"),
    (_version, "format version 99"),
    (_index, "index does not match its checksum"),
])
def test_damaged_file_is_detected_and_rebuilt(tmp_path, damage, reason):
    first, _ = build(tmp_path)
    damage(first.path)
    with pytest.raises(CacheError, match=reason) as raised:  # the read side never returns its bytes
        DiskImageCache(first.path, FP, SIZE, SHAPES)[0]
    assert str(first.path) in str(raised.value) and "\n" not in str(raised.value)
    lines: list[str] = []
    rebuilt, load = build(tmp_path, salt=1, lines=lines)
    assert lines[0].startswith(f"image cache: {first.path} is invalid (") and reason in lines[0]
    assert sorted(load.calls) == list(range(len(SHAPES)))
    assert_holds(rebuilt, salt=1)
    assert files(tmp_path) == [first.path.name, first.path.name + ".lock"]


def _other_fingerprint(tmp_path: Path) -> tuple[str, int, list]:
    other = FP[:24] + "0" * 40  # same file name, another dataset
    assert other != FP and cache_file(tmp_path, other, SIZE) == cache_file(tmp_path, FP, SIZE)
    return other, SIZE, SHAPES


def _other_size(tmp_path: Path) -> tuple[str, int, list]:
    """A file built for size 64, then found under size 32's name."""
    built, _ = build(tmp_path, size=64)
    os.replace(built.path, cache_file(tmp_path, FP, SIZE))
    return FP, 64, SHAPES


def _other_shapes(tmp_path: Path) -> tuple[str, int, list]:
    return FP, SIZE, [(w, h) for h, w in SHAPES]


def _other_count(tmp_path: Path) -> tuple[str, int, list]:
    return FP, SIZE, SHAPES + [(3, 3)]


@pytest.mark.parametrize(("stale", "reason"), [
    (_other_fingerprint, f"stale: built for dataset fingerprint {FP[:16]}..., expected {FP[:16]}..."),
    (_other_size, "stale: built for image size 64, expected 32"),
    (_other_shapes, "stale: its image shapes differ"),
    (_other_count, "stale: holds 9 images, expected 8"),
])
def test_stale_file_is_rebuilt(tmp_path, stale, reason):
    """A file at the expected path built for another fingerprint, size or shapes is never read."""
    fingerprint, size, shapes = stale(tmp_path)
    if size == SIZE:
        build(tmp_path, fingerprint=fingerprint, shapes=shapes)
    path = cache_file(tmp_path, FP, SIZE)
    with pytest.raises(CacheError, match=reason):
        DiskImageCache(path, FP, SIZE, SHAPES)
    lines: list[str] = []
    rebuilt, load = build(tmp_path, salt=1, lines=lines)
    assert reason in lines[0]
    assert sorted(load.calls) == list(range(len(SHAPES)))
    assert_holds(rebuilt, salt=1)


def test_leftover_temporary_file_is_removed(tmp_path):
    path = cache_file(tmp_path, FP, SIZE)
    leftover = tmp_path / f"{path.name}.k1ll3d.tmp"  # as left by a builder killed with SIGKILL
    leftover.write_bytes(b"partial")
    lines: list[str] = []
    cache, _ = build(tmp_path, lines=lines)
    assert f"image cache: removing {leftover.name}, left by an interrupted build" in lines
    assert files(tmp_path) == [path.name, path.name + ".lock"]
    assert_holds(cache)


# -- failures leave nothing under the final name -------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_failing_load_leaves_no_file(tmp_path, threads):
    load = Loader(fail_at=5)
    with pytest.raises(DatasetError, match="image 5: cannot decode") as raised:
        open_or_build(tmp_path, FP, SIZE, SHAPES, load, threads=threads)
    assert type(raised.value) is DatasetError  # load's own error, unchanged
    assert files(tmp_path) == [cache_file(tmp_path, FP, SIZE).name + ".lock"]
    cache, _ = build(tmp_path)  # and the next attempt builds normally
    assert_holds(cache)


def test_failing_rebuild_does_not_keep_invalid_file(tmp_path):
    first, _ = build(tmp_path)
    _truncate(first.path)
    with pytest.raises(DatasetError):
        open_or_build(tmp_path, FP, SIZE, SHAPES, Loader(fail_at=2))
    assert files(tmp_path) == [first.path.name + ".lock"]


def _build_slowly(cache_dir: str, record: str) -> None:
    open_or_build(Path(cache_dir), FP, SIZE, SHAPES, Loader(delay=0.2, record=Path(record)))


def test_killed_build_leaves_no_file_under_the_final_name(tmp_path):
    """A builder killed mid-build (SIGKILL: no cleanup runs) leaves only its temporary file,
    which the next build removes."""
    cache_dir, record = tmp_path / "cache", tmp_path / "calls.txt"
    proc = mp.get_context("fork").Process(target=_build_slowly, args=(str(cache_dir), str(record)))
    proc.start()
    deadline = time.monotonic() + 30
    while len(record.read_text().split() if record.exists() else []) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.join(10)
    path = cache_file(cache_dir, FP, SIZE)
    left = files(cache_dir)
    temps = [name for name in left if name.endswith(".tmp")]
    assert sorted(left) == sorted([path.name + ".lock", *temps]) and len(temps) == 1, left
    lines: list[str] = []
    cache, load = build(cache_dir, lines=lines)
    assert f"image cache: removing {temps[0]}, left by an interrupted build" in lines
    assert files(cache_dir) == [path.name, path.name + ".lock"]
    assert_holds(cache)


def _one_line_naming(error: BaseException, path: Path) -> None:
    assert str(path) in str(error) and "\n" not in str(error), str(error)


def test_directory_in_the_way(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    load = Loader()
    with pytest.raises(CacheError, match="cannot create the image cache directory") as raised:
        open_or_build(blocker / "cache", FP, SIZE, SHAPES, load)
    _one_line_naming(raised.value, blocker / "cache")
    assert load.calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_directory(tmp_path):
    cache_dir = tmp_path / "ro"
    cache_dir.mkdir()
    cache_dir.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="ABLATE_CACHE_DIR") as raised:
            open_or_build(cache_dir, FP, SIZE, SHAPES, Loader())
        _one_line_naming(raised.value, cache_dir)
    finally:
        cache_dir.chmod(0o755)
    assert files(cache_dir) == []


def test_too_little_free_space(tmp_path, monkeypatch):
    real = os.statvfs(tmp_path)
    fake = os.statvfs_result((real.f_bsize, 1, 10, 10, 10, *tuple(real)[5:]))  # 10 one-byte blocks free
    monkeypatch.setattr(cache_module.os, "statvfs", lambda path: fake)
    load = Loader()
    with pytest.raises(CacheError, match="cannot write the image cache .it needs") as raised:
        open_or_build(tmp_path, FP, SIZE, SHAPES, load)
    _one_line_naming(raised.value, cache_file(tmp_path, FP, SIZE))
    assert load.calls == []
    assert files(tmp_path) == [cache_file(tmp_path, FP, SIZE).name + ".lock"]


@pytest.mark.parametrize("threads", [1, 3])
def test_disk_full_while_writing(tmp_path, monkeypatch, threads):
    real_pwrite, writes = os.pwrite, []

    def pwrite(fd, data, offset):
        writes.append(offset)
        if len(writes) >= 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(cache_module.os, "pwrite", pwrite)
    with pytest.raises(CacheError, match="No space left on device") as raised:
        open_or_build(tmp_path, FP, SIZE, SHAPES, Loader(), threads=threads)
    _one_line_naming(raised.value, cache_file(tmp_path, FP, SIZE))
    assert files(tmp_path) == [cache_file(tmp_path, FP, SIZE).name + ".lock"]


# -- locking: one build per node -----------------------------------------------------------------------


@pytest.mark.parametrize("built_meanwhile", [False, True])
def test_waits_for_the_lock_and_rechecks(tmp_path, built_meanwhile):
    """While another holder has the lock, open_or_build says it waits; once it gets the lock it
    builds only if the file is still missing."""
    other, _ = build(tmp_path / "elsewhere")
    path = cache_file(tmp_path, FP, SIZE)
    lock = path.with_name(path.name + ".lock")
    lines: list[str] = []
    load = Loader()
    result: dict = {}
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # flock locks per open file: this blocks the thread below too
    try:
        thread = threading.Thread(target=lambda: result.setdefault(
            "cache", open_or_build(tmp_path, FP, SIZE, SHAPES, load, progress=lines.append)))
        thread.start()
        deadline = time.monotonic() + 20
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines == [f"image cache: waiting for another process's build (lock {lock})"]
        assert thread.is_alive() and load.calls == []
        if built_meanwhile:
            os.replace(other.path, path)  # what the lock holder would do
    finally:
        os.close(fd)
    thread.join(20)
    assert not thread.is_alive()
    assert load.calls == ([] if built_meanwhile else list(range(len(SHAPES))))
    assert_holds(result["cache"])


def _concurrent_trial(cache_dir: str, out_dir: str, rank: int, barrier) -> None:
    """One trial process: open_or_build with a slow load that records its calls in its own file."""
    out = Path(out_dir)
    lines: list[str] = []
    load = Loader(delay=0.2, record=out / f"calls-{rank}.txt")  # a 1.6 s build: the other one waits
    barrier.wait()
    cache = open_or_build(Path(cache_dir), FP, SIZE, SHAPES, load, progress=lines.append)
    (out / f"result-{rank}.txt").write_text("\n".join([digest(cache), *lines]))


def test_concurrent_processes_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_trial, args=(str(tmp_path / "cache"), str(tmp_path), rank, barrier))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    calls = [int(x) for rank in range(2) if (tmp_path / f"calls-{rank}.txt").exists()
             for x in (tmp_path / f"calls-{rank}.txt").read_text().split()]
    assert sorted(calls) == list(range(len(SHAPES)))  # built exactly once
    results = [(tmp_path / f"result-{rank}.txt").read_text().splitlines() for rank in range(2)]
    assert results[0][0] == results[1][0]  # both read the same bytes
    expected = hashlib.sha256(b"".join(image(i, *s).numpy().tobytes() for i, s in enumerate(SHAPES))).hexdigest()
    assert results[0][0] == expected
    waited = [any("waiting for another process's build" in line for line in r[1:]) for r in results]
    assert sorted(waited) == [False, True]


# -- pickling: DataLoader workers ----------------------------------------------------------------------


def test_pickle_is_small_and_reopens(tmp_path):
    few, _ = build(tmp_path / "a")
    many_shapes = [(1 + i % 5, 1 + i % 7) for i in range(2000)]
    many, _ = build(tmp_path / "b", shapes=many_shapes)
    many[3]  # opened: the map is not pickled
    sizes = len(pickle.dumps(few)), len(pickle.dumps(many))
    assert max(sizes) < 600 and sizes[1] - sizes[0] <= 2, sizes  # path + expected header, not the shapes
    again = pickle.loads(pickle.dumps(many))
    assert again._map is None  # reopened lazily
    assert torch.equal(again[1999], image(1999, *many_shapes[1999]))
    few_again = pickle.loads(pickle.dumps(few))
    _truncate(few.path)  # a reader opening it later refuses it
    with pytest.raises(CacheError, match="truncated"):
        few_again[0]


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_it(tmp_path, context):
    cache, _ = build(tmp_path)
    cache[0]  # opened in the parent before the workers start
    workers = 2 if context == "fork" else 1  # a spawned worker imports torch: seconds each
    loader = DataLoader(cache, batch_size=None, num_workers=workers, multiprocessing_context=context)
    got = list(loader)
    assert len(got) == len(SHAPES)
    for i, (h, w) in enumerate(SHAPES):
        assert torch.equal(got[i], image(i, h, w))
