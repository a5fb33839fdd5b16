#!/usr/bin/env python3
"""Write PyTorch checkpoints (torch.save) beside the safetensors fixtures, so that the
reader of PyTorch's format is checked against files PyTorch itself wrote.

- torch_legacy_b1.pt: model_legacy_b1's weights as NExT-GPT saves its checkpoint: an
  OrderedDict of nn.Parameter (requires_grad) under the checkpoint prefix, with
  torch.save's defaults (pickle protocol 2). Read back, it must give the safetensors
  fixture's tensors bit for bit, and the projector the fixture's output.
- torch_mixed.pt + torch_mixed.expected.safetensors: a training-style dict written with
  pickle protocol 4: a module's state_dict() (with its _metadata) nested in a dict,
  plain Python values and an argparse.Namespace beside it, tensors that view one storage
  at different offsets, f64/f16/bf16/i64/i32/u8/bool storages, empty and 0-dim tensors,
  tensors in lists and tuples, a set, and values the reader must refuse by name when
  asked for them (a transposed view, a quantized and a complex tensor, an object, and
  names that two values share once keys are joined with '.'). `expected` holds each readable tensor as a
  contiguous copy under its name, nested dicts' names joined with '.'; its metadata
  lists the names that must be refused.
- torch_legacy_format.pt: a state dict saved with _use_new_zipfile_serialization=False
  (the format before PyTorch 1.6), which the reader refuses with a message.
- torch_repacked.pt, torch_big_endian.pt: torch_mixed.pt's records rewritten by Python's
  zipfile, deflated, and with a byteorder record of "big": both refused with a message.

Usage:  python tests/golden/make_torch_checkpoints.py   (needs torch, safetensors; CPU)
torch.save writes a random serialization id, so reruns differ in bytes, not content.
"""

import argparse
import collections
import json
import os
import zipfile

import torch
from safetensors.torch import load_file, save_file

OUT_DIR = os.path.dirname(os.path.abspath(__file__))


def out(name):
    return os.path.join(OUT_DIR, name)


def nextgpt_style():
    weights = load_file(out("model_legacy_b1.weights.safetensors"))
    prefix = "gen_text_hidden_fcs_video.0."
    ckpt = collections.OrderedDict()
    for k, v in weights.items():
        if k.startswith(prefix):
            ckpt[k] = torch.nn.Parameter(v.clone(), requires_grad=True)
    torch.save(ckpt, out("torch_legacy_b1.pt"))
    back = torch.load(out("torch_legacy_b1.pt"), weights_only=True)
    assert all(torch.equal(back[k], weights[k]) for k in ckpt)
    print(f"wrote torch_legacy_b1.pt: {len(ckpt)} parameters")


def mixed():
    g = torch.Generator().manual_seed(7)
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    big = torch.randn(6, 4, generator=g, dtype=torch.float64)
    half = torch.randn(10, generator=g).half()
    readable = {
        "model": module.state_dict(),
        "views": {
            "rows_1_3": big[1:3],  # storage offset 4, the storage shared with `whole`
            "whole": big,
            "tail": half[7:],
            "row_col": big[2:3, :],  # a size-1 dimension
        },
        "dtypes": {
            "bf16": torch.randn(2, 3, generator=g).bfloat16(),
            "i64": torch.tensor([[32000, -1], [7, 2**40]], dtype=torch.int64),
            "i32": torch.tensor([3, -4], dtype=torch.int32),
            "u8": torch.tensor([0, 255], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
        },
        "empty": torch.zeros(0, 4),
        "empty_3_0": torch.zeros(3, 0),  # strides (1, 1): any stride goes when empty
        "empty_2_0_4": torch.zeros(2, 0, 4),
        "scalar": torch.tensor(2.5),
        "layers": [torch.randn(2, generator=g), {"w": torch.randn(3, generator=g)}],
        "pair": (torch.randn(1, generator=g), torch.randn(1, generator=g)),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    refused = {
        "refused.transposed": big.t(),
        "refused.quantized": torch.quantize_per_tensor(torch.randn(4, generator=g), 0.1, 0, torch.qint8),
        "refused.complex": torch.randn(3, generator=g, dtype=torch.complex64),
        "args": argparse.Namespace(lr=1e-4, name="run"),
        "dup.x": None,  # both `dup.x` and `dup` = {"x": ...} below
        "ids.1": None,  # keys 1 and "1"
    }
    ckpt = dict(readable)
    ckpt["refused"] = {k.split(".", 1)[1]: v for k, v in refused.items() if k.startswith("refused.")}
    ckpt["args"] = refused["args"]
    ckpt["dup.x"] = torch.ones(1)
    ckpt["dup"] = {"x": torch.zeros(1)}
    ckpt["ids"] = {1: torch.ones(1), "1": torch.zeros(1)}
    ckpt["tags"] = {"a", "b"}  # protocol 4 writes sets with their own opcodes
    ckpt["epoch"] = 3
    ckpt["history"] = [0.5, 0.25, None, "text", b"bytes"]
    torch.save(ckpt, out("torch_mixed.pt"), pickle_protocol=4)

    expected = {}

    def flatten(v, name):
        if isinstance(v, dict):
            items = v.items()
        elif isinstance(v, (list, tuple)):
            items = enumerate(v)
        else:
            expected[name] = v.detach().contiguous().clone()
            return
        for k, x in items:
            flatten(x, f"{name}.{k}" if name else str(k))

    flatten(readable, "")
    meta = {"refused": json.dumps(sorted(refused))}
    save_file(expected, out("torch_mixed.expected.safetensors"), metadata=meta)
    back = torch.load(out("torch_mixed.pt"), weights_only=False)
    assert torch.equal(back["views"]["rows_1_3"], big[1:3])
    print(f"wrote torch_mixed.pt: {len(expected)} readable tensors, {len(refused)} refused")


def legacy_format():
    sd = {"w": torch.arange(4, dtype=torch.float32)}
    torch.save(sd, out("torch_legacy_format.pt"), _use_new_zipfile_serialization=False)
    print("wrote torch_legacy_format.pt")


def rewritten():
    with zipfile.ZipFile(out("torch_mixed.pt")) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(out("torch_repacked.pt"), "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in records:
            z.writestr(name, data)
    with zipfile.ZipFile(out("torch_big_endian.pt"), "w", zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, b"big" if name.endswith("/byteorder") else data)
    print("wrote torch_repacked.pt, torch_big_endian.pt")


if __name__ == "__main__":
    torch.manual_seed(0)
    nextgpt_style()
    mixed()
    legacy_format()
    rewritten()
    for name in ["torch_legacy_b1.pt", "torch_mixed.pt", "torch_mixed.expected.safetensors",
                 "torch_legacy_format.pt", "torch_repacked.pt", "torch_big_endian.pt"]:
        print(f"{name}: {os.path.getsize(out(name))} bytes")
