#!/usr/bin/env python3
"""Regenerate the golden fixtures in tests/golden/.

Every reference value is computed with PyTorch in torch.float64 from fixed seeds.
Each model output is checked twice: PyTorch's nn.Transformer (with and without its
fused inference "fast path") against an explicit float64 re-implementation of the
pre-LayerNorm projector, to 1e-12, and again after reloading the written files.
Each op reference is checked against a second, hand-written computation.

Usage (from anywhere):  python tests/golden/make_golden.py
Requires: torch, safetensors, numpy.  CPU only.  Format: tests/golden/README.md.
"""

import json
import math
import os
import warnings

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextgpt_model import F64, NAMES, Projector, gen, randn, randomize_

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-12

# One thread: float64 reductions then run in a fixed order, so reruns give identical bytes.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")


def max_dev(a, b):
    return (a - b).abs().max().item()


def check(name, got, want, tol=TOL):
    d = max_dev(got, want)
    assert d <= tol, f"{name}: max |deviation| {d:.3e} > {tol:.0e}"
    return d


def save(path, tensors, metadata):
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared storage
    full = os.path.join(OUT_DIR, path)
    save_file(tensors, full, metadata=metadata)
    canonicalize_header(full)
    print(f"wrote {path}: {len(tensors)} tensors, {os.path.getsize(full)} bytes")


def canonicalize_header(path):
    """safetensors writes the metadata map in hash order; rewrite the JSON header with
    sorted keys so reruns give byte-identical files.  Data offsets are relative to the end
    of the header, so only the 8-byte header length changes."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"))
    header = header.encode() + b" " * (-len(header) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    os.chmod(path, 0o644)


# ---------------------------------------------------------------------------------------
# The projector
# ---------------------------------------------------------------------------------------

# --- explicit float64 re-implementation (pre-LN), used only as a cross-check ----------

def m_linear(x, sd, key):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def m_layer_norm(x, sd, key, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[key + ".weight"] + sd[key + ".bias"]


def m_mha(xq, xkv, sd, key, heads):
    E = xq.shape[-1]
    w, b = sd[key + ".in_proj_weight"], sd[key + ".in_proj_bias"]
    q = xq @ w[:E].T + b[:E]
    k = xkv @ w[E:2 * E].T + b[E:2 * E]
    v = xkv @ w[2 * E:].T + b[2 * E:]
    hd = E // heads
    outs = []
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        s = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(hd)
        s = torch.exp(s - s.max(-1, keepdim=True).values)
        outs.append((s / s.sum(-1, keepdim=True)) @ v[..., cols])
    return m_linear(torch.cat(outs, -1), sd, key + ".out_proj")


def m_ffn(x, sd, key):
    return m_linear(torch.relu(m_linear(x, sd, key + ".linear1")), sd, key + ".linear2")


def manual_forward(sd, cfg, hidden, embeds):
    fc, out = NAMES[cfg["variant"]]
    H = cfg["heads"]
    x = m_linear(hidden + embeds, sd, fc)
    for i in range(cfg["n_enc"]):
        k = f"tfm.encoder.layers.{i}"
        x = x + m_mha(m_layer_norm(x, sd, k + ".norm1"), m_layer_norm(x, sd, k + ".norm1"), sd,
                      k + ".self_attn", H)
        x = x + m_ffn(m_layer_norm(x, sd, k + ".norm2"), sd, k)
    memory = m_layer_norm(x, sd, "tfm.encoder.norm")
    t = sd["query_embs"].expand(hidden.shape[0], -1, -1)
    for i in range(cfg["n_dec"]):
        k = f"tfm.decoder.layers.{i}"
        n1 = m_layer_norm(t, sd, k + ".norm1")
        t = t + m_mha(n1, n1, sd, k + ".self_attn", H)
        t = t + m_mha(m_layer_norm(t, sd, k + ".norm2"), memory, sd, k + ".multihead_attn", H)
        t = t + m_ffn(m_layer_norm(t, sd, k + ".norm3"), sd, k)
    return m_linear(m_layer_norm(t, sd, "tfm.decoder.norm"), sd, out)


class FastPathCounter:
    """Counts calls into PyTorch's fused inference kernels while active."""

    FUNCS = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")

    def __enter__(self):
        self.counts = {f: 0 for f in self.FUNCS}
        self.orig = {f: getattr(torch, f) for f in self.FUNCS}
        for f in self.FUNCS:
            def wrapped(*a, _f=f, **kw):
                self.counts[_f] += 1
                return self.orig[_f](*a, **kw)
            setattr(torch, f, wrapped)
        return self

    def __exit__(self, *exc):
        for f, fn in self.orig.items():
            setattr(torch, f, fn)


DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}

MODEL_CONFIGS = [
    ("legacy_prefixed", dict(variant="legacy", prefix="gen_text_hidden_fcs.0.", heads=4,
                             d_model=32, ffn=64, n_enc=4, n_dec=4, in_dim=48, out_dim=24,
                             n_in=4, n_out=7, batch=2,
                             weights_dtype="float64", input_dtype="float64")),
    ("v15_audio_like", dict(variant="v1.5", prefix="model.mm_output_aud_projector.", heads=2,
                            d_model=32, ffn=48, n_enc=2, n_dec=3, in_dim=40, out_dim=16,
                            n_in=3, n_out=1, batch=3,
                            weights_dtype="float64", input_dtype="float64")),
    ("legacy_heads8_f16", dict(variant="legacy", prefix="", heads=8,
                               d_model=64, ffn=128, n_enc=1, n_dec=2, in_dim=32, out_dim=20,
                               n_in=1, n_out=3, batch=2,
                               weights_dtype="float16", input_dtype="bfloat16")),
    ("legacy_b1", dict(variant="legacy", prefix="gen_text_hidden_fcs_video.0.", heads=4,
                       d_model=16, ffn=32, n_enc=4, n_dec=4, in_dim=16, out_dim=32,
                       n_in=5, n_out=4, batch=1,
                       weights_dtype="float32", input_dtype="float32")),
]


def make_model_fixture(seed, name, cfg):
    g = gen(seed)
    model = Projector(cfg["variant"], cfg["in_dim"], cfg["out_dim"], cfg["n_out"],
                      cfg["d_model"], cfg["heads"], cfg["ffn"], cfg["n_enc"], cfg["n_dec"])
    model = model.to(F64).eval()
    randomize_(model, g)
    wdt, idt = DTYPES[cfg["weights_dtype"]], DTYPES[cfg["input_dtype"]]
    with torch.no_grad():  # round to the stored dtype; the reference uses the rounded values
        for p in model.parameters():
            p.copy_(p.to(wdt).to(F64))
    B, n_in, D = cfg["batch"], cfg["n_in"], cfg["in_dim"]
    hidden = randn(g, B, n_in, D).to(idt).to(F64)
    embeds = randn(g, B, n_in, D).to(idt).to(F64)

    # 1) default inference: no_grad, PyTorch may take its fused fast path
    torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad(), FastPathCounter() as fast:
        y_fast = model(hidden, embeds)
    # 2) the plain composite path
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), FastPathCounter() as slow:
        y_plain = model(hidden, embeds)
    torch.backends.mha.set_fastpath_enabled(True)
    assert sum(slow.counts.values()) == 0
    # 3) explicit re-implementation from the state dict
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    y_manual = manual_forward(sd, cfg, hidden, embeds)

    d_plain = check(f"{name} plain vs manual", y_plain, y_manual)
    d_fast = check(f"{name} fast path vs manual", y_fast, y_manual)
    print(f"  {name}: fused calls {fast.counts}; |plain-manual| {d_plain:.2e}, "
          f"|fast-manual| {d_fast:.2e}, |y| max {y_plain.abs().max().item():.2f}")

    meta = {"config": json.dumps(cfg)}
    weights = {cfg["prefix"] + k: v.to(wdt) for k, v in sd.items()}
    weights["llm.embed_tokens.weight"] = randn(g, 3, 4).to(wdt)  # decoy: not a projector key
    save(f"model_{name}.weights.safetensors", weights, meta)
    save(f"model_{name}.io.safetensors",
         {"hidden": hidden.to(idt), "embeds": embeds.to(idt), "conditioning": y_plain}, meta)

    # Round trip: what a reader gets from the two files reproduces the stored output.
    w = load_file(os.path.join(OUT_DIR, f"model_{name}.weights.safetensors"))
    io = load_file(os.path.join(OUT_DIR, f"model_{name}.io.safetensors"))
    with safe_open(os.path.join(OUT_DIR, f"model_{name}.io.safetensors"), "pt") as f:
        cfg_read = json.loads(f.metadata()["config"])
    sd_read = {k[len(cfg_read["prefix"]):]: v.to(F64) for k, v in w.items()
               if k.startswith(cfg_read["prefix"]) and k != "llm.embed_tokens.weight"}
    assert sd_read.keys() == sd.keys()
    y_read = manual_forward(sd_read, cfg_read, io["hidden"].to(F64), io["embeds"].to(F64))
    check(f"{name} round trip", y_read, io["conditioning"])


