"""A smoke run of the speed benchmark at its CPU size (a few seconds): the same code path as a GPU run."""

import importlib.util
import json
import os
import sys

import pytest


HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = os.path.join(HERE, "..", "benchmarks")


def load_benchmark(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module (with ``benchmarks/`` importable, as when run)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_tiny_smoke(tmp_path):
    speed = load_benchmark("speed")
    results, output = tmp_path / "RESULTS.md", tmp_path / "speed.json"
    argv = ["--size", "tiny", "--steps", "1", "--warmup", "1", "--batch", "1", "--configurations", "dpo-lora"]
    argv += ["--in-process", "--threads", "1", "--num-workers", "0", "--model-dir", str(tmp_path / "model")]
    argv += ["--results", str(results), "--json", str(output)]
    rows = speed.main(argv)
    (row,) = json.loads(output.read_text())
    assert row["trainer_s_per_step"] == rows[0]["trainer_s_per_step"]
    for key in (
        "method",
        "size",
        "device",
        "baseline_s_per_step",
        "trainer_s_per_step",
        "speedup",
        "baseline_peak_bytes",
        "trainer_peak_bytes",
    ):
        assert key in row, key
    assert (row["method"], row["configuration"], row["size"]) == ("dpo", "lora", "tiny")
    assert row["baseline_s_per_step"] > 0 and row["trainer_s_per_step"] > 0 and row["trainer_peak_bytes"] > 0
    assert row["speedup"] == pytest.approx(row["baseline_s_per_step"] / row["trainer_s_per_step"])
    table = results.read_text()
    assert "| dpo | lora |" in table and "Command: `python benchmarks/speed.py --size tiny" in table
    assert "torch " in table and "diffusers " in table


def test_flow_error_scale_reproduces_the_documented_ratios():
    table = load_benchmark("flow_error_scale").main(["--num", "20000"])
    rows = {(name, scheme): (analytic, weighted) for name, scheme, analytic, weighted in table}
    # The ratios of docs/supported_models.md ("Choosing beta")
    assert round(rows["SD3/3.5", "logit_normal"][0], 3) == 0.113
    assert round(rows["Flux.1", "logit_normal"][0], 3) == 0.293
    assert round(rows["Flux.2@1024", "logit_normal"][0], 3) == 0.039
    # Qwen-Image's mu = ln 3 and Z-Image's static shift 3 are SD3's shift of 3
    for scheme in ("logit_normal", "uniform", "mode"):
        assert rows["Qwen-Image", scheme] == pytest.approx(rows["SD3/3.5", scheme])
        assert rows["Z-Image", scheme] == pytest.approx(rows["SD3/3.5", scheme])
    # The stronger the shift, the smaller the ratio
    assert rows["Flux.2@1024", "logit_normal"][0] < rows["Flux.2@512", "logit_normal"][0] < 0.1


def test_real_size_memory_on_meta_tensors():
    (row,) = load_benchmark("real_size_memory").main(["--families", "FLUX.2 [klein] 4B", "--resolution", "256"])
    # FLUX.2 [klein] 4B: a 3.9B transformer and Qwen3-4B, nothing allocated
    assert 3.8e9 < row["denoiser_params"] < 4.0e9 and 4.0e9 < row["text_encoder_params"] < 4.1e9
    assert row["weights_gib"] < row["peak_checkpointing_gib"] < row["peak_gib"]
