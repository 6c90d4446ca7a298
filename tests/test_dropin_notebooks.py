"""The LICENSE file and the notebooks' install cell (issue 19, item 11)."""

import json
import pathlib
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_license_file_is_the_declared_apache_2():
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "http://www.apache.org/licenses/" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
    # the nine sections of the standard text
    for n, title in enumerate(
        [
            "Definitions",
            "Grant of Copyright License",
            "Grant of Patent License",
            "Redistribution",
            "Submission of Contributions",
            "Trademarks",
            "Disclaimer of Warranty",
            "Limitation of Liability",
            "Accepting Warranty or Additional Liability",
        ],
        start=1,
    ):
        assert f"{n}. {title}." in text, title


def _install_cell(path):
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "code")


# Runs a notebook's install cell with optax_lowbit not importable and pip
# replaced by a recorder; prints the pip command it would run.
RUNNER = """
import importlib.util, json, subprocess, sys
calls = []
subprocess.check_call = lambda cmd, *a, **k: calls.append(cmd)
importlib.util.find_spec = lambda name, *a, **k: None
exec(compile(open(sys.argv[1]).read(), "cell", "exec"), {"__name__": "__main__"})
print(json.dumps(calls))
"""


def _pip_calls(cell, cwd, tmp_path, env=None):
    src = tmp_path / "cell.py"
    src.write_text(cell)
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, str(src)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_install_from_their_checkout_or_a_documented_pip_line(path, tmp_path):
    cell = _install_cell(path)
    assert "optax-lowbit/optax_lowbit" not in cell  # the placeholder repository
    assert "pip" in cell and "COLAB_PIP" in cell
    # in the checkout (as under CI): pip installs this very checkout
    calls = _pip_calls(cell, ROOT / "notebooks", tmp_path)
    assert len(calls) == 1, calls
    assert calls[0][:5] == [sys.executable, "-m", "pip", "install", "-q"], calls
    assert calls[0][5].startswith(str(ROOT) + "["), calls
    # no checkout above (Colab): the documented line, overridable
    outside = tmp_path / "colab"
    outside.mkdir()
    calls = _pip_calls(cell, outside, tmp_path)
    assert calls[0][5].startswith("optax_lowbit["), calls
    env = {"OPTAX_LOWBIT_PIP": "optax_lowbit @ git+https://example.org/fork"}
    env["PATH"] = "/usr/bin:/bin"
    calls = _pip_calls(cell, outside, tmp_path, env=env)
    assert calls[0][5] == env["OPTAX_LOWBIT_PIP"], calls


def test_the_install_cell_does_nothing_where_the_package_is_importable(tmp_path):
    cell = _install_cell(NOTEBOOKS[0])
    src = tmp_path / "cell.py"
    src.write_text(cell)
    runner = (
        "import subprocess, sys\n"
        "subprocess.check_call = lambda *a, **k: sys.exit('pip was called')\n"
        "exec(open(sys.argv[1]).read(), {'__name__': '__main__'})\n"
    )
    subprocess.run([sys.executable, "-c", runner, str(src)], cwd=tmp_path, check=True)
