"""benchmarks/kernel_ablation.py: every variant patches what it names, and
taking a part out of the kernel takes its operations out."""

import pytest

from benchmarks import kernel_ablation as ka

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("kernel_ops_bench")]


@pytest.mark.parametrize("variant", sorted(ka.VARIANTS))
def test_variant_patches_existing_attributes(variant):
    # mock.patch.object raises AttributeError for a name the package lost
    with ka.patched(variant):
        for obj, name, value in ka.VARIANTS[variant]:
            assert getattr(obj, name) is value


def test_stand_ins_apply_in_a_process_that_traced_the_kernel():
    """`patched` in one process: a kernel traced before the stand-ins is not
    reused under them (the jitted launch and codec math are retraced), and
    the real kernel comes back after."""
    from benchmarks import kernel_ops

    def ttir():
        return kernel_ops.count_case("4bit", "fused")["total"]

    before = ttir()
    with ka.patched("no codec work"):
        ablated = ttir()
    assert ablated < before / 2
    assert ttir() == before


def test_removing_parts_lowers_the_ttir_count(tmp_path):
    recs = ka.main(
        [
            "--optimizer",
            "4bit",
            "--variants",
            "kernel,no hash,no codec work",
            "--out",
            str(tmp_path / "a.json"),
        ]
    )
    ttir = {r["variant"]: r["ttir"] for r in recs}
    assert ttir["no codec work"] < ttir["no hash"] < ttir["kernel"]
    assert (tmp_path / "a.json").exists()


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        ka.main(["--variants", "kernel,nope"])
    with pytest.raises(SystemExit):
        ka.main(["--optimizer", "9bit"])
