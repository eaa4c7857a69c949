"""The target values ``z_i``: what the residual stream after the last edited layer ``L`` should hold at each
request's lookup token so that the model says its new target (MEMIT, Meng et al. 2023, Eq. 16 "compute_z").

Each request ``i`` gets its own vector ``δ_i`` (d_model), added to the output of layer ``L``'s MLP (so to the
residual stream after ``L``) at the lookup token of *its own* prompts only, and

    L_i(δ_i) = 1/N Σ_j -log p(target_i | x_j + prompt_i ; +δ_i)              (mean over target tokens)
               + kl_factor · KL( p(· | "{subject_i} is a" ; +δ_i) ‖ p(· | "{subject_i} is a") )
               + v_weight_decay · ‖δ_i‖ / ‖z_i‖²

is minimised with Adam, ``δ_i`` projected into ‖δ_i‖ ≤ clamp_norm_factor · ‖z_i‖ after each step (``z_i``: the
residual before the edit). ``z_i + δ_i`` is the target value. This is ROME's ``compute_v`` for every request at
once: the prompts of ``batch_requests`` requests share each forward, and one Adam step updates all their ``δ_i``
with the gradient of Σ_i L_i - which is each request's own gradient, since ``δ_i`` enters only its own rows.
Adam is element-wise, so this *is* n independent optimisations, done ``batch_requests`` at a time. A request
whose loss drops below ``v_loss_stop`` stops moving and leaves the batch (ROME's early stop, per request).
Requests about the same subject share one ``δ`` (see :func:`compute_zs`).

What makes thousands of requests affordable on a CPU, without changing the result:

* **the tokens before the lookup token are run once.** ``δ`` enters at the lookup token, so nothing before it
  depends on ``δ``: each prompt is split there, its prefix run once (no gradient) into a key/value cache, and
  each step runs only the suffix (lookup token, the rest of the prompt, the target but its last token) on top of
  that cache. The KL prompt needs its lookup token alone;
* **only the blocks above the value layer ``L`` run at each step.** Nothing up to ``L`` depends on ``δ`` either:
  the residual stream after block ``L`` on the suffix is read once (``δ`` = 0), and each step adds ``δ`` to it at
  the lookup token and runs blocks ``L+1…`` on top of the prefix cache (blocks ``0…L`` are swapped for a
  pass-through and a read-out while the forward runs, :func:`_upper_layers_only`, so the model's own forward
  does masks, positions and caches for every architecture);
* **no padding after the cut.** Rows are grouped by suffix length (2-7 tokens on the embedded world; one for the
  KL prompts), each group one forward per step, instead of every row padded to the longest;
* only the answer positions (and the KL prompt's lookup token) are unembedded;
* gradients flow to ``δ`` only: the optimisation runs on an un-bridged copy of the model whose weights do not
  require gradients (:func:`mechedit.editing.training.unbridged_copy`; the live model is only read).

:func:`compute_zs_reference` is the earlier way (every block on right-padded suffixes, ``δ`` added by a hook on
``L``'s MLP output); the tests check both give the same δ. ``v_precision="bfloat16"`` runs the matrix products of
the fast path in bfloat16 (close to, not equal to, the float32 result).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from mechedit.editing.memit.compute_ks import Prepared
from mechedit.editing.memit.hparams import MEMITHyperParams
from mechedit.editing.rome.repr_tools import lookup_index, subject_prompt
from mechedit.editing.training import unbridged_copy
from mechedit.errors import MecheditError
from mechedit.model import LoadedModel, prefix_cache, resolve_module

Progress = Callable[[int, int], None]  # (requests done, requests in all)


@dataclass(frozen=True, eq=False)
class Values:
    delta: torch.Tensor  # (n, d_model) float32: δ_i
    z_init: torch.Tensor  # (n, d_model) float64: residual after layer L at the bare prompt's lookup token
    loss: torch.Tensor  # (n,) each request's loss at its last forward
    target_prob: torch.Tensor  # (n,) mean p(target) over its templates at its last forward (geometric per token)
    steps: torch.Tensor  # (n,) forwards each request took part in

    @property
    def z(self) -> torch.Tensor:
        """The target values z_i + δ_i, (n, d_model) float64."""
        return self.z_init + self.delta.double()


@contextmanager
def _add_first(module: torch.nn.Module, values: Callable[[], torch.Tensor]):
    """While active, ``values()`` (B, d) is added to ``module``'s output (B, S, d) at position 0 of each row."""

    def hook(mod, args, output):
        v = values().to(output.dtype)  # (B, d)
        return torch.cat([output[:, :1] + v[:, None], output[:, 1:]], dim=1)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def compute_zs(model: LoadedModel, prep: Prepared, layer: int, z_init: torch.Tensor, hparams: MEMITHyperParams,
               progress: Progress | None = None, *, hf: torch.nn.Module | None = None) -> Values:
    """Optimise every request's δ at ``layer`` (see the module docstring). ``z_init``: (n, d_model) from
    :func:`~mechedit.editing.memit.compute_ks.read_resid` at ``layer``. ``hf``: an un-bridged copy of ``model``
    with the same weights, to reuse (sequential editing keeps one); made here when not given.

    Requests about the same subject share one δ, optimised on the sum of their losses: δ sits at the subject's
    last token, where the subject's attributes are looked up before the relation is known, so separate δs for
    "X was born in → A" and "X speaks → B" would each undo the other (MEMIT's own mass-editing set, MCF, drops
    such records instead; a world with more facts than subjects cannot).

    Each step runs only the blocks above ``layer``, on the tokens from each prompt's lookup token on, prompts
    grouped by that length (no padding); :func:`compute_zs_reference` gives the same result to float tolerance.
    """
    return _compute_zs(model, prep, layer, z_init, hparams, progress, hf, _optimise_chunk)