# ---------------------------------------------------------------------------------------
# Op fixtures
# ---------------------------------------------------------------------------------------

def act_fn(act, x):
    if act == "none":
        return x
    if act == "relu":
        return F.relu(x)
    if act == "gelu_erf":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(act)


def act_manual(act, x):
    if act == "none":
        return x
    if act == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    if act == "gelu_erf":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def make_linear(seed):
    g = gen(seed)
    # (x shape, N, act, bias, residual)
    cases = [
        ([2, 3, 5], 7, "none", True, False),
        ([2, 3, 5], 7, "relu", False, True),
        ([1, 1, 1], 1, "relu", True, True),
        ([1, 1, 1], 1, "gelu_erf", False, False),
        ([13, 33], 129, "gelu_erf", True, False),
        ([3, 4, 64], 96, "gelu_tanh", True, False),
        ([5, 9], 3, "gelu_tanh", False, True),
        ([4, 6], 8, "gelu_erf", False, True),
        ([2, 2, 8], 12, "relu", True, True),
        ([3, 7], 5, "none", False, False),
    ]
    tensors, meta = {}, {}
    for i, (xs, N, act, has_b, has_r) in enumerate(cases):
        c = f"c{i}"
        K = xs[-1]
        x = randn(g, *xs)
        w = randn(g, N, K) / math.sqrt(K)
        b = 0.3 * randn(g, N) if has_b else None
        pre = F.linear(x, w, b)
        y = act_fn(act, pre)
        tensors[f"{c}.x"], tensors[f"{c}.w"] = x, w
        if has_b:
            tensors[f"{c}.b"] = b
        if has_r:
            r = randn(g, *y.shape)
            y = y + r
            tensors[f"{c}.residual"] = r
        # cross-check: explicit sum over k
        pre_m = (x.unsqueeze(-2) * w).sum(-1) + (b if has_b else 0)
        y_m = act_manual(act, pre_m) + (tensors[f"{c}.residual"] if has_r else 0)
        check(f"linear {c}", y, y_m)
        tensors[f"{c}.y"] = y
        meta[c] = json.dumps({"act": act})
    save("linear.safetensors", tensors, meta)


def make_layer_norm(seed):
    g = gen(seed)
    # (x shape, eps, residual, mean offset)
    cases = [
        ([2, 1], 1e-5, False, 0.0),
        ([4, 3], 1e-5, False, 0.0),
        ([2, 3, 3], 1e-3, True, 0.0),
        ([1, 512], 1e-5, False, 1000.0),
        ([2, 64], 1e-5, True, 1000.0),
        ([2, 129], 1e-3, True, 0.0),
        ([1, 3, 129], 1e-5, False, 0.0),
        ([1, 64], 1e-3, False, -3.0),
    ]
    tensors, meta = {}, {}
    for i, (xs, eps, has_r, offset) in enumerate(cases):
        c = f"c{i}"
        C = xs[-1]
        x = offset + randn(g, *xs)
        w = 1 + 0.2 * randn(g, C)
        b = 0.1 * randn(g, C)
        s = x
        tensors[f"{c}.x"] = x
        if has_r:
            r = randn(g, *xs)
            s = x + r
            tensors[f"{c}.residual"] = r
            tensors[f"{c}.sum"] = s
        y = F.layer_norm(s, (C,), w, b, eps)
        mean = s.sum(-1, keepdim=True) / C
        var = ((s - mean) ** 2).sum(-1, keepdim=True) / C
        check(f"layer_norm {c}", y, (s - mean) / torch.sqrt(var + eps) * w + b)
        tensors[f"{c}.weight"], tensors[f"{c}.bias"], tensors[f"{c}.y"] = w, b, y
        meta[c] = json.dumps({"eps": eps})
    save("layer_norm.safetensors", tensors, meta)


