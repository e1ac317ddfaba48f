"""Safe zip extraction: good exports extract exactly, hostile archives are refused whole."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

import pytest

from har_edge.agent.decode.archive import inspect_zip, is_zip, safe_extract
from har_edge.agent.errors import CorruptFile, InputError, UnsafeArchive

MB = 1 << 20
FIT_LIKE = bytes([14, 0x10, 0xD9, 0x07, 0, 0, 0, 0]) + b".FIT" + bytes(range(256)) * 40
STUDY_ACC = b"timestamp,timestamp_ms,sample_time_offset,calibrated_accel_x,calibrated_accel_y,calibrated_accel_z\n"
ROW = b'1111111111,0,"[0,10]","[1,2]","[3,4]","[5,6]"\n'
STUDY_GYR = b"timestamp,timestamp_ms,sample_time_offset,calibrated_gyro_x,calibrated_gyro_y,calibrated_gyro_z\n"


def make_zip(path: Path, members: dict[str, bytes], *, compression=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def zeros_zip(path: Path, name: str, size: int) -> Path:
    """A member of ``size`` zero bytes, written in pieces (never all in memory)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w") as w:
            block = bytes(MB)
            for _ in range(size // MB):
                w.write(block)
    return path


def central_records(data: bytes) -> list[int]:
    """Offsets of the central directory headers of a (non-zip64) archive."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _size, start = struct.unpack_from("<HLL", data, eocd + 10)
    out, at = [], start
    for _ in range(count):
        assert data[at : at + 4] == b"PK\x01\x02"
        out.append(at)
        n, m, k = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + n + m + k
    return out


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# -- good archives ----------------------------------------------------------------------


def test_garmin_export_with_fit_and_study_pair_extracts_exactly(tmp_path):
    members = {
        "12345678901.fit": FIT_LIKE,
        "study/": b"",
        "study/2025-03-23-15-23-10-accelerometer_data.csv": STUDY_ACC + ROW,
        "study/2025-03-23-15-23-10-gyroscope_data.csv": STUDY_GYR + ROW,
    }
    z = make_zip(tmp_path / "export.zip", members)
    assert is_zip(z)
    dest = tmp_path / "out"
    got = safe_extract(z, dest, max_bytes=10 * MB)
    files = {n: d for n, d in members.items() if not n.endswith("/")}
    assert [p.relative_to(dest).as_posix() for p in got] == list(files)
    for p in got:
        assert p.read_bytes() == files[p.relative_to(dest).as_posix()]
    assert listing(dest) == ["12345678901.fit", "study"] + [f"study/{n.split('/')[1]}" for n in list(files)[1:]]


def test_stored_members_and_backslash_names(tmp_path):
    z = make_zip(tmp_path / "s.zip", {"a\\b.fit": FIT_LIKE}, compression=zipfile.ZIP_STORED)
    got = safe_extract(z, tmp_path / "out", max_bytes=MB)
    assert got == [tmp_path / "out" / "a" / "b.fit"]
    assert got[0].read_bytes() == FIT_LIKE


def test_nested_zip_is_extracted_once(tmp_path):
    inner = make_zip(tmp_path / "inner.zip", {"x.fit": FIT_LIKE, "y/z.csv": b"1,2\n"}).read_bytes()
    z = make_zip(tmp_path / "outer.zip", {"DI_CONNECT/Part1.zip": inner, "top.fit": b"abc"})
    dest = tmp_path / "out"
    got = safe_extract(z, dest, max_bytes=MB)
    assert [p.relative_to(dest).as_posix() for p in got] == [
        "DI_CONNECT/Part1/x.fit",
        "DI_CONNECT/Part1/y/z.csv",
        "top.fit",
    ]
    assert (dest / "DI_CONNECT/Part1/x.fit").read_bytes() == FIT_LIKE
    assert not (dest / "DI_CONNECT/Part1.zip").exists()


def test_xlsx_inside_a_zip_is_an_ordinary_member(tmp_path):
    book = make_zip(tmp_path / "b.xlsx", {"xl/workbook.xml": b"<x/>"}).read_bytes()
    z = make_zip(tmp_path / "o.zip", {"accelerometer.xlsx": book})
    got = safe_extract(z, tmp_path / "out", max_bytes=MB)
    assert got[0].read_bytes() == book


def test_empty_zip_gives_no_files(tmp_path):
    z = make_zip(tmp_path / "e.zip", {})
    assert is_zip(z)
    assert safe_extract(z, tmp_path / "out", max_bytes=MB) == []


# -- hostile archives ----------------------------------------------------------------------


def assert_refused(z: Path, dest: Path, err=UnsafeArchive, match: str | None = None, **kw) -> str:
    kw.setdefault("max_bytes", 10 * MB)
    with pytest.raises(err, match=match) as ei:
        safe_extract(z, dest, **kw)
    if dest.exists():
        assert listing(dest) == [], "nothing may be left behind"
    return str(ei.value)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("../evil.fit", r"'\.\.'"),
        ("a/../../evil.fit", r"'\.\.'"),
        ("..\\evil.fit", r"'\.\.'"),
        ("/etc/evil.fit", "absolute"),
        ("C:/evil.fit", "absolute"),
        ("\\\\server\\share\\evil.fit", "absolute"),
    ],
)
def test_zip_slip_and_absolute_names_are_refused(tmp_path, name, reason):
    z = make_zip(tmp_path / "e.zip", {"good.fit": FIT_LIKE, name: b"pwned"})
    msg = assert_refused(z, tmp_path / "out", match=reason)
    assert repr(name) in msg and "e.zip" in msg
    assert not (tmp_path / "evil.fit").exists()
    assert not (tmp_path / "out" / "good.fit").exists(), "all or nothing"


def test_symlink_member_is_refused(tmp_path):
    z = tmp_path / "l.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link.fit")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    assert_refused(z, tmp_path / "out", match="symbolic link")


def test_device_file_member_is_refused(tmp_path):
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("dev")
        info.create_system = 3
        info.external_attr = (stat.S_IFCHR | 0o666) << 16
        zf.writestr(info, b"")
    assert_refused(z, tmp_path / "out", match="special file")


def test_zip_bomb_of_200_mb_is_refused_before_writing(tmp_path):
    z = zeros_zip(tmp_path / "bomb.zip", "zeros.fit", 200 * MB)
    assert z.stat().st_size < MB
    msg = assert_refused(z, tmp_path / "out", match="beyond the limit", max_bytes=10 * MB)
    assert "'zeros.fit'" in msg


def test_compression_ratio_bomb_within_the_byte_budget_is_refused(tmp_path):
    z = zeros_zip(tmp_path / "ratio.zip", "zeros.csv", 8 * MB)
    assert_refused(z, tmp_path / "out", match="compression ratio", max_bytes=10 * MB)


def patch_sizes(z: Path, declared: int) -> None:
    """Make the single member's local and central headers declare ``declared`` bytes."""
    data = bytearray(z.read_bytes())
    (cen,) = central_records(bytes(data))
    struct.pack_into("<L", data, cen + 24, declared)
    local = struct.unpack_from("<L", data, cen + 42)[0]
    struct.pack_into("<L", data, local + 22, declared)
    z.write_bytes(bytes(data))


@pytest.mark.parametrize("max_ratio", [200.0, 1e9])
def test_member_whose_header_lies_about_its_size_is_refused_while_streaming(tmp_path, max_ratio):
    z = zeros_zip(tmp_path / "liar.zip", "small.fit", 50 * MB)
    patch_sizes(z, 1000)
    # the header alone looks harmless
    assert inspect_zip(z, max_bytes=10 * MB, max_ratio=max_ratio)[0].file_size == 1000
    dest = tmp_path / "out"
    msg = assert_refused(z, dest, match="small.fit", max_bytes=10 * MB, max_ratio=max_ratio)
    assert "lying header" in msg or "compression ratio" in msg
    assert not any(p.is_file() for p in dest.rglob("*"))


def test_header_declaring_more_than_the_data_holds_is_refused(tmp_path):
    z = make_zip(tmp_path / "short.zip", {"a.fit": FIT_LIKE})
    patch_sizes(z, len(FIT_LIKE) + 10)
    assert_refused(z, tmp_path / "out", match="declares")


def test_too_many_members_are_refused(tmp_path):
    z = make_zip(tmp_path / "many.zip", {f"f{i}.csv": b"x" for i in range(20)})
    assert_refused(z, tmp_path / "out", match="more than the limit of 10", max_files=10)


def test_encrypted_member_is_refused(tmp_path):
    z = make_zip(tmp_path / "enc.zip", {"secret.fit": FIT_LIKE})
    data = bytearray(z.read_bytes())
    (cen,) = central_records(bytes(data))
    struct.pack_into("<H", data, cen + 8, struct.unpack_from("<H", data, cen + 8)[0] | 1)
    struct.pack_into("<H", data, 6, struct.unpack_from("<H", data, 6)[0] | 1)
    z.write_bytes(bytes(data))
    assert_refused(z, tmp_path / "out", match="encrypted")


def test_overlapping_members_are_refused(tmp_path):
    """Two central entries pointing at the same data (the non-recursive zip bomb trick)."""
    z = make_zip(tmp_path / "ov.zip", {"a.fit": FIT_LIKE})
    data = z.read_bytes()
    (cen,) = central_records(data)
    eocd = data.rindex(b"PK\x05\x06")
    record = bytearray(data[cen:eocd])
    record[46:51] = b"b.fit"
    new_cd = data[cen:eocd] + bytes(record)
    end = bytearray(data[eocd:])
    struct.pack_into("<HHL", end, 8, 2, 2, len(new_cd))
    z.write_bytes(data[:cen] + new_cd + bytes(end))
    assert_refused(z, tmp_path / "out", match="overlaps")


def test_zip_nested_two_levels_is_refused(tmp_path):
    deepest = make_zip(tmp_path / "l2.zip", {"x.fit": FIT_LIKE}).read_bytes()
    middle = make_zip(tmp_path / "l1.zip", {"deeper.zip": deepest}).read_bytes()
    z = make_zip(tmp_path / "l0.zip", {"middle.zip": middle})
    assert_refused(z, tmp_path / "out", match="nested more than 1 level")


def test_nested_zip_shares_the_byte_budget(tmp_path):
    inner = make_zip(tmp_path / "in.zip", {"big.bin": bytes(range(256)) * 4096}).read_bytes()  # 1 MB
    z = make_zip(tmp_path / "o.zip", {"a.bin": bytes(range(256)) * 2048, "in.zip": inner})
    assert_refused(z, tmp_path / "out", match="beyond the limit", max_bytes=MB + 1000)


def test_duplicate_member_names_are_refused(tmp_path):
    z = tmp_path / "dup.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.fit", b"1")
        with pytest.warns(UserWarning):
            zf.writestr("a.fit", b"2")
    assert_refused(z, tmp_path / "out", match="twice")


