"""ROME with the r-ROME correction. One file per piece of the maths, as in ROME's repository:

- ``hparams.py``: :class:`ROMEHyperParams`, ROME's defaults explained;
- ``layer_stats.py``: second-moment statistics of MLP keys, streamed and cached (``C``);
- ``compute_u.py``: the prefix-averaged key ``k*`` and the direction ``u = C⁻¹k*/‖C⁻¹k*‖``;
- ``compute_v.py``: the optimised change ``δ`` of the MLP output (the value ``v* = v + δ``);
- ``rome_main.py``: :func:`rome`, the rank-one update, its checks, and the edit handle;
- ``repr_tools.py``: reading keys (the input of the MLP output projection) with leak-proof hooks.
"""

from mechedit.editing.rome.hparams import KEY_POSITIONS, ROMEHyperParams
from mechedit.editing.rome.layer_stats import LayerStats, key_fingerprint, text_source
from mechedit.editing.rome.rome_main import choose_layer, context_templates, rome

# The function layer_stats is exported by mechedit.editing; here the name stays the submodule's, so that
# ``mechedit.editing.rome.layer_stats`` is the module (as in ROME's repository).
__all__ = ["KEY_POSITIONS", "LayerStats", "ROMEHyperParams", "choose_layer", "context_templates", "key_fingerprint",
           "rome", "text_source"]
