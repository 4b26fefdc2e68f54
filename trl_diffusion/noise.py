"""The noise rules: which random draws each pair gets at each step, and how they are seeded.

Every random decision of a training or evaluation step (the noise tensor, the timestep, the caption dropout and the
flip of a cached pair) is drawn from one generator per pair, seeded by ``pair_seed(seed, step, row)``. The draws
therefore depend only on the run's seed, the step that seeds them and the pair's dataset row, never on how rows are
split into micro-batches or processes: batch 4 and batch 2 x accumulation 2 see the same noise, a resumed run
continues with the same draws, and a pair's chosen and rejected images share their noise, timestep and flip.

The step that seeds the draws (see [`noise_step`][]):

- in training, the optimizer step (``TrainerState.global_step``), so each step sees new noise;
- in evaluation, ``EVAL_NOISE_STEP``, so every evaluation scores the same noise and its metrics are comparable;
- with precomputed reference errors, ``FIXED_NOISE_STEP`` at every training step, so that the stored reference
  errors are exactly those of the live reference at every step.
"""

from typing import NamedTuple

import torch


# The step whose seeds fix the noise and timestep of every training pair when reference errors are precomputed
FIXED_NOISE_STEP = 0
# The step whose seeds fix the noise and timestep of every evaluation pair, at every evaluation of a run
EVAL_NOISE_STEP = -1


def pair_seed(seed: int, step: int, row: int) -> int:
    """A 63-bit seed for the noise, timestep and caption dropout of one pair at one optimizer step.

    A fixed mix of the three integers (odd 64-bit multipliers of the SplitMix64 family), so nearby rows and steps
    get unrelated seeds.

    Args:
        seed: the run's seed (``args.seed``).
        step: the step that seeds the draws (see [`noise_step`][]).
        row: the pair's row in its source dataset.

    Returns:
        The seed, in ``[0, 2^63)``.
    """
    return (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + row * 0x94D049BB133111EB) % (1 << 63)


def noise_step(mode: str, global_step: int = 0, fixed_step: int | None = None) -> int:
    """The step that seeds a pair's draws (see [`pair_seed`][]).

    Args:
        mode: ``"train"`` or ``"eval"``.
        global_step: the optimizer step, used in training unless ``fixed_step`` is set.
        fixed_step: a step that seeds every training step alike (``FIXED_NOISE_STEP`` when reference errors are
            precomputed), or ``None``.

    Returns:
        ``EVAL_NOISE_STEP`` in evaluation; in training ``fixed_step`` if set, else ``global_step``.
    """
    if mode != "train":
        return EVAL_NOISE_STEP
    return global_step if fixed_step is None else fixed_step


class PairDraws(NamedTuple):
    """The random draws of a batch of pairs, one row per pair, in the order of ``row_index``.

    Attributes:
        noise: ``(B, *latent_shape)`` standard normal noise, shared by the images of a pair.
        timestep: ``(B,)`` uniforms in ``[0, 1)`` that the model family maps to timesteps.
        caption_dropout: ``(B,)`` uniforms: a pair's caption is dropped where it is below ``proportion_empty_prompts``.
        flip: ``(B,)`` uniforms: a cached pair reads its flipped latents where it is below ``0.5``.
    """

    noise: torch.Tensor
    timestep: torch.Tensor
    caption_dropout: torch.Tensor
    flip: torch.Tensor

    def to(self, device: torch.device) -> "PairDraws":
        """The same draws on ``device``, in two non-blocking copies (pinned host memory on CUDA)."""
        noise, uniforms = self.noise, torch.stack([self.timestep, self.caption_dropout, self.flip], dim=1)
        if device.type == "cuda":
            noise, uniforms = noise.pin_memory(), uniforms.pin_memory()
        noise, uniforms = noise.to(device, non_blocking=True), uniforms.to(device, non_blocking=True)
        return PairDraws(noise, *uniforms.unbind(dim=1))


def pair_randomness(
    row_index: torch.Tensor | list[int], latent_shape: torch.Size | tuple[int, ...], seed: int, step: int
) -> PairDraws:
    """The draws of each pair of a batch, on the host, from one generator per pair seeded by [`pair_seed`][].

    Each pair's generator draws, in this order, its noise ``(*latent_shape)``, then its timestep and caption-dropout
    uniforms, then its flip uniform (drawn last, so that adding the flip left the earlier draws, and past runs'
    noise, unchanged).

    Args:
        row_index: ``(B,)`` dataset rows of the pairs.
        latent_shape: the shape of one image's latents, ``(C, h, w)`` (or ``(C, F, h, w)`` for videos).
        seed: the run's seed.
        step: the step that seeds the draws (see [`noise_step`][]).

    Returns:
        The [`PairDraws`][] of the batch, on the CPU.
    """
    rows = row_index.tolist() if isinstance(row_index, torch.Tensor) else list(row_index)
    noise, uniforms = [], []
    for row in rows:
        generator = torch.Generator().manual_seed(pair_seed(seed, step, row))
        noise.append(torch.randn(latent_shape, generator=generator))
        uniforms.append(torch.cat([torch.rand(2, generator=generator), torch.rand(1, generator=generator)]))
    timestep, caption_dropout, flip = torch.stack(uniforms).unbind(dim=1)
    return PairDraws(torch.stack(noise), timestep, caption_dropout, flip)
