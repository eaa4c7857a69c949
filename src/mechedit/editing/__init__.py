"""Editors: change what a model says about one fact, surgically and reversibly.

Every editor returns an :class:`EditHandle` (exact weight deltas, hyperparameters, the model's fingerprint,
evidence) that restores bit-exactly, works as a context manager, saves and re-applies.
"""

from mechedit.editing.handle import EditHandle, export_model
from mechedit.editing.methods import METHODS, edit
from mechedit.editing.rome import LayerStats, ROMEHyperParams, rome
from mechedit.editing.rome.layer_stats import layer_stats
from mechedit.editing.sweep import LayerSweepResult, layer_sweep

__all__ = ["METHODS", "EditHandle", "LayerStats", "LayerSweepResult", "ROMEHyperParams", "edit", "export_model",
           "layer_stats", "layer_sweep", "rome"]
