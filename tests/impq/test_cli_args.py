"""The IMPQ command line refuses bad arguments at once, before any loading."""

import ast
import pathlib
import time

import pytest

from optax_lowbit.impq import cli, data, model, smollm2

PACKAGE = pathlib.Path(cli.__file__).parent


@pytest.fixture
def nothing_loads(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("loaded text or a model before checking arguments")

    for obj, name in [
        (data, "austen_text"),
        (data, "austen_novels"),
        (model, "smollm2_model"),
        (model, "tiny_llama"),
        (smollm2, "load_tokenizer"),
        (smollm2, "load_params"),
    ]:
        monkeypatch.setattr(obj, name, boom)


BAD = [
    (["--budget", ""], "--budget", "comma-separated list"),
    (["--budget", "3,,4"], "--budget", "comma-separated list"),
    (["--budget", "nan"], "--budget", "comma-separated list"),
    (["--budget", "1.5"], "--budget", "accepted: 2 <= avg_bits <= 4 code bits"),
    (["--budget", "4.5"], "--budget", "accepted: 2 <= avg_bits <= 4 code bits"),
    (["--budget", "9", "--bits", "2,8"], "--budget", "accepted: 2 <= avg_bits <= 8"),
    (["--samples", "0"], "--samples", "integer >= 1"),
    (["--samples", "many"], "--samples", "integer >= 1"),
    (["--calib-tokens", "0"], "--calib-tokens", "integer >= 1"),
    (["--eval-tokens", "-3"], "--eval-tokens", "integer >= 1"),
    (["--seq-len", "x"], "--seq-len", "integer >= 1"),
    (["--batch", "0"], "--batch", "integer >= 1"),
    (["--random-seeds", "0"], "--random-seeds", "integer >= 1"),
    (["--out", "/no/such/folder/o.json"], "--out", "does not exist"),
    (["--out", "."], "--out", "is a folder"),
    (["--model", "tiny", "--source", "x.gguf"], "--source", "only with --model"),
    (["--source", "/no/such/model.gguf"], "--source", "no such .gguf"),
    (["--bits", "5"], "--bits", "bit_choices must be one of"),
    (["--bits", ""], "--bits", "comma-separated list"),
    (["--methods", "impq,gptq"], "--methods", "not accepted"),
    (["--calib-text", "/no/such.txt"], "--calib-text", "no such file"),
    (["--model", "big"], "--model", "invalid choice"),
    (["--quantizer", "awq"], "--quantizer", "invalid choice"),
]


@pytest.mark.parametrize(("argv", "flag", "says"), BAD, ids=[b[0][1] for b in BAD])
def test_bad_argument_fails_at_once(argv, flag, says, nothing_loads, capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and says in err, err
    assert time.perf_counter() - t0 < 5.0


def test_text_too_short_is_named_before_the_model_loads(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("short")
    monkeypatch.setattr(model, "tiny_llama", pytest.fail)
    with pytest.raises(SystemExit):
        cli.main(
            ["--model", "tiny", "--calib-text", str(text), "--eval-text", str(text)]
        )


def test_package_does_not_import_benchmarks():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "benchmarks" for n in names), path
