"""No hang across processes: a fault on one of 2 CPU processes (DDP on gloo) stops both, soon, with the reason.

Each test launches `tests/helpers/faulty_run.py` with `accelerate launch --multi_gpu --num_processes 2` (torchrun;
the script sets `use_cpu`, so accelerate runs MULTI_CPU on gloo), on 8 pairs with one pair per process and step. The
seeded sampler gives the processes these rows per step: process 0 rows 4, 7, 2, 1 and process 1 rows 0, 3, 5, 6
(checked by `test_the_processes_meet_the_rows_the_faults_are_planted_in`). Each process prints
``RANK r FAILED at <time>: <error>`` when it stops with an error; the tests print how long the job took to exit.
"""

import os
import re
import subprocess
import sys
import time

import pytest
from datasets import Dataset
from helpers import resumable
from helpers.rows import make_pickapic
from helpers.runs import REPO, subprocess_env


SCRIPT = os.path.join(REPO, "tests", "helpers", "faulty_run.py")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
LAUNCH += ["--mixed_precision", "no"]
BAD_ROW = 3  # met by process 1 only, at step 2
EXIT_WITHIN_S = 60


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("faulty-data")
    make_pickapic(8).save_to_disk(str(path / "clean"))
    data = make_pickapic(8).to_dict()
    data["jpg_1"][BAD_ROW] = b"not an image"
    Dataset.from_dict(data).save_to_disk(str(path / "bad-image"))
    return path


def _launch(tiny_sd, dataset, output_dir, *flags) -> tuple[str, int, dict[int, str], float]:
    """Run the 2-process job (a hang fails it at the timeout); return its output, exit code, each failed process's
    message, and the seconds from the first process's error to the exit of the whole job."""
    command = [*LAUNCH, SCRIPT, tiny_sd, str(dataset), str(output_dir), *flags]
    start = time.time()
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(output_dir), capture_output=True, text=True, timeout=300
    )
    end = time.time()
    output = result.stdout + result.stderr
    # The two processes share the pipe: one's line may run into the other's
    found = re.findall(r"RANK (\d) FAILED at ([\d.]+): (.*?)(?=RANK \d FAILED|\n|$)", output)
    assert found, output[-4000:]
    exit_s = end - min(float(at) for _, at, _ in found)
    print(f"2 processes: the job exited {exit_s:.1f} s after the first error ({end - start:.1f} s in all)")
    return output, result.returncode, {int(rank): message for rank, _, message in found}, exit_s


@pytest.mark.slow
def test_an_unreadable_image_on_one_process_stops_both_with_its_row(tiny_sd, datasets_dir, tmp_path):
    output, code, failures, exit_s = _launch(tiny_sd, datasets_dir / "bad-image", tmp_path)
    assert code != 0 and exit_s < EXIT_WITHIN_S
    assert sorted(failures) == [0, 1], output[-4000:]  # both processes stopped on the error, neither hung
    for message in failures.values():
        assert f"Data error on process 1: Row {BAD_ROW}, column 'jpg_1': unreadable image" in message


@pytest.mark.slow
def test_an_unreadable_image_met_while_encoding_the_cache_stops_both(tiny_sd, datasets_dir, tmp_path):
    """With the encoding cache, the main process encodes every pair first while the other waits for it."""
    output, code, failures, exit_s = _launch(tiny_sd, datasets_dir / "bad-image", tmp_path, "--precompute-encodings")
    assert code != 0 and exit_s < EXIT_WITHIN_S
    assert sorted(failures) == [0, 1], output[-4000:]  # the main process met it, then the waiting one did too
    for message in failures.values():
        assert f"Row {BAD_ROW}, column 'jpg_1': unreadable image" in message


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_process_stops_both_at_the_same_step(tiny_sd, datasets_dir, tmp_path):
    output, code, failures, exit_s = _launch(tiny_sd, datasets_dir / "clean", tmp_path, "--nan-on-rank", "1")
    assert code != 0 and exit_s < EXIT_WITHIN_S
    assert sorted(failures) == [0, 1], output[-4000:]
    for message in failures.values():
        assert message.startswith("NonFiniteError: Non-finite values at optimizer step 2:")
        assert f"policy errors non-finite for dataset rows [{BAD_ROW}] (process 1)" in message


def test_the_processes_meet_the_rows_the_faults_are_planted_in(tiny_sd, datasets_dir, tmp_path):
    """The global batches of the seeded sampler, which accelerate deals out to the processes in turn."""
    trainer = resumable.build_trainer(
        "dpo", tiny_sd, datasets_dir / "clean", tmp_path, per_device_train_batch_size=2, precompute_encodings=False
    )
    batches = [batch["row_index"].tolist() for batch in trainer.get_train_dataloader()]
    assert batches[1][1] == BAD_ROW and BAD_ROW not in [row for batch in batches for row in batch[:1]]