def compute_zs_reference(model: LoadedModel, prep: Prepared, layer: int, z_init: torch.Tensor,
                         hparams: MEMITHyperParams, progress: Progress | None = None, *,
                         hf: torch.nn.Module | None = None) -> Values:
    """:func:`compute_zs` the earlier way, kept to check the fast path against: every step runs every layer on
    the suffix tokens (right-padded to the longest), with ``δ`` added by a hook on ``layer``'s MLP output."""
    return _compute_zs(model, prep, layer, z_init, hparams, progress, hf, _optimise_chunk_reference)


def _compute_zs(model: LoadedModel, prep: Prepared, layer: int, z_init: torch.Tensor, hparams: MEMITHyperParams,
                progress: Progress | None, hf: torch.nn.Module | None, optimise_chunk: Callable) -> Values:
    """Both ways: the requests in chunks of whole subject groups, each chunk optimised by ``optimise_chunk``."""
    n = prep.n
    if hf is None:
        hf = unbridged_copy(model)
    for p in hf.parameters():
        p.requires_grad_(False)
    kl = []
    for r in prep.requests:
        ids, rng = subject_prompt(model, hparams.kl_prompt.replace("{}", r.subject), r.subject)
        kl.append((ids, lookup_index(len(ids), rng, hparams.key_position)))
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(prep.requests):
        groups.setdefault(r.subject.strip(), []).append(i)
    out = Values(delta=torch.zeros(n, model.d_model), z_init=z_init, loss=torch.full((n,), float("nan")),
                 target_prob=torch.full((n,), float("nan")), steps=torch.zeros(n, dtype=torch.long))
    if progress is not None:
        progress(0, n)
    chunk: list[list[int]] = []
    done = 0
    for g in list(groups.values()) + [None]:
        if g is None or (chunk and sum(map(len, chunk)) + len(g) > hparams.batch_requests):
            if chunk:
                optimise_chunk(model, hf, prep, chunk, kl, layer, hparams, out)
                done += sum(map(len, chunk))
                if progress is not None:
                    progress(done, n)
            chunk = []
        if g is not None:
            chunk.append(g)
    return out


