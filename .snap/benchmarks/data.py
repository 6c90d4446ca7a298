"""Real data for benchmarks and tests, fetched from Debian packages and cached.

Our machines reach PyPI and Debian's package mirrors only, so every data set
here comes from a Debian package that this module downloads with
``apt-get download`` (no installation, no root needed on most systems) and
unpacks with ``dpkg -x`` (or, without dpkg, with the standard library) into a
cache directory: ``~/.cache/optax_lowbit``, or ``$OPTAX_LOWBIT_CACHE``.
Nothing is ever committed to the repository.

Data sets:
  * ``austen_novels()``: six Jane Austen novels (public domain), from
    ``r-cran-janeaustenr`` (1.6 MB .deb). The text sits in an R lazy-load
    database (``Rdata.rdb`` + ``Rdata.rdx``), read here by a small reader of R's
    XDR serialization format (versions 2 and 3); R is not needed.
  * ``austen_bytes(split)``: the same as byte-level ``uint8`` tokens; the
    held-out split is one whole novel (*Persuasion*).
  * ``docs_documents()`` / ``docs_bytes(split)``: about 65 MB of technical
    English from Debian's documentation packages (``linux-doc-6.1``,
    ``python3.11-doc``, ``perl-doc``) for long LM runs; every 30th document
    is held out. ``python -m benchmarks.data docs --out .devdata`` writes a
    compressed copy small enough to carry to the device machine.
  * ``fashion_mnist()``: Fashion-MNIST, 60000 + 10000 28x28 images, from
    ``dataset-fashion-mnist`` (31 MB .deb, IDX files).
  * ``digits()``: scikit-learn's bundled 8x8 digits, for quick CPU demos.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gzip
import html.parser
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from optax_lowbit.impq import data as _impq_data

# The Austen text, the Debian-package cache and the R readers moved to the
# package (the IMPQ command line needs them without this folder).
AUSTEN_PACKAGE = _impq_data.AUSTEN_PACKAGE
AUSTEN_NAMES = _impq_data.AUSTEN_NAMES
AUSTEN_HELDOUT = _impq_data.AUSTEN_HELDOUT
_AUSTEN_TITLES = _impq_data._AUSTEN_TITLES
_RDB_DIR = _impq_data._RDB_DIR
cache_dir = _impq_data.cache_dir
_howto = _impq_data._howto
_run = _impq_data._run
_apt_download = _impq_data._apt_download
_extract_deb_stdlib = _impq_data._extract_deb_stdlib
debian_package = _impq_data.debian_package
_XdrReader = _impq_data._XdrReader
unserialize_xdr = _impq_data.unserialize_xdr
_inflate = _impq_data._inflate
read_lazyload_db = _impq_data.read_lazyload_db
_austen_cached = _impq_data._austen_cached
austen_novels = _impq_data.austen_novels
austen_text = _impq_data.austen_text

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
_FASHION_DIR = "usr/share/datasets/fashion-mnist"


def austen_bytes(split: str = "train") -> np.ndarray:
    """Returns Austen text as byte-level ``uint8`` tokens (UTF-8 bytes).

    Args:
      split: ``"heldout"``: the whole of *Persuasion*; ``"train"``: the other
        five novels in alphabetical order, separated by blank lines.

    Returns:
      A 1-D ``uint8`` array.
    """
    novels = austen_novels()
    if split == "heldout":
        text = novels[AUSTEN_HELDOUT]
    elif split == "train":
        text = "\n\n".join(v for k, v in novels.items() if k != AUSTEN_HELDOUT)
    else:
        raise ValueError(f"split must be one of ('train', 'heldout'), got {split!r}.")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def random_windows(
    tokens: np.ndarray, batch_size: int, length: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yields ``(batch_size, length)`` int32 windows at random offsets, forever.

    The same seed gives the same sequence of batches: every optimizer in a
    benchmark sees the same data order.
    """
    if tokens.ndim != 1 or tokens.size <= length:
        raise ValueError(
            f"tokens must be 1-D and longer than length={length}, "
            f"got shape {tokens.shape}."
        )
    rng = np.random.default_rng(seed)
    offsets = np.arange(length)
    while True:
        starts = rng.integers(0, tokens.size - length + 1, size=batch_size)
        yield tokens[starts[:, None] + offsets].astype(np.int32)


