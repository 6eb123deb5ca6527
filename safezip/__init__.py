"""Refuse hostile zip archives before any member is read. Standard library only.

A leaf package both layers import: the API (which never imports torch or the worker) checks every
zip-based upload — TorchScript, torch.export ``.pt2``, torch.save checkpoints, ``.npz``, image zips — with
:func:`check_zip` under the deployment's limits, and the engine (which never imports the service) checks
again, right before ``torch.jit.load`` / ``torch.export.load`` / ``torch.load`` / ``np.load`` see the file.

Readers disagree on ambiguous archives: Python's :mod:`zipfile` keeps the *last* central-directory entry
of a duplicated name while torch's miniz-based ``PyTorchStreamReader`` may read another, and a reader may
trust a local header whose name differs from the central directory's. A safety check that reads one copy
while the loader reads another is no check at all, so anything a second reader could understand
differently is refused, as are members that escape a directory when extracted and archives that inflate
far beyond their size.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

MiB = 1024 * 1024
#: Below this many declared bytes the compression ratio is not checked (small, highly compressible files are fine).
RATIO_AFTER_BYTES = 64 * MiB
#: Compression methods zipfile can read: stored, deflate, bzip2, lzma.
#: Central-directory bytes allowed per permitted member (an entry is 46 bytes plus its name and extra field).
MAX_DIRECTORY_BYTES_PER_MEMBER = 1024
READABLE_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
                    zipfile.ZIP_LZMA: "lzma"}

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory record, 22 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes, just before the end record
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_DRIVE = re.compile(r"^[A-Za-z]:")
#: What the messages name as the source of each limit, unless the caller names its settings.
DEFAULT_LIMIT_NAMES = {"members": "the member limit", "bytes": "the size limit", "ratio": "the ratio limit"}


class UnsafeArchive(ValueError):
    """The archive is refused; the message names the member and the limit or rule it breaks."""


def check_zip(source: str | os.PathLike[str] | BinaryIO, *, max_total_bytes: int, max_ratio: float,
              max_members: int, ratio_after_bytes: int = RATIO_AFTER_BYTES,
              limit_names: Mapping[str, str] | None = None) -> list[zipfile.ZipInfo]:
    """Check a zip archive's structure, reading only its directory and local headers (no member data).

    ``source`` is a path or a seekable binary file (its position is restored). Returns the members'
    :class:`zipfile.ZipInfo` in central-directory order. Raises :class:`UnsafeArchive` for a damaged
    directory, data before/after the archive, more than ``max_members`` members, duplicate or unsafe
    names (absolute, drive letter, backslash, ``..``, NUL), symlinks, encrypted members, unknown
    compression, more than ``max_total_bytes`` declared uncompressed bytes, a compression ratio above
    ``max_ratio`` once the total passes ``ratio_after_bytes``, a local header naming another file, or
    members whose bytes overlap. ``limit_names`` (keys ``members``, ``bytes``, ``ratio``) names where each
    limit comes from in the messages, e.g. the setting that raises it.
    """
    names = {**DEFAULT_LIMIT_NAMES, **(limit_names or {})}
    with _binary(source) as f:
        entries, cd_start, cd_size = _end_record(f)
        _check_count(entries, max_members, names)
        if cd_size > max_members * MAX_DIRECTORY_BYTES_PER_MEMBER:  # bound what zipfile parses into memory
            raise UnsafeArchive(f"the zip archive's central directory is {cd_size} bytes, more than "
                                f"{MAX_DIRECTORY_BYTES_PER_MEMBER} per member of the limit of {max_members} members "
                                f"({names['members']})")
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise UnsafeArchive(f"the zip archive's central directory is damaged ({exc})") from None
        if len(infos) != entries:
            raise UnsafeArchive(f"the zip archive's central directory lists {len(infos)} members but its end "
                                f"record declares {entries}; an ambiguous archive is refused")
        _check_count(len(infos), max_members, names)
        _check_names(infos)
        _check_sizes(infos, max_total_bytes, max_ratio, ratio_after_bytes, names)
        _check_local_headers(f, infos, cd_start)
        return infos


@contextmanager
def _binary(source: str | os.PathLike[str] | BinaryIO) -> Iterator[BinaryIO]:
    """A seekable binary file for ``source``: opened (and closed) here for a path, else restored to its position."""
    if isinstance(source, (str, os.PathLike)):
        with open(Path(source), "rb") as f:
            yield f
        return
    pos = source.tell()
    try:
        yield source
    finally:
        source.seek(pos)


def _end_record(f: BinaryIO) -> tuple[int, int, int]:
    """``(members declared, central directory start, its size)`` from the end record (zip64-aware).

    Refuses multi-disk archives, bytes after the end record, and a central directory that is not where the
    end record says (data prepended to the archive, or another archive concatenated in front of it).
    """
    size = f.seek(0, os.SEEK_END)
    tail_len = min(size, _EOCD.size + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        raise UnsafeArchive("not a zip archive: no end of central directory record")
    _sig, disk, cd_disk, _on_disk, entries, cd_size, cd_offset, comment_len = _EOCD.unpack_from(tail, at)
    eocd_at = size - tail_len + at
    if eocd_at + _EOCD.size + comment_len != size:
        extra = size - (eocd_at + _EOCD.size + comment_len)
        raise UnsafeArchive(f"the zip archive has {extra} bytes after its end record (a comment whose length "
                            f"does not match, or appended data); refused")
    dir_end = eocd_at
    if _has_zip64_locator(f, eocd_at):  # like zipfile, prefer the zip64 record whenever there is one
        entries, cd_size, cd_offset, dir_end = _zip64_end_record(f, eocd_at)
    elif entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        raise UnsafeArchive("the zip64 end record locator is missing")
    elif disk or cd_disk:
        raise UnsafeArchive("multi-disk zip archives are not accepted")
    if cd_offset + cd_size != dir_end:
        raise UnsafeArchive(f"the zip archive's central directory is not where its end record says "
                            f"({dir_end - cd_offset - cd_size} bytes of other data before it: a prefixed or "
                            f"concatenated archive); refused")
    return entries, cd_offset, cd_size


def _has_zip64_locator(f: BinaryIO, eocd_at: int) -> bool:
    if eocd_at < _ZIP64_LOCATOR.size:
        return False
    f.seek(eocd_at - _ZIP64_LOCATOR.size)
    return f.read(4) == b"PK\x06\x07"


def _zip64_end_record(f: BinaryIO, eocd_at: int) -> tuple[int, int, int, int]:
    """``(members, central directory size, its offset, zip64 record offset)`` of a zip64 archive
    (torch writes one even for small archives)."""
    f.seek(eocd_at - _ZIP64_LOCATOR.size)
    _sig, disk, record_at, disks = _ZIP64_LOCATOR.unpack(f.read(_ZIP64_LOCATOR.size))
    if disk or disks > 1:
        raise UnsafeArchive("multi-disk zip archives are not accepted")
    f.seek(record_at)
    raw = f.read(_ZIP64_EOCD.size)
    if len(raw) != _ZIP64_EOCD.size or raw[:4] != b"PK\x06\x06":
        raise UnsafeArchive("the zip64 end record is missing or damaged")
    _sig, _size, _made, _need, disk, cd_disk, _on_disk, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack(raw)
    if disk or cd_disk:
        raise UnsafeArchive("multi-disk zip archives are not accepted")
    if record_at + _ZIP64_EOCD.size > eocd_at - _ZIP64_LOCATOR.size:
        raise UnsafeArchive("the zip64 end record overlaps its locator")
    return entries, cd_size, cd_offset, record_at


def _check_count(count: int, max_members: int, names: Mapping[str, str]) -> None:
    if count > max_members:
        raise UnsafeArchive(f"the zip archive holds {count} members, more than the limit of {max_members} "
                            f"({names['members']})")


def unsafe_name_reason(name: str) -> str | None:
    """Why a member name is refused (it could escape a directory, or mean different files to different
    readers), or None when it is a plain relative path."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/"):
        return "is an absolute path"
    if _DRIVE.match(name):
        return "starts with a drive letter"
    if ".." in name.split("/"):
        return "has a '..' component"
    return None


