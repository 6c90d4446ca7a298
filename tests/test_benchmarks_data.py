"""Tests of benchmarks.data (R and IDX readers, Debian loaders) and models.

Parser tests build their inputs byte by byte here, so they run offline; the
real-data tests skip with the loader's message when the Debian mirror is
unreachable.
"""

import gzip
import io
import lzma
import pathlib
import struct
import tarfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from benchmarks import capture_moments, data, models

# --------------------------------------------------------------------------
# A minimal writer of R's XDR serialization, independent of the reader.
# --------------------------------------------------------------------------

_UTF8, _LATIN1, _ASCII = 1 << 3, 1 << 2, 1 << 6


def _i(*values):
    return struct.pack(f">{len(values)}i", *values)


def _header(version):
    out = b"X\n" + _i(version, 0x040201, 0x020300)
    if version == 3:
        out += _i(5) + b"UTF-8"
    return out


def _charsxp(value, encoding=_UTF8):
    if value is None:
        return _i(9, -1)
    raw = value.encode("latin-1" if encoding == _LATIN1 else "utf-8")
    return _i(9 | (encoding << 12), len(raw)) + raw


def _strsxp(values, attrs=b""):
    flags = 16 | (1 << 9 if attrs else 0)
    return _i(flags, len(values)) + b"".join(map(_charsxp, values)) + attrs


def _intsxp(values):
    return _i(13, len(values), *values)


def _names_attr(names, first_symbol=True):
    # Pairlist cell with a tag: the symbol `names` (or a reference to it).
    tag = _i(1) + _charsxp("names", _ASCII) if first_symbol else _i((1 << 8) | 255)
    return _i(2 | (1 << 10)) + tag + _strsxp(names) + _i(254)


def _named_list(items, first_symbol=True):
    names = list(items)
    body = b"".join(items.values())
    return _i(19 | (1 << 9), len(items)) + body + _names_attr(names, first_symbol)


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_character_vector(version):
    lines = ["EMMA", "", None, "Emma Woodhouse, handsome", "“Café” — naïve"]
    blob = _header(version) + _strsxp(lines)
    assert data.unserialize_xdr(blob) == lines


def test_unserialize_latin1_and_long_vector():
    # A latin-1 flagged CHARSXP and a long-vector length (-1, hi, lo).
    blob = _header(2) + _i(16, -1, 0, 2) + _charsxp("naïve", _LATIN1)
    blob += _charsxp("plain", _ASCII)
    assert data.unserialize_xdr(blob) == ["naïve", "plain"]


def test_unserialize_rejects_bad_input():
    good = _header(3) + _strsxp(["a", "b"])
    with pytest.raises(ValueError, match="XDR"):
        data.unserialize_xdr(b"A\n" + good[2:])
    with pytest.raises(ValueError, match="version must be 2 or 3"):
        data.unserialize_xdr(_header(2)[:2] + _i(4) + good[6:])
    with pytest.raises(ValueError, match="truncated"):
        data.unserialize_xdr(good[:-1])
    with pytest.raises(ValueError, match="unsupported R SEXP type 3"):
        data.unserialize_xdr(_header(2) + _i(3))  # A closure.


def _record(payload, compression=1):
    if compression == 1:
        body = zlib.compress(payload)
    else:
        body = b"X" + lzma.compress(payload)
    return struct.pack(">I", len(payload)) + body


@pytest.mark.parametrize("compression", [1, 3])
def test_read_lazyload_db(compression):
    first = ["NORTHANGER ABBEY", "", "by Jane Austen"]
    second = ["Persuasion", None, "Sir Walter Elliot, of Kellynch Hall"]
    rec_first = _record(_header(3) + _strsxp(first), compression)
    rec_second = _record(_header(2) + _strsxp(second), compression)
    rdb = rec_second + rec_first  # File order differs from index order.
    variables = _named_list(
        {
            "northangerabbey": _intsxp([len(rec_second), len(rec_first)]),
            "persuasion": _intsxp([0, len(rec_second)]),
        },
        first_symbol=True,
    )
    index = _named_list(
        {
            "variables": variables,
            "references": _i(19, 0),
            "compressed": _i(10, 1, compression),
        },
        first_symbol=False,  # `names` now comes as a reference (REFSXP).
    )
    rdx = gzip.compress(_header(3) + index)
    out = data.read_lazyload_db(rdb, rdx)
    assert list(out) == ["northangerabbey", "persuasion"]
    assert out["northangerabbey"] == first
    assert out["persuasion"] == second


