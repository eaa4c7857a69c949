"""Tracers: where in the model does a fact live? Each tracer is one module; shared pieces are in ``common``."""

from mechedit.tracing.causal import (
    CausalTraceConfig,
    CausalTraceResult,
    causal_trace,
    causal_trace_reference,
    trace_restore_set,
    window_layers,
)
from mechedit.tracing.common import Prompt, find_subject_range, hooks, live_hooks, noise_scale, prepare_prompt

__all__ = [
    "CausalTraceConfig",
    "CausalTraceResult",
    "Prompt",
    "causal_trace",
    "causal_trace_reference",
    "find_subject_range",
    "hooks",
    "live_hooks",
    "noise_scale",
    "prepare_prompt",
    "trace_restore_set",
    "window_layers",
]
