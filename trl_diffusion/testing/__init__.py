"""Testing and demo support: tiny offline pipelines and a synthetic preference task.

Like `diffusers.utils.testing_utils`, this subpackage holds what tests, the demo, the benchmarks and the CLI's
offline tiny models (``--model_name_or_path tiny-sd`` and the other names of `model_config.TINY_MODELS`) build on,
apart from the training library itself:

- `trl_diffusion.testing.tiny_models`: tiny, randomly initialised diffusers pipelines of every supported family,
  built from configs and saved as real diffusers folders (nothing is downloaded).
- `trl_diffusion.testing.synthetic`: a synthetic text-to-image preference task with known, rule-based true rewards,
  small enough to pre-train and align on a CPU (the demo and `benchmarks/efficacy.py` run on it).

The modules are imported on demand (``from trl_diffusion.testing.tiny_models import build_tiny_stable_diffusion``),
so importing the package costs nothing. `trl_diffusion.tiny_models` and `trl_diffusion.synthetic`, their former
homes, still import for compatibility.
"""
