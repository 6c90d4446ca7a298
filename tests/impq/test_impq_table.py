"""The IMPQ v2 table's summary: mean ± sd over seeds, verdicts, rank agreement."""

import numpy as np
import pytest

from benchmarks import impq_table


def _run(seed, ppl, phi):
    records = []
    for m, v in ppl.items():
        vals = v if isinstance(v, list) else [v]
        for d, x in enumerate(vals):
            records.append(
                {
                    "method": m,
                    "budget_bits": 2.5,
                    "ppl": x,
                    "code_bits": 2.5,
                    "all_in_bits": 3.0,
                    "calib_kl": 0.1,
                    **({"draw": d} if isinstance(v, list) else {}),
                }
            )
    games = [{"budget_bits": 2.5, "phi": phi, "heldout_r2": 0.9}]
    return {"seed": seed, "reference_ppl": 10.0, "records": records, "games": games}


def test_summary_means_verdicts_and_rank_agreement():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=6)
    runs = [
        _run(
            0,
            {"impq": 20.0, "impq_noint": 25.0, "greedy": 24.0, "random": [30, 40]},
            phi,
        ),
        _run(
            1,
            {"impq": 22.0, "impq_noint": 27.0, "greedy": 26.0, "random": [34, 36]},
            2 * phi,
        ),
    ]
    methods = ("impq", "impq_noint", "greedy", "random")
    out = impq_table.summarize(runs, [2.5], methods)
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["impq"]["ppl"]["mean"] == pytest.approx(21.0)
    assert rows["impq"]["ppl"]["std"] == pytest.approx(np.std([20, 22], ddof=1))
    assert rows["random"]["ppl"]["per_seed"] == [35.0, 35.0]  # mean of the draws
    v = out["verdicts"][0]
    assert v["best_baseline"] == "greedy" and v["in_range"]
    assert v["impq_gain"] == pytest.approx(1 - 21 / 25)
    assert v["impq_gain_in_sd"] == pytest.approx(4 / np.hypot(np.sqrt(2), np.sqrt(2)))
    assert v["interaction_gain"] == pytest.approx(1 - 21 / 26)
    assert v["phi_spearman"] == pytest.approx(1.0)


def _report(runs, budgets, methods):
    meta = {"budgets": budgets, "methods": methods, "samples": 10}
    return {"model": "m", "meta": meta, "runs": runs}


def test_merge_joins_budgets_of_a_seed_and_summarizes_each_over_its_seeds():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=5)
    ppl = {"impq": float(rng.uniform(10, 20)), "greedy": float(rng.uniform(20, 30))}
    a = _run(0, ppl, phi)
    b = _run(0, ppl, phi)
    b["records"] = [x for x in b["records"] if x["method"] == "greedy"]
    for x in b["records"] + b["games"]:
        x["budget_bits"] = 3.0
    c = _run(1, {k: v + 1 for k, v in ppl.items()}, phi)
    methods = ["impq", "greedy"]
    out = impq_table.merge(
        [
            _report([a, c], [2.5], methods),
            _report([b], [3.0], methods),
        ]
    )
    assert out["meta"]["budgets"] == [2.5, 3.0]
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    assert len(out["runs"][0]["records"]) == 3
    v25, v30 = out["summary"]["verdicts"]
    assert v25["seeds"] == [0, 1] and v30["seeds"] == [0]
    rows = {(r["method"], r["budget_bits"]): r for r in out["summary"]["rows"]}
    assert rows["impq", 2.5]["ppl"]["mean"] == pytest.approx(ppl["impq"] + 0.5)
    assert rows["greedy", 3.0]["ppl"]["mean"] == pytest.approx(ppl["greedy"])
    assert ("impq", 3.0) not in rows  # the 3.0 part ran greedy only: no NaN row
    assert "impq_gain" not in v30 and v30["best_baseline"] == "greedy"
    with pytest.raises(ValueError, match="in two reports"):
        impq_table.merge([_report([a], [2.5], methods), _report([a], [2.5], methods)])
    with pytest.raises(ValueError, match="different models"):
        impq_table.merge(
            [_report([a], [2.5], methods), {**_report([b], [3], methods), "model": "x"}]
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "tiny", "--data-dir", "."], "is for --model train_lm"),
        (
            ["--model", "train_lm", "--params", "p.npz", "--data-dir", "/nonexistent"],
            "docs.npz does not exist",
        ),
    ],
)
def test_data_dir_is_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        impq_table.main(argv)
    assert err.value.code == 2
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        impq_table.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, act_order", [("gptq", False), ("gptq_act", True)])
def test_gptq_candidates_pass_act_order(name, act_order, monkeypatch):
    """``--quantizer gptq_act`` runs GPTQ with act-order at every width."""
    seen = []

    def fake(params, config, calib, bits, **kw):
        seen.append((bits, kw["act_order"], calib.shape))
        return {"bits": bits}

    monkeypatch.setattr(impq_table.pipeline.gptq, "quantize_model", fake)
    p = impq_table.parser()
    args = p.parse_args(["--quick", "--quantizer", name, "--bits", "2,4"])
    impq_table._settle(p, args)
    m = impq_table.impq_model.tiny_llama()
    ids = np.random.default_rng(0).integers(0, 100, 10_000)
    out = impq_table.candidates(m, args, ids)
    assert out == {2: {"bits": 2}, 4: {"bits": 4}}
    assert [s[:2] for s in seen] == [(2, act_order), (4, act_order)]
