"""Tracers: where in the model does a fact live? Each tracer is one module; shared pieces are in ``common``."""

from mechedit.tracing.causal import (
    CausalTraceConfig,
    CausalTraceResult,
    causal_trace,
    causal_trace_reference,
    scaled_window,
    trace_restore_set,
    window_layers,
)
from mechedit.tracing.attribution import AgreementReport, AttributionResult, agreement, attribution_patching
from mechedit.tracing.common import Prompt, find_subject_range, hooks, live_hooks, noise_scale, prepare_prompt
from mechedit.tracing.gradients import GradientNormConfig, GradientNormResult, gradient_norms
from mechedit.tracing.lens import LogitLensConfig, LogitLensResult, logit_lens
from mechedit.tracing.magnitudes import (
    DEFAULT_BASELINE_PROMPTS,
    MagnitudeConfig,
    MagnitudeResult,
    activation_magnitudes,
)
from mechedit.tracing.patching import Hit, PatchingConfig, PatchingResult, activation_patching

__all__ = [
    "AgreementReport",
    "AttributionResult",
    "CausalTraceConfig",
    "CausalTraceResult",
    "DEFAULT_BASELINE_PROMPTS",
    "GradientNormConfig",
    "GradientNormResult",
    "Hit",
    "LogitLensConfig",
    "LogitLensResult",
    "MagnitudeConfig",
    "MagnitudeResult",
    "PatchingConfig",
    "PatchingResult",
    "Prompt",
    "activation_magnitudes",
    "activation_patching",
    "agreement",
    "attribution_patching",
    "causal_trace",
    "causal_trace_reference",
    "find_subject_range",
    "gradient_norms",
    "hooks",
    "live_hooks",
    "logit_lens",
    "noise_scale",
    "prepare_prompt",
    "scaled_window",
    "trace_restore_set",
    "window_layers",
]
