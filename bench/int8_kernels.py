"""Which int8 kernel SHOAL_QUANTIZE=int8 should use: one 8192x1024 linear at batch 1, weights read from DRAM.

Each candidate runs over COPIES distinct weight matrices in turn (float32: 768 MiB, beyond any cache), so every call
reads its weights from memory as a decode step does. Rounds interleave the candidates, so a noisy neighbour slows
them alike; the medians and minimums are per call, and the ratios are against float32 in the same run.

    .venv/bin/python bench/int8_kernels.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

OUT_FEATURES, IN_FEATURES = 8192, 1024
COPIES = 24  # x 32 MiB of float32 weights


def candidates() -> dict:
    """name -> list of zero-argument calls, one per weight copy."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, IN_FEATURES, generator=gen)
    weights = [torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * 0.02 for _ in range(COPIES)]
    dynamic = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for w in weights:
            linear = torch.nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
            linear.weight.data = w
            dynamic.append(quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                            dtype=torch.qint8)[0])
    packed = []
    for w in weights:
        scale = w.abs().amax(dim=1) / 127
        packed.append((torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale))
    return {
        "float32 F.linear": [lambda w=w: F.linear(x, w) for w in weights],
        f"dynamic int8 Linear ({torch.backends.quantized.engine}, per channel; shoal's)": [lambda m=m: m(x)
                                                                                            for m in dynamic],
        "ATen _weight_int8pack_mm": [lambda q=q, s=s: torch._weight_int8pack_mm(x, q, s) for q, s in packed],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calls = candidates()
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fns in calls.items():
                fns[0]()
                t0 = time.perf_counter()
                for fn in fns:
                    fn()
                times[name].append((time.perf_counter() - t0) / len(fns) * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {OUT_FEATURES}x{IN_FEATURES} at batch 1, "
          f"{args.rounds} rounds")
    base = statistics.median(times["float32 F.linear"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name:62s} median {med:6.3f} ms  min {min(t):6.3f} ms  {base / med:5.2f}x float32's speed")


if __name__ == "__main__":
    main()
