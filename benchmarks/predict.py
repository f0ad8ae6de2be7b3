"""The sampler's choice per NFE: logits copied to the host and predicted there (before) vs predicted where the
logits are, with only the [B, S] ids and confidences copied (`sampler.predict_to_host`, now), one run.

A denoiser step of Nano returns [B, 16, 131072] fp32 logits (8 MB for one sequence); a decode step [B,
131072]. On the CPU both columns do the same work (a check of the script and the host cost that moves to
the GPU); on CUDA the first pays the device-to-host copy and a CPU softmax per NFE.

A second table samples (temperature 0.8): the Gumbel noise drawn on the host and copied over (before) vs
drawn where the logits are (`sampler.uniform`, now): as many uniforms as logits per NFE.

    python benchmarks/predict.py                  # CPU
    python benchmarks/predict.py --device cuda    # what gpu_check section 7 prints
"""

from __future__ import annotations

import argparse

import torch
from moe import best_ms  # benchmarks/ is the script's folder

from twotower_cli import sampler as S


def run(device: torch.device, vocab: int = 131072, rounds: int = 5, inner: int = 10) -> None:
    cfg = S.SamplingConfig(mode="mask_diffusion", block_size=16, threshold=0.8, max_new_tokens=16, mask_token_id=3)
    g = torch.Generator().manual_seed(0)
    print(f"sampler choice per NFE · vocab {vocab} · greedy · {device} · best of {rounds}×{inner}, ms")
    print(f"{'logits':>16}{'host (before)':>15}{'device (now)':>14}{'ratio':>8}")
    for shape in ((1, vocab), (1, 16, vocab), (4, 16, vocab)):
        logits = torch.randn(*shape, generator=g).to(device)

        def before(logits=logits):
            return S.predict(logits.cpu(), cfg, None, 3)

        def now(logits=logits):
            return S.predict_to_host(logits, cfg, None, 3)

        if device.type == "cpu":  # the same computation there
            assert all(torch.equal(a, b) for a, b in zip(before(), now(), strict=True))
        times = {"before": float("inf"), "now": float("inf")}
        for _ in range(rounds):  # interleaved
            times["before"] = min(times["before"], best_ms(before, device, 1, inner))
            times["now"] = min(times["now"], best_ms(now, device, 1, inner))
        label = "×".join(str(d) for d in shape[:-1]) + " × V"
        print(f"{label:>16}{times['before']:15.2f}{times['now']:14.2f}{times['before'] / times['now']:7.2f}×")

    hot = S.SamplingConfig(**{**cfg.__dict__, "temperature": 0.8})
    device_noise = S.uniform

    def host_noise(shape, generator, device):  # before: the CPU generator's draw, copied to the logits
        return torch.rand(shape, generator=generator).to(device)

    print(f"sampling (temperature 0.8) per NFE · noise drawn · {device} · best of {rounds}×{inner}, ms")
    print(f"{'logits':>16}{'host (before)':>15}{'device (now)':>14}{'ratio':>8}")
    for shape in ((1, vocab), (1, 16, vocab)):
        logits = torch.randn(*shape, generator=g).to(device)

        def sample(logits=logits, gen=torch.Generator().manual_seed(1)):
            return S.predict_to_host(logits, hot, gen, 3)

        times = {"before": float("inf"), "now": float("inf")}
        try:
            for _ in range(rounds):
                S.uniform = host_noise
                times["before"] = min(times["before"], best_ms(sample, device, 1, inner))
                S.uniform = device_noise
                times["now"] = min(times["now"], best_ms(sample, device, 1, inner))
        finally:
            S.uniform = device_noise
        label = "×".join(str(d) for d in shape[:-1]) + " × V"
        print(f"{label:>16}{times['before']:15.2f}{times['now']:14.2f}{times['before'] / times['now']:7.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=10)
    args = ap.parse_args()
    run(torch.device(args.device), rounds=args.rounds, inner=args.inner)


if __name__ == "__main__":
    main()