def _optimise_chunk_reference(model: LoadedModel, hf: torch.nn.Module, prep: Prepared, group_list: list[list[int]],
                              kl: list, layer: int, hparams: MEMITHyperParams, out: Values) -> None:
    dev = model.device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    root = resolve_module(hf, model.arch.layers.split(".")[0])  # the decoder stack with its final norm
    unembed = resolve_module(hf, model.arch.unembed)
    mlp_out = resolve_module(hf, model.module_name(layer, "mlp_out"))
    chunk = [i for g in group_list for i in g]  # the requests, group by group
    member_group = torch.tensor([k for k, g in enumerate(group_list) for _ in g], device=dev)  # (m,)
    n_t, m, mg = len(prep.templates), len(chunk), len(group_list)

    # Rows: every template of every request (request-major), then one KL row per request. Each row is split at
    # its lookup token: prefix ids[:p] (run once), suffix ids[p:] (run every step, δ added at its position 0).
    prefixes, suffixes, row_req = [], [], []
    t_row, t_pos, t_tok, t_w = [], [], [], []  # every target token: row, suffix position, id, weight
    for c, i in enumerate(chunk):
        for j, p in enumerate(prep.prompts[i]):
            cut = int(prep.lookups[i, j])
            b = len(prefixes)
            prefixes.append(p.input_ids[:cut]), suffixes.append(p.input_ids[cut:]), row_req.append(c)
            for pos, tok in zip(p.answer_positions, p.answer_ids):
                t_row.append(b), t_pos.append(pos - cut), t_tok.append(tok), t_w.append(1.0 / len(p.answer_ids))
    first_kl = len(prefixes)
    for c, i in enumerate(chunk):
        ids, cut = kl[i]
        prefixes.append(ids[:cut]), suffixes.append(ids[cut:cut + 1]), row_req.append(c)
    B = len(prefixes)
    P, S = max(map(len, prefixes)), max(map(len, suffixes))
    x_pre = torch.full((B, P), pad, dtype=torch.long)  # (B, P) left-padded
    x_suf = torch.full((B, S), pad, dtype=torch.long)  # (B, S) right-padded
    mask = torch.zeros((B, P + S), dtype=torch.long)
    for b, (pre, suf) in enumerate(zip(prefixes, suffixes)):
        if pre:
            x_pre[b, P - len(pre):] = torch.tensor(pre)
        x_suf[b, :len(suf)] = torch.tensor(suf)
        mask[b, P - len(pre):P + len(suf)] = 1
    pre_len = torch.tensor([len(p) for p in prefixes])
    pos_pre = (torch.arange(P)[None, :] - (P - pre_len)[:, None]).clamp_min(0)  # (B, P)
    pos_suf = pre_len[:, None] + torch.arange(S)[None, :]  # (B, S)
    x_pre, x_suf, mask, pos_pre, pos_suf = (t.to(dev) for t in (x_pre, x_suf, mask, pos_pre, pos_suf))
    past = None
    if P > 0:
        from transformers import DynamicCache

        with torch.no_grad():
            cache = prefix_cache(root, x_pre, attention_mask=mask[:, :P], position_ids=pos_pre)
        past = [(lay.keys.detach(), lay.values.detach()) for lay in cache.layers]  # per layer (B, h, P, d_head)

    row_req = torch.tensor(row_req, device=dev)
    t_row, t_pos, t_tok = (torch.tensor(a, device=dev) for a in (t_row, t_pos, t_tok))
    t_w = torch.tensor(t_w, device=dev)
    z_norm_m = out.z_init[chunk].norm(dim=1).float().to(dev).clamp_min(1e-12)  # (m,)
    z_norm = torch.zeros(mg, device=dev).index_add(0, member_group, z_norm_m) / torch.bincount(
        member_group, minlength=mg)  # (mg,) mean over each group's requests
    delta = torch.zeros(mg, model.d_model, device=dev, requires_grad=True)  # one δ per subject
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = None
    active = torch.ones(mg, dtype=torch.bool, device=dev)  # groups still moving
    for step in range(hparams.v_num_grad_steps):
        last = step == hparams.v_num_grad_steps - 1
        member_active = active[member_group]  # (m,)
        rows = member_active[row_req].nonzero().squeeze(1)  # (B',) the rows of the requests still moving
        new_index = torch.full((B,), -1, dtype=torch.long, device=dev)
        new_index[rows] = torch.arange(len(rows), device=dev)
        kwargs = {}
        if past is not None:
            kwargs["past_key_values"] = DynamicCache([(k[rows], v[rows]) for k, v in past])
        with _add_first(mlp_out, lambda r=rows: delta[member_group[row_req[r]]]):
            hidden = root(input_ids=x_suf[rows], attention_mask=mask[rows], position_ids=pos_suf[rows],
                          use_cache=past is not None, **kwargs).last_hidden_state  # (B', S, d_model)
        keep_t = member_active[row_req[t_row]]
        tr, tp, tt, tw = t_row[keep_t], t_pos[keep_t], t_tok[keep_t], t_w[keep_t]
        lp = unembed(hidden[new_index[tr], tp]).float().log_softmax(-1)  # (targets, V)
        token_lp = lp[torch.arange(len(tt), device=dev), tt]
        row_nll = -torch.zeros(B, device=dev).index_add(0, tr, token_lp * tw)  # (B,) zero on inactive rows
        nll = row_nll[:first_kl].reshape(m, n_t).mean(dim=1)  # (m,)
        kl_lp = unembed(hidden[new_index[first_kl:].clamp_min(0), 0]).float().log_softmax(-1)  # (m, V)
        if kl_init is None:  # first forward: every δ is 0, every request active
            kl_init = kl_lp.detach().clone()
        kl_div = (kl_lp.exp() * (kl_lp - kl_init)).sum(dim=-1)  # (m,) KL(now ‖ before), as ROME
        wd = hparams.v_weight_decay * delta.norm(dim=1) / z_norm ** 2  # (mg,)
        loss = nll + hparams.kl_factor * kl_div  # (m,), meaningful on active requests
        moving = _record_and_check(prep, chunk, member_group, member_active, active, loss, wd, row_nll, first_kl,
                                   n_t, hparams, out, last)
        if not moving.any():
            break
        group_loss = torch.zeros(mg, device=dev).index_add(0, member_group, loss) + wd  # (mg,)
        _adam_step(delta, opt, group_loss, moving, hparams.clamp_norm_factor * z_norm)
        active = moving
    out.delta[chunk] = delta.detach().float().cpu()[member_group.cpu()]


