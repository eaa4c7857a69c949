"""The value: what the MLP at the lookup token should output so that the model says the new target (ROME, Meng
et al. 2022, Eq. 4).

A vector ``δ`` (d_model) is added to the MLP output of the edit layer at the lookup token of every prompt, and
optimised with Adam so that

    L(δ) = 1/N Σ_j  -log p(target | x_j + prompt ; MLP_out += δ)          (averaged over target tokens)
           + kl_factor · KL( p(· | "{subject} is a" ; +δ) ‖ p(· | "{subject} is a") )
           + v_weight_decay · ‖δ‖ / ‖v‖²

is small, where ``x_j`` are the same context prefixes as the key's and ``v`` the MLP output at the bare
prompt's lookup token before the edit. The KL term (measured, as in ROME, on the distribution at the lookup
token of "{subject} is a") keeps the subject's other properties; after each step ``δ`` is projected into the
ball ‖δ‖ ≤ clamp_norm_factor · ‖v‖. ``v* = v + δ`` is the value the rank-one update writes.

**Only the tokens from the lookup token on are run at each step.** Attention is causal, so a token before the
lookup token never sees ``δ``: its keys and values at every layer are the same at every step. Each prompt is
cut at its lookup token (:func:`~mechedit.editing.rome.repr_tools.split_rows`: prefixes left-padded, so all
lookup tokens share one column), the part before the cut runs once with a KV cache, and each of the ≤20 steps
runs only the rest - the subject's last token, the relation's words and the target - against that cache,
forward and backward. With ~20 context prefixes in front of every prompt that is most of the tokens saved.
:func:`compute_v_reference` runs ROME's way (every prompt whole, through the TransformerBridge, at every step)
and gives the same δ up to floating-point noise; the tests and ``benchmarks/bench_rome.py`` compare them.

``δ`` enters with a forward hook on the layer's MLP output projection that is removed when the forward ends
(:func:`~mechedit.editing.rome.repr_tools.add_to_mlp_output`), and only ``δ`` receives gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mechedit.data import EditRecord
from mechedit.editing.rome.hparams import ROMEHyperParams
from mechedit.editing.rome.repr_tools import (add_to_mlp_output, lookup_index, pad_right, prompt_lookup_index,
                                              split_rows, subject_prompt)
from mechedit.errors import MecheditError
from mechedit.model import LoadedModel, prefix_cache
from mechedit.sites import Site
from mechedit.tracing.common import hooks, prepare_prompt

Progress = Callable[[int, int], None]  # (steps done, steps at most)
# δ (d_model,) -> log-probabilities (n_targets + 1, V) float32: one row per target token, then the KL row. The
# forward records the bare prompt's MLP output at the lookup token (before δ) into the dict it is given.
Forward = Callable[[torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Value:
    delta: torch.Tensor  # (d_model,) float32: δ, the change of the MLP output at the lookup token
    v_init: torch.Tensor  # (d_model,) float32: the MLP output at the bare prompt's lookup token before the edit
    losses: list[dict] = field(default_factory=list)  # per step: total, nll, kl, weight_decay, target_prob

    @property
    def target_prob(self) -> float:
        """Mean probability of the target over the prompts at the last forward (with δ)."""
        return self.losses[-1]["target_prob"] if self.losses else float("nan")

    @property
    def bare_prob(self) -> float:
        """Probability of the target (per-token geometric mean) on the bare prompt at the last forward."""
        return self.losses[-1]["bare_prob"] if self.losses else float("nan")

    def on_clamp(self, clamp_norm_factor: float) -> bool:
        """Whether δ ended on the surface of the ball ‖δ‖ ≤ clamp_norm_factor · ‖v‖."""
        return bool(self.delta.norm() >= 0.999 * clamp_norm_factor * self.v_init.norm())


@dataclass(frozen=True)
class _Rows:
    """The prompts of one value optimisation: the rewriting prompts (prompt with each context prefix, then the
    target's tokens but the last), then the KL prompt; where each one's lookup token is, and what is scored."""

    ids: list[list[int]]  # (R + 1) rows of token ids; the last is the KL prompt
    lookups: list[int]  # lookup token position per row
    targets: list[tuple[int, int, int, float]]  # (row, position, target token, 1/len(target)) per target token


def _rows(model: LoadedModel, request: EditRecord, templates: Sequence[str], hparams: ROMEHyperParams) -> _Rows:
    kp = hparams.key_position
    rewrites = [prepare_prompt(model, t.replace("{}", request.prompt), request.subject, request.target_new)
                for t in templates]
    kl_ids, kl_range = subject_prompt(model, hparams.kl_prompt.replace("{}", request.subject), request.subject)
    targets = [(i, pos, tok, 1.0 / len(p.answer_ids))
               for i, p in enumerate(rewrites) for pos, tok in zip(p.answer_positions, p.answer_ids)]
    return _Rows(ids=[p.input_ids for p in rewrites] + [kl_ids],
                 lookups=[prompt_lookup_index(p, kp) for p in rewrites] + [lookup_index(len(kl_ids), kl_range, kp)],
                 targets=targets)


def _pad_id(model: LoadedModel) -> int:
    return model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0


def compute_v(model: LoadedModel, request: EditRecord, layer: int, templates: Sequence[str],
              hparams: ROMEHyperParams, progress: Progress | None = None) -> Value:
    """Optimise δ for ``request`` at ``layer`` over ``templates`` (``"{}"`` first: the bare prompt)."""
    rows = _rows(model, request, templates, hparams)
    device = model.device
    batch = split_rows(rows.ids, rows.lookups, _pad_id(model))  # every lookup token at suffix column 0
    B, S = batch.suffix.shape
    suffix = batch.suffix.to(device)  # (B, S)
    mask = batch.attention_mask.to(device)  # (B, P + S)
    suffix_pos = batch.positions[:, batch.width:].to(device)  # (B, S)
    cache = None
    if batch.width > 0:  # the tokens before every lookup token: once, keeping their keys and values
        with torch.no_grad():
            cache = prefix_cache(model.hf_model, batch.prefix.to(device), attention_mask=mask[:, :batch.width],
                                 position_ids=batch.positions[:, :batch.width].to(device))
    # the (row, suffix column) of every scored distribution: target tokens, then the KL prompt's lookup token
    # Only those columns are unembedded (``logits_to_keep``): a vocabulary-sized matmul saved per other column.
    cols = [batch.column(r, pos) for r, pos, _, _ in rows.targets] + [0]
    keep = sorted(set(cols))
    pick_row = torch.tensor([r for r, _, _, _ in rows.targets] + [B - 1], device=device)
    pick_col = torch.tensor([keep.index(c) for c in cols], device=device)  # index into the kept columns
    keep = torch.tensor(keep, device=device)
    where = torch.zeros(B, S, 1, device=device)  # (B, S, 1): 1 at each row's lookup token (column 0)
    where[:, 0] = 1.0

    def forward(delta: torch.Tensor, state: dict) -> torch.Tensor:
        def add_delta(act: torch.Tensor) -> torch.Tensor:  # act (B, S, d_model)
            if "v_init" not in state:
                state["v_init"] = act[0, 0].detach().float().clone()  # bare prompt, before any δ
            return act + where.to(act.dtype) * delta.to(act.dtype)

        past = copy.deepcopy(cache)  # a forward appends to the cache it is given: each step gets a fresh one
        with add_to_mlp_output(model, layer, add_delta):
            logits = model.hf_model(input_ids=suffix, attention_mask=mask, position_ids=suffix_pos,
                                    past_key_values=past, use_cache=past is not None,
                                    logits_to_keep=keep).logits  # (B, len(keep), V)
        return logits[pick_row, pick_col].float().log_softmax(dim=-1)  # (n_targets + 1, V)

    return _optimise(model, rows, forward, hparams, progress)


def compute_v_reference(model: LoadedModel, request: EditRecord, layer: int, templates: Sequence[str],
                        hparams: ROMEHyperParams, progress: Progress | None = None) -> Value:
    """:func:`compute_v` as ROME computes it: every prompt whole (right-padded), through the TransformerBridge
    with δ added at ``blocks.L.hook_mlp_out``, at every step. Slower; the same δ up to floating-point noise."""
    rows = _rows(model, request, templates, hparams)
    device = model.device
    x = pad_right(rows.ids, _pad_id(model)).to(device)  # (B, T)
    B, T = x.shape
    where = torch.zeros(B, T, 1, device=device)  # (B, T, 1): 1 at each row's lookup token
    where[torch.arange(B), torch.tensor(rows.lookups)] = 1.0
    pick_row = torch.tensor([r for r, _, _, _ in rows.targets] + [B - 1], device=device)
    pick_pos = torch.tensor([pos for _, pos, _, _ in rows.targets] + [rows.lookups[-1]], device=device)
    hook_name = Site(layer, "mlp_out").hook_name

    def forward(delta: torch.Tensor, state: dict) -> torch.Tensor:
        def add_delta(act: torch.Tensor, hook) -> torch.Tensor:  # act (B, T, d_model)
            if "v_init" not in state:
                state["v_init"] = act[0, rows.lookups[0]].detach().float().clone()  # bare prompt, before any δ
            return act + where.to(act.dtype) * delta.to(act.dtype)

        with hooks(model, [(hook_name, add_delta)]):
            logits = model.bridge(x)  # (B, T, V)
        return logits[pick_row, pick_pos].float().log_softmax(dim=-1)  # (n_targets + 1, V)

    return _optimise(model, rows, forward, hparams, progress)


def _optimise(model: LoadedModel, rows: _Rows, forward: Forward, hparams: ROMEHyperParams,
              progress: Progress | None) -> Value:
    """ROME's Adam loop on δ (see the module docstring), with ``forward`` giving the scored log-probabilities."""
    device = model.device
    n_rewrites = len(rows.ids) - 1
    n_targets = len(rows.targets)
    tgt_row = torch.tensor([r for r, _, _, _ in rows.targets], device=device)  # (n_targets,)
    tgt_tok = torch.tensor([t for _, _, t, _ in rows.targets], device=device)
    tgt_w = torch.tensor([w for _, _, _, w in rows.targets], device=device)  # 1/len(target): a row's mean

    delta = torch.zeros(model.d_model, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    losses: list[dict] = []
    kl_init = None
    if progress is not None:
        progress(0, hparams.v_num_grad_steps)
    for step in range(hparams.v_num_grad_steps):
        log_probs = forward(delta, state)  # (n_targets + 1, V)
        token_lp = log_probs[torch.arange(n_targets, device=device), tgt_tok]  # (n_targets,)
        nll_each = -torch.zeros(n_rewrites, device=device).index_add(0, tgt_row, token_lp * tgt_w)  # (R,)
        nll = nll_each.mean()
        kl_lp = log_probs[n_targets:]  # (1, V)
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")  # KL(now ‖ before)
        v_norm = state["v_init"].norm()
        weight_decay = hparams.v_weight_decay * delta.norm() / v_norm ** 2
        loss = nll + hparams.kl_factor * kl + weight_decay
        record = {"total": loss.item(), "nll": nll.item(), "kl": kl.item(), "weight_decay": weight_decay.item(),
                  "target_prob": torch.exp(-nll_each.detach()).mean().item(),
                  "bare_prob": torch.exp(-nll_each[0].detach()).item()}  # row 0: the bare prompt
        losses.append(record)
        if not torch.isfinite(loss):
            raise MecheditError(f"the value optimisation diverged at step {step} (loss {record['total']}); try a "
                                "smaller v_lr")
        if progress is not None:
            progress(step + 1, hparams.v_num_grad_steps)
        if record["total"] < hparams.v_loss_stop or step == hparams.v_num_grad_steps - 1:
            break  # as ROME: the last forward only measures
        (grad,) = torch.autograd.grad(loss, [delta])  # only δ: no .grad lands on the model's weights
        delta.grad = grad
        opt.step()
        with torch.no_grad():  # project into the ball ‖δ‖ ≤ clamp · ‖v‖
            max_norm = hparams.clamp_norm_factor * v_norm
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return Value(delta=delta.detach().clone(), v_init=state["v_init"], losses=losses)
