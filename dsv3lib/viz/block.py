"""One DeepSeek-V3 Transformer block with its MoE opened up, and the MTP module beside it (chapter 0).

Drawn from a :class:`~dsv3lib.config.ModelConfig`, so every size printed is the config's: V3 Fig. 2
(block, MLA, DeepSeekMoE) and V3 §2.2 Fig. 3 (multi-token prediction).
"""

from __future__ import annotations

from matplotlib.patches import Circle

from ..config import ModelConfig
from ._draw import PALETTE, arrow, box, canvas, n

__all__ = ["draw_v3_block"]


def _plus(ax, x, y, r=0.32):
    ax.add_patch(Circle((x, y), r, facecolor="white", edgecolor=PALETTE["norm"], lw=1.3, zorder=2))
    ax.plot([x - r * 0.6, x + r * 0.6], [y, y], color=PALETTE["norm"], lw=1.3, zorder=3)
    ax.plot([x, x], [y - r * 0.6, y + r * 0.6], color=PALETTE["norm"], lw=1.3, zorder=3)
    return (x, y - r), (x, y + r), (x - r, y)


def _residual(ax, x_from, y_from, x_side, plus_left):
    """A skip connection: from (x_from, y_from) out to x_side, up, and into a ⊕'s left side."""
    ax.plot([x_from, x_side, x_side], [y_from, y_from, plus_left[1]], color=PALETTE["norm"], lw=1.3, zorder=1)
    arrow(ax, (x_side, plus_left[1]), plus_left)


def _main_column(ax, cfg: ModelConfig, x: float):
    arrow(ax, (x, 0.2), (x, 0.8), text="input tokens $t_i$", text_at=0, offset=(0, -0.05), va="top")
    emb = box(ax, x, 1.25, 5.4, 0.8, "Embedding (shared with MTP)", "embed", fs=9)
    norm1 = box(ax, x, 3.0, 2.6, 0.7, "RMSNorm")
    mla = box(ax, x, 4.55, 5.2, 1.15, f"Multi-head Latent Attention\n{cfg.n_heads} heads, KV latent "
              f"{n(cfg.kv_lora_rank)}", "attention")
    p1_in, p1_out, p1_left = _plus(ax, x, 6.0)
    norm2 = box(ax, x, 7.15, 2.6, 0.7, "RMSNorm")
    moe = box(ax, x, 8.7, 5.6, 1.15, f"DeepSeekMoE\n{cfg.n_routed_experts} routed ({cfg.n_activated_experts} "
              f"active) + {cfg.n_shared_experts} shared", "moe", fs=9)
    p2_in, p2_out, p2_left = _plus(ax, x, 10.15)
    final = box(ax, x, 11.25, 2.6, 0.6, "RMSNorm")
    head = box(ax, x, 12.45, 3.4, 0.65, "Output head", "embed")
    arrow(ax, emb.top, norm1.bottom)
    arrow(ax, norm1.top, mla.bottom)
    arrow(ax, mla.top, p1_in)
    arrow(ax, p1_out, norm2.bottom)
    arrow(ax, norm2.top, moe.bottom)
    arrow(ax, moe.top, p2_in)
    arrow(ax, p2_out, final.bottom)
    arrow(ax, final.top, head.bottom)
    ax.plot([x], [11.85], marker="o", markersize=4, color=PALETTE["norm"])  # h^0 branches off to the MTP
    side = x - 2.9
    _residual(ax, x, 2.2, side, p1_left)
    _residual(ax, x, 6.55, side, p2_left)
    frame = box(ax, x - 0.1, 6.3, 6.2, 8.6, None, "norm", dashed=True, fill=False, lw=1.0, zorder=0)
    ax.text(frame.x - frame.w / 2 - 0.12, frame.y, f"× {cfg.n_layers} blocks (first {cfg.n_dense_layers}: dense "
            f"FFN, hidden {n(cfg.inter_dim)})", ha="right", va="center", rotation=90, fontsize=9)
    ax.text(x, 13.2, "main model predicts $t_{i+1}$", ha="center", va="bottom", fontsize=10)
    return emb, head, moe, (x, 11.85)


