"""Multi-head Latent Attention's dataflow, naive vs absorbed, with per-token sizes from a config (chapter 2).

V3 §2.1.1 (eq. 1-11): the keys and values of every head are up-projections of one joint latent c_KV; a
naive cache stores them expanded, the absorbed form folds W_UK into the query and W_UV into the output
projection so the cache holds only c_KV and the shared RoPE key k_R (:mod:`dsv3lib.model.mla`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from .. import accounting
from ..config import ModelConfig
from ._draw import PALETTE, arrow, box, canvas, n

__all__ = ["mla_sizes", "draw_mla_dataflow", "draw_mla_comparison"]


def mla_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Numbers per token (and per layer) of each tensor in the MLA dataflow, and of each form's cache."""
    h = cfg.n_heads
    return {
        "h": cfg.dim, "c_q": cfg.q_lora_rank, "c_kv": cfg.kv_lora_rank, "k_r": cfg.qk_rope_head_dim,
        "q": h * cfg.qk_head_dim, "q_absorbed": h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        "k": h * cfg.qk_head_dim, "v": h * cfg.v_head_dim, "o": h * cfg.v_head_dim, "o_latent": h * cfg.kv_lora_rank,
        "cache_naive": h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim),
        "cache_absorbed": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
    }


def _cache_caption(cfg: ModelConfig, absorbed: bool) -> str:
    s = mla_sizes(cfg)
    if absorbed:
        total = (f"cached per token and layer: $c_{{KV}}$ + $k_R$ = {n(cfg.kv_lora_rank)} + "
                 f"{n(cfg.qk_rope_head_dim)} = {n(s['cache_absorbed'])} numbers")
    else:
        total = (f"cached per token and layer: {cfg.n_heads} × ({cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} + "
                 f"{cfg.v_head_dim}) = {n(s['cache_naive'])} numbers")
    nbytes = accounting.kv_cache_bytes_per_token(cfg, "mla" if absorbed else "mha", bytes_per_element=2)
    return f"{total}\n× {cfg.n_layers} layers × 2 bytes (BF16) = {n(nbytes)} bytes per token"


