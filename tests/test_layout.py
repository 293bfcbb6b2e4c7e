"""ParallelLayout's rules (dsv3lib.parallel.layout.check_layout): each broken rule raises one line naming it."""

import pytest

from dsv3lib.parallel.layout import check_layout


@pytest.mark.parametrize("kw, match", [
    (dict(world=4, pp=2, ep=2, dp=2), r"pp × ep × dp = 2 × 2 × 2 = 8, but the world has 4"),
    (dict(world=4, pp=0, ep=4), r"pp: a parallel degree must be an int >= 1, got 0"),
    (dict(world=4, pp=2, ep=2.0), r"ep: a parallel degree must be an int >= 1, got 2.0"),
    (dict(world=3, pp=3, schedule="DualPipe"), r"DualPipe needs an even number of ranks"),
    (dict(world=3, pp=3, schedule="DualPipe", n_micro=6), r"DualPipe needs an even number of ranks"),
    (dict(world=2, pp=2, schedule="DualPipe", n_micro=2), r"DualPipe needs n_micro >= 2 \* pp"),
    (dict(world=2, pp=2, schedule="DualPipe", n_micro=5), r"DualPipe needs an even number of micro-batches"),
    (dict(world=2, pp=2, schedule="DualPipeV", n_micro=3), r"DualPipeV needs n_micro >= 2 \* pp_devices"),
    (dict(world=2, pp=2, schedule="GPipe"), r"schedule: unknown 'GPipe'"),
    (dict(world=4, pp=2, ep=2, schedule="1F1B", n_layers=3), r"n_layers: 3 layers do not split into the 2 stages"),
    (dict(world=2, pp=2, schedule="DualPipeV", n_layers=6), r"n_layers: 6 layers do not split into the 4 stages"),
    (dict(world=3, ep=3, n_experts=16), r"ep: 3 expert-parallel ranks do not divide n_routed_experts=16"),
])
def test_each_rule_raises_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        check_layout(kw.pop("world"), **kw)
    assert "\n" not in str(info.value)


def test_valid_layouts_pass():
    check_layout(8, pp=2, ep=2, dp=2, schedule="DualPipe", n_micro=4, n_layers=4, n_experts=16)
    check_layout(4, pp=2, ep=2, schedule="DualPipeV", n_micro=4, n_layers=4, n_experts=16)
    check_layout(1)
