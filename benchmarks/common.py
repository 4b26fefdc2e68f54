"""Measuring and reporting shared by the benchmarks: step timing, peak memory, the device and library versions,
result files, and the meta-tensor helpers of the memory estimates.

The benchmarks run as scripts (``python benchmarks/speed.py``), so ``import common`` finds this file next to them;
importing it puts the checkout's root first on ``sys.path``, so a benchmark measures the ``trl_diffusion`` of its own
checkout, installed or not.
"""

import os
import platform
import resource
import shlex
import sys
import time
from contextlib import contextmanager

import torch
from transformers import TrainerCallback


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from trl_diffusion import METHODS, UnpairedPreferenceDataset  # noqa: E402


# Dense bf16 peak FLOP/s (no sparsity), by device-name fragment, for MFU
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


# ----- timing -----


class StepClock:
    """Wall time of ``steps`` steps after ``warmup`` ones, and the executed FLOPs of one more step (GPU only).

    Call `step_done` after every optimizer step; CUDA is synchronised at the two ends of the timed window only.
    """

    def __init__(self, warmup: int, steps: int, count_flops: bool):
        self.warmup, self.steps, self.count_flops = warmup, steps, count_flops
        self.start = self.end = None
        self.flops = None
        self._counter = None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def step_done(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) has finished."""
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        if step == self.warmup + self.steps:
            self._sync()
            self.end = time.perf_counter()
            if self.count_flops:
                from torch.utils.flop_counter import FlopCounterMode

                self._counter = FlopCounterMode(display=False)
                self._counter.__enter__()
        if self._counter is not None and step == self.warmup + self.steps + 1:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps + (1 if self.count_flops else 0)

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / self.steps


class ClockCallback(TrainerCallback):
    """Feeds a `StepClock` from a `transformers.Trainer`'s step ends."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.step_done(state.global_step)


class StepTimer(TrainerCallback):
    """The wall time of every optimizer step of a `transformers.Trainer`, in ``times``."""

    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


# ----- the machine -----


def peak_memory_bytes() -> int:
    """The CUDA allocator's peak on a GPU, else this process's peak RSS."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def device_name() -> str:
    """The GPU's name, or the CPU's model with its core and torch thread counts."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def peak_flops(device: str) -> float | None:
    """The dense bf16 peak of ``device`` (a `device_name`), or `None` if it is not in `PEAK_BF16_FLOPS`."""
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device:
            return flops
    return None


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    import trl_diffusion

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "trl_diffusion": getattr(trl_diffusion, "__version__", "dev"),
        "python": platform.python_version(),
    }


# ----- the methods -----


def rows_per_pair(method: str) -> int:
    """Dataset rows one preference pair becomes for ``method`` (a key of `METHODS`): 2 for an unpaired method
    (Diffusion-KTO reads each pair as a desirable and an undesirable row), else 1. Multiplying the batch by it keeps
    the images per step equal across methods."""
    trainer_class, _ = METHODS[method]
    return 2 if issubclass(trainer_class.dataset_class, UnpairedPreferenceDataset) else 1


# ----- result files -----


def command_line(script: str, argv: list[str]) -> str:
    """The shell command that ran ``benchmarks/<script>`` with ``argv``."""
    return f"python benchmarks/{script} " + shlex.join(argv)


def write_section(path: str, section: str, start: str, end: str) -> None:
    """Write ``section`` (which begins with ``start`` and ends with ``end``) into the markdown file ``path``,
    replacing the text between the markers of an earlier run, or appending it."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


# ----- meta tensors (memory estimates at real size) -----


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention whose saved tensors are a fused (flash / memory-efficient) kernel's: ``q``,
    ``k``, ``v`` and the output, plus with ``log_sum_exp`` a float32 log-sum-exp per query; never ``L x L``."""

    @staticmethod
    def forward(ctx, query, key, value, log_sum_exp: bool):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        saved = (query, key, value, output)
        if log_sum_exp:
            saved += (query.new_empty(query.shape[:-1], dtype=torch.float32),)
        ctx.save_for_backward(*saved)
        return output

    @staticmethod
    def backward(ctx, grad):
        query, key, value, *_ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


@contextmanager
def fused_attention(log_sum_exp: bool):
    """Replace `scaled_dot_product_attention` by `_FusedAttention` (shapes only: for meta tensors) while open."""
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        return _FusedAttention.apply(query, key, value, log_sum_exp)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
