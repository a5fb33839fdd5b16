"""Full-size projectors made by PyTorch against `outproj run --device cpu`.

Builds NExT-GPT-sized projectors (512 wide, 4+4 layers, in_dim 4096) with
torch.nn.Transformer and non-trivial random weights, writes them as checkpoints the
way NExT-GPT names them, runs the given `outproj` binary on them and compares its
output with PyTorch's float64 forward. Exits non-zero if any case exceeds the tolerance:
1e-9 for the float64 CPU reference, 1e-4 for the f32 GPU backends.

    python tests/golden/check_full_size.py target/release/outproj [workdir] [--device cpu|wgpu|cuda]
        [--format safetensors|pt]

`--format pt` writes the checkpoints and inputs with torch.save instead, as NExT-GPT
saves its own: an OrderedDict of nn.Parameter, beside a LoRA-like tensor the loader
must pass over.

Needs torch and safetensors; not run in CI (the files are ~130 MB each).
"""
import json
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nextgpt_model import full_size, gen, randomize_  # noqa: E402

TOLERANCE = {"cpu": 1e-9, "wgpu": 1e-4, "cuda": 1e-4}
# name, variant, modality flag, prefix, heads, n_in, n_out, out_dim, batch, stored dtype, extra flags
CASES = [
    ("image_legacy", "legacy", "image", "gen_text_hidden_fcs.0.", 4, 4, 77, 768, 1, torch.float32, []),
    ("audio_legacy", "legacy", "audio", "gen_text_hidden_fcs_audio.0.", 4, 8, 1, 512, 2, torch.float16, []),
    ("image_v15", "v1.5", "image", "model.mm_output_img_projector.", 4, 7, 77, 1024, 2, torch.bfloat16, []),
    ("custom_8_heads", "legacy", None, "", 8, 6, 5, 300, 3, torch.float32, ["--heads", "8"]),
]


def main():
    args = sys.argv[1:]
    device = "cpu"
    if "--device" in args:
        i = args.index("--device")
        device = args[i + 1]
        del args[i:i + 2]
    fmt = "safetensors"
    if "--format" in args:
        i = args.index("--format")
        fmt = args[i + 1]
        del args[i:i + 2]
    tol = TOLERANCE[device]
    exe = os.path.abspath(args[0])
    work = args[1] if len(args) > 1 else tempfile.mkdtemp(prefix="outproj-full-")
    os.makedirs(work, exist_ok=True)
    torch.set_num_threads(2)
    worst, failed = 0.0, False
    for i, (name, variant, modality, prefix, heads, n_in, n_out, out_dim, batch, dtype, extra) in enumerate(CASES):
        g = gen(1000 + i)
        model = full_size(variant, out_dim, n_out, heads).double().eval()
        randomize_(model, g)
        sd = {prefix + k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        # what the file holds is the model: compute from the stored (rounded) values
        model.load_state_dict({k[len(prefix):]: v.double() for k, v in sd.items()})
        hidden = torch.randn(batch, n_in, 4096, generator=g, dtype=torch.float64).float()
        embeds = torch.randn(batch, n_in, 4096, generator=g, dtype=torch.float64).float()
        with torch.no_grad():
            want = model(hidden.double(), embeds.double())
        ext = "pt" if fmt == "pt" else "safetensors"
        wpath, ipath = (os.path.join(work, f"{name}.{s}.{ext}") for s in ("weights", "input"))
        opath = os.path.join(work, f"{name}.out.safetensors")
        if fmt == "pt":
            ckpt = OrderedDict((k, torch.nn.Parameter(v)) for k, v in sd.items())
            ckpt["llama_model.base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = \
                torch.nn.Parameter(torch.randn(32, 4096, generator=g).half())
            torch.save(ckpt, wpath)
            torch.save({"hidden": hidden, "embeds": embeds}, ipath)
        else:
            save_file(sd, wpath)
            save_file({"hidden": hidden, "embeds": embeds}, ipath)
        cmd = [exe, "run", "--device", device, "--weights", wpath, "--input", ipath, "--output", opath] + extra
        if modality:
            cmd += ["--modality", modality]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: outproj failed: {r.stderr.strip()}")
            failed = True
            continue
        got = load_file(opath)["conditioning"].double()
        rel = ((got - want).norm() / want.norm()).item() if got.shape == want.shape else float("inf")
        worst = max(worst, rel)
        ok = rel <= tol
        failed |= not ok
        print(f"{name:<16} {str(list(want.shape)):<16} stored {str(dtype)[6:]:<9} {ext:<11} rel {rel:.2e}  {'ok' if ok else 'FAIL'}")
    print(json.dumps({"device": device, "format": fmt, "worst_rel": worst, "tolerance": tol, "passed": not failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