def attention_manual(q, k, v, heads, hd, mask, causal):
    """q [B,Lq,H*hd], k/v [B,Lk,H*hd]; explicit per-head softmax."""
    B, Lq, _ = q.shape
    Lk = k.shape[1]
    out = torch.empty(B, Lq, heads * hd, dtype=F64)
    for bi in range(B):
        for h in range(heads):
            cols = slice(h * hd, (h + 1) * hd)
            s = q[bi, :, cols] @ k[bi, :, cols].T / math.sqrt(hd)  # [Lq, Lk]
            allowed = torch.ones(Lq, Lk, dtype=torch.bool)
            if mask is not None:
                allowed &= ~mask[bi].bool().unsqueeze(0)
            if causal:
                allowed &= torch.arange(Lk).unsqueeze(0) <= torch.arange(Lq).unsqueeze(1)
            s = s.masked_fill(~allowed, -math.inf)
            p = torch.exp(s - s.max(-1, keepdim=True).values)
            out[bi, :, cols] = (p / p.sum(-1, keepdim=True)) @ v[bi, :, cols]
    return out


def attention_sdpa(q, k, v, heads, hd, mask, causal):
    def split(t):  # [B, L, H*hd] -> [B, H, L, hd]
        return t.unflatten(-1, (heads, hd)).transpose(1, 2)
    attn_mask = None
    if mask is not None:  # key_padding_mask (1 = ignore) -> boolean "may attend"
        attn_mask = ~mask.bool()[:, None, None, :]
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask,
                                       is_causal=causal)
    return o.transpose(1, 2).flatten(-2)


def make_attention(seed):
    g = gen(seed)
    tensors, meta = {}, {}

    def add(c, q_src, k_src, v_src, heads, hd, qs, ks, vs, causal=False, mask=None):
        W = heads * hd
        q, k, v = q_src[..., qs:qs + W], k_src[..., ks:ks + W], v_src[..., vs:vs + W]
        out = attention_sdpa(q, k, v, heads, hd, mask, causal)
        check(f"attention {c}", out, attention_manual(q, k, v, heads, hd, mask, causal))
        tensors.update({f"{c}.q_src": q_src, f"{c}.k_src": k_src, f"{c}.v_src": v_src,
                        f"{c}.out": out})
        if mask is not None:
            tensors[f"{c}.mask"] = mask
        meta[c] = json.dumps({"heads": heads, "head_dim": hd, "q_start": qs, "k_start": ks,
                              "v_start": vs, "causal": causal})

    # c0: self-attention on a packed qkv tensor [B, L, 3C] (C = 2 heads x 4)
    qkv = randn(g, 2, 3, 24)
    add("c0", qkv, qkv, qkv, 2, 4, 0, 8, 16)
    # c1: cross-attention Lq 7 / Lk 3; k and v packed side by side in one [B, Lk, 2C] tensor
    q, kv = randn(g, 2, 7, 8), randn(g, 2, 3, 16)
    add("c1", q, kv, kv, 2, 4, 0, 0, 8)
    # c2: Lq = Lk = 1, blocks at non-zero offsets inside wider tensors
    add("c2", randn(g, 1, 1, 20), randn(g, 1, 1, 12), randn(g, 1, 1, 24), 2, 4, 4, 4, 16)
    # c3: Lq 5, Lk 129 with a key padding mask (row 0 partly masked, row 1 right-padded);
    # inputs scaled x2 for sharper softmax rows
    mask = (torch.rand(2, 129, generator=g) < 0.3).to(torch.uint8)
    mask[0, 17] = 0
    mask[1] = 0
    mask[1, 100:] = 1
    add("c3", 2.0 * randn(g, 2, 5, 4), 2.0 * randn(g, 2, 129, 4), randn(g, 2, 129, 4),
        1, 4, 0, 0, 0, mask=mask)
    # c4: causal self-attention Lq = Lk = 6 (packed)
    qkv = randn(g, 2, 6, 24)
    add("c4", qkv, qkv, qkv, 2, 4, 0, 8, 16, causal=True)
    # c5: causal Lq 4, Lk 9 (top-left aligned: query i sees keys 0..i)
    add("c5", randn(g, 1, 4, 8), randn(g, 1, 9, 8), randn(g, 1, 9, 8), 1, 8, 0, 0, 0,
        causal=True)
    # c6: head_dim 64, two heads
    add("c6", randn(g, 1, 2, 128), randn(g, 1, 3, 128), randn(g, 1, 3, 128), 2, 64, 0, 0, 0)
    # c7: head_dim 128 (the real model's), with a mask
    mask = torch.tensor([[0, 1, 0]], dtype=torch.uint8)
    add("c7", randn(g, 1, 2, 128), randn(g, 1, 3, 128), randn(g, 1, 3, 128), 1, 128, 0, 0, 0,
        mask=mask)
    # c8: a single head over the full width, batch 3
    add("c8", randn(g, 3, 2, 4), randn(g, 3, 5, 4), randn(g, 3, 5, 4), 1, 4, 0, 0, 0)
    save("attention.safetensors", tensors, meta)


