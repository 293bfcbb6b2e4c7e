"""The book's diagrams (dsv3lib.viz): each draws, no two labels collide, and the numbers they print are the
config's arithmetic; the DualPipe pair's timing model hides what it should."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from dsv3lib import accounting  # noqa: E402
from dsv3lib.config import ModelConfig  # noqa: E402

V3 = ModelConfig.preset("deepseek-v3")
TINY = ModelConfig.preset("tiny")


def visible_texts(fig) -> list[Text]:
    """Every non-empty text the figure draws: axes texts and titles, tick labels of visible axes, legends."""
    out = list(fig.texts)
    for ax in fig.axes:
        out += ax.texts + [ax.title, ax._left_title, ax._right_title]
        if ax.axison:
            out += ax.get_xticklabels() + ax.get_yticklabels() + [ax.xaxis.label, ax.yaxis.label]
        legend = ax.get_legend()
        if legend is not None:
            out += legend.get_texts() + [legend.get_title()]
    return [t for t in out if t.get_visible() and t.get_text().strip()]


def overlapping_texts(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose window extents intersect (after drawing the figure)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = visible_texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    return [(texts[i].get_text(), texts[j].get_text())
            for i in range(len(texts)) for j in range(i + 1, len(texts)) if boxes[i].overlaps(boxes[j])]


def small_fonts(fig, minimum: float = 9.0) -> list[str]:
    return [t.get_text() for t in visible_texts(fig) if t.get_fontsize() < minimum]


def all_text(fig) -> str:
    return "\n".join(t.get_text() for t in visible_texts(fig))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------ every figure draws
def _figures():
    from dsv3lib import viz

    return {
        "block-v3": lambda: viz.draw_v3_block(V3),
        "block-tiny": lambda: viz.draw_v3_block(TINY),
        "block-no-q-lora": lambda: viz.draw_v3_block(TINY.replace(q_lora_rank=0, n_routed_experts=4,
                                                                  n_expert_groups=1, n_limited_groups=1)),
        "mla-naive-v3": lambda: viz.draw_mla_dataflow(V3, absorbed=False),
        "mla-absorbed-v3": lambda: viz.draw_mla_dataflow(V3, absorbed=True),
        "mla-absorbed-no-q-lora": lambda: viz.draw_mla_dataflow(TINY.replace(q_lora_rank=0), absorbed=True),
        "mla-both-tiny": lambda: viz.draw_mla_comparison(TINY),
        "fp8-linear": lambda: viz.draw_fp8_linear(),
        **{f"pair-{r}": (lambda r=r: viz.draw_dualpipe_pair(r)[0]) for r in (0.25, 1.0, 1.5, 2.5)},
        "pair-grid": lambda: viz.dualpipe_pair_small_multiples()[0],
    }


@pytest.mark.parametrize("name", list(_figures()))
def test_figure_draws_without_overlapping_labels(name):
    fig = _figures()[name]()
    assert isinstance(fig, Figure)
    assert overlapping_texts(fig) == []
    assert small_fonts(fig) == []
    assert len(visible_texts(fig)) >= 5


def test_figures_draw_into_a_given_axes():
    from dsv3lib import viz

    fig, (a, b) = plt.subplots(1, 2, figsize=(20, 6))
    assert viz.draw_v3_block(TINY, ax=a) is fig
    assert viz.draw_fp8_linear(ax=b) is fig
    fig, ax = plt.subplots(figsize=(10, 3))
    assert viz.draw_dualpipe_pair(1.0, ax=ax)[0] is fig
    assert viz.draw_mla_dataflow(V3, ax=ax) is fig


# ------------------------------------------------------------------------------ numbers come from cfg
def test_block_prints_the_config():
    from dsv3lib.viz import draw_v3_block

    text = all_text(draw_v3_block(V3))
    for want in ["256 routed (8 active) + 1 shared", "top-8 of 256", "hidden 2,048", "× 61 blocks",
                 "first 3: dense", "2d = 14,336", "14,336 → 7,168", "128 heads", "depth D = 1", "(× 2.5)"]:
        assert want in text, want
    text = all_text(draw_v3_block(TINY))
    for want in ["16 routed (4 active) + 1 shared", "top-4 of 16", "2d = 256", "256 → 128", "× 4 blocks"]:
        assert want in text, want


def test_mla_sizes_match_accounting():
    from dsv3lib.viz import mla_sizes

    for cfg in (V3, TINY):
        s = mla_sizes(cfg)
        assert s["cache_absorbed"] * cfg.n_layers * 2 == accounting.kv_cache_bytes_per_token(cfg, "mla")
        assert s["cache_naive"] * cfg.n_layers * 2 == accounting.kv_cache_bytes_per_token(cfg, "mha")
    s = mla_sizes(V3)
    assert (s["cache_absorbed"], s["cache_naive"], s["q"], s["q_absorbed"]) == (576, 40960, 128 * 192, 128 * 576)


def test_mla_figure_labels_the_cache_sizes():
    from dsv3lib.viz import draw_mla_dataflow

    absorbed = all_text(draw_mla_dataflow(V3, absorbed=True))
    assert "512 + 64 = 576 numbers" in absorbed
    assert f"{accounting.kv_cache_bytes_per_token(V3, 'mla'):,} bytes per token" in absorbed  # 70,272
    assert "128 × 512" in absorbed  # the absorbed query and the latent output, per head
    naive = all_text(draw_mla_dataflow(V3, absorbed=False))
    assert "128 × (128 + 64 + 128) = 40,960 numbers" in naive
    assert f"{accounting.kv_cache_bytes_per_token(V3, 'mha'):,} bytes per token" in naive  # 4,997,120
    for want in ["7,168", "1,536", "128 × 128", "128 × 64", "\\sqrt{192}"]:
        assert want in naive, want
    tiny = all_text(draw_mla_dataflow(TINY, absorbed=True))
    assert f"= {TINY.kv_lora_rank + TINY.qk_rope_head_dim} numbers" in tiny


def test_fp8_figure_names_the_three_gemms_and_the_scaling_groups():
    from dsv3lib.viz import draw_fp8_linear

    text = all_text(draw_fp8_linear())
    for want in ["Fprop", "Dgrad", "Wgrad", "1×128 tiles", "128×128 blocks", "128×1 tiles", "accumulate in FP32",
                 "E4M3", "BF16 (output)", "dW: FP32"]:
        assert want in text, want


# --------------------------------------------------------------------------- DualPipe pair timing model
def test_pair_schedule_respects_lanes_and_producers():
    from dsv3lib.viz.dualpipe import _OPS, pair_schedule

    producer = {name: dep for name, _, _, dep in _OPS}
    for r in (0.0, 0.3, 1.0, 1.7, 3.0):
        ops, stats = pair_schedule(r)
        assert sorted(o[0] for o in ops) == sorted(producer)
        by_name = {name: (lane, s, e) for name, lane, s, e in ops}
        for lane in ("compute", "comm"):
            spans = sorted((s, e) for _, ln, s, e in ops if ln == lane)
            assert all(e1 <= s2 + 1e-12 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # one op at a time
        for name, dep in producer.items():
            if dep:
                assert by_name[name][1] >= by_name[dep][2] - 1e-12, (r, name)
        assert stats["compute"] == 6.0 and stats["comm"] == pytest.approx(4 * r)
        assert stats["makespan"] == pytest.approx(stats["compute"] + stats["exposed_comm"])
        assert stats["makespan"] >= max(stats["compute"], stats["comm"]) - 1e-12


def test_pair_hides_small_ratios_and_exposes_more_as_comm_grows():
    from dsv3lib.viz import pair_schedule

    ratios = [i / 20 for i in range(0, 81)]
    stats = [pair_schedule(r)[1] for r in ratios]
    for r, s in zip(ratios, stats):
        assert 0.0 <= s["hidden_fraction"] <= 1.0
        if r <= 1.0:  # each all-to-all fits under the compute op it overlaps
            assert s["exposed_comm"] == 0.0 and s["makespan"] == 6.0, r
    exposed = [s["exposed_comm"] for s in stats]
    assert all(b >= a for a, b in zip(exposed, exposed[1:]))  # monotone
    past = [e for r, e in zip(ratios, exposed) if r > 1.0]
    assert all(b > a for a, b in zip(past, past[1:])) and past[0] > 0  # and strictly growing once exposed
    assert pair_schedule(3.0)[1]["hidden_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="comm_ratio"):
        pair_schedule(-1.0)


def test_small_multiples_match_the_single_pair():
    from dsv3lib.viz import draw_dualpipe_pair, dualpipe_pair_small_multiples

    fig, stats = dualpipe_pair_small_multiples((0.5, 2.0))
    assert set(stats) == {0.5, 2.0}
    assert stats[2.0] == draw_dualpipe_pair(2.0)[1]
    assert stats[0.5]["exposed_comm"] == 0.0 < stats[2.0]["exposed_comm"]


def test_exposed_time_is_highlighted():
    from dsv3lib.viz import PALETTE, draw_dualpipe_pair

    def red_hatched(fig):
        return [p for p in fig.axes[0].patches if p.get_hatch() and
                matplotlib.colors.same_color(p.get_edgecolor(), PALETTE["exposed"])]

    assert red_hatched(draw_dualpipe_pair(0.5)[0]) == []
    fig, stats = draw_dualpipe_pair(2.0)
    assert sum(p.get_width() for p in red_hatched(fig)) == pytest.approx(stats["exposed_comm"])


def test_widget_builds():
    pytest.importorskip("ipywidgets")
    from dsv3lib.viz import dualpipe_pair_widget

    w = dualpipe_pair_widget()
    slider = w.children[0]
    assert slider.description == "comm/compute" and slider.value == 1.0
    assert (slider.min, slider.max) == (0.0, 3.0)


def text_outside_boxes(fig) -> list[str]:
    """Texts anchored inside a drawn, filled box (a FancyBboxPatch) that spill out of it."""
    from matplotlib.patches import FancyBboxPatch

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        boxes = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, FancyBboxPatch)
                 and p.get_facecolor()[3] > 0]  # filled boxes: the dashed frames hold no centred label
        for t in ax.texts:
            if not (t.get_visible() and t.get_text().strip()):
                continue
            anchor = ax.transData.transform(t.get_position())
            around = [b for b in boxes if b.contains(*anchor)]
            if not around:
                continue
            b = min(around, key=lambda b: b.width * b.height)
            e = t.get_window_extent(renderer)
            if e.x0 < b.x0 - 0.5 or e.x1 > b.x1 + 0.5 or e.y0 < b.y0 - 0.5 or e.y1 > b.y1 + 0.5:
                out.append(t.get_text())
    return out


# The site's content column at a 1280-px window (book/_static/custom.css; scripts/check_site.py measures it)
COLUMN_PX = 800


@pytest.mark.parametrize("name", list(_figures()))
def test_labels_fit_their_boxes_and_read_at_9px_in_the_column(name):
    fig = _figures()[name]()
    assert text_outside_boxes(fig) == []
    fig.canvas.draw()
    width_in = fig.get_tightbbox(fig.canvas.get_renderer()).width  # inches, as the notebook's PNG is cropped
    smallest = min(t.get_fontsize() for t in visible_texts(fig))
    shown = min(1.0, COLUMN_PX / (width_in * 72))  # the page scales a wider figure down to the column
    assert smallest * shown >= 9.0 - 0.05, f"{smallest} pt at {width_in:.1f} in shows at {smallest * shown:.1f} px"
