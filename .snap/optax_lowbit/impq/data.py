"""Text for IMPQ: Jane Austen's six novels, fetched from Debian and cached.

The installed package reads its calibration and held-out text with this
module alone (no repository folder needed). The text comes from the Debian
package ``r-cran-janeaustenr`` (1.6 MB .deb), downloaded once with
``apt-get download`` (no installation, no root needed on most systems) and
unpacked with ``dpkg -x`` (or, without dpkg, with the standard library) into
a cache directory: ``~/.cache/optax_lowbit``, or ``$OPTAX_LOWBIT_CACHE``. The
novels sit in an R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``), read
here by a small reader of R's XDR serialization format (versions 2 and 3); R
is not needed. ``benchmarks.data`` re-exports all of it.

* `austen_novels`: name to text, the six novels.
* `austen_text`: the training split (five novels) or the held-out one
  (*Persuasion*, `AUSTEN_HELDOUT`): never evaluate on training text.
* `debian_package`, `cache_dir`: fetching and caching any Debian package.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import lzma
import os
import pathlib
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from typing import Any

import numpy as np

AUSTEN_PACKAGE = "r-cran-janeaustenr"

AUSTEN_NAMES = (
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
)
AUSTEN_HELDOUT = "persuasion"

# Title each novel's text starts with: checks that index names match content.
_AUSTEN_TITLES = {
    "emma": "emma",
    "mansfieldpark": "mansfield park",
    "northangerabbey": "northanger abbey",
    "persuasion": "persuasion",
    "prideprejudice": "pride and prejudice",
    "sensesensibility": "sense and sensibility",
}

_RDB_DIR = "usr/lib/R/site-library/janeaustenr/data"

# --------------------------------------------------------------------------
# Cache and Debian packages.
# --------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """Returns the cache root (``$OPTAX_LOWBIT_CACHE`` or ~/.cache/optax_lowbit)."""
    root = os.environ.get("OPTAX_LOWBIT_CACHE")
    path = pathlib.Path(root) if root else pathlib.Path.home() / ".cache/optax_lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _howto(package: str, what: str, reason: str) -> str:
    debs = cache_dir() / "debian"
    return (
        f"{what} comes from the Debian package {package!r}, which could not be "
        f"fetched: {reason}\n"
        "Fetch it by hand with these two commands (Debian/Ubuntu; if apt cannot "
        "find the package, run `apt-get update` first, as root):\n"
        f"  cd {debs} && apt-get download {package}\n"
        f"  dpkg -x {debs}/{package}_*.deb {debs}/{package}\n"
        "Without apt, download the .deb from "
        f"https://packages.debian.org/bookworm/all/{package}/download into "
        f"{debs}; it is then unpacked with the Python standard library."
    )


def _run(cmd: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
    )


def _apt_download(package: str, what: str, debs: pathlib.Path) -> pathlib.Path:
    """Downloads ``package``'s .deb into ``debs`` with apt-get; returns its path."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(_howto(package, what, "apt-get is not on PATH."))
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        tmp_path = pathlib.Path(tmp)
        result = _run(["apt-get", "download", package], tmp_path)
        if result.returncode != 0:
            # Package lists may be missing (fresh containers): refresh, retry.
            _run(["apt-get", "update"], tmp_path)
            result = _run(["apt-get", "download", package], tmp_path)
        found = sorted(tmp_path.glob(f"{package}_*.deb"))
        if result.returncode != 0 or not found:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise RuntimeError(
                _howto(package, what, "`apt-get download` failed: " + " | ".join(tail))
            )
        target = debs / found[-1].name
        os.replace(found[-1], target)
    return target