def make_alignment_loss(seed):
    g = gen(seed)
    tensors, meta = {}, {}
    for i, shape in enumerate([[2, 77, 3], [1, 1, 5], [3, 4, 16]]):
        c = f"c{i}"
        pred, target = randn(g, *shape), randn(g, *shape)
        B, N, _ = shape
        p = pred.clone().requires_grad_(True)
        l2 = torch.sqrt(((p - target) ** 2).sum(-1)).mean().reshape(1)
        (l2_grad,) = torch.autograd.grad(l2.sum(), p)
        p = pred.clone().requires_grad_(True)
        mse = F.mse_loss(p, target).reshape(1)
        (mse_grad,) = torch.autograd.grad(mse.sum(), p)
        dist = torch.linalg.vector_norm(pred - target, dim=-1, keepdim=True)
        check(f"l2 grad {c}", l2_grad, (pred - target) / (dist * B * N))
        check(f"mse grad {c}", mse_grad, 2 * (pred - target) / pred.numel())
        check(f"mse {c}", mse, ((pred - target) ** 2).mean().reshape(1))
        tensors.update({f"{c}.pred": pred, f"{c}.target": target,
                        f"{c}.l2_loss": l2.detach(), f"{c}.l2_grad": l2_grad,
                        f"{c}.mse_loss": mse.detach(), f"{c}.mse_grad": mse_grad})
        meta[c] = json.dumps({})
    save("alignment_loss.safetensors", tensors, meta)


def gather_manual(hidden, embeds, token_ids, signal_ids):
    B, T, C = hidden.shape
    out = torch.empty(B, len(signal_ids), C, dtype=F64)
    for b in range(B):
        pos = -1
        for i, sid in enumerate(signal_ids.tolist()):
            pos = next(t for t in range(pos + 1, T) if token_ids[b, t].item() == sid)
            out[b, i] = hidden[b, pos] + embeds[b, pos]
    return out


def make_gather(seed):
    g = gen(seed)
    tensors, meta = {}, {}

    def add(c, T, C, signal_ids, starts, extra=()):
        """Signal tokens contiguous from starts[b]; extra: (b, t, id) overrides elsewhere."""
        B, n = len(starts), len(signal_ids)
        ids = torch.randint(0, 32000, (B, T), generator=g, dtype=torch.int64)
        ids[torch.isin(ids, signal_ids)] = 1  # no accidental signal/separator ids
        for b, s in enumerate(starts):
            ids[b, s:s + n] = signal_ids
        for b, t, v in extra:
            ids[b, t] = v
        hidden, embeds = randn(g, B, T, C), randn(g, B, T, C)
        idx = torch.stack([torch.arange(s, s + n) for s in starts])  # the positions, by design
        out = torch.gather(hidden + embeds, 1, idx.unsqueeze(-1).expand(B, n, C))
        check(f"gather {c}", out, gather_manual(hidden, embeds, ids, signal_ids), tol=0.0)
        tensors.update({f"{c}.hidden": hidden, f"{c}.embeds": embeds,
                        f"{c}.token_ids": ids, f"{c}.signal_ids": signal_ids, f"{c}.out": out})
        meta[c] = json.dumps({})

    # c0: NExT-GPT image style [IMG0..IMG3] = 32000..32003, a different start per row
    add("c0", 12, 8, torch.arange(32000, 32004), [3, 0, 8])
    # c1: one row, signal tokens at the very end, one token of them
    add("c1", 6, 5, torch.tensor([32010]), [5])
    # c2: v1.5 style, signals interleaved with a repeated separator id (29871, < 32000);
    # the separator also occurs before and after the block, where it must be skipped
    sep = 29871
    sig = torch.tensor([32100, sep, 32101, sep, 32102])
    add("c2", 14, 6, sig, [4, 9], extra=[(0, 1, sep), (0, 10, sep), (1, 0, sep)])
    save("gather_signal_tokens.safetensors", tensors, meta)


def main():
    print(f"torch {torch.__version__}")
    for i, (name, cfg) in enumerate(MODEL_CONFIGS):
        make_model_fixture(1000 + i, name, cfg)
    make_linear(1)
    make_layer_norm(2)
    make_attention(3)
    make_alignment_loss(4)
    make_gather(5)


if __name__ == "__main__":
    main()