# --------------------------------------------------------------------------
# Debian documentation: technical English for long LM runs.
# --------------------------------------------------------------------------

#: The packages of the documentation corpus, in corpus order (sorted by name).
DOCS_PACKAGES = ("linux-doc-6.1", "perl-doc", "python3.11-doc")
#: Every DOCS_HOLDOUT_EVERY-th document (1-based) of the sorted corpus is held out.
DOCS_HOLDOUT_EVERY = 30
#: Bytes between two documents of a split.
DOCS_SEPARATOR = b"\n\n"
#: The file `write_docs_devdata` writes and `load_docs_devdata` reads.
DOCS_DEVDATA_FILE = "docs.npz"
# Bump when the extraction changes: the on-disk cache is keyed by it.
_DOCS_VERSION = 1

_LINUX_DOC = "usr/share/doc/linux-doc-6.1/Documentation"
_PYTHON_DOC = "usr/share/doc/python3.11/html"
_PERL_POD = "usr/share/perl/5.36.0/pod"
_PERL_DOC = "usr/share/doc/perl"
_PERL_MAN3 = "usr/share/man/man3"
_PROBES = {
    "linux-doc-6.1": f"{_LINUX_DOC}/index.rst.gz",
    "perl-doc": f"{_PERL_POD}/perlfunc.pod",
    "python3.11-doc": f"{_PYTHON_DOC}/index.html",
}
# Not text: images and other binary formats that sit beside the rst files.
_NOT_TEXT = frozenset(
    ".png .jpg .jpeg .gif .svg .ico .bmp .tif .tiff .pdf .ps .eps .dia .odg "
    ".xcf .ttf .woff .woff2 .zip .bz2 .xz".split()
)


class _HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page: script and style dropped, blocks on lines."""

    _BLOCKS = frozenset(
        "p div br li ul ol dl dt dd h1 h2 h3 h4 h5 h6 pre tr table section "
        "blockquote hr title".split()
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # inside <script> or <style>
        self.pre = 0  # inside <pre>: keep whitespace

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")
            self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = (line.rstrip() for line in "".join(self.parts).splitlines())
        out, blank = [], 0
        for line in lines:  # at most one blank line in a row
            blank = blank + 1 if not line.strip() else 0
            if blank <= 1:
                out.append(line if line.strip() else "")
        return "\n".join(out).strip() + "\n"


def html_to_text(page: str) -> str:
    """The visible text of an HTML page (`html.parser`; script/style dropped)."""
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    return parser.text()


def _maybe_gunzip(path: pathlib.Path) -> bytes:
    blob = path.read_bytes()
    return gzip.decompress(blob) if path.suffix == ".gz" else blob


def _is_text(blob: bytes) -> bool:
    if b"\x00" in blob:
        return False
    try:
        blob.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _files(root: pathlib.Path, pattern: str) -> list[pathlib.Path]:
    """Regular files (no symlinks) under ``root`` matching ``pattern``, sorted."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def _render_man(page: bytes, groff: str) -> bytes:
    """A man page rendered to plain UTF-8 text by groff (no SGR, no overstrike)."""
    result = subprocess.run(
        [groff, "-k", "-man", "-Tutf8", "-P-cbou"],
        input=page,
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "GROFF_NO_SGR": "1", "LC_ALL": "C.UTF-8"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"groff failed: {result.stderr.decode()[-300:]}")
    return result.stdout


