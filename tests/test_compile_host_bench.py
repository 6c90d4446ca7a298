"""benchmarks/compile_host.py: a first step's trace and lowering, row by row."""

import json
import subprocess

import pytest

# A benchmark smoke run: the slow CI step (OPTAX_LOWBIT_SLOW=1).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compile_host_bench")]


def _fake_rows(monkeypatch, row=None):
    """Replaces each row's process by a fake that records its command line.

    ``row(case, optimizer, ablation)`` gives parts that replace the fake
    row's defaults (0.1 s traces and lowerings). Returns the list the
    commands go to.
    """
    from benchmarks import compile_host

    commands, real_run = [], subprocess.run

    def run(cmd, **kwargs):
        if "--one" not in cmd:  # git, for the commit
            return real_run(cmd, **kwargs)
        commands.append(cmd)
        case, optimizer = cmd[cmd.index("--one") + 1 : cmd.index("--one") + 3]
        ablation = cmd[cmd.index("--ablation") + 1]
        out = dict(case=case, optimizer=optimizer, ablation=ablation)
        out.update(trace_s=0.1, lower_s=0.1, compile_s=None, hlo_ops=1)
        out.update(row(case, optimizer, ablation) if row else {})
        return subprocess.CompletedProcess(cmd, 0, json.dumps(out) + "\n", "")

    monkeypatch.setattr(compile_host.subprocess, "run", run)
    return commands


def test_rows_in_fresh_processes_with_ratios(tmp_path):
    from benchmarks import compile_host

    out = tmp_path / "compile_host.json"
    records = compile_host.main(
        ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out), "--cache"]
    )
    doc = json.loads(out.read_text())
    assert doc["records"] == records and doc["meta"]["jax_version"]
    assert doc["meta"]["cache"] is True
    by_name = {r["optimizer"]: r for r in records}
    assert set(by_name) == {"optax.adamw", "polar2"}  # the baseline is added
    for r in records:
        assert r["trace_s"] > 0 and r["lower_s"] > 0 and r["compile_s"] is None
        # the restart, in its own process, traces and lowers again
        assert r["cached_trace_s"] > 0 and r["cached_lower_s"] > 0
        assert r["cached_compile_s"] is None
        assert r["init_s"] > 0 and r["cached_init_s"] > 0  # the first opt.init
        assert r["gc_s"] >= 0 and r["gc_full"] >= 0
    # the fused step's Triton kernels are lowered (forced on a CPU host)
    assert by_name["polar2"]["hlo_ops"] > by_name["optax.adamw"]["hlo_ops"] > 0
    assert by_name["optax.adamw"]["host_ratio"] == 1.0
    assert by_name["polar2"]["host_ratio"] > 1.0


def test_ablation_row_in_its_own_process():
    """A `kernel_ablation` variant's stand-ins apply in the row's process only:
    the same launches (HLO operations) as the kernel, the variant recorded."""
    from benchmarks import compile_host

    rows = {
        v: compile_host._fresh("tiny_tree", "polar2", v, 300)
        for v in ("kernel", "no codec work")
    }
    assert all("error" not in r for r in rows.values()), rows
    assert rows["no codec work"]["ablation"] == "no codec work"
    assert rows["kernel"]["ablation"] == "kernel"
    assert rows["no codec work"]["hlo_ops"] == rows["kernel"]["hlo_ops"]
    # the stand-ins shrink the kernels' Triton modules, not their number
    kernel, stand_in = rows["kernel"], rows["no codec work"]
    assert stand_in["triton_configs"] == kernel["triton_configs"] > 0
    # to under half their operations (258 of 591 at 4785675); a stand-in that
    # did not apply leaves them equal. Counted as operations, not serialised
    # characters: those carry debug locations (file paths, line numbers) and
    # so move with the checkout's path (CI failed on them at 7bbed30)
    assert 0 < stand_in["triton_ops"] < kernel["triton_ops"] / 2


def test_bad_arguments_are_named():
    from benchmarks import compile_host

    with pytest.raises(SystemExit):
        compile_host.main(["--cases", "nope"])
    with pytest.raises(SystemExit):
        compile_host.main(["--optimizers", "adamw9"])
    with pytest.raises(SystemExit):
        compile_host.main(["--ablations", "kernel,no such part"])


def test_ablations_are_rows_of_every_low_bit_optimizer(tmp_path, monkeypatch):
    """``--ablations``: each low-bit optimizer once per variant (passed to the
    row's process), the baseline once; each record names its variant."""
    from benchmarks import compile_host

    commands = _fake_rows(monkeypatch)
    out = tmp_path / "ablations.json"
    flags = ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out)]
    records = compile_host.main([*flags, "--ablations", "kernel,no hash"])
    rows = [(r["optimizer"], r["ablation"]) for r in records]
    assert rows == [
        ("optax.adamw", "kernel"),
        ("polar2", "kernel"),
        ("polar2", "no hash"),
    ]
    assert len(commands) == 3
    assert json.loads(out.read_text())["meta"]["ablations"] == ["kernel", "no hash"]


def test_kernel_flags_reach_every_row(tmp_path, monkeypatch):
    """The kernel tunables apply in each row's fresh process (passed as flags)
    and are recorded in the metadata."""
    from benchmarks import compile_host
    from optax_lowbit.kernels import adam as kadam

    monkeypatch.setattr(kadam, "LEAVES_PER_LAUNCH", None)  # restored after
    commands = _fake_rows(monkeypatch)
    out = tmp_path / "flags.json"
    flags = ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out)]
    compile_host.main([*flags, "--leaves-per-launch", "3"])
    assert len(commands) == 2  # optax.adamw and polar2
    for cmd in commands:
        i = cmd.index("--leaves-per-launch")
        assert cmd[i + 1] == "3"
    meta = json.loads(out.read_text())["meta"]
    assert meta["kernel_settings"]["leaves_per_launch"] == 3