def _extract_deb_stdlib(deb: pathlib.Path, dest: pathlib.Path) -> None:
    """Unpacks the data member of a .deb (an ar archive) with the stdlib."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not a Debian package (no ar header).")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise RuntimeError(
                    f"{deb} holds {name}; zstd needs `dpkg -x` (install dpkg)."
                )
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:  # Python < 3.11.4: no extraction filters.
                    tar.extractall(dest)
            return
    raise RuntimeError(f"{deb} has no data.tar member.")


def debian_package(package: str, probe: str, what: str = "This data") -> pathlib.Path:
    """Returns the directory holding ``package`` unpacked, fetching it once.

    Args:
      package: Debian binary package name, e.g. ``"r-cran-janeaustenr"``.
      probe: a file path inside the package that must exist once unpacked.
      what: what the package provides, for the error message.

    Returns:
      The root of the unpacked tree (``<cache>/debian/<package>``).

    Raises:
      RuntimeError: if the package cannot be downloaded or unpacked; the
        message gives the commands to fetch it by hand.
    """
    debs = cache_dir() / "debian"
    debs.mkdir(parents=True, exist_ok=True)
    root = debs / package
    if (root / probe).exists():
        return root
    found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1] if found else _apt_download(package, what, debs)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=debs, prefix=f".{package}-"))
    try:
        if shutil.which("dpkg") is not None:
            result = _run(["dpkg", "-x", str(deb), str(tmp)], debs)
            if result.returncode != 0:
                raise RuntimeError(f"dpkg -x {deb} failed: {result.stderr.strip()}")
        else:
            _extract_deb_stdlib(deb, tmp)
        if not (tmp / probe).exists():
            raise RuntimeError(
                _howto(package, what, f"{deb.name} has no {probe} inside.")
            )
        if root.exists():  # A stale or partial tree: replace it.
            shutil.rmtree(root)
        try:
            os.rename(tmp, root)
        except OSError:  # Another process unpacked it first.
            if not (root / probe).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    deb.unlink(missing_ok=True)  # The unpacked tree is all we read.
    return root


# --------------------------------------------------------------------------
# R's XDR serialization and lazy-load databases.
# --------------------------------------------------------------------------

# SEXP type codes (R Internals, "Serialization formats").
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_IS_OBJECT, _HAS_ATTR, _HAS_TAG = 1 << 8, 1 << 9, 1 << 10
# CHARSXP encoding bits, in the "levels" field (flags >> 12).
_BYTES_MASK, _LATIN1_MASK = 1 << 1, 1 << 2


class _XdrReader:
    r"""Reads one object from R's XDR ("X\n") serialization format."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos}.")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R serialization truncated at byte {self.pos}.")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def length(self) -> int:
        n = self.int()
        if n == -1:  # Long vector: two more words.
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        if n < 0:
            raise ValueError(f"bad vector length {n} at byte {self.pos}.")
        return n

    def header(self) -> int:
        fmt = self.raw(2)
        if fmt != b"X\n":
            raise ValueError(
                f"only R's XDR format (b'X\\n') is supported, got {fmt!r}."
            )
        version = self.int()
        if version not in (2, 3):
            raise ValueError(f"R serialization version must be 2 or 3, got {version}.")
        self.int()  # R version that wrote it.
        self.int()  # Minimal R version to read it.
        if version == 3:
            self.raw(self.int())  # Native encoding name, e.g. b"UTF-8".
        return version

    def item(self) -> Any:
        return self.item_from_flags(self.int())

    def item_from_flags(self, flags: int) -> Any:
        sexp = flags & 0xFF
        if sexp == _NILVALUE_SXP:
            return None
        if sexp == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexp == _SYMSXP:
            name = self.item()  # A CHARSXP.
            self.refs.append(name)
            return name
        if sexp == _LISTSXP:
            return self.pairlist(flags)
        if sexp == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_.
            raw = self.raw(n)
            levels = flags >> 12
            if levels & _BYTES_MASK:
                return raw
            return raw.decode("latin-1" if levels & _LATIN1_MASK else "utf-8")
        if sexp in (_LGLSXP, _INTSXP):  # NA is INT_MIN, as in R.
            n = self.length()
            value = np.frombuffer(self.raw(4 * n), ">i4").astype(np.int32)
        elif sexp == _REALSXP:
            n = self.length()
            value = np.frombuffer(self.raw(8 * n), ">f8").astype(np.float64)
        elif sexp == _STRSXP:
            value = [self.item() for _ in range(self.length())]
        elif sexp == _VECSXP:
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(
                f"unsupported R SEXP type {sexp} at byte {self.pos - 4}; this "
                "reader handles NULL, symbols, pairlists, character, logical, "
                "integer, double and list vectors."
            )
        if flags & _HAS_ATTR:
            attributes = self.item()
            names = attributes.get("names") if isinstance(attributes, dict) else None
            if sexp == _VECSXP and names is not None and len(names) == len(value):
                value = dict(zip(names, value, strict=True))
        return value

    def pairlist(self, flags: int) -> dict[Any, Any] | list[Any]:
        tags, values = [], []
        while True:
            if flags & _HAS_ATTR:
                self.item()  # Attributes of a cons cell: unused here.
            tags.append(self.item() if flags & _HAS_TAG else None)
            values.append(self.item())
            flags = self.int()
            if flags & 0xFF != _LISTSXP:
                self.item_from_flags(flags)  # The final CDR, normally NULL.
                break
        if all(isinstance(t, str) for t in tags):
            return dict(zip(tags, values, strict=True))
        return values


