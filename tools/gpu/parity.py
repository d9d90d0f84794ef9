"""GPU correctness on the committed fixtures, through `vidgen run-component` (the same door as the
CPU tests). For each fixture: the GPU output in f32 and bf16 against the diffusers/transformers
reference output stored with the fixture, and against the CPU output of the same binary.
Limits (issue 7): f32 <= 1e-4, bf16 <= 2e-2 relative. The VAE fixtures' perturbed random weights make
bf16 rounding itself exceed 2e-2 (diffusers' own bf16 decode of the Wan2.1 fixture is ~3.5e-2 off its
f32 output), so where diffusers is importable the VAE cases run it in bf16 on the same GPU and inputs,
and their bf16 limit is the larger of 2e-2 and 1.25x diffusers' own bf16 error (printed as
`reference_bf16_rel_err`). Prints one JSON line per case and exits 1 if any case fails. Needs python3
with torch and safetensors (the GPU machine's PyTorch install); diffusers optional.

    python3 tools/gpu/parity.py path/to/vidgen [NAME_PREFIX,...]   # e.g. dit,denoise
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FX = ROOT / "tests" / "fixtures"
LIMITS = {"f32": 1e-4, "bf16": 2e-2}

# (name, component, model, inputs, our output key, reference key, --set values)
CASES = [
    ("dit t2v", "dit", "dit/t2v/transformer", "dit/t2v/io.safetensors", "output", "output", []),
    ("dit i2v", "dit", "dit/i2v/transformer", "dit/i2v/io.safetensors", "output", "output", []),
    ("dit ti2v per-token t", "dit", "dit/ti2v/transformer", "dit/ti2v/io.safetensors", "output", "output", []),
    ("denoise a14b unipc", "denoise", "dit/pipe_a14b_unipc", "dit/pipe_a14b_unipc/io.safetensors", "latents", "output",
     ["steps=6", "guidance_scale=4", "guidance_scale_2=3"]),
    ("denoise ti2v euler", "denoise", "dit/pipe_ti2v_euler", "dit/pipe_ti2v_euler/io.safetensors", "latents", "output",
     ["steps=4", "guidance_scale=5"]),
    ("vae2.1 decode", "vae-decode", "vae/wan21/diffusers", "vae/wan21/io.safetensors", "sample", "decoded", []),
    ("vae2.1 encode", "vae-encode", "vae/wan21/diffusers", "vae/wan21/io.safetensors", "latent_mean", "latent_mean", []),
    ("vae2.2 decode", "vae-decode", "vae/wan22/diffusers", "vae/wan22/io.safetensors", "sample", "decoded", []),
    ("vae2.2 encode", "vae-encode", "vae/wan22/diffusers", "vae/wan22/io.safetensors", "latent_mean", "latent_mean", []),
    ("umt5 encoder", "text-encode", "text/text_encoder", "text/encoder.safetensors", "last_hidden_state",
     "last_hidden_state", []),
]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def diffusers_bf16_error(comp, model, inputs, ref):
    """diffusers' own bf16 error on a VAE case (same GPU, same inputs), or None without diffusers."""
    if not comp.startswith("vae-"):
        return None
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        return None
    try:
        vae = AutoencoderKLWan.from_pretrained(str(FX / model), torch_dtype=torch.bfloat16).to("cuda").eval()
        io = load_file(str(FX / inputs))
        with torch.no_grad():
            if comp == "vae-decode":
                out = vae.decode(io["latents"].to("cuda", torch.bfloat16)).sample
            else:
                out = vae.encode(io["sample"].to("cuda", torch.bfloat16)).latent_dist.mean
    except Exception as e:  # the plain 2e-2 limit then applies
        print(json.dumps({"case": f"{comp} {model}", "diffusers_bf16_error": str(e)[-300:]}), flush=True)
        return None
    return rel_err(out.float().cpu(), ref)


def run(vidgen, component, model, inputs, settings, device, dtype, out):
    cmd = [vidgen, "run-component", component, "--model", str(FX / model), "--inputs", str(FX / inputs),
           "--output", str(out), "--device", device, "--dtype", dtype]
    if settings:
        cmd += ["--set", *settings]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()[-400:]}")
    return load_file(str(out))


def main():
    vidgen = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, comp, model, inputs, key, ref_key, settings in CASES:
            if only and not any(name.startswith(o) for o in only):
                continue
            ref = load_file(str(FX / inputs))[ref_key]
            try:
                cpu = run(vidgen, comp, model, inputs, settings, "cpu", "f32", Path(tmp) / "cpu.safetensors")[key]
            except RuntimeError as e:
                print(json.dumps({"case": name, "device": "cpu", "error": str(e)}), flush=True)
                failed += 1
                continue
            peer = diffusers_bf16_error(comp, model, inputs, ref)
            for dtype in ("f32", "bf16"):
                limit = LIMITS[dtype]
                if dtype == "bf16" and peer is not None:
                    limit = max(limit, 1.25 * peer)
                try:
                    gpu = run(vidgen, comp, model, inputs, settings, "cuda", dtype, Path(tmp) / "gpu.safetensors")[key]
                except RuntimeError as e:
                    print(json.dumps({"case": name, "dtype": dtype, "error": str(e)}), flush=True)
                    failed += 1
                    continue
                e_ref, e_cpu = rel_err(gpu, ref), rel_err(gpu, cpu)
                ok = bool(torch.isfinite(gpu).all()) and e_ref <= limit and e_cpu <= limit
                failed += not ok
                line = {"case": name, "dtype": dtype, "rel_err_vs_reference": e_ref,
                        "rel_err_vs_cpu": e_cpu, "cpu_vs_reference": rel_err(cpu, ref), "limit": limit,
                        "pass": ok}
                if dtype == "bf16" and peer is not None:
                    line["reference_bf16_rel_err"] = peer
                print(json.dumps(line), flush=True)
    print(json.dumps({"parity_failures": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
