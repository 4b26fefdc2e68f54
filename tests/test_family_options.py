"""The families' options object (`trl_diffusion.models.options`) and the encoding cache key built from it."""

import dataclasses

import pytest
from diffusers import DiffusionPipeline

from trl_diffusion import DiffusionDPOConfig
from trl_diffusion.data import PreferenceDataset
from trl_diffusion.encodings import CacheOptions, Encoders, encodings_fingerprint
from trl_diffusion.models import FamilyOptions, get_family


def another_value(option: dataclasses.Field, value):
    """A valid value of ``option`` other than ``value``."""
    if option.name == "video_size":
        return (8, 16) if value is None else None
    if option.name == "weighting_scheme":
        return "uniform" if value != "uniform" else "mode"
    if option.name == "flow_loss_weighting":
        return "cosmap" if value != "cosmap" else "none"
    if isinstance(value, bool) or option.name in ("upcast_vae", "resolution_shift"):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value + 0.25
    return "other/vae" if isinstance(value, str) or option.name.endswith("name_or_path") else 7


def test_options_come_from_the_config_field_of_the_same_name(tmp_path):
    config = DiffusionDPOConfig(output_dir=str(tmp_path), video_size=[480, 832], guidance_scale=1.0, resolution=64)
    options = FamilyOptions.from_config(config)
    assert options.video_size == (480, 832) and options.guidance_scale == 1.0 and options.resolution == 64
    defaults = FamilyOptions.from_config(DiffusionDPOConfig(output_dir=str(tmp_path)))
    assert defaults == FamilyOptions()  # the options' defaults are the config's
    hash(options)  # frozen and hashable


@pytest.mark.parametrize("option", dataclasses.fields(FamilyOptions), ids=lambda option: option.name)
def test_every_option_is_in_the_cache_key_unless_it_is_step_only(option):
    base = FamilyOptions()
    changed = dataclasses.replace(base, **{option.name: another_value(option, getattr(base, option.name))})
    assert changed.key() != base.key()  # every option is in the reference errors' key
    step_only = option.name in {
        "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "flow_loss_weighting",
        "epsilon_equivalent_errors", "guidance_scale", "resolution_shift",
    }  # fmt: skip
    assert (changed.encoding_key() == base.encoding_key()) == step_only


def test_a_new_option_is_in_the_cache_key_without_being_listed_anywhere():
    extended = dataclasses.make_dataclass(
        "ExtendedOptions",
        [("text_encoder_layer", int, dataclasses.field(default=-2))],
        bases=(FamilyOptions,),
        frozen=True,
    )
    assert extended(text_encoder_layer=-1).encoding_key() != extended().encoding_key()


def test_the_fingerprint_follows_the_family_options(tiny_flux, tmp_path):
    from helpers.rows import make_pickapic

    pipeline = DiffusionPipeline.from_pretrained(tiny_flux)
    dataset = PreferenceDataset(make_pickapic(2), resolution=16)
    fingerprints = {}
    for name, options in {
        "default": FamilyOptions(resolution=16),
        "max_sequence_length": FamilyOptions(resolution=16, max_sequence_length=8),
        "guidance_scale": FamilyOptions(resolution=16, guidance_scale=1.0),
    }.items():
        family = get_family(pipeline, options)
        assert family.options is options
        encoders = Encoders(family.encode_images, family.encode_prompt, family.frozen_modules(), family.encoding_key())
        fingerprints[name] = encodings_fingerprint(dataset, encoders, CacheOptions(str(tmp_path)), (False,))
    assert fingerprints["max_sequence_length"] != fingerprints["default"]  # T5 embeddings of another length
    assert fingerprints["guidance_scale"] == fingerprints["default"]  # a step option: the cache is reused