def test_lazyload_record_size_is_checked():
    record = _record(_header(2) + _strsxp(["x"]))
    bad = struct.pack(">I", 999) + record[4:]
    with pytest.raises(ValueError, match="header says 999"):
        data._inflate(bad, 1)


# --------------------------------------------------------------------------
# IDX and .deb unpacking.
# --------------------------------------------------------------------------


def test_read_idx_uint8_and_int32():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + images.tobytes()
    out = data.read_idx(blob)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)

    values = np.array([-5, 7, 1 << 20], dtype=">i4")
    out = data.read_idx(b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + values.tobytes())
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [-5, 7, 1 << 20])


def test_read_idx_rejects_bad_input():
    blob = b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03"
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(b"\x01" + blob[1:])
    with pytest.raises(ValueError, match="should have 11 bytes"):
        data.read_idx(blob[:-1])
    with pytest.raises(ValueError, match="type byte"):
        data.read_idx(b"\x00\x00\x07" + blob[3:])


def _ar(members):
    out = b"!<arch>\n"
    for name, body in members:
        header = (
            f"{name + '/':16s}{0:<12d}{0:<6d}{0:<6d}{100644:<8d}{len(body):<10d}`\n"
        )
        out += header.encode("ascii") + body + (b"\n" if len(body) % 2 else b"")
    return out


def test_extract_deb_with_stdlib(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        payload = b"hello from a deb"
        info = tarfile.TarInfo("./usr/share/demo/file.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    deb = tmp_path / "demo_1.0_all.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("data.tar.xz", buf.getvalue())]))
    dest = tmp_path / "out"
    data._extract_deb_stdlib(deb, dest)
    assert (dest / "usr/share/demo/file.txt").read_bytes() == b"hello from a deb"


def test_missing_apt_explains_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTAX_LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError) as err:
        data.debian_package("r-cran-janeaustenr", "x", "The Jane Austen text")
    message = str(err.value)
    assert "apt-get download r-cran-janeaustenr" in message
    assert f"dpkg -x {tmp_path}/debian/r-cran-janeaustenr_*.deb" in message


# --------------------------------------------------------------------------
# Real data (skips when the Debian mirror is unreachable).
# --------------------------------------------------------------------------


def _or_skip(loader):
    try:
        return loader()
    except RuntimeError as err:
        pytest.skip(f"Debian package unavailable: {err}")


@pytest.fixture(scope="module")
def novels():
    return _or_skip(data.austen_novels)


def test_austen_novels(novels):
    assert sorted(novels) == sorted(data.AUSTEN_NAMES)
    assert novels["emma"].startswith("EMMA")
    assert "Emma Woodhouse" in novels["emma"]
    assert "Elizabeth Bennet" in novels["prideprejudice"]
    assert "Anne Elliot" in novels["persuasion"]
    assert all(len(text) > 400_000 for text in novels.values())


def test_austen_bytes_hold_out_persuasion(novels):
    heldout = data.austen_bytes("heldout")
    train = data.austen_bytes("train")
    assert heldout.dtype == train.dtype == np.uint8
    assert heldout.tobytes().decode("utf-8") == novels["persuasion"]
    assert b"Emma Woodhouse" in train.tobytes()
    assert b"Sir Walter Elliot, of Kellynch Hall" in heldout.tobytes()
    assert b"Sir Walter Elliot, of Kellynch Hall" not in train.tobytes()
    with pytest.raises(ValueError, match="split"):
        data.austen_bytes("test")


