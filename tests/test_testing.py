"""`trl_diffusion.testing`: the former import paths `trl_diffusion.tiny_models` and `trl_diffusion.synthetic` still
give the very same objects, every public name of the new modules included."""

import importlib
import types

import pytest


@pytest.mark.parametrize("name", ["tiny_models", "synthetic"])
def test_the_former_module_re_exports_every_public_name_of_the_new_one(name):
    new = importlib.import_module(f"trl_diffusion.testing.{name}")
    old = importlib.import_module(f"trl_diffusion.{name}")
    public = {
        attribute
        for attribute, value in vars(new).items()
        if not attribute.startswith("_")
        and getattr(value, "__module__", new.__name__) == new.__name__
        and not isinstance(value, types.ModuleType)
    }
    assert public and public <= set(old.__all__)
    for attribute in public:
        assert getattr(old, attribute) is getattr(new, attribute), attribute


def test_the_former_png_encoder_of_the_synthetic_task_is_the_data_module_one():
    from trl_diffusion.data import encode_png
    from trl_diffusion.synthetic import __all__, png_bytes

    assert png_bytes is encode_png
    assert "png_bytes" in __all__
