"""Gradient-trained LoRA beside the constructions of :mod:`lora_theory` (torch).

The torch models (:mod:`verification.models`), a batched trainer that trains many independent runs as one
stacked model (:mod:`verification.trainer`), and the paper's synthetic experiments as command-line modules
(``python -m verification`` lists them).
"""

EXPERIMENTS = ("linear", "fnn", "tfn", "final_layers", "biases", "rank_schedule", "depth_sweep", "singular_values")
TOOLS = ("certify", "advise", "real_data", "pretraining", "paper")

__all__ = ["TorchFNN", "TorchTFN", "merge_adapter", "EXPERIMENTS", "TOOLS"]


def __getattr__(name):
    # the torch models load on first use, so that tools without torch (``certify``) import this package
    if name in ("TorchFNN", "TorchTFN", "merge_adapter"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'verification' has no attribute {name!r}")