def unserialize_xdr(data: bytes) -> Any:
    r"""Reads one R object serialized in XDR format (versions 2 and 3).

    Maps ``NULL`` to None, character vectors to ``list[str | None]`` (NA is
    None), logical and integer vectors to int32 arrays (NA is INT_MIN), double
    vectors to float64 arrays, lists to lists (to dicts when they have names),
    pairlists to dicts keyed by tag. Other attributes are dropped.

    Args:
      data: bytes starting with ``b"X\n"``, uncompressed.

    Returns:
      The object as Python values.
    """
    reader = _XdrReader(data)
    reader.header()
    return reader.item()


def _inflate(record: bytes, compression: int) -> bytes:
    """Decompresses one lazy-load record: uncompressed length, then payload."""
    if len(record) < 4:
        raise ValueError("R lazy-load record shorter than its 4-byte header.")
    (size,) = struct.unpack(">I", record[:4])  # Uncompressed size.
    payload = record[4:]
    if compression == 1:
        out = zlib.decompress(payload)
    else:  # Types 2 (bzip2) and 3 (xz) write a method byte first.
        method, payload = payload[:1], payload[1:]
        decoders = {
            b"Z": zlib.decompress,
            b"2": bz2.decompress,
            b"X": lzma.decompress,
            b"0": bytes,
        }
        if method not in decoders:
            raise ValueError(f"unknown R lazy-load compression byte {method!r}.")
        out = decoders[method](payload)
    if len(out) != size:
        raise ValueError(
            f"R lazy-load record inflated to {len(out)} bytes; header says {size}."
        )
    return out


def read_lazyload_db(rdb: bytes, rdx: bytes) -> dict[str, Any]:
    """Reads every variable of an R lazy-load database (``.rdb`` + ``.rdx``).

    The index (``.rdx``, a gzip- or zlib-compressed XDR serialization) maps each
    variable to ``(offset, length)`` of its record in the ``.rdb``: a 4-byte
    big-endian uncompressed length and a compressed XDR serialization.

    Args:
      rdb: contents of the ``.rdb`` file.
      rdx: contents of the ``.rdx`` file.

    Returns:
      Variable name to unserialized value, in index order.
    """
    if rdx[:2] == b"\x1f\x8b":
        index = unserialize_xdr(gzip.decompress(rdx))
    else:
        index = unserialize_xdr(_inflate(rdx, 1))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError("R lazy-load index has no named 'variables' list.")
    compressed = index.get("compressed")
    compression = 1 if compressed is None else int(np.asarray(compressed).ravel()[0])
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset) : int(offset) + int(length)]
        out[name] = unserialize_xdr(_inflate(record, compression))
    return out


# --------------------------------------------------------------------------
# Jane Austen.
# --------------------------------------------------------------------------


@functools.cache
def _austen_cached() -> tuple[tuple[str, str], ...]:
    root = debian_package(
        AUSTEN_PACKAGE, f"{_RDB_DIR}/Rdata.rdb", "The Jane Austen text"
    )
    data = read_lazyload_db(
        (root / _RDB_DIR / "Rdata.rdb").read_bytes(),
        (root / _RDB_DIR / "Rdata.rdx").read_bytes(),
    )
    if sorted(data) != sorted(AUSTEN_NAMES):
        raise RuntimeError(f"{AUSTEN_PACKAGE} holds {sorted(data)}, not the novels.")
    novels = []
    for name in AUSTEN_NAMES:
        text = "\n".join("" if line is None else line for line in data[name])
        if _AUSTEN_TITLES[name] not in text[:300].lower():
            raise RuntimeError(f"{AUSTEN_PACKAGE}: {name!r} does not start its title.")
        novels.append((name, text))
    return tuple(novels)


def austen_novels() -> dict[str, str]:
    r"""Returns the six Jane Austen novels, name to text (lines joined by "\n").

    Names: emma, mansfieldpark, northangerabbey, persuasion, prideprejudice,
    sensesensibility. The first call downloads ``r-cran-janeaustenr`` (1.6 MB).

    Raises:
      RuntimeError: if the Debian package cannot be fetched (says how to).
    """
    return dict(_austen_cached())


def austen_text(split: str = "train") -> str:
    """Returns a split of the Austen text.

    Args:
      split: ``"heldout"``: the whole of *Persuasion*; ``"train"``: the other
        five novels in alphabetical order, separated by blank lines.

    Returns:
      The text.

    Raises:
      ValueError: for another split.
      RuntimeError: if the Debian package cannot be fetched (says how to).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be one of ('train', 'heldout'), got {split!r}.")
    novels = austen_novels()
    if split == "heldout":
        return novels[AUSTEN_HELDOUT]
    return "\n\n".join(v for k, v in novels.items() if k != AUSTEN_HELDOUT)
