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

The model runs its real forward (through the TransformerBridge); ``δ`` enters with a hook on
``blocks.L.hook_mlp_out`` that is removed when the forward ends, and only ``δ`` receives gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mechedit.data import EditRecord
from mechedit.editing.rome.hparams import ROMEHyperParams
from mechedit.editing.rome.repr_tools import lookup_index, pad_right, prompt_lookup_index, subject_prompt
from mechedit.errors import MecheditError
from mechedit.model import LoadedModel
from mechedit.sites import Site
from mechedit.tracing.common import hooks, prepare_prompt

Progress = Callable[[int, int], None]  # (steps done, steps at most)


@dataclass(frozen=True, eq=False)
class Value:
    delta: torch.Tensor  # (d_model,) float32: δ, the change of the MLP output at the lookup token
    v_init: torch.Tensor  # (d_model,) float32: the MLP output at the bare prompt's lookup token before the edit
    losses: list[dict] = field(default_factory=list)  # per step: total, nll, kl, weight_decay, target_prob

    @property
    def target_prob(self) -> float:
        """Mean probability of the target over the prompts at the last forward (with δ)."""
        return self.losses[-1]["target_prob"] if self.losses else float("nan")


def compute_v(model: LoadedModel, request: EditRecord, layer: int, templates: Sequence[str],
              hparams: ROMEHyperParams, progress: Progress | None = None) -> Value:
    """Optimise δ for ``request`` at ``layer`` over ``templates`` (``"{}"`` first: the bare prompt)."""
    kp = hparams.key_position
    # Rewriting prompts: prompt (with prefix) + target tokens but the last, scored under teacher forcing.
    rewrites = [prepare_prompt(model, t.replace("{}", request.prompt), request.subject, request.target_new)
                for t in templates]
    kl_ids, kl_range = subject_prompt(model, hparams.kl_prompt.replace("{}", request.subject), request.subject)
    rows = [p.input_ids for p in rewrites] + [kl_ids]
    lookups = [prompt_lookup_index(p, kp) for p in rewrites] + [lookup_index(len(kl_ids), kl_range, kp)]
    kl_row, kl_pos = len(rows) - 1, lookups[-1]

    device = model.device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    x = pad_right(rows, pad).to(device)  # (B, T)
    B, T = x.shape
    where = torch.zeros(B, T, 1, device=device)  # (B, T, 1): 1 at each row's lookup token
    where[torch.arange(B), torch.tensor(lookups)] = 1.0
    # flat (row, position, token, weight) of every target token: weight 1/len(target) averages within a row
    tgt_row, tgt_pos, tgt_tok, tgt_w = [], [], [], []
    for i, p in enumerate(rewrites):
        for pos, tok in zip(p.answer_positions, p.answer_ids):
            tgt_row.append(i), tgt_pos.append(pos), tgt_tok.append(tok), tgt_w.append(1.0 / len(p.answer_ids))
    tgt_row, tgt_pos, tgt_tok = (torch.tensor(a, device=device) for a in (tgt_row, tgt_pos, tgt_tok))
    tgt_w = torch.tensor(tgt_w, device=device)
    n_rewrites = len(rewrites)

    delta = torch.zeros(model.d_model, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def add_delta(act: torch.Tensor, hook) -> torch.Tensor:  # act (B, T, d_model)
        if "v_init" not in state:
            state["v_init"] = act[0, lookups[0]].detach().float().clone()  # bare prompt, before any δ
        return act + where.to(act.dtype) * delta.to(act.dtype)

    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    hook_name = Site(layer, "mlp_out").hook_name
    losses: list[dict] = []
    kl_init = None
    if progress is not None:
        progress(0, hparams.v_num_grad_steps)
    for step in range(hparams.v_num_grad_steps):
        with hooks(model, [(hook_name, add_delta)]):
            logits = model.bridge(x)  # (B, T, V)
        log_probs = logits.float().log_softmax(dim=-1)  # (B, T, V)
        token_lp = log_probs[tgt_row, tgt_pos, tgt_tok]  # (n target tokens,)
        nll_each = -torch.zeros(n_rewrites, device=device).index_add(0, tgt_row, token_lp * tgt_w)  # (R,)
        nll = nll_each.mean()
        kl_lp = log_probs[kl_row, kl_pos][None]  # (1, V)
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")  # KL(now ‖ before)
        v_norm = state["v_init"].norm()
        weight_decay = hparams.v_weight_decay * delta.norm() / v_norm ** 2
        loss = nll + hparams.kl_factor * kl + weight_decay
        record = {"total": loss.item(), "nll": nll.item(), "kl": kl.item(), "weight_decay": weight_decay.item(),
                  "target_prob": torch.exp(-nll_each.detach()).mean().item()}
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
