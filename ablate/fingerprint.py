"""The code fingerprint: which code determines a trial's results (no heavy imports: the CLI's
``ablate status`` computes it without loading torch).

A trial's results are a function of its config, its dataset and the code that trains and
evaluates it. The fingerprint covers the last: the bytes of :data:`CODE_MODULES` and the versions
of :data:`CODE_LIBRARIES`. It is part of every trial hash (``ablate.spec.trial_hash``), kept with
each trial in the store and written into every checkpoint, so results are reused, and checkpoints
resumed, only across identical code.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: The sources whose bytes are in :func:`code_fingerprint`, relative to the ``ablate`` package: the
#: code that turns a resolved config and a dataset into a trial's numbers. A folder means every
#: ``*.py`` file in it (not recursive). Left out: the job machinery (spec, runner, record, store,
#: cli*), statistics and reports, which do not change what a trial computes.
CODE_MODULES = ("detect", "data", "train.py", "evaluate.py", "config.py")
#: The distributions whose versions are in :func:`code_fingerprint`: the libraries that compute a
#: trial's numbers (tensors and kernels, image decoding, the synthetic generator's RNG, COCOeval).
CODE_LIBRARIES = ("torch", "torchvision", "numpy", "pycocotools", "faster-coco-eval")


def code_fingerprint_of(package_dir: Path, versions: dict[str, str]) -> str:
    """SHA-256 hex over the :data:`CODE_MODULES` sources under ``package_dir`` (sorted relative
    paths and bytes, CRLF read as LF so a Windows checkout agrees) and ``versions`` (name -> version)."""
    files: list[Path] = []
    for entry in CODE_MODULES:
        path = package_dir / entry
        files.extend(sorted(path.glob("*.py")) if path.is_dir() else [path])
    digest = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(package_dir).as_posix()):
        digest.update(f"{f.relative_to(package_dir).as_posix()}\0".encode())
        digest.update(f.read_bytes().replace(b"\r\n", b"\n"))
        digest.update(b"\0")
    for name in sorted(versions):
        digest.update(f"{name}=={versions[name]}\n".encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """The installed versions of :data:`CODE_LIBRARIES` (``"absent"`` for one that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in CODE_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The fingerprint (64 hex digits) of the code that determines a trial's results: this ablate's
    :data:`CODE_MODULES` and the versions of :data:`CODE_LIBRARIES`. Computed once per process (a
    few milliseconds); part of every ``ablate.spec.trial_hash``, so results are reused only across identical
    code, and kept with each trial in the store and in each checkpoint."""
    return code_fingerprint_of(Path(__file__).resolve().parent, library_versions())
