"""Faults survived (`trl_diffusion/trainer/checkpoints.py`): a run killed at any moment resumes from its last complete
checkpoint to the weights of an uninterrupted run; an incomplete, missing or corrupt checkpoint gives a clear error;
resuming unpickles nothing."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import resumable
from helpers.rows import make_pickapic
from helpers.runs import REPO, subprocess_env

from trl_diffusion.trainer.checkpoints import COMPLETE_MARKER, complete_checkpoints


CHILD = os.path.join(REPO, "tests", "helpers", "resumable.py")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("resumable-data") / "pickapic"
    make_pickapic(8).save_to_disk(str(path))
    return path


def _child(method, model, dataset_dir, output_dir, *flags) -> subprocess.Popen:
    command = [sys.executable, CHILD, method, model, str(dataset_dir), str(output_dir), *flags]
    env = subprocess_env(output_dir)
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_at_step(process: subprocess.Popen, step: int) -> list[str]:
    """SIGKILL the child as soon as it reports ``STEP step`` (its checkpoint of that step may be half-written)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.strip() == f"STEP {step}":
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return lines


def _assert_same(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        # SGD steps are reproduced exactly; the tolerance only absorbs summation-order differences between CPUs.
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-7, msg=key)


def _kill_while_saving(method, peft, model, dataset_dir, output_dir, step: int):
    """Run the child until it SIGKILLs itself while writing ``checkpoint-{step}`` (weights written, the rest not)."""
    flags = ["--kill-while-saving", str(step)] + ([] if peft else ["--full"])
    child = _child(method, model, dataset_dir, output_dir, *flags)
    output = child.communicate(timeout=300)[0]
    assert child.returncode == -signal.SIGKILL, output[-3000:]


@pytest.mark.parametrize(
    ("method", "peft", "moment"),
    [("dpo", True, "mid-write"), ("dpo", False, "any"), ("adaptive", True, "any")],
    ids=["lora-killed-mid-checkpoint", "full", "adaptive-lora"],
)
def test_a_run_killed_at_a_random_step_resumes_to_the_uninterrupted_weights(
    method, peft, moment, tiny_sd, dataset_dir, tmp_path
):
    """SIGKILL at a random step: as soon as the step ends ("any": before, during or after its checkpoint is written,
    as the race falls), or in the middle of writing its checkpoint ("mid-write"). Then resume and compare."""
    run = tmp_path / "run"
    kill_step = random.Random(f"{method}-{peft}-{time.time()}").randint(2, resumable.MAX_STEPS - 1)
    print(f"killing at step {kill_step} ({moment})")
    if moment == "mid-write":
        _kill_while_saving(method, peft, tiny_sd, dataset_dir, run, kill_step)
        half_written = run / f"checkpoint-{kill_step}"
        assert (half_written / "pytorch_lora_weights.safetensors").is_file()  # its weights were written...
        assert not (half_written / COMPLETE_MARKER).exists()  # ...its optimizer state and manifest were not
    else:
        _kill_at_step(_child(method, tiny_sd, dataset_dir, run, *([] if peft else ["--full"])), kill_step)
    complete = complete_checkpoints(str(run))
    assert complete and all(int(path.rsplit("-", 1)[1]) <= kill_step for path in complete)
    resumed = resumable.build_trainer(method, tiny_sd, dataset_dir, run, peft=peft)
    if moment == "mid-write":  # never taken for a complete checkpoint, whether named or found
        assert complete[-1].endswith(f"checkpoint-{kill_step - 1}")
        with pytest.raises(ValueError, match="it has no checkpoint_complete.json: it was interrupted") as error:
            resumed.train(resume_from_checkpoint=str(half_written))
        assert f"The last complete checkpoint beside it is {complete[-1]}" in str(error.value)
    resumed.train(resume_from_checkpoint=True)
    uninterrupted = resumable.build_trainer(method, tiny_sd, dataset_dir, tmp_path / "uninterrupted", peft=peft)
    uninterrupted.train()
    assert resumed.state.global_step == uninterrupted.state.global_step == resumable.MAX_STEPS
    _assert_same(resumable.trained_weights(uninterrupted), resumable.trained_weights(resumed))
    assert len(complete_checkpoints(str(run))) == resumable.MAX_STEPS  # the half-written one was rewritten whole


@pytest.fixture(scope="module")
def checkpoints(tiny_sd, dataset_dir, tmp_path_factory):
    """A finished run's folder: checkpoint-1 and checkpoint-2, both complete."""
    output_dir = tmp_path_factory.mktemp("finished-run")
    resumable.build_trainer("dpo", tiny_sd, dataset_dir, output_dir, max_steps=2).train()
    return output_dir


def _copy(source, destination):
    import shutil

    shutil.copytree(source, destination)
    return destination


def test_missing_truncated_and_corrupt_checkpoints_give_clear_errors(tiny_sd, dataset_dir, checkpoints, tmp_path):
    trainer = resumable.build_trainer("dpo", tiny_sd, dataset_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"Cannot resume from .*checkpoint-9: it does not exist"):
        trainer.train(resume_from_checkpoint=str(checkpoints / "checkpoint-9"))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    truncated = _copy(checkpoints / "checkpoint-2", tmp_path / "truncated")
    with open(truncated / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"optimizer.pt has 100 bytes where \d+ were written \(truncated"):
        trainer.train(resume_from_checkpoint=str(truncated))
    corrupt = _copy(checkpoints / "checkpoint-2", tmp_path / "corrupt")
    weights = corrupt / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size, garbage content
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.safetensors is corrupt"):
        trainer.train(resume_from_checkpoint=str(corrupt))
    state = _copy(checkpoints / "checkpoint-2", tmp_path / "state")
    text = (state / "trainer_state.json").read_text()
    (state / "trainer_state.json").write_text("{" + " " * (len(text) - 1))
    with pytest.raises(ValueError, match=r"trainer_state.json is corrupt"):
        trainer.train(resume_from_checkpoint=str(state))
    manifest = json.loads((checkpoints / "checkpoint-2" / COMPLETE_MARKER).read_text())
    assert manifest["global_step"] == 2 and "optimizer.pt" in manifest["files"]


def test_resuming_loads_optimizer_scheduler_and_rng_state_with_weights_only(
    tiny_sd, dataset_dir, checkpoints, tmp_path, monkeypatch
):
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append((os.path.basename(str(args[0])), kwargs.get("weights_only")))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    trainer = resumable.build_trainer("dpo", tiny_sd, dataset_dir, tmp_path / "out", max_steps=3)
    trainer.train(resume_from_checkpoint=str(checkpoints / "checkpoint-2"))
    assert trainer.state.global_step == 3
    assert {name for name, _ in calls} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert all(weights_only is True for _, weights_only in calls), calls


def test_nothing_passes_trust_remote_code():
    package = os.path.join(REPO, "trl_diffusion")
    offenders = []
    for root, _, names in os.walk(package):
        for name in names:
            if name.endswith(".py"):
                with open(os.path.join(root, name)) as f:
                    if "trust_remote_code" in f.read():
                        offenders.append(os.path.join(root, name))
    assert not offenders
