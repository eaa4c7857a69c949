"""MEMIT's hyperparameters, with the defaults of the paper's GPT-J run (``hparams/MEMIT/EleutherAI_gpt-j-6B.json``
in MEMIT's repository) unless a comment says otherwise.

The object is frozen and round-trips through :meth:`MEMITHyperParams.to_dict` / :meth:`MEMITHyperParams.from_dict`
(JSON-ready: lists for tuples), so every edit handle records exactly the hyperparameters that made it. The
fields shared with ROME (key position, context prefixes, statistics source) mean exactly what they mean in
:class:`~mechedit.editing.rome.ROMEHyperParams`, and :func:`mechedit.editing.rome.context_templates` reads them.

>>> MEMITHyperParams(layers=(0, 1, 2)).to_dict()["mom2_update_weight"]
1000.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mechedit.editing.hparams import HyperParams
from mechedit.editing.rome.hparams import KEY_POSITIONS
from mechedit.errors import InputError


@dataclass(frozen=True)
class MEMITHyperParams(HyperParams):
    # -- where -------------------------------------------------------------------------------------------------
    # The MLP layers whose output projections share the update; the target value is optimised at the *last*
    # of them. MEMIT used a range of critical MLP layers found by causal tracing: 3-8 of GPT-J's 28 layers,
    # 13-17 of GPT-2 XL's 48. "auto": the window of `auto_width` consecutive layers with the largest mean MLP
    # causal-trace effect at the subject's last token over the first `auto_trace_requests` requests (for the
    # embedded 8-layer model the effect is 0.42, 0.45, 0.13 at layers 0, 1, 2 and below 0.07 after: layers
    # 0-2; see docs/embedded-model.md). The trace is recorded in the handle's evidence.
    layers: tuple[int, ...] | str = "auto"
    auto_width: int = 3
    auto_trace_requests: int = 4
    # Token whose key is rewritten, as in ROME (MEMIT's "fact_token": "subject_last").
    key_position: str = "subject_last"

    # -- keys and prompts ---------------------------------------------------------------------------------------
    # Context prefixes, as in ROME. MEMIT samples 5 prefixes of 10 tokens (its get_context_templates uses
    # length_params [[10, 5]]): 6 templates per request with the bare prompt, fewer than ROME's 21, which is
    # what makes thousands of requests per call affordable.
    context_prefixes: tuple[str, ...] | None = None
    prefix_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    prefix_top_k: int = 5
    seed: int = 0

    # -- the target values z (compute_zs) -----------------------------------------------------------------------
    v_lr: float = 0.5  # Adam learning rate on each request's residual-stream delta
    # At most this many forwards (MEMIT: 25 on GPT-J, 20 on GPT-2 XL; 20 here). A request stops moving once its
    # own loss is below v_loss_stop (MEMIT's 5e-2); the batch stops when every request has. On the embedded
    # model that rarely happens (mean 19.8 of 20 steps on 200 requests, 20.0 on 1,000): its residual is small
    # (||z|| ~ 21), so the decay term alone is ~0.048 once ||delta|| reaches the clamp. More steps buy efficacy
    # where subjects carry several edited facts (205 requests about 50 subjects, z-level ES: 65 at 20 steps, 75
    # at 40) at proportional cost; 20 is kept (docs/results/memit-embedded/README.md).
    v_num_grad_steps: int = 20
    v_loss_stop: float = 0.05
    kl_factor: float = 0.0625  # KL on "{subject} is a" at the key's position, as ROME
    kl_prompt: str = "{} is a"
    # Penalty v_weight_decay * ||delta|| / ||z||^2 (MEMIT's 0.5) and the clamp ||delta|| <= clamp_norm_factor *
    # ||z||, with z the residual stream after the last edited layer before the edit (MEMIT's target_init).
    # MEMIT clamps at 0.75 (its residual is larger than ROME's MLP output). On the embedded model 0.75 bound
    # almost every request (mean p(target) 0.64 after optimisation, ES 0.80 on 20 requests with λ=100); 2.0
    # gave 0.78 and ES 0.95 (measured with /tmp scripts, reported in docs/results/sequential-edits/README.md).
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 2.0
    # Requests whose prompts share one forward in the value optimisation (about 7 rows each: the context
    # templates and the KL prompt). Bounds memory only: every request has its own delta and loss, and Adam is
    # element-wise, so chunking does not change the result.
    batch_requests: int = 128
    # "bfloat16": the value optimisation's matrix products in bfloat16 (torch.autocast), the rest float32. Not
    # MEMIT's (float32 on GPT-2 XL, float16 weights on GPT-J): close to the float32 δ (1.5% apart on 200
    # embedded-world requests, same z-level efficacy), 1.3x less CPU time where the CPU has bfloat16 instructions
    # (AVX512-BF16 here) and far slower where it has not, hence not the default.
    v_precision: str = "float32"

    # -- the spread (memit_main) --------------------------------------------------------------------------------
    # ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ per layer, C = E[k kᵀ] of ordinary keys (normalised: one token's worth), so λ
    # counts how many "ordinary keys" the preserved memories weigh against the edited ones. MEMIT: 15,000 on
    # GPT-J, 20,000 on GPT-2 XL, whose keys are 16,384 / 6,400 wide. The embedded model's keys are 512 wide and
    # 15,000 let almost nothing through (ES 0/20, 6% of the asked residual written); measured on embedded-world
    # requests (clamp 2): 20 requests, λ=100: ES 0.95, NS 1.00; 200 requests, λ=100: ES 0.88, NS 0.79 and
    # ‖ΔW‖/‖W‖ up to 9.5; λ=1000: ES 0.83, NS 0.86, ratio ≤ 5.7. 1,000 trades a little efficacy for locality.
    # False: C = I (ablation).
    mom2_adjustment: bool = True
    mom2_update_weight: float = 1000.0
    mom2_source: str = "auto"  # as ROMEHyperParams.mom2_source
    mom2_n_samples: int = 10_000  # as ROME's CPU-sized default (MEMIT: 100,000 Wikipedia records)
    mom2_max_tokens: int = 128
    # ||ΔW|| / ||W|| above this in any layer is an exploding update, refused before any weight changes.
    max_update_ratio: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.context_prefixes, list):
            object.__setattr__(self, "context_prefixes", tuple(self.context_prefixes))
        object.__setattr__(self, "prefix_lengths", tuple(tuple(p) for p in self.prefix_lengths))
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers != "auto":
            if (not isinstance(self.layers, tuple) or not self.layers
                    or not all(_int(x) and x >= 0 for x in self.layers)):
                raise InputError(f"layers must be 'auto' or a non-empty list of non-negative layer numbers, got "
                                 f"{self.layers!r}")
            if list(self.layers) != sorted(set(self.layers)):
                raise InputError(f"layers must be increasing and distinct, got {list(self.layers)}")
        if self.key_position not in KEY_POSITIONS:
            raise InputError(f"key_position must be one of {', '.join(KEY_POSITIONS)}; got {self.key_position!r}")
        if self.context_prefixes is not None and not all(isinstance(p, str) for p in self.context_prefixes):
            raise InputError("context_prefixes must be strings")
        for p in self.prefix_lengths:
            if len(p) != 2 or not all(_int(x) and x > 0 for x in p):
                raise InputError(f"prefix_lengths must be (tokens, count) pairs of positive integers, got {p!r}")
        for name in ("auto_width", "auto_trace_requests", "prefix_top_k", "v_num_grad_steps", "batch_requests",
                     "mom2_n_samples", "mom2_max_tokens"):
            if not (_int(getattr(self, name)) and getattr(self, name) > 0):
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _int(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        for name in ("v_lr", "clamp_norm_factor", "max_update_ratio", "mom2_update_weight"):
            if not _num(getattr(self, name)) or getattr(self, name) <= 0:
                raise InputError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("v_loss_stop", "kl_factor", "v_weight_decay"):
            if not _num(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        if self.v_precision not in ("float32", "bfloat16"):
            raise InputError(f"v_precision must be 'float32' or 'bfloat16', got {self.v_precision!r}")
        if not isinstance(self.kl_prompt, str) or self.kl_prompt.count("{}") != 1:
            raise InputError(f"kl_prompt must contain exactly one '{{}}' for the subject, got {self.kl_prompt!r}")
        if not isinstance(self.mom2_source, str) or not self.mom2_source.strip():
            raise InputError("mom2_source must be 'auto', 'world', 'model', 'hf:NAME[:CONFIG]' or a text file path")
        if not isinstance(self.mom2_adjustment, bool):
            raise InputError(f"mom2_adjustment must be True or False, got {self.mom2_adjustment!r}")
        object.__setattr__(self, "mom2_update_weight", float(self.mom2_update_weight))


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
