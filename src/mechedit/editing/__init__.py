"""Editors: change what a model says about one fact, surgically and reversibly.

Every editor returns an :class:`EditHandle` (exact weight deltas, hyperparameters, the model's fingerprint,
evidence) that restores bit-exactly, works as a context manager, saves and re-applies.
"""

from mechedit.editing.handle import EditHandle, export_model
from mechedit.editing.rome import LayerStats, ROMEHyperParams, rome
from mechedit.editing.rome.layer_stats import layer_stats

__all__ = ["EditHandle", "LayerStats", "ROMEHyperParams", "export_model", "layer_stats", "rome"]
