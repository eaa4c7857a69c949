"""What the model answers: the greedy next token of each prompt and the probability of named targets.

The small measurement every edit report starts from: ask the edit prompt, its paraphrases and its neighbours
before and after, and print them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechedit.model import LoadedModel
from mechedit.tracing.common import encode_target


@dataclass(frozen=True)
class Answer:
    prompt: str
    top: str  # greedy next token, decoded
    top_prob: float
    target_probs: dict[str, float]  # p(first token of target | prompt) for each named target


@torch.no_grad()
def answers(model: LoadedModel, prompts: list[str], targets: tuple[str, ...] = ()) -> list[Answer]:
    """Greedy next token of each prompt, and each target's first-token probability (targets get a leading
    space by the rule of :func:`mechedit.tracing.common.needs_space`)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([model.encode(prompt)], device=model.device)  # (1, T)
        probs = model.bridge(ids)[0, -1].float().softmax(-1)  # (V,)
        top = int(probs.argmax())
        tp = {t: float(probs[encode_target(model, prompt, t)[0]]) for t in targets if t}
        out.append(Answer(prompt, model.tokenizer.decode([top]), float(probs[top]), tp))
    return out
