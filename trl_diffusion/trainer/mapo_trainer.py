import textwrap

from ..losses import mapo_loss
from .base_trainer import DiffusionPreferenceTrainer
from .mapo_config import MaPOConfig


class MaPOTrainer(DiffusionPreferenceTrainer):
    """Trainer for Margin-aware Preference Optimization (Hong et al. 2024, arXiv 2406.06424).

    MaPO needs no reference model: none is created, loaded or run, and the denoiser runs once per micro-batch. The loss
    is ``L = mean(e_w) − β·mean log σ(T·(f(e_w) − f(e_l)))`` with ``f(e) = s·e/(exp(s·e) − 1)`` (see [`mapo_loss`][]):
    supervised fine-tuning on the chosen images plus a margin between the chosen and rejected likelihoods.

    See [`DiffusionPreferenceTrainer`][] for the arguments; `ref_model` is rejected.
    """

    _tag_names = ["trl", "trl-diffusion", "mapo"]
    _name = "MaPO"
    _paper = {
        "title": "Margin-aware Preference Optimization for Aligning Diffusion Models without Reference",
        "id": "2406.06424",
        "citation": textwrap.dedent(
            """\
            @article{hong2024margin,
                title   = {{Margin-aware Preference Optimization for Aligning Diffusion Models without Reference}},
                author  = {Jiwoo Hong and Sayak Paul and Noah Lee and Kashif Rasul and James Thorne and Jongheon Jeong},
                journal = {arXiv preprint arXiv:2406.06424},
                year    = 2024
            }"""
        ),
    }
    config_class = MaPOConfig
    args: MaPOConfig
    uses_reference = False
    accuracy_metric = "mapo/accuracy"

    def preference_loss(self, step, policy_errors):
        policy_chosen, policy_rejected = policy_errors.chunk(2)
        return mapo_loss(
            policy_chosen,
            policy_rejected,
            beta=self.args.beta,
            num_train_timesteps=self.family.num_train_timesteps,
            snr_value=self.args.mapo_snr_value,
        )

    def model_card_hyperparameters(self):
        return {
            "beta": self.args.beta,
            "mapo_snr_value": self.args.mapo_snr_value,
            **super().model_card_hyperparameters(),
        }