def _moe_detail(ax, cfg: ModelConfig, x: float, moe_box):
    w = 8.6
    frame = box(ax, x, 7.1, w, 7.6, None, "moe", dashed=True, fill=False, lw=1.0, zorder=0)
    for corner in (1, -1):  # the block's MoE, opened up
        ax.plot([moe_box.x + moe_box.w / 2, frame.x - w / 2], [moe_box.y + corner * moe_box.h / 2,
                frame.y + corner * frame.h / 2], color=PALETTE["moe"], lw=0.8, ls=":", zorder=0)
    ax.text(x, 10.55, "DeepSeekMoE (V3 §2.1.2)", ha="center", va="center", fontsize=10, fontweight="bold")
    arrow(ax, (x - 1.5, 3.3), (x - 1.5, 4.15), kind="moe")
    ax.text(x - 1.5, 3.25, f"u (width {n(cfg.dim)})", ha="center", va="top", fontsize=9)
    router = box(ax, x + 0.8, 4.75, 6.6, 1.05, f"Router: $s_i$ = {cfg.score_func}($u \\cdot e_i$)\nchoose top-"
                 f"{cfg.n_activated_experts} of {cfg.n_routed_experts} by $s_i + b_i$", "moe")
    ye = 7.0
    n_shared = cfg.n_shared_experts
    shared = box(ax, x - 3.05, ye, 1.9, 1.0, f"{n_shared} shared\nexpert{'s' * (n_shared != 1)}", "moe")
    arrow(ax, (x - 3.05, 3.75), shared.bottom, kind="moe")
    ax.plot([x - 3.05, x - 1.5], [3.75, 3.75], color=PALETTE["moe"], lw=1.3, zorder=1)
    n_r, k_r = cfg.n_routed_experts, cfg.n_activated_experts
    slots = ["1", "2", "3", "4", "5", "…", n(n_r)] if n_r > 6 else [str(i + 1) for i in range(n_r)]
    chosen = {1, 3, 6} if n_r > 6 else set(range(0, 2 * k_r, 2)) & set(range(n_r))  # an example token's
    xs = [x - 1.5 + 0.75 * i for i in range(len(slots))]
    for i, (xi, label) in enumerate(zip(xs, slots)):
        if label == "…":
            ax.text(xi, ye, label, ha="center", va="center", fontsize=10)
            continue
        b = box(ax, xi, ye, 0.62, 1.0, label, "moe", fs=9, lw=1.0,
                text_colour="white" if i in chosen else "black")
        if i in chosen:
            b.patch.set_facecolor(PALETTE["moe"])
        arrow(ax, (xi, router.y + router.h / 2), b.bottom, kind="moe", lw=1.0 if i in chosen else 0.6,
              dashed=i not in chosen)
    ax.text(x - 1.3, 4.1, f"experts: SwiGLU, hidden {n(cfg.moe_inter_dim)};\ndark: "
            f"chosen ({cfg.n_activated_experts} per token)", ha="left", va="top", fontsize=9)
    weights = "$g_i = s_i\\,/\\,\\Sigma_j\\, s_j$" if cfg.norm_topk_prob else "$g_i = s_i$"
    weights += f" (× {cfg.route_scale:g})" if cfg.route_scale != 1 else ""
    _plus(ax, x, 9.35)
    for xi in [shared.x] + [xs[i] for i in sorted(chosen)]:
        arrow(ax, (xi, ye + 0.5), (x + (xi - x) * 0.08, 9.0), kind="moe", lw=0.9)
    ax.text(x + 0.45, 9.35, f"shared(u) + $\\Sigma_i\\, g_i\\,$expert$_i$(u)\n{weights}", ha="left", va="center", fontsize=9)


