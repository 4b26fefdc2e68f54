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
    assert public and set(old.__all__) == public
    for attribute in public:
        assert getattr(old, attribute) is getattr(new, attribute), attribute
