"""Fixtures: tiny diffusers pipelines saved as real folders, and small preference datasets."""

import logging
import os
import shutil
import tempfile


# Keep the suite hermetic: the encoding cache and datasets' own cache go to a fresh folder, not the user's home.
# Set before `datasets` is imported, which reads it once.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="trl-diffusion-tests-datasets-")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers.rows import make_pickapic  # noqa: E402

from trl_diffusion.model_config import resolve_model_path  # noqa: E402
from trl_diffusion.testing.tiny_models import (  # noqa: E402
    build_tiny_flux,
    build_tiny_flux2,
    build_tiny_qwen_image,
    build_tiny_sd3,
    build_tiny_sdxl,
    build_tiny_stable_diffusion,
    build_tiny_wan,
    build_tiny_z_image,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The folder of the CLI's offline tiny models (``TRL_DIFFUSION_CACHE``), with ``tiny-sd`` built once in it for
    the in-process runs and the launched processes alike."""
    path = tmp_path_factory.mktemp("tiny-model-cache")
    os.environ["TRL_DIFFUSION_CACHE"] = str(path)
    resolve_model_path("tiny-sd")
    yield path
    os.environ.pop("TRL_DIFFUSION_CACHE", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(os.environ["HF_DATASETS_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    return build_tiny_stable_diffusion(str(tmp_path_factory.mktemp("tiny-sd")), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> str:
    return build_tiny_stable_diffusion(str(tmp_path_factory.mktemp("tiny-sd-v")), prediction_type="v_prediction")


@pytest.fixture
def pickapic() -> Dataset:
    return make_pickapic()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tiny models gain nothing from intra-op threads, and on a 2-core machine that also runs data-loader workers
    # or another job, oversubscribed threads make a training step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
    return build_tiny_sdxl(str(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> str:
    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> str:
    return build_tiny_flux(str(tmp_path_factory.mktemp("tiny-flux")))


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> str:
    return build_tiny_flux2(str(tmp_path_factory.mktemp("tiny-flux2")))


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory) -> str:
    return build_tiny_flux2(str(tmp_path_factory.mktemp("tiny-flux2-klein")), klein=True)


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> str:
    return build_tiny_qwen_image(str(tmp_path_factory.mktemp("tiny-qwen-image")))


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory) -> str:
    return build_tiny_z_image(str(tmp_path_factory.mktemp("tiny-z-image")))


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> str:
    return build_tiny_wan(str(tmp_path_factory.mktemp("tiny-wan")))
