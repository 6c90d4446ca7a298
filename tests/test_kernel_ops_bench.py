"""benchmarks/kernel_ops.py (TTIR operations per element, counted offline) and
the column `benchmarks.step_speed` takes from it."""

import pytest

# A benchmark smoke run: the slow CI step (OPTAX_LOWBIT_SLOW=1).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kernel_ops_bench")]


def test_count_case_categories_add_up():
    from benchmarks import kernel_ops

    rec = kernel_ops.count_case("8bit", "fused")
    parts = rec["compute"] + rec["memory"] + rec["layout"]
    assert rec["total"] == pytest.approx(parts, abs=0.05)
    assert rec["elements_per_block"] > 0 and rec["ops"]["tt.store"] > 0
    # the 8-bit block is capped at MAX_BLOCK_ELEMENTS (kadam.default_block_groups)
    assert rec["elements_per_block"] <= 2048


def test_step_speed_ttir_column_is_the_kernel_ops_count():
    from benchmarks import kernel_ops, step_speed

    got = step_speed.ttir_counts(["polar2", "optax.adamw"], log=lambda *_: None)
    assert set(got) == {("polar2", "chain"), ("polar2", "fused")}
    assert got[("polar2", "fused")] == kernel_ops.count_case("polar2", "fused")["total"]
    # the fused kernel also applies AdamW: more work per element than the chain's
    assert got[("polar2", "fused")] > got[("polar2", "chain")] > 50


def test_sass_counts_compile_the_kernel_offline():
    pytest.importorskip("triton")  # optional: `pip install triton` to count SASS
    from benchmarks import kernel_ops

    rec = kernel_ops.count_case("4bit", "chain", sass=True)
    ops = rec["sass_ops"]
    # a real Hopper kernel: global loads and stores, and no FMA (contraction off)
    assert ops["LDG"] > 0 and ops["STG"] > 0 and "FFMA" not in ops
    assert rec["sass_per_element"] == pytest.approx(sum(ops.values()), rel=0.02)
    assert 0 < rec["sass_alu_per_element"] < rec["sass_per_element"]
    assert rec["sass_registers"] > 0


def test_step_speed_records_offline_sass_where_triton_is_installed():
    pytest.importorskip("triton")
    from benchmarks import step_speed

    got = step_speed.kernel_counts(["8bit"], log=lambda *_: None)
    assert set(got) == {("8bit", "chain"), ("8bit", "fused")}
    for counts in got.values():
        assert counts["sass"] > counts["sass_alu"] > 0 and counts["ttir"] > 0
    # without triton (or told not to) only the TTIR count
    bare = step_speed.kernel_counts(["8bit"], log=lambda *_: None, sass=False)
    assert bare[("8bit", "fused")] == {"ttir": got[("8bit", "fused")]["ttir"]}


def test_launch_compiles_lower_each_of_the_steps_distinct_launches():
    from benchmarks import kernel_ops
    from optax_lowbit.kernels import adam as kadam

    shapes = [(40, 300), (40, 300), (40, 300), (9, 64)]
    kinds = kernel_ops.launch_kinds("4bit", shapes)
    assert kadam.GROUPED_LEAVES_PER_LAUNCH == 2  # else the launches below change
    # the step's own grouping: two of the three leaves of one shape share a
    # launch, the third and the odd leaf are alone (lone leaves share one
    # only with kadam.SHARE_LONE_LEAVES, v28 / v29)
    assert kadam.SHARE_LONE_LEAVES == 0
    want = [[(40, 300)] * 2, [(40, 300)], [(9, 64)]]
    assert sorted(kinds) == sorted(want)
    recs = kernel_ops.launch_compiles("4bit", shapes)
    assert [(r["shapes"], r["leaves"]) for r in recs] == [
        ([list(s) for s in dict.fromkeys(k)], len(k)) for k in kinds
    ]
    for r in recs:  # a CPU host lowers each launch; only a GPU compiles it
        assert r["kernels"] == 1 and r["module_ops"] > 0 and r["xla_compile_s"] is None
