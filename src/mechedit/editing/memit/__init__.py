"""MEMIT (Meng et al. 2023): many facts in one edit, spread over a range of MLP layers. One file per piece of
the maths, as ROME's package:

- ``hparams.py``: :class:`MEMITHyperParams`, MEMIT's defaults explained;
- ``compute_ks.py``: every request tokenized once; keys per layer and residuals, in batches;
- ``compute_zs.py``: the target values, one batched optimisation for all requests;
- ``memit_main.py``: :func:`memit`, the covariance-weighted least-squares spread, its checks, the handle.

Key statistics and context templates are ROME's (:mod:`mechedit.editing.rome.layer_stats`,
:func:`mechedit.editing.rome.context_templates`).
"""

from mechedit.editing.memit.hparams import MEMITHyperParams
from mechedit.editing.memit.memit_main import memit

__all__ = ["MEMITHyperParams", "memit"]