def _package_documents(
    package: str, root: pathlib.Path, groff: str | None
) -> list[tuple[str, bytes]]:
    """``(path, text bytes)`` of one package's documents, sorted by path."""
    docs: list[tuple[str, bytes]] = []
    if package == "linux-doc-6.1":
        for path in _files(root / _LINUX_DOC, "**/*"):
            name = path.name[:-3] if path.suffix == ".gz" else path.name
            if pathlib.PurePath(name).suffix.lower() in _NOT_TEXT:
                continue
            blob = _maybe_gunzip(path)
            if blob.strip() and _is_text(blob):
                docs.append((str(path.relative_to(root)), blob))
    elif package == "python3.11-doc":
        for path in _files(root / _PYTHON_DOC, "**/*.html"):
            text = html_to_text(path.read_bytes().decode("utf-8", "replace"))
            docs.append((str(path.relative_to(root)), text.encode("utf-8")))
    elif package == "perl-doc":
        paths = _files(root / _PERL_POD, "*.pod") + _files(root / _PERL_DOC, "*.pod.gz")
        for path in paths:
            docs.append((str(path.relative_to(root)), _maybe_gunzip(path)))
        if groff is not None:
            pages = _files(root / _PERL_MAN3, "*.3perl.gz")
            with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                rendered = pool.map(
                    lambda p: _render_man(_maybe_gunzip(p), groff), pages
                )
                for path, text in zip(pages, rendered, strict=True):
                    docs.append((str(path.relative_to(root)), text))
    else:
        raise ValueError(f"package must be one of {DOCS_PACKAGES}, got {package!r}.")
    docs = [(p, b) for p, b in docs if b.strip()]
    return sorted(docs)


@functools.cache
def _docs_cached(
    groff: bool,
) -> tuple[tuple[tuple[str, str], ...], np.ndarray, np.ndarray]:
    """``((package, path), ...)`` and the documents' bytes, joined, with offsets.

    Built once from the unpacked packages, then kept in the cache directory
    (``docs/v<version>-<groff|nogroff>.npz``): groff rendering takes a minute.
    """
    tag = f"v{_DOCS_VERSION}-{'groff' if groff else 'nogroff'}"
    path = cache_dir() / "docs" / f"{tag}.npz"
    if path.exists():
        with np.load(path) as z:
            names = tuple(tuple(n) for n in json.loads(str(z["names"])))
            return names, z["offsets"], z["data"]
    renderer = shutil.which("groff") if groff else None
    names, blobs = [], []
    for package in DOCS_PACKAGES:
        root = debian_package(package, _PROBES[package], "The documentation corpus")
        for doc_path, blob in _package_documents(package, root, renderer):
            names.append((package, doc_path))
            blobs.append(blob)
    offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, names=np.asarray(json.dumps(names)), offsets=offsets, data=data)
    os.replace(tmp, path)
    return tuple(names), offsets, data


def docs_documents(*, groff: bool | None = None) -> list[tuple[str, str, bytes]]:
    """The documentation corpus: ``(package, path, text bytes)``, sorted.

    Three Debian packages, downloaded with ``apt-get download`` and unpacked
    (never installed), sorted by package and then by path:

    * ``linux-doc-6.1``: every text file under
      ``usr/share/doc/linux-doc-6.1/Documentation/`` (rst, txt, README-style;
      ``.gz`` gunzipped; images and non-UTF-8 files skipped; the rendered
      ``html/`` tree, which repeats the rst, is not read);
    * ``perl-doc``: the POD files of ``usr/share/perl/5.36.0/pod/`` and
      ``usr/share/doc/perl/*.pod.gz``, and the module manuals
      ``usr/share/man/man3/*.3perl.gz`` rendered with ``groff -man -Tutf8``
      (plain text, no SGR or overstrike). Where groff is not installed the
      man3 pages are left out (about 5.5 MB of 65 MB): install ``groff-base``
      to include them. The cache keeps the two variants apart;
    * ``python3.11-doc``: ``usr/share/doc/python3.11/html/**/*.html`` stripped
      to text with `html.parser` (script and style dropped).

    The first call downloads about 58 MB of packages and builds the corpus
    (about a minute); it is then read from the cache directory.

    Args:
      groff: render the man3 pages; ``None``: where ``groff`` is on PATH.

    Returns:
      A list of ``(package, path inside the package, bytes)``.

    Raises:
      RuntimeError: if a Debian package cannot be fetched (says how to).
    """
    if groff is None:
        groff = shutil.which("groff") is not None
    names, offsets, data = _docs_cached(bool(groff))
    return [
        (package, path, data[offsets[i] : offsets[i + 1]].tobytes())
        for i, (package, path) in enumerate(names)
    ]