def test_existing_files_are_never_overwritten(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.fit").write_bytes(b"mine")
    z = make_zip(tmp_path / "a.zip", {"a.fit": FIT_LIKE})
    with pytest.raises(UnsafeArchive, match="overwrite"):
        safe_extract(z, dest, max_bytes=MB)
    assert (dest / "a.fit").read_bytes() == b"mine"
    assert listing(dest) == ["a.fit"]


# -- damaged archives ----------------------------------------------------------------------


def test_not_a_zip_is_corrupt(tmp_path):
    z = tmp_path / "x.zip"
    z.write_bytes(b"PK\x03\x04 definitely not a zip" * 10)
    assert_refused(z, tmp_path / "out", err=CorruptFile, match="x.zip")
    assert not is_zip(tmp_path / "missing.zip")
    (tmp_path / "t.fit").write_bytes(FIT_LIKE)
    assert not is_zip(tmp_path / "t.fit")


def test_truncated_zip_is_corrupt(tmp_path):
    z = make_zip(tmp_path / "t.zip", {"a.fit": FIT_LIKE * 10})
    z.write_bytes(z.read_bytes()[:-40])
    assert_refused(z, tmp_path / "out", err=CorruptFile)


def test_damaged_data_is_corrupt(tmp_path):
    z = make_zip(tmp_path / "crc.zip", {"a.fit": FIT_LIKE}, compression=zipfile.ZIP_STORED)
    data = bytearray(z.read_bytes())
    at = data.index(b".FIT")
    data[at + 10] ^= 0xFF
    z.write_bytes(bytes(data))
    assert_refused(z, tmp_path / "out", err=CorruptFile, match="CRC")


def test_unsupported_compression_is_an_input_error(tmp_path):
    z = make_zip(tmp_path / "bz.zip", {"a.fit": FIT_LIKE}, compression=zipfile.ZIP_BZIP2)
    with pytest.raises(InputError, match="compression method 12"):
        safe_extract(z, tmp_path / "out", max_bytes=MB)
