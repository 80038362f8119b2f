"""evaluator/batch/archive.py: archives from another machine are unpacked safely; links never travel."""

import io
import tarfile

import pytest

from evaluator.batch import UnsafeArchive, extract_archive, pack_folder

CAP = 1 << 20


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "bad",
    [
        (_member("link", tarfile.SYMTYPE, "/etc/passwd"), None),
        (_member("hard", tarfile.LNKTYPE, "result.json"), None),
        (_member("../escape.txt"), b"x"),
        (_member("sub/../../escape.txt"), b"x"),
        (_member("/tmp/absolute.txt"), b"x"),
        (_member("fifo", tarfile.FIFOTYPE), None),
    ],
    ids=["symlink", "hardlink", "dotdot", "nested-dotdot", "absolute", "fifo"],
)
def test_extraction_refuses_links_escapes_and_special_files(tmp_path, bad):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive):
        extract_archive(_tar((_member("result.json"), b"{}"), bad), dest, CAP)
    assert not (tmp_path / "escape.txt").exists()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_extraction_refuses_duplicates_and_oversized_archives(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="twice"):
        extract_archive(_tar((_member("a"), b"1"), (_member("a"), b"2")), dest, CAP)
    assert (dest / "a").read_bytes() == b"1"
    with pytest.raises(UnsafeArchive, match="cap"):
        extract_archive(_tar((_member("big"), b"x" * 4096)), tmp_path / "unused", 2048)


def test_pack_and_extract_round_trip_leaves_links_behind(tmp_path):
    source = tmp_path / "source"
    (source / "sandbox").mkdir(parents=True)
    (source / "result.json").write_text("{}")
    (source / "sandbox" / "nsjail.log").write_text("log")
    (source / "model.pt").write_bytes(b"weights")
    (source / "outside").symlink_to("/etc/passwd")
    archive = pack_folder(source, CAP, leave_out=frozenset({"model.pt"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_archive(archive, dest, CAP)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "result.json",
        "sandbox",
        "sandbox/nsjail.log",
    ]
    assert (dest / "sandbox" / "nsjail.log").read_text() == "log"
