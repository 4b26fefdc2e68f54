"""`trl_diffusion.testing`: the former import paths `trl_diffusion.tiny_models` and `trl_diffusion.synthetic` still
give the very same objects, every public name of the new modules included."""

import ast
import importlib
import inspect

import pytest


def defined_public_names(module) -> set[str]:
    """The public names a module defines at its top level (functions, classes, constants), not those it imports."""
    names = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize("name", ["tiny_models", "synthetic"])
def test_the_former_module_re_exports_every_public_name_of_the_new_one(name):
    new = importlib.import_module(f"trl_diffusion.testing.{name}")
    old = importlib.import_module(f"trl_diffusion.{name}")
    public = defined_public_names(new)
    assert public and public <= set(old.__all__)
    for attribute in public:
        assert getattr(old, attribute) is getattr(new, attribute), attribute


def test_the_former_png_encoder_of_the_synthetic_task_is_the_data_module_one():
    from trl_diffusion.data import encode_png
    from trl_diffusion.synthetic import __all__, png_bytes

    assert png_bytes is encode_png
    assert "png_bytes" in __all__