def split_documents(
    docs: Sequence[Any], every: int = DOCS_HOLDOUT_EVERY
) -> tuple[list[Any], list[Any]]:
    """Splits sorted documents: every ``every``-th (1-based) is held out.

    Returns:
      ``(train, heldout)`` lists, each in the input order.
    """
    train = [d for i, d in enumerate(docs) if (i + 1) % every]
    heldout = [d for i, d in enumerate(docs) if (i + 1) % every == 0]
    return train, heldout


def join_documents(blobs: Sequence[bytes]) -> np.ndarray:
    """Documents' bytes joined by `DOCS_SEPARATOR`, as a ``uint8`` array."""
    return np.frombuffer(DOCS_SEPARATOR.join(blobs), dtype=np.uint8).copy()


@functools.cache
def _docs_split(split: str, groff: bool) -> np.ndarray:
    train, heldout = split_documents(docs_documents(groff=groff))
    chosen = train if split == "train" else heldout
    out = join_documents([blob for _, _, blob in chosen])
    out.flags.writeable = False
    return out


def docs_bytes(split: str = "train", *, groff: bool | None = None) -> np.ndarray:
    """The documentation corpus as byte-level ``uint8`` tokens (`docs_documents`).

    Args:
      split: ``"heldout"``: every 30th document of the sorted corpus (about
        2.4 MB); ``"train"``: all the others (about 63 MB). Documents are
        joined by a blank line.
      groff: as in `docs_documents`.

    Returns:
      A 1-D ``uint8`` array (read-only; cached in memory).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be one of ('train', 'heldout'), got {split!r}.")
    if groff is None:
        groff = shutil.which("groff") is not None
    return _docs_split(split, bool(groff))


def spread_subset(sizes: Sequence[int], max_total: int) -> list[int]:
    """Indices of an evenly spread subset of items whose sizes sum to <= max_total.

    Takes every item where that fits; otherwise about the share
    ``max_total / sum(sizes)`` of them, spread over the whole list (so every
    part of a sorted corpus keeps its share), then drops items from the end
    of that selection until the total fits.
    """
    total = int(sum(sizes))
    if total <= max_total:
        return list(range(len(sizes)))
    frac = max_total / total
    keep = [i for i in range(len(sizes)) if int((i + 1) * frac) > int(i * frac)]
    while keep and sum(sizes[i] for i in keep) > max_total:
        keep.pop()
    return keep


def write_docs_devdata(
    out_dir: str | os.PathLike,
    max_train_bytes: int = 40_000_000,
    docs: Sequence[tuple[str, str, bytes]] | None = None,
) -> pathlib.Path:
    """Writes a compressed copy of the corpus for a machine without the packages.

    The device machine takes at most 64 MiB of working tree per call: the file
    holds all the held-out bytes and an evenly spread subset of the training
    documents (`spread_subset`) of at most ``max_train_bytes``, compressed
    with `numpy.savez_compressed` (about a quarter of the raw size).
    `load_docs_devdata` reads it.

    Args:
      out_dir: directory to write `DOCS_DEVDATA_FILE` into (e.g. ``.devdata``,
        which ``.gitignore`` keeps out of the repository).
      max_train_bytes: budget of training bytes.
      docs: the sorted documents (default: `docs_documents`).

    Returns:
      The path of the file written.
    """
    docs = docs_documents() if docs is None else docs
    train, heldout = split_documents(docs)
    keep = spread_subset(
        [len(b) + len(DOCS_SEPARATOR) for *_, b in train], max_train_bytes
    )
    train_bytes = join_documents([train[i][2] for i in keep])
    heldout_bytes = join_documents([b for *_, b in heldout])
    info = dict(
        packages=list(DOCS_PACKAGES),
        groff_man3=any(p.endswith(".3perl.gz") for _, p, _ in docs),
        documents=len(docs),
        train_documents=len(keep),
        train_documents_all=len(train),
        heldout_documents=len(heldout),
        train_bytes=int(train_bytes.size),
        train_bytes_all=int(sum(len(b) for *_, b in train)),
        heldout_bytes=int(heldout_bytes.size),
        holdout_every=DOCS_HOLDOUT_EVERY,
        train_selection=f"evenly spread documents, <= {max_train_bytes} bytes",
    )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DOCS_DEVDATA_FILE
    np.savez_compressed(
        path,
        train=train_bytes,
        heldout=heldout_bytes,
        info=np.asarray(json.dumps(info)),
    )
    return path


def load_docs_devdata(
    data_dir: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train, heldout, info)`` from the file `write_docs_devdata` wrote."""
    with np.load(pathlib.Path(data_dir) / DOCS_DEVDATA_FILE) as z:
        return z["train"], z["heldout"], json.loads(str(z["info"]))


