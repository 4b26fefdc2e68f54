"""The scale of flow-matching velocity errors relative to ε errors, per family: the ratio ``r = E[(1 − σ)²]`` that
turns an ε-family ``beta`` into a velocity-error ``beta`` (``β·r``), see docs/supported_models.md ("Choosing beta").

For each family's default noise-level density and shift (at its usual training resolution), by midpoint quadrature
over ``u``, through the library's own ``sigmas_from_uniform`` and shifts:

- analytic: ``E[(1 − σ)²]``;
- error-weighted: the same mean weighted by the irreducible velocity error of unit-variance Gaussian latents,
  ``Var(v | x_t) = 1 / (1 − 2σ + 2σ²)``.

    python benchmarks/flow_error_scale.py
"""

import argparse
import math

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

from trl_diffusion.models.flow_matching import shift_sigmas, sigmas_from_uniform
from trl_diffusion.models.resolution_shift import linear_mu, time_shift


def family_sigmas(name: str, u: torch.Tensor, scheme: str) -> torch.Tensor:
    """Training noise levels of a family's default scheduler, at 1024 px for the resolution-shifted ones."""
    sigmas = sigmas_from_uniform(u, scheme).clamp(1e-3, 1.0)
    if name in ("SD3/3.5", "Z-Image"):
        return shift_sigmas(sigmas, 3.0)
    if name == "Qwen-Image":
        # base_shift = max_shift = ln 3: the same mu at every resolution
        mu = linear_mu(4096, {"base_shift": math.log(3), "max_shift": math.log(3), "max_image_seq_len": 8192})
        return time_shift(sigmas, mu)
    if name.startswith("Flux.2"):
        side = int(name.split("@")[1]) // 16
        return time_shift(sigmas, compute_empirical_mu(side * side, 50))
    return sigmas  # Flux.1: no shift at training time (the default)


def ratios(name: str, scheme: str, num: int) -> tuple[float, float]:
    u = (torch.arange(num, dtype=torch.float64) + 0.5) / num
    sigmas = family_sigmas(name, u, scheme)
    ratio = (1 - sigmas) ** 2
    weights = 1 / (1 - 2 * sigmas + 2 * sigmas**2)
    return ratio.mean().item(), ((weights * ratio).sum() / weights.sum()).item()


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200_000, help="quadrature points in u")
    args = parser.parse_args(argv)
    rows = []
    families = ["SD3/3.5", "Flux.1", "Flux.2@512", "Flux.2@1024", "Qwen-Image", "Z-Image"]
    for name in families:
        for scheme in ("logit_normal", "uniform", "mode"):
            analytic, weighted = ratios(name, scheme, args.num)
            rows.append((name, scheme, analytic, weighted))
            print(f"{name:12s} {scheme:13s} E[(1-sigma)^2] = {analytic:.3f}  error-weighted = {weighted:.3f}")
    return rows


if __name__ == "__main__":
    main()
