"""NExT-GPT's output projector in PyTorch, as the golden fixtures, the full-size check
and the PyTorch benchmark build it.  Needs torch only.

The shapes and names follow /SPEC: nn.Transformer with NExT-GPT's arguments (pre-LN,
no dropout, batch first), an input Linear and an output Linear around it, and learned
queries for the decoder.
"""

import math

import torch
import torch.nn as nn

F64 = torch.float64

# The released model's sizes (every preset shares them; only n_in/n_out/out_dim differ).
IN_DIM, D_MODEL, HEADS, FFN, LAYERS = 4096, 512, 4, 2048, 4


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


NAMES = {"legacy": ("fc", "model"), "v1.5": ("in_fc", "out_fc")}


class Projector(nn.Module):
    """NExT-GPT's output projector: TextFcLayer 'gill_mapper' (legacy names fc/tfm/model/
    query_embs) or the v1.5 TransformersProjector (in_fc/tfm/out_fc/query_embs)."""

    def __init__(self, variant, in_dim, out_dim, n_out, d_model, nhead, ffn, n_enc, n_dec):
        super().__init__()
        self.fc_name, self.out_name = NAMES[variant]
        # Registration order fixes the state_dict order: fc, tfm, model, query_embs.
        setattr(self, self.fc_name, nn.Linear(in_dim, d_model))
        self.tfm = nn.Transformer(
            d_model=d_model, nhead=nhead, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
            dim_feedforward=ffn, dropout=0.0, batch_first=True, norm_first=True)
        setattr(self, self.out_name, nn.Linear(d_model, out_dim))
        self.query_embs = nn.Parameter(torch.randn(1, n_out, d_model))

    def forward(self, x, input_embs=None):
        if input_embs is not None:  # None: the caller already added them (or has none)
            x = x + input_embs
        x = getattr(self, self.fc_name)(x)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return getattr(self, self.out_name)(x)


def full_size(variant, out_dim, n_out, heads=HEADS):
    """A projector at NExT-GPT's real size (in_dim 4096, 512 wide, 4 + 4 layers)."""
    return Projector(variant, IN_DIM, out_dim, n_out, D_MODEL, heads, FFN, LAYERS, LAYERS)


def randomize_(model, g):
    """Overwrite every parameter with non-trivial seeded values (activations stay O(1))."""
    layer_norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if owner in layer_norms:
                v = 1 + 0.2 * randn(g, *p.shape) if leaf == "weight" else 0.1 * randn(g, *p.shape)
            elif name == "query_embs":
                v = randn(g, *p.shape)
            elif p.dim() == 1:  # every bias, in_proj_bias and out_proj.bias included
                v = 0.1 * randn(g, *p.shape)
            else:  # weight matrix [out, in]
                v = randn(g, *p.shape) / math.sqrt(p.shape[1])
            p.copy_(v)