def _check_names(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse duplicate or unsafe names, symlinks, encrypted members and compression zipfile cannot read."""
    seen: set[str] = set()
    for info in infos:
        # orig_filename: zipfile cuts ``filename`` at a NUL byte, the raw name keeps it.
        name = info.orig_filename
        if (reason := unsafe_name_reason(name)) is not None:
            raise UnsafeArchive(f"member {name!r} {reason}; such names are refused")
        if name in seen:
            raise UnsafeArchive(f"member {name!r} appears more than once; readers disagree on which copy they "
                                f"read, so archives with duplicate names are refused")
        seen.add(name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeArchive(f"member {name!r} is a symbolic link; links are refused")
        if info.flag_bits & 0x1:
            raise UnsafeArchive(f"member {name!r} is encrypted; encrypted archives cannot be checked")
        if info.compress_type not in READABLE_METHODS:
            raise UnsafeArchive(f"member {name!r} uses compression method {info.compress_type}; only "
                                f"{', '.join(READABLE_METHODS.values())} are accepted")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise UnsafeArchive(f"member {name!r} is stored uncompressed but declares {info.file_size} bytes in "
                                f"{info.compress_size}; its sizes are inconsistent")


def _check_sizes(infos: list[zipfile.ZipInfo], max_total_bytes: int, max_ratio: float,
                 ratio_after_bytes: int, names: Mapping[str, str]) -> None:
    """Refuse by declared sizes (what zipfile and miniz inflate at most), before anything is inflated."""
    total = sum(i.file_size for i in infos)
    packed = sum(i.compress_size for i in infos)
    if total > max_total_bytes:
        biggest = max(infos, key=lambda i: i.file_size)
        raise UnsafeArchive(f"the zip archive inflates to {total} bytes (largest member {biggest.orig_filename!r}: "
                            f"{biggest.file_size} bytes), more than the limit of {max_total_bytes} bytes "
                            f"({names['bytes']})")
    if total > ratio_after_bytes and total > max_ratio * max(packed, 1):
        biggest = max(infos, key=lambda i: i.file_size / max(i.compress_size, 1))
        raise UnsafeArchive(f"the zip archive inflates {total / max(packed, 1):.0f}-fold ({packed} bytes to {total}; "
                            f"member {biggest.orig_filename!r}: {biggest.compress_size} to {biggest.file_size}), "
                            f"more than the limit of {max_ratio:g} ({names['ratio']}) for archives "
                            f"over {ratio_after_bytes} bytes")


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The name's bytes as stored in the central directory (zipfile decodes them by the UTF-8 flag)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _check_local_headers(f: BinaryIO, infos: list[zipfile.ZipInfo], cd_start: int) -> None:
    """Each member's local header must exist, name the same file as the central directory, and the
    members' bytes (header + data) must not overlap each other or the central directory."""
    previous: tuple[str, int] | None = None  # (name, end offset) of the member before, by offset
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.orig_filename
        f.seek(info.header_offset)
        header = f.read(_LOCAL.size)
        if len(header) != _LOCAL.size or header[:4] != b"PK\x03\x04":
            raise UnsafeArchive(f"member {name!r} has no local file header at offset {info.header_offset}")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        local_name = f.read(name_len)
        if local_name != _raw_name(info):
            raise UnsafeArchive(f"member {name!r} is named {local_name.decode('utf-8', 'replace')!r} in its local "
                                f"header; readers would disagree on which file it is")
        if previous is not None and info.header_offset < previous[1]:
            raise UnsafeArchive(f"members {previous[0]!r} and {name!r} overlap in the archive; overlapping "
                                f"members (a zip bomb technique) are refused")
        end = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
        if end > cd_start:
            raise UnsafeArchive(f"member {name!r} runs into the central directory; the archive is damaged")
        previous = (name, end)