def _mtp(ax, cfg: ModelConfig, x: float, emb_main, head_main, h_out):
    xl, xr = x - 1.9, x + 1.9
    emb = box(ax, xr, 1.25, 3.4, 0.8, "Embedding\n(shared)", "embed", fs=9)
    arrow(ax, (xr, 0.2), emb.bottom, text="token $t_{i+k}$", text_at=0, offset=(0, -0.05), va="top")
    norm_h = box(ax, xl, 3.0, 2.6, 0.7, "RMSNorm")
    norm_e = box(ax, xr, 3.0, 2.6, 0.7, "RMSNorm")
    arrow(ax, emb.top, norm_e.bottom)
    cat = box(ax, x, 4.55, 5.4, 0.75, f"concatenate: 2d = {n(2 * cfg.dim)}")
    arrow(ax, norm_h.top, (xl, cat.y - cat.h / 2))
    arrow(ax, norm_e.top, (xr, cat.y - cat.h / 2))
    proj = box(ax, x, 6.0, 5.4, 1.0, f"Linear projection $M_k$ (eh_proj)\n{n(2 * cfg.dim)} → {n(cfg.dim)}")
    trm = box(ax, x, 7.7, 6.2, 1.0, "Transformer block TRM$_k$\n(MLA + DeepSeekMoE, as above)", "attention", fs=9)
    head = box(ax, x, 12.45, 4.8, 0.8, "RMSNorm → Output head", "embed", fs=9)
    arrow(ax, cat.top, proj.bottom)
    arrow(ax, proj.top, trm.bottom)
    arrow(ax, trm.top, head.bottom, text="$h_i^k$", offset=(0.15, 0), ha="left")
    frame = box(ax, x, 6.8, 7.2, 12.5, None, "embed", dashed=True, fill=False, lw=1.0, zorder=0)
    ax.text(x, 13.2, f"MTP module k (depth D = {cfg.n_mtp_modules}) predicts $t_{{i+k+1}}$", ha="center", va="bottom",
            fontsize=10)
    # h^(k-1): the main model's (or the previous module's) hidden state feeds the module
    y_h, x_in = h_out[1], frame.x - frame.w / 2 + 0.35
    ax.plot([h_out[0], h_out[0] + 0.1], [y_h, y_h], color=PALETTE["norm"], lw=1.3)
    ax.plot([h_out[0], x_in, x_in], [y_h, y_h, 2.2], color=PALETTE["norm"], lw=1.3, ls="--", zorder=0)
    arrow(ax, (x_in, 2.2), (xl, 2.2), dashed=True)
    arrow(ax, (xl, 2.2), norm_h.bottom)
    ax.text(x_in + 0.15, 2.1, "$h_i^{k-1}$", ha="left", va="top", fontsize=9)
    for a, b in ((emb_main, emb), (head_main, head)):  # shared parameters
        ax.plot([a.x + a.w / 2, b.x - b.w / 2], [a.y, b.y], color=PALETTE["embed"], lw=1.0, ls=":", zorder=0)
    ax.text(frame.x - frame.w / 2 - 0.1, emb.y + 0.12, "same embedding", ha="right", va="bottom", fontsize=9,
            color=PALETTE["embed"])
    ax.text(frame.x - frame.w / 2 - 0.1, head.y + 0.12, "same output head", ha="right", va="bottom", fontsize=9,
            color=PALETTE["embed"])


def draw_v3_block(cfg: ModelConfig, ax=None):
    """One DeepSeek-V3 Transformer block (V3 Fig. 2), its DeepSeekMoE layer opened up, and one MTP module
    (V3 §2.2, Fig. 3), with every size taken from ``cfg`` (``ModelConfig.preset("deepseek-v3")``: 256
    routed experts, 8 active, 1 shared). Returns the figure.

    Two readings the paper leaves open are drawn one way here: the hidden state $h^0$ the MTP module takes
    leaves the main model after its final RMSNorm (as in :mod:`dsv3lib.model.mtp`), and the drawing does
    not fix the concatenation's order: eq. 21 writes [RMSNorm(h); RMSNorm(Emb)], the released checkpoint
    (and the library) use [enorm(emb); hnorm(h)]."""
    fig, ax = canvas(ax, (11, 7.6), (-1.0, 25.0), (-0.45, 13.8))
    emb, head, moe, h_out = _main_column(ax, cfg, 3.2)
    _moe_detail(ax, cfg, 10.9, moe)
    _mtp(ax, cfg, 20.6, emb, head, h_out)
    ax.set_title(f"DeepSeek-V3 block and MTP module: d = {n(cfg.dim)}, {cfg.n_layers} layers", fontsize=11)
    return fig