def _record_and_check(prep: Prepared, chunk: list[int], member_group: torch.Tensor, member_active: torch.Tensor,
                      active: torch.Tensor, loss: torch.Tensor, wd: torch.Tensor, row_nll: torch.Tensor,
                      first_kl: int, n_t: int, hparams: MEMITHyperParams, out: Values, last: bool) -> torch.Tensor:
    """Record the active requests' loss, p(target) and step count; raise on a non-finite loss. Returns the
    groups that keep moving: a group stops once each of its requests is below the stop loss (ROME's early
    stop), and every group stops at the last step."""
    m, mg = len(chunk), len(active)
    with torch.no_grad():
        if not torch.isfinite(loss[member_active]).all():
            bad = [prep.requests[chunk[c]].case_id for c in range(m)
                   if member_active[c] and not torch.isfinite(loss[c])]
            raise MecheditError(f"the value optimisation diverged for request(s) {bad[:5]}; try a smaller "
                                "v_lr. Nothing was changed")
        prob = torch.exp(-row_nll[:first_kl]).reshape(m, n_t).mean(dim=1)
        total = loss + wd[member_group]
        idx = torch.tensor(chunk)[member_active.cpu()]
        out.loss[idx] = total[member_active].float().cpu()
        out.target_prob[idx] = prob[member_active].cpu()
        out.steps[idx] += 1
        above = torch.zeros(mg, device=loss.device).index_add(0, member_group,
                                                                (total >= hparams.v_loss_stop).float())
        return active & (above > 0) if not last else torch.zeros_like(active)


def _adam_step(delta: torch.Tensor, opt: torch.optim.Optimizer, group_loss: torch.Tensor, moving: torch.Tensor,
               max_norm: torch.Tensor) -> None:
    """One Adam step of the moving groups' δ on the gradient of their summed loss (the others keep their δ),
    then each δ projected into the ball ‖δ‖ ≤ max_norm."""
    (grad,) = torch.autograd.grad(group_loss[moving].sum(), [delta])
    delta.grad = grad
    keep = delta.detach().clone()
    opt.step()
    with torch.no_grad():
        delta[~moving] = keep[~moving]  # converged requests do not move
        norms = delta.norm(dim=1)
        delta.mul_(torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))[:, None])


class _Stop(Exception):
    pass


