"""The documentation site builds with `mkdocs build --strict`: no broken link, anchor or API reference; and every
docstring of the package is Google style, with no griffe warning, whether the site renders it or not."""

import logging
import os
import re
import subprocess
import sys

import pytest


pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mkdocs_strict_build(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(REPO, "mkdocs.yml")]
        + ["-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in (
        "DiffusionDPOTrainer",
        "MaPOConfig",
        "AdaptiveDPOConfig",
        "DiffusionModelConfig",
        "diffusion_dpo_loss",
    ):
        assert name in api, name
    for page in ("quickstart", "distributed", "faq", "scripts", "methods/diffusion_dpo", "data", "supported_models"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page


# HF/transformers docstring conventions that griffe's Google parser accepts without a warning, so they are looked for
# by name: a `Parameters:` header (ours is `Args:`), `name (`type`, *optional*, defaults to ...)` entries, `> Group`
# separator lines and HF cross-references.
FOREIGN_STYLE = {
    "a 'Parameters:' section (use 'Args:')": re.compile(r"^\s*Parameters:\s*$", re.MULTILINE),
    "an HF-style '(`type`, *optional*, ...)' entry": re.compile(r"\*optional\*"),
    "an HF-style '> Group' line (use a titled 'Args: Group:' section)": re.compile(r"^\s*> \S", re.MULTILINE),
    "a reST ':param' field": re.compile(r"^\s*:(param|type|returns?|rtype)\b", re.MULTILINE),
    # HF's [`name`] renders as literal brackets here; mkdocs-autorefs links [`name`][] (scoped) or [`name`][path]
    "an HF-style [`name`] cross-reference (use [`name`][])": re.compile(r"\[`[^`\]]+`\](?![\[(])"),
}


def _documented_objects(obj):
    """The package's modules, classes, functions and attributes that have a docstring (aliases skipped)."""
    if obj.docstring is not None:
        yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _documented_objects(member)


def test_docstrings_are_google_style_without_griffe_warnings():
    griffe = pytest.importorskip("griffe")
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.name.endswith("griffe"):
                messages.append(record.getMessage())

    # On the root logger: griffe logs as `griffe`, or as `mkdocs.plugins.griffe` once mkdocstrings has patched it.
    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        package = griffe.load("trl_diffusion", search_paths=[REPO], allow_inspection=False, resolve_aliases=False)
        objects = list(_documented_objects(package))
        for obj in objects:
            obj.docstring.parse("google", warn_unknown_params=True, warn_missing_types=True, warnings=True)
    finally:
        root.removeHandler(handler)
    assert str(package.filepath).startswith(REPO), package.filepath
    assert len(objects) > 200, len(objects)  # the whole package, not one module
    foreign = [
        f"{obj.relative_filepath}:{obj.docstring.lineno}: {obj.path} has {what}"
        for obj in objects
        for what, pattern in FOREIGN_STYLE.items()
        if pattern.search(obj.docstring.value)
    ]
    assert not messages + foreign, "\n".join(messages + foreign)