def test_fashion_mnist():
    x_train, y_train, x_test, y_test = _or_skip(data.fashion_mnist)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [1000] * 10)
    np.testing.assert_array_equal(y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train, x_test, _ = data.digits(seed=0)
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    again = data.digits(seed=0)
    np.testing.assert_array_equal(again[2], x_test)
    rows = {r.tobytes() for r in x_test}
    overlap = sum(r.tobytes() in rows for r in x_train)
    assert overlap < 10  # A few digits are pixel-identical duplicates.
    assert set(np.unique(y_train)) == set(range(10))


def test_random_windows_are_seeded_slices():
    tokens = np.arange(1000, dtype=np.uint8)
    a = next(data.random_windows(tokens, 4, 17, seed=3))
    b = next(data.random_windows(tokens, 4, 17, seed=3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(np.diff(a, axis=1) % 256, 1)


# --------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_tinygpt_shape_and_causality(tie):
    model = models.TinyGPT(
        d_model=32,
        n_layers=2,
        n_heads=4,
        seq_len=16,
        tie_embeddings=tie,
        rngs=nnx.Rngs(0),
    )
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    changed = model(tokens.at[:, 10].set((tokens[:, 10] + 1) % 256))
    np.testing.assert_allclose(changed[:, :10], logits[:, :10], atol=1e-6)
    assert np.abs(changed[:, 10:] - logits[:, 10:]).max() > 1e-4
    with pytest.raises(ValueError, match="seq_len=16"):
        model(jnp.zeros((1, 17), jnp.int32))


def test_tinygpt_param_paths_name_embeddings():
    model = models.TinyGPT(d_model=32, n_layers=1, seq_len=8, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    paths = {
        capture_moments.path_name(p): v.shape
        for p, v in jax.tree_util.tree_flatten_with_path(state)[0]
    }
    assert paths["embed/embedding"] == (256, 32)
    assert paths["pos_embed"] == (8, 32)
    assert paths["head/kernel"] == (32, 256)
    assert [p for p in paths if "embed" in p] == ["embed/embedding", "pos_embed"]


def _text_slice():
    try:
        tokens = data.austen_bytes("train")
    except RuntimeError:  # Offline: any real English text will do.
        tokens = np.frombuffer(pathlib.Path(data.__file__).read_bytes(), np.uint8)
    return tokens[:200_000]


def test_tinygpt_training_loss_falls():
    model = models.TinyGPT(
        d_model=64, n_layers=2, n_heads=4, seq_len=64, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(
            lambda p: models.loss_fn(nnx.merge(graphdef, p), batch)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = data.random_windows(_text_slice(), 8, 65, seed=0)
    losses = []
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state, next(batches))
        losses.append(float(loss))
    assert abs(losses[0] - np.log(256)) < 0.1  # Near uniform at init.
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses


def test_mlp_learns_digits():
    x_train, y_train, x_test, y_test = data.digits()
    model = models.MLP(64, (64,), 10, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(models.classifier_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    before = float(models.accuracy(model, x_test, y_test))
    for _ in range(30):
        step(model, optimizer, x_train, y_train)
    after = float(models.accuracy(model, x_test, y_test))
    assert after > 0.85 and after > before + 0.3


def test_capture_adam_moments_mlp_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTAX_LOWBIT_CACHE", str(tmp_path))
    kwargs = dict(steps=5, seed=1, model="mlp", batch_size=32, learning_rate=1e-2)
    out = capture_moments.capture_adam_moments(**kwargs)
    assert sorted(out["mu"]) == ["layers/0/kernel", "layers/1/kernel"]
    assert out["mu"]["layers/0/kernel"].shape == (64, 256)
    assert out["nu"]["layers/1/kernel"].shape == (256, 256)
    for name in out["mu"]:
        assert out["mu"][name].dtype == out["nu"][name].dtype == np.float32
        assert (out["nu"][name] >= 0).all() and out["nu"][name].max() > 0
    assert len(out["loss"]) == 5
    assert len(list((tmp_path / "moments").glob("*.npz"))) == 1
    again = capture_moments.capture_adam_moments(**kwargs)
    assert again["loss"] == out["loss"]
    for name in out["mu"]:
        np.testing.assert_array_equal(again["mu"][name], out["mu"][name])
        np.testing.assert_array_equal(again["nu"][name], out["nu"][name])
    with pytest.raises(ValueError, match="model must be one of"):
        capture_moments.capture_adam_moments(model="resnet", use_cache=False)