def test_repeats_run_round_by_round_and_report_medians(tmp_path, monkeypatch):
    """``--repeats 3``: every row runs 3 times, rounds interleaved across rows;
    each part is the median of its runs, the ratios are the medians'; a
    failed run makes its row an error, never hidden in a median."""
    from benchmarks import compile_host

    order = []
    # three runs' trace times per row: an outlier in each, another median
    traces = {"optax.adamw": [0.2, 0.9, 0.3], "polar2": [0.5, 0.7, 2.0]}

    def row(case, optimizer, ablation):
        order.append(optimizer)
        return {"trace_s": traces[optimizer][order.count(optimizer) - 1]}

    _fake_rows(monkeypatch, row)
    out = tmp_path / "repeats.json"
    flags = ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out)]
    records = compile_host.main([*flags, "--repeats", "3"])
    assert order == ["optax.adamw", "polar2"] * 3
    by_name = {r["optimizer"]: r for r in records}
    assert by_name["optax.adamw"]["trace_s"] == 0.3
    assert by_name["polar2"]["trace_s"] == 0.7
    assert [r["trace_s"] for r in by_name["polar2"]["runs"]] == traces["polar2"]
    assert by_name["polar2"]["repeats"] == 3
    assert by_name["polar2"]["host_ratio"] == round(0.8 / 0.4, 2)
    assert json.loads(out.read_text())["meta"]["repeats"] == 3

    failing = [{"case": "c", "optimizer": "o", "trace_s": 1.0}, {"error": "boom"}]
    assert compile_host.median_row(failing)["error"] == "boom"
    with pytest.raises(SystemExit):
        compile_host.main([*flags, "--repeats", "0"])


def test_compile_events_split_total_and_self_time():
    """``compile_events`` profiles a compile: every event's self time is at
    most its total, nested names (XLA's compiler under JAX's call) are kept,
    and the longest total is the outermost event, not a nested one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import compile_host

    x = jnp.asarray(np.random.default_rng().normal(size=(32, 48)), jnp.float32)
    lowered = jax.jit(lambda a: jnp.tanh(a) @ a.T + a.sum()).lower(x)
    events = compile_host.compile_events(lowered.compile, 6)
    assert 6 <= len(events) <= 12  # the top by total and the top by self
    totals = [t for _, t, _, _ in events]
    assert totals == sorted(totals, reverse=True)
    for name, total, own, count in events:
        assert isinstance(name, str) and count >= 1
        assert 0 <= own <= total + 0.01
    # the outermost event contains the others: its self time is a sliver
    assert events[0][2] < events[0][1] / 2
    assert any("Compil" in name for name, *_ in events)


def test_xla_events_flag_reaches_every_row(tmp_path, monkeypatch):
    """``--xla-events N`` is passed to each row's process and recorded."""
    from benchmarks import compile_host

    commands = _fake_rows(monkeypatch)
    out = tmp_path / "events.json"
    flags = ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out)]
    compile_host.main([*flags, "--xla-events", "7"])
    assert len(commands) == 2
    for cmd in commands:
        assert cmd[cmd.index("--xla-events") + 1] == "7"
    assert json.loads(out.read_text())["meta"]["xla_events"] == 7
    with pytest.raises(SystemExit):
        compile_host.main([*flags, "--xla-events", "-1"])


def test_gc_timer_counts_collections_in_its_block_only():
    import gc

    from benchmarks import compile_host

    was_enabled = gc.isenabled()
    gc.disable()  # only the collections asked for below (callbacks still run)
    try:
        with compile_host._gc_timer() as gc_s:
            junk = [[object()] for _ in range(20000)]
            gc.collect()
            gc.collect(1)
        del junk
        assert gc_s["full"] == 1 and gc_s["seconds"] > 0
        before = dict(gc_s)
        gc.collect()  # after the block: not counted
        assert gc_s == before
    finally:
        if was_enabled:
            gc.enable()


def test_donate_flag_reaches_every_row(tmp_path, monkeypatch):
    """``--donate`` is passed to each row's process and recorded."""
    from benchmarks import compile_host

    commands = _fake_rows(monkeypatch)
    out = tmp_path / "donate.json"
    flags = ["--cases", "tiny_tree", "--optimizers", "polar2", "--out", str(out)]
    compile_host.main(flags)
    assert len(commands) == 2 and all("--donate" not in c for c in commands)
    assert json.loads(out.read_text())["meta"]["donated"] is False
    compile_host.main([*flags, "--donate"])
    assert len(commands) == 4 and all("--donate" in c for c in commands[2:])
    assert json.loads(out.read_text())["meta"]["donated"] is True


def test_a_donated_row_lowers_its_inputs_as_donated():
    """In the row's own process: the donated step's lowered module marks the
    parameters and the state for reuse, the undonated one nothing."""
    from benchmarks import compile_host

    rows = {
        d: compile_host._fresh("tiny_tree", "polar2", "kernel", 300, donate=d)
        for d in (False, True)
    }
    assert all("error" not in r for r in rows.values()), rows
    assert rows[False]["donated"] is False and rows[False]["donated_inputs"] == 0
    assert rows[True]["donated"] is True and rows[True]["donated_inputs"] > 0
    # the same operations; `hlo_ops` counts each " = ", the marks' too
    donated = rows[True]["hlo_ops"] - rows[True]["donated_inputs"]
    assert donated == rows[False]["hlo_ops"]