# --------------------------------------------------------------------------
# IDX files and Fashion-MNIST.
# --------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(data: bytes) -> np.ndarray:
    """Parses an IDX file (as in MNIST): magic, big-endian uint32 dims, data.

    The magic is two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64) and the number of dims.

    Args:
      data: the file's bytes (already gunzipped).

    Returns:
      An array of the stored shape, in native byte order.
    """
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise ValueError(f"not an IDX file: magic {data[:4]!r}.")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"unknown IDX type byte 0x{code:02x}.")
    if len(data) < 4 + 4 * ndim:
        raise ValueError("IDX file truncated in its dimensions.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = _IDX_DTYPES[code]
    expected = 4 + 4 * ndim + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"IDX file of shape {shape} should have {expected} bytes, has {len(data)}."
        )
    flat = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    return flat.reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns Fashion-MNIST as ``(x_train, y_train, x_test, y_test)``.

    Images are ``uint8`` of shape ``(n, 28, 28)`` (60000 train, 10000 test),
    labels ``uint8`` in 0..9. The first call downloads
    ``dataset-fashion-mnist`` (31 MB).

    Raises:
      RuntimeError: if the Debian package cannot be fetched (says how to).
    """
    root = debian_package(
        FASHION_MNIST_PACKAGE,
        f"{_FASHION_DIR}/t10k-labels-idx1-ubyte.gz",
        "Fashion-MNIST",
    )

    def load(name: str) -> np.ndarray:
        path = root / _FASHION_DIR / f"{name}-ubyte.gz"
        return read_idx(gzip.decompress(path.read_bytes()))

    out = (
        load("train-images-idx3"),
        load("train-labels-idx1"),
        load("t10k-images-idx3"),
        load("t10k-labels-idx1"),
    )
    if out[0].shape != (60000, 28, 28) or out[2].shape != (10000, 28, 28):
        raise RuntimeError(f"unexpected Fashion-MNIST shapes {out[0].shape}.")
    return out


# --------------------------------------------------------------------------
# scikit-learn digits.
# --------------------------------------------------------------------------


def digits(
    test_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns sklearn's 8x8 digits split as ``(x_train, y_train, x_test, y_test)``.

    Args:
      test_fraction: share of the 1797 images held out for testing.
      seed: seed of the fixed random permutation behind the split.

    Returns:
      ``x`` float32 of shape ``(n, 64)`` scaled to [0, 1]; ``y`` int32 in 0..9.
    """
    from sklearn.datasets import load_digits  # Optional dependency.

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.data docs --out .devdata``: the device's data copy."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("what", choices=["docs"])
    p.add_argument("--out", default=".devdata")
    p.add_argument("--max-train-mb", type=float, default=40.0)
    cfg = p.parse_args(argv)
    path = write_docs_devdata(cfg.out, int(cfg.max_train_mb * 1e6))
    _, _, info = load_docs_devdata(cfg.out)
    print(json.dumps(info, indent=1))
    print(f"wrote {path}: {path.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