def draw_mla_dataflow(cfg: ModelConfig, absorbed: bool = True, ax=None):
    """MLA for one token (V3 §2.1.1): sizes of h, c_Q, c_KV, k_R, the queries, keys and values per head,
    and what the KV cache holds (red dashed frame).

    ``absorbed=False``: keys and values are expanded per head (``attn_impl="naive"``) and cached as such,
    n_heads·(qk_nope + qk_rope + v) numbers. ``absorbed=True``: W_UK is folded into the query (scores
    are taken in the latent space) and W_UV into the output, so the cache holds c_KV and k_R only,
    kv_lora_rank + qk_rope_head_dim numbers (V3: 576). Returns the figure.
    """
    h = cfg.n_heads
    fig, ax = canvas(ax, (11, 4.6), (-0.2, 24.0), (0.0, 9.3))
    hb = box(ax, 1.0, 4.6, 1.8, 1.1, f"h\n{n(cfg.dim)}")
    # queries
    x1, x2 = 6.2, 12.4
    if cfg.q_lora_rank:
        cq = box(ax, x1, 7.6, 2.6, 1.0, f"$c_Q$\n{n(cfg.q_lora_rank)}", "attention")
        arrow(ax, hb.right, cq.left, text="$W_{DQ}$ (wq_a)", offset=(-0.3, 0), ha="right")
        q_from, w_q = cq.right, "wq_b"
    else:  # no query compression: one wq
        q_from, w_q = hb.top, "wq"
    if absorbed:
        qc = box(ax, x2, 8.2, 3.6, 1.0, f"$q_C W_{{UK}}$  (absorbed)\n{h} × {n(cfg.kv_lora_rank)}", "attention")
    else:
        qc = box(ax, x2, 8.2, 3.6, 1.0, f"$q_C$\n{h} × {cfg.qk_nope_head_dim}", "attention")
    qr = box(ax, x2, 6.85, 3.6, 1.0, f"$q_R$ (RoPE)\n{h} × {cfg.qk_rope_head_dim}", "attention")
    arrow(ax, q_from, qc.left, text="$W_{UQ}$, then $W_{UK}$" if absorbed else f"$W_{{UQ}}$ ({w_q})",
          offset=(0, 0.38))
    arrow(ax, q_from, qr.left, text=f"$W_{{QR}}$ ({w_q})", offset=(0, -0.4))
    # keys and values
    ckv = box(ax, x1, 4.4, 2.6, 1.0, f"$c_{{KV}}$\n{n(cfg.kv_lora_rank)}", "attention")
    kr = box(ax, x1, 1.9, 2.6, 1.0, f"$k_R$ (RoPE)\n{cfg.qk_rope_head_dim}", "attention")
    arrow(ax, hb.right, ckv.left, text="$W_{DKV}$ (wkv_a)", text_at=0.5, offset=(0.05, 0.32))
    arrow(ax, hb.right, kr.left, text="$W_{KR}$ (wkv_a)", offset=(-0.3, -0.1), ha="right")
    att = box(ax, 17.0, 5.0, 3.0, 7.4, None, "attention")
    if absorbed:
        att_text = ("attention in\nlatent space\n\nscores:\n$q_C W_{UK} \\cdot c_{KV}$\n+ $q_R \\cdot k_R$\n\n"
                    "mix $c_{KV}$")
        cached = [ckv, kr]
        arrow(ax, ckv.right, (att.x - att.w / 2, 4.4), text="all heads\nread it", text_at=0.62, offset=(0, 0.6))
        arrow(ax, kr.right, (att.x - att.w / 2, 2.4))
        out = box(ax, 21.3, 5.0, 2.5, 1.0, f"$o$ (latent)\n{h} × {n(cfg.kv_lora_rank)}", "attention")
        wo = "$W_{UV}$ · $W_O$\n(wkv_b, wo)"
    else:
        att_text = f"attention\nper head\n\nsoftmax\n$q \\cdot k / \\sqrt{{{cfg.qk_head_dim}}}$\n\nmix $v$"
        kc = box(ax, x2, 4.85, 3.9, 0.9, f"$k_C$  {h} × {cfg.qk_nope_head_dim}", "attention")
        vc = box(ax, x2, 3.75, 3.9, 0.9, f"$v_C$  {h} × {cfg.v_head_dim}", "attention")
        krh = box(ax, x2, 1.9, 3.9, 0.9, f"$k_R$ per head  {h} × {cfg.qk_rope_head_dim}", "attention")
        arrow(ax, ckv.right, kc.left, text="$W_{UK}$ (wkv_b)", offset=(0, 0.36))
        arrow(ax, ckv.right, vc.left, text="$W_{UV}$ (wkv_b)", offset=(0, -0.4))
        arrow(ax, kr.right, krh.left, text="copy", text_at=0.5, offset=(0, 0.25))
        cached = [kc, vc, krh]
        for b in cached:
            arrow(ax, b.right, (att.x - att.w / 2, b.y))
        out = box(ax, 21.3, 5.0, 2.5, 1.0, f"$o$\n{h} × {cfg.v_head_dim}", "attention")
        wo = "$W_O$ (wo)"
    ax.text(att.x, att.y, att_text, ha="center", va="center", fontsize=10)
    arrow(ax, qc.right, (att.x - att.w / 2, qc.y))
    arrow(ax, qr.right, (att.x - att.w / 2, qr.y))
    arrow(ax, (att.x + att.w / 2, out.y), out.left)
    u = box(ax, 21.3, 1.9, 2.5, 1.0, f"u\n{n(cfg.dim)}")
    arrow(ax, out.bottom, u.top, text=wo, offset=(0.2, 0), ha="left")
    # the cache: a dashed frame around what is kept per token
    pad = 0.18
    x0 = min(b.x - b.w / 2 for b in cached) - pad
    x1_ = max(b.x + b.w / 2 for b in cached) + pad
    y0 = min(b.y - b.h / 2 for b in cached) - pad
    y1 = max(b.y + b.h / 2 for b in cached) + pad
    box(ax, (x0 + x1_) / 2, (y0 + y1) / 2, x1_ - x0, y1 - y0, None, "cache", dashed=True, fill=False, lw=1.8,
        zorder=0)
    ax.text(0.0, 0.55, _cache_caption(cfg, absorbed), ha="left", va="center", fontsize=10,
            color=PALETTE["cache"])
    form = "absorbed: cache the latent" if absorbed else "naive: cache per-head keys and values"
    ax.set_title(f"MLA, {form} (numbers per token, d = {n(cfg.dim)}, {h} heads)", fontsize=11)
    return fig


def draw_mla_comparison(cfg: ModelConfig):
    """:func:`draw_mla_dataflow` naive (top) and absorbed (bottom) for the same config. Returns the figure."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 9.4))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.96, hspace=0.12)
    for ax, absorbed in zip(axes, (False, True)):
        draw_mla_dataflow(cfg, absorbed, ax=ax)
    return fig
