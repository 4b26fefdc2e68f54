"""The noise rules (`trl_diffusion.noise`): per-pair seeds, the step that seeds them, and the named draws."""

import pytest
import torch
from helpers.rows import make_pickapic
from peft import LoraConfig

from trl_diffusion import DiffusionDPOConfig, DiffusionDPOTrainer
from trl_diffusion.noise import (
    EVAL_NOISE_STEP,
    FIXED_NOISE_STEP,
    PairDraws,
    noise_step,
    pair_randomness,
    pair_seed,
)


def test_pair_seed_is_the_documented_mix_and_fits_63_bits():
    assert pair_seed(0, EVAL_NOISE_STEP, 0) == 0  # the evaluation step is -1: (step + 1) vanishes
    for seed, step, row in [(0, 0, 0), (42, 7, 3), (2**40, 10**6, 10**7)]:
        expected = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9 + row * 0x94D049BB133111EB) % 2**63
        assert pair_seed(seed, step, row) == expected
        assert 0 <= pair_seed(seed, step, row) < 2**63
    seeds = {pair_seed(0, step, row) for step in range(-1, 20) for row in range(50)}
    assert len(seeds) == 21 * 50  # every (step, row) gets its own seed


def test_noise_step_rule():
    assert noise_step("train", 5) == 5
    assert noise_step("train", 5, fixed_step=FIXED_NOISE_STEP) == FIXED_NOISE_STEP == 0
    assert noise_step("eval", 5) == EVAL_NOISE_STEP == -1
    assert noise_step("eval", 5, fixed_step=FIXED_NOISE_STEP) == EVAL_NOISE_STEP  # evaluation keeps its own step


def test_pair_randomness_draws_from_one_generator_per_pair_in_the_documented_order():
    draws = pair_randomness(torch.tensor([3, 9]), (4, 2, 2), seed=11, step=6)
    assert isinstance(draws, PairDraws)
    assert draws.noise.shape == (2, 4, 2, 2)
    assert all(values.shape == (2,) for values in (draws.timestep, draws.caption_dropout, draws.flip))
    for position, row in enumerate([3, 9]):
        generator = torch.Generator().manual_seed(pair_seed(11, 6, row))
        noise = torch.randn((4, 2, 2), generator=generator)
        timestep, caption_dropout, flip = torch.rand(3, generator=generator)
        torch.testing.assert_close(draws.noise[position], noise, rtol=0, atol=0)
        assert draws.timestep[position] == timestep
        assert draws.caption_dropout[position] == caption_dropout
        assert draws.flip[position] == flip


def test_pair_randomness_depends_on_the_row_not_on_the_batch():
    together = pair_randomness([5, 2, 8], (3, 4), seed=0, step=1)
    alone = pair_randomness([2], (3, 4), seed=0, step=1)
    for field in PairDraws._fields:
        torch.testing.assert_close(getattr(together, field)[1], getattr(alone, field)[0], rtol=0, atol=0)
    other_step = pair_randomness([2], (3, 4), seed=0, step=2)
    other_seed = pair_randomness([2], (3, 4), seed=1, step=1)
    assert not torch.equal(other_step.noise, alone.noise) and not torch.equal(other_seed.noise, alone.noise)
    uniforms = torch.cat([together.timestep, together.caption_dropout, together.flip])
    assert ((uniforms >= 0) & (uniforms < 1)).all()


def test_pair_draws_to_device_keeps_every_value():
    draws = pair_randomness([0, 1, 2], (2, 2), seed=3, step=0)
    moved = draws.to(torch.device("cpu"))
    for field in PairDraws._fields:
        torch.testing.assert_close(getattr(moved, field), getattr(draws, field), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_trainer_noises_each_pair_with_its_seeded_draws(tiny_sd, tmp_path, mode):
    args = DiffusionDPOConfig(
        output_dir=str(tmp_path), resolution=16, report_to="none", bf16=False, precompute_encodings=False, seed=4
    )
    trainer = DiffusionDPOTrainer(
        model=tiny_sd, args=args, train_dataset=make_pickapic(4), peft_config=LoraConfig(r=4, lora_alpha=8)
    )
    trainer.state.global_step = 3
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in (2, 0)])  # on the CPU, the trainer's device
    step = trainer.prepare_step(inputs, mode)
    latents = trainer.encode_images(inputs["pixel_values"])
    draws = pair_randomness([2, 0], latents.shape[1:], seed=4, step=3 if mode == "train" else EVAL_NOISE_STEP)
    timesteps = trainer.family.timesteps_from_uniform(draws.timestep).repeat(2)
    torch.testing.assert_close(step.timesteps, timesteps, rtol=0, atol=0)
    expected = trainer.family.noisy_input(latents, draws.noise.repeat(2, 1, 1, 1), timesteps)
    torch.testing.assert_close(step.noisy_latents, expected)
    # A fixed noise step (as with precomputed reference errors) seeds every training step alike.
    trainer.fixed_noise_step = FIXED_NOISE_STEP
    fixed = pair_randomness([2, 0], latents.shape[1:], seed=4, step=FIXED_NOISE_STEP if mode == "train" else -1)
    expected = trainer.family.timesteps_from_uniform(fixed.timestep).repeat(2)
    torch.testing.assert_close(trainer.prepare_step(inputs, mode).timesteps, expected, rtol=0, atol=0)
