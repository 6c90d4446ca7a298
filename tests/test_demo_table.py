"""The README's demo table: its state columns are what the demo's optimizers hold."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _table():
    text = README.read_text()
    section = text[text.index("## What the demo prints") :]
    section = section[: section.index("\n## ", 5)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(.+?)` \| [^|]+ \| [^|]+ \| ([\d.]+) \| ([\d.]+)% \|", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return rows


def test_readme_state_columns_match_the_demo():
    pytest.importorskip("flax")
    from optax_lowbit import demo

    sizes = demo.state_sizes()
    table = _table()
    assert set(table) == set(sizes)
    base = sizes["optax.adamw (fp32)"]["state_bytes"]
    for name, s in sizes.items():
        per_param, saved = table[name]
        assert per_param == round(s["state_bytes"] / s["params"], 3), name
        assert saved == round(100 * (1 - s["state_bytes"] / base), 1), name
