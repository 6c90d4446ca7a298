"""The public API's docstrings: a doctest each, and the paper and bits they cost."""

import importlib
import inspect

import pytest

MODULES = (
    "optax_lowbit",
    "optax_lowbit.codecs",
    "optax_lowbit.transforms",
    "optax_lowbit.impq",
    "optax_lowbit.kernels",
)


def _public_functions():
    for modname in MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{modname}.{name}", obj


@pytest.mark.parametrize(
    "name, fn", list(_public_functions()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_every_public_function_has_a_doctest(name, fn):
    doc = inspect.getdoc(fn) or ""
    assert ">>>" in doc, f"{name} has no doctested example"
    assert "Args:" in doc or not inspect.signature(fn).parameters, name


@pytest.mark.parametrize(
    "name",
    [
        "adamw_polar",
        "scale_by_adam_polar",
        "fused_adamw_polar",
        "adamw_piquant",
        "scale_by_adam_piquant",
        "fused_adamw_piquant",
        "adamw_8bit",
        "fused_adamw_8bit",
        "adamw_4bit",
        "fused_adamw_4bit",
    ],
)
def test_codec_optimizers_name_their_paper_and_bits(name):
    import optax_lowbit as lowbit

    doc = inspect.getdoc(getattr(lowbit, name)) or ""
    assert "bits" in doc and any(c.isdigit() for c in doc), name
    assert any(k in doc for k in ("References", "arXiv", "OpenReview", "adamw_")), name
