"""ROME's hyperparameters as the studies pin them, in one place.

The studies pin every field (the library's defaults may change, and a results page must say what produced it):
ROME's GPT-2 XL values (Meng et al. 2022: 20 Adam steps at lr 0.5, KL weight 0.0625 on "{subject} is a", weight
decay 0.5, clamp at 4 x ||v||, context prefixes of 5 and 10 tokens), r-ROME's consistent keys, and no clamp
widening (``clamp_norm_max`` None: ROME's own rule). Key statistics: on the embedded model its world corpus
(10,000 texts); on a model without a world (SmolLM2) 1,000 texts of 64 tokens sampled from the model itself, since
there is no Wikipedia offline (sampled once, cached on disk and shared by every layer).

A script in ``analyses/`` puts its own folder on ``sys.path`` and reads these with ``from pinned import ...``, so
it works both as ``python analyses/NAME.py`` and when a test loads it from its file.
"""

from __future__ import annotations

ROME_COMMON = {"key_position": "subject_last", "context_prefixes": None, "prefix_lengths": [[5, 10], [10, 10]],
               "prefix_top_k": 5, "seed": 0, "v_lr": 0.5, "v_num_grad_steps": 20, "v_loss_stop": 0.05,
               "kl_factor": 0.0625, "kl_prompt": "{} is a", "v_weight_decay": 0.5, "clamp_norm_factor": 4.0,
               "mom2_adjustment": True, "consistent_keys": True, "update_key": "averaged",
               "mom2_update_weight": 0.0, "min_key_alignment": 1e-4,
               "max_update_ratio": 10.0, "clamp_norm_max": None, "clamp_retry_prob": 0.5}
# Key statistics of the embedded model: its world corpus, 10,000 texts of up to 128 tokens.
EMBEDDED_STATS = {"mom2_source": "auto", "mom2_n_samples": 10_000, "mom2_max_tokens": 128}
# Key statistics of SmolLM2 (and any model without a world file): 1,000 model-sampled texts of 64 tokens.
SAMPLED_STATS = {"mom2_source": "model", "mom2_n_samples": 1000, "mom2_max_tokens": 64}
# ROME on SmolLM2 at layer 8, inside the 7-11 plateau of its MLP causal-trace effect (analyses/counterfact_smollm2.py).
SMOL_ROME = {**ROME_COMMON, **SAMPLED_STATS, "layer": 8}