@contextmanager
def _upper_layers_only(layers: torch.nn.ModuleList, layer: int, value: Callable[[], torch.Tensor]):
    """While active, blocks ``0..layer-1`` of ``layers`` pass their input through and block ``layer`` returns
    ``value()`` (B, S, d_model) instead of computing: a forward then runs only the blocks above ``layer`` on
    that residual stream (the embedding still runs; its output is discarded). Restored in a ``finally``."""

    def through(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def replaced(*args, **kwargs):
        return value()

    for k in range(layer + 1):
        layers[k].forward = replaced if k == layer else through
    try:
        yield
    finally:
        for k in range(layer + 1):
            del layers[k].forward  # the instance attribute goes; the class's forward is back


@dataclass(eq=False)
class _Bucket:
    """Rows whose suffixes have one length, laid out once (no padding after the cut)."""

    rows: torch.Tensor  # (b,) long: global row numbers
    split: object  # repr_tools.SplitBatch
    past: list | None  # per decoder layer (keys, values) of the prefixes, (b, h, P, d_head); None when P = 0
    resid: torch.Tensor  # (b, S, d_model): residual stream after the value layer on the suffix, δ = 0
    t_local: torch.Tensor  # (t,) bucket row of every target token
    t_pos: torch.Tensor  # (t,) its suffix column
    t_tok: torch.Tensor  # (t,) its id
    t_w: torch.Tensor  # (t,) its weight (1 / target length)
    t_row: torch.Tensor  # (t,) its global row
    kl_local: torch.Tensor  # (k,) bucket rows that are KL rows
    kl_req: torch.Tensor  # (k,) their request (position in the chunk)


def _layer_output(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise MecheditError(f"a decoder block returned a {type(output).__name__}, not a tensor; MEMIT's value "
                            "optimisation needs transformers >= 5 (blocks return their hidden states)")
    return output


def _optimise_chunk(model: LoadedModel, hf: torch.nn.Module, prep: Prepared, group_list: list[list[int]], kl: list,
                    layer: int, hparams: MEMITHyperParams, out: Values) -> None:
    from transformers import DynamicCache

    from mechedit.editing.rome.repr_tools import split_rows

    dev = model.device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    root = resolve_module(hf, model.arch.layers.split(".")[0])  # the decoder stack with its final norm
    blocks = resolve_module(hf, model.arch.layers)
    unembed = resolve_module(hf, model.arch.unembed)
    chunk = [i for g in group_list for i in g]  # the requests, group by group
    member_group = torch.tensor([k for k, g in enumerate(group_list) for _ in g], device=dev)  # (m,)
    n_t, m, mg = len(prep.templates), len(chunk), len(group_list)

    # Rows as in the reference: every template of every request (request-major), then one KL row per request,
    # each cut at its lookup token. Rows are grouped by the length of the part from the cut on.
    seqs, cuts, row_req, targets = [], [], [], []  # targets: per row [(suffix column, id, weight)]
    for c, i in enumerate(chunk):
        for j, p in enumerate(prep.prompts[i]):
            cut = int(prep.lookups[i, j])
            seqs.append(p.input_ids), cuts.append(cut), row_req.append(c)
            targets.append([(pos - cut, tok, 1.0 / len(p.answer_ids))
                            for pos, tok in zip(p.answer_positions, p.answer_ids)])
    first_kl = len(seqs)
    for c, i in enumerate(chunk):
        ids, cut = kl[i]
        seqs.append(ids[:cut + 1]), cuts.append(cut), row_req.append(c), targets.append([])
    B = len(seqs)
    by_len: dict[int, list[int]] = {}
    for b in range(B):
        by_len.setdefault(len(seqs[b]) - cuts[b], []).append(b)

    buckets = []
    for rows in by_len.values():
        split = split_rows([seqs[b] for b in rows], [cuts[b] for b in rows], pad)
        mask, pos = split.attention_mask.to(dev), split.positions.to(dev)
        P = split.width
        past = None
        with torch.no_grad():
            if P > 0:
                cache = prefix_cache(root, split.prefix.to(dev), attention_mask=mask[:, :P],
                                     position_ids=pos[:, :P])
                past = [(lay.keys, lay.values) for lay in cache.layers]  # per layer (b, h, P, d_head)
            box = {}

            def grab(mod, args, output, box=box):
                box["resid"] = _layer_output(output).detach()
                raise _Stop

            handle = blocks[layer].register_forward_hook(grab)
            try:
                root(input_ids=split.suffix.to(dev), attention_mask=mask, position_ids=pos[:, P:],
                     past_key_values=DynamicCache(past) if past is not None else None, use_cache=past is not None)
            except _Stop:
                pass
            finally:
                handle.remove()
        t = [(lb, col, tok, w, b) for lb, b in enumerate(rows) for col, tok, w in targets[b]]
        t_local, t_pos, t_tok, t_w, t_row = (
            torch.tensor([x[k] for x in t], dtype=torch.float32 if k == 3 else torch.long, device=dev)
            for k in range(5))
        kl_local = [lb for lb, b in enumerate(rows) if b >= first_kl]
        buckets.append(_Bucket(torch.tensor(rows, device=dev), split, past, box["resid"], t_local, t_pos, t_tok,
                               t_w, t_row, torch.tensor(kl_local, dtype=torch.long, device=dev),
                               torch.tensor([row_req[rows[lb]] for lb in kl_local], dtype=torch.long, device=dev)))

    row_req = torch.tensor(row_req, device=dev)
    z_norm_m = out.z_init[chunk].norm(dim=1).float().to(dev).clamp_min(1e-12)  # (m,)
    z_norm = torch.zeros(mg, device=dev).index_add(0, member_group, z_norm_m) / torch.bincount(
        member_group, minlength=mg)  # (mg,) mean over each group's requests
    delta = torch.zeros(mg, model.d_model, device=dev, requires_grad=True)  # one δ per subject
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    kl_init = torch.zeros(m, unembed.weight.shape[0], device=dev)  # (m, V) set at the first forward (δ = 0)
    active = torch.ones(mg, dtype=torch.bool, device=dev)  # groups still moving
    # bfloat16 (hparams.v_precision): matrix products of the forward and backward in bfloat16, the rest float32
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=hparams.v_precision == "bfloat16")
    views: dict[int, tuple] = {}  # bucket -> (active mask it was cut for, its tensors for those rows)
    for step in range(hparams.v_num_grad_steps):
        last = step == hparams.v_num_grad_steps - 1
        member_active = active[member_group]  # (m,)
        row_nll = torch.zeros(B, device=dev)
        kl_div = torch.zeros(m, device=dev)
        for k, bk in enumerate(buckets):
            on = member_active[row_req[bk.rows]]  # (b,)
            if not on.any():
                continue
            if k not in views or not torch.equal(views[k][0], on):
                sel = on.nonzero().squeeze(1)
                local = torch.full((len(on),), -1, dtype=torch.long, device=dev)
                local[sel] = torch.arange(len(sel), device=dev)
                t_on, kl_on = on[bk.t_local], on[bk.kl_local]
                P = bk.split.width
                mask, pos = bk.split.attention_mask.to(dev)[sel], bk.split.positions.to(dev)[sel]
                views[k] = (on, SimpleNamespace(
                    sel=sel, ids=bk.split.suffix.to(dev)[sel], mask=mask, pos=pos[:, P:], resid=bk.resid[sel],
                    past=[(kk[sel], vv[sel]) for kk, vv in bk.past] if bk.past is not None else None,
                    groups=member_group[row_req[bk.rows[sel]]],
                    t_local=local[bk.t_local[t_on]], t_pos=bk.t_pos[t_on], t_tok=bk.t_tok[t_on],
                    t_w=bk.t_w[t_on], t_row=bk.t_row[t_on],
                    kl_local=local[bk.kl_local[kl_on]], kl_req=bk.kl_req[kl_on]))
            v = views[k][1]

            def value(v=v):  # the residual after `layer` with each row's δ added at its lookup token
                r = v.resid
                return torch.cat([r[:, :1] + delta[v.groups][:, None].to(r.dtype), r[:, 1:]], dim=1)

            with _upper_layers_only(blocks, layer, value), autocast:
                hidden = root(input_ids=v.ids, attention_mask=v.mask, position_ids=v.pos,
                              past_key_values=DynamicCache(v.past) if v.past is not None else None,
                              use_cache=v.past is not None).last_hidden_state  # (b', S, d_model)
            with autocast:
                if len(v.t_tok):
                    lp = unembed(hidden[v.t_local, v.t_pos]).float().log_softmax(-1)  # (targets, V)
                    token_lp = lp[torch.arange(len(v.t_tok), device=dev), v.t_tok]
                    row_nll = row_nll.index_add(0, v.t_row, -token_lp * v.t_w)
                if len(v.kl_req):
                    kl_lp = unembed(hidden[v.kl_local, 0]).float().log_softmax(-1)  # (k', V)
                    if step == 0:
                        kl_init[v.kl_req] = kl_lp.detach()
                    kl_div = kl_div.index_add(0, v.kl_req,
                                              (kl_lp.exp() * (kl_lp - kl_init[v.kl_req])).sum(dim=-1))
        nll = row_nll[:first_kl].reshape(m, n_t).mean(dim=1)  # (m,)
        wd = hparams.v_weight_decay * delta.norm(dim=1) / z_norm ** 2  # (mg,)
        loss = nll + hparams.kl_factor * kl_div  # (m,), meaningful on active requests
        moving = _record_and_check(prep, chunk, member_group, member_active, active, loss, wd, row_nll, first_kl,
                                   n_t, hparams, out, last)
        if not moving.any():
            break
        group_loss = torch.zeros(mg, device=dev).index_add(0, member_group, loss) + wd  # (mg,)
        _adam_step(delta, opt, group_loss, moving, hparams.clamp_norm_factor * z_norm)
        active = moving
    out.delta[chunk] = delta.detach().float().cpu()[member_group.cpu()]
