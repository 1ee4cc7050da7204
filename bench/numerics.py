"""bench/numerics.py: what pinning the CPU kernels to AVX2 costs (``numerics.cpu_isa: avx2``).

    .venv/bin/python bench/numerics.py [--steps 40] [--repeats 3]

The same workload runs in fresh processes with native kernels (what the CPU offers, e.g. AVX-512)
and with the portable AVX2 pinning, alternating, ``--repeats`` times each: training steps of the
tiny LLaVA of the embedded default (forward + backward + AdamW, batch 16) and greedy generation
(batch 16, 32 new tokens). Prints the median time of each and the ratio pinned / native, and the
sha256 of the trained weights under each (equal on an AVX2-only CPU, different where the CPU has
wider kernels: that difference is why the embedded default pins them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(models_dir: str, steps: int) -> dict:
    import hashlib
    import time

    import torch
    from PIL import Image

    from bpo_ray.models.loading import load_mllm
    from bpo_ray.models.mllm import encode_prompts
    from bpo_ray.models.prompts import build_prompt

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, processor = load_mllm(str(Path(models_dir) / "llava"), device="cpu")
    images = [Image.new("RGB", (32, 32), (40 * i % 255, 90, 160)) for i in range(16)]
    prompts = [build_prompt("Describe the image in detail.") for _ in images]
    enc = encode_prompts(processor, images, prompts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        out.loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    generate_s = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return {"train_s": train_s, "generate_s": generate_s, "sha256": digest,
            "capability": str(torch.backends.cpu.get_cpu_capability())}


def main() -> int:
    from bpo_ray import numerics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", nargs=2, metavar=("MODELS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]))))
        return 0

    from bpo_ray.models.tiny import build_tiny_models

    base_env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV["avx2"]}
    envs = {"native": base_env, "avx2": {**base_env, **numerics.env_vars("avx2")}}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_models(tmp, seed=0)
        for _ in range(args.repeats):
            for name, env in envs.items():
                done = subprocess.run([sys.executable, __file__, "--worker", tmp, str(args.steps)], env=env,
                                      capture_output=True, text=True, check=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("train_s", "generate_s")} for name, rs in runs.items()}
    print(f"{args.steps} training steps and one 32-token greedy generation, batch 16, tiny LLaVA, 2 threads; "
          f"median of {args.repeats} fresh processes each")
    for name, rs in runs.items():
        shas = sorted({r["sha256"][:16] for r in rs})
        print(f"  {name:7s} kernels {rs[0]['capability']:7s} train {med[name]['train_s']:6.2f} s  "
              f"generate {med[name]['generate_s']:6.2f} s  weights sha256 {', '.join(shas)}")
    print(f"  ratio avx2 / native: train {med['avx2']['train_s'] / med['native']['train_s']:.2f}x time, "
          f"generate {med['avx2']['generate_s'] / med['native']['generate_s']:.2f}x time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
