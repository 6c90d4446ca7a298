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
