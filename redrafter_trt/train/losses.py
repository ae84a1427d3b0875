"""Training-time semantics of the draft head: the D unrolled draft steps and the losses.

Indexing (identical to :meth:`redrafter_trt.models.drafter.Drafter.beam_search`): for a position
``t`` of a sequence ``x``, the context is ``c_t`` (base hidden state at ``t``, after the final
norm) and the root is ``x_{t+1}`` (the base's own next token). Draft step ``i`` (1..D) updates the
state with the embedding of the previous token,

    s_1 = update(0, E(x_{t+1})),   s_i = update(s_{i-1}, E(x_{t+i})),

and ``head(c_t, s_i)`` predicts ``x_{t+i+1}``. Its distillation teacher is the base's next-token
distribution at position ``t+i``, ``p_base(. | x_{<= t+i})``. Depth ``i`` of position ``t`` is
used when ``x_{t+i+1}`` lies in the same sequence and is a training target.

Everything is vectorised over positions; the only loop is over the D draft steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.drafter import Drafter


@dataclass
class DraftBatch:
    """One batch of N positions, D draft steps each."""

    context: torch.Tensor  # [N, H] float32, c_t
    in_tokens: torch.Tensor  # [N, D] int64, x_{t+1} .. x_{t+D} (state-update inputs)
    labels: torch.Tensor  # [N, D] int64, x_{t+2} .. x_{t+D+1}
    valid: torch.Tensor  # [N, D] bool
    teacher_pos: torch.Tensor  # [N, D] int64, stream index t+1 .. t+D of the teacher distribution


def gather_batch(
    tokens: torch.Tensor,
    targets: torch.Tensor,
    seq_end: torch.Tensor,
    hidden: torch.Tensor,
    pos: torch.Tensor,
    draft_len: int,
) -> DraftBatch:
    """Build a :class:`DraftBatch` for stream positions ``pos`` [N] of a flat token stream.

    Args:
        tokens: [S] int64; targets: [S] bool; seq_end: [S] int64 exclusive end of each token's
            sequence; hidden: [S, H] base hidden states; pos: [N] int64; draft_len: D.
    """
    s = tokens.shape[0]
    i = torch.arange(draft_len, dtype=torch.int64)
    inp = pos[:, None] + 1 + i[None, :]  # t+1 .. t+D
    lab = inp + 1  # t+2 .. t+D+1
    valid = (lab < seq_end[pos][:, None]) & targets[lab.clamp(max=s - 1)]
    return DraftBatch(
        context=hidden[pos].to(torch.float32),
        in_tokens=tokens[inp.clamp(max=s - 1)],
        labels=tokens[lab.clamp(max=s - 1)],
        valid=valid,
        teacher_pos=inp.clamp(max=s - 1),
    )


class UnrolledHead(nn.Module):
    """The draft head unrolled over D steps with teacher forcing (a module, so DDP can wrap it).

    ``forward(context [N, H], emb [N, D, H], valid [N, D] | None)`` returns the draft logits
    [N, D, V], or only the valid rows [M, V] (the vocabulary projection then runs on those rows
    only). Step i's state update takes ``emb[:, i]`` = E(x_{t+1+i}); the logits are exactly
    :meth:`Drafter.logits` of (context, state).
    """

    def __init__(self, drafter: Drafter):
        super().__init__()
        self.drafter = drafter

    def forward(
        self,
        context: torch.Tensor,
        emb: torch.Tensor,
        valid: torch.Tensor | None = None,
        project: bool = True,
    ):
        """``project=False`` returns the inputs of the final vocabulary projection instead of logits
        (for :func:`logit_match_loss`, which never forms the [M, V] logits)."""
        d = self.drafter
        state = torch.zeros_like(context)
        states = []
        for i in range(emb.shape[1]):
            state = d.update_state(state, emb[:, i].to(state.dtype))
            states.append(state)
        s = torch.stack(states, dim=1)  # [N, D, H]
        x = torch.cat([context[:, None, :].expand(-1, s.shape[1], context.shape[-1]), s], dim=-1)
        if d.input_proj is not None:
            x = d.input_proj(x)
        for layer in d.lm_head[:-1]:
            x = layer(x)
        if valid is not None:
            x = x[valid]
        return d.projection(x) if project else x


def unrolled_logits(
    drafter: Drafter, embedding: nn.Embedding, context: torch.Tensor, in_tokens: torch.Tensor
) -> torch.Tensor:
    """Draft logits [N, D, V] of the D unrolled steps (teacher forcing on ``in_tokens`` [N, D])."""
    with torch.no_grad():  # the base embedding is shared and frozen
        emb = embedding(in_tokens)
    return UnrolledHead(drafter)(context, emb)


def _loss_and_grad(
    logits, labels, t_ids, t_probs, temperature, alpha
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row loss ``alpha * T^2 * KL(p_teacher || softmax(z/T)) + (1-alpha) * CE(z, label)`` [M],
    its gradient in the logits ``alpha*T*(softmax(z/T) - p) + (1-alpha)*(softmax(z) -
    onehot(label))`` [M, V] in one float32 buffer (no log-softmax output kept), the argmax [M])."""
    z = logits.detach()
    if z.dtype != torch.float64:
        z = z.to(torch.float32)
    if t_probs is not None:
        t_probs = t_probs.to(z.dtype)
    rows = torch.arange(z.shape[0], device=z.device)
    kd, ce = alpha > 0, alpha < 1
    loss = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    grad = None
    # one softmax when T == 1 (or a single term), two otherwise
    temps = (
        [1.0] if not kd else [temperature] if (not ce or temperature == 1.0) else [temperature, 1.0]
    )
    lse = {}
    top = z.argmax(-1)  # the same for every T > 0
    for temp in temps:
        zt = z / temp if temp != 1.0 else z
        zt = torch.softmax(zt, dim=-1)  # fused; a new buffer that becomes the gradient
        # log-sum-exp from the largest probability (>= 1/V, so its log is exact enough)
        lse[temp] = z[rows, top] / temp - zt[rows, top].log()
        scale = 0.0
        if kd and temp == temperature:
            scale += alpha * temperature
        if ce and temp == 1.0:
            scale += 1 - alpha
        if grad is None:
            grad = zt.mul_(scale) if scale != 1.0 else zt
        else:
            grad.add_(zt, alpha=scale)
    if kd:
        lq = (z if t_ids is None else z.gather(1, t_ids)) / temperature - lse[temperature][:, None]
        kl = (torch.xlogy(t_probs, t_probs) - t_probs * lq).sum(-1)
        loss += alpha * temperature**2 * kl
        if t_ids is None:
            grad.add_(t_probs, alpha=-alpha * temperature)
        else:
            grad.scatter_add_(1, t_ids, t_probs * (-alpha * temperature))
    if ce:
        loss += (1 - alpha) * (lse[1.0] - z[rows, labels])
        grad[rows, labels] -= 1 - alpha
    return loss, grad, top


class _DistillLoss(torch.autograd.Function):
    """:func:`_loss_and_grad` as an autograd function: the gradient is formed in the forward."""

    @staticmethod
    def forward(ctx, logits, labels, t_ids, t_probs, temperature, alpha):
        loss, grad, _ = _loss_and_grad(logits, labels, t_ids, t_probs, temperature, alpha)
        ctx.save_for_backward(grad)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rows[:, None]).to(ctx.in_dtype), None, None, None, None, None


def logit_match_loss(
    feat: torch.Tensor,
    target: torch.Tensor,
    gram: torch.Tensor,
    rows: torch.Tensor,
    t_probs: torch.Tensor,
    vocab_size: int,
    temperature: float = 1.0,
    mse_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distillation for a head whose final projection ``W`` [V, H] *is* the base's (frozen), without
    forming a single [M, V] logits row.

    The head's logits are ``W g`` and the teacher's are ``W h`` (``h`` = the base's final-norm hidden
    state at the teacher position), so

    - the full-vocabulary logit mean squared error is exact through the Gram matrix ``G = W^T W``:
      ``||W g - W h||^2 / V = (g - h)^T G (g - h) / V`` (O(H^2) per row instead of O(V H));
    - the forward KL is taken over the teacher's top-k tokens, both distributions renormalised
      over that set (``W[ids] g`` is O(K H)): it decides the ranking among the likely tokens,
      which is what beam search and acceptance see, while the MSE keeps the rest of the
      vocabulary where the base has it.

    Args:
        feat: [M, H] head outputs before the projection (``UnrolledHead(..., project=False)``).
        target: [M, H] teacher hidden states ``h``.
        gram: [H, H] ``W^T W``.
        rows: [M, K, H] ``W[teacher top-k ids]``.
        t_probs: [M, K] teacher probabilities over its top-k at temperature T (rows sum to 1).
        vocab_size: V (the MSE is a mean over the vocabulary).
    Returns:
        (per-row loss [M] = ``T^2 * KL_topk + mse_weight * MSE``, top-k student logits [M, K]).
    """
    d = feat - target
    mse = ((d @ gram) * d).sum(-1) / vocab_size
    zk = torch.bmm(rows, feat.unsqueeze(-1)).squeeze(-1)
    logq = torch.log_softmax(zk / temperature, dim=-1)
    p = t_probs.to(logq.dtype)
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)
    return temperature**2 * kl + mse_weight * mse, zk


class _ProjectedDistillLoss(torch.autograd.Function):
    """:func:`distill_loss` of ``logits = feat @ weight.T`` for a frozen ``weight`` [V, H], fused
    with the projection and done in row chunks: neither the [M, V] logits nor their gradient is
    ever held whole, and the gradient reaching ``feat`` is formed in the forward pass.

    Each row's loss depends only on that row's features, so the forward computes the per-row
    gradient ``d loss_r / d feat_r`` [M, H] and the backward only scales it by the incoming
    per-row weights. ``matmul_dtype`` bfloat16 runs both projections on bf16 tensor units (the
    CPU's AMX or a GPU's); the softmax, the loss and the accumulation stay float32.
    """

    @staticmethod
    def forward(ctx, feat, weight, labels, t_ids, t_probs, temperature, alpha, chunk, matmul_dtype):
        w = weight.detach().to(matmul_dtype)
        f = feat.detach()
        m = f.shape[0]
        acc = torch.float64 if f.dtype == torch.float64 else torch.float32
        loss = torch.empty(m, dtype=acc, device=f.device)
        pred = torch.empty(m, dtype=torch.int64, device=f.device)
        grad = torch.empty(f.shape, dtype=acc, device=f.device)
        for lo in range(0, m, chunk):
            hi = min(lo + chunk, m)
            z = (f[lo:hi].to(matmul_dtype) @ w.T).to(acc)
            loss[lo:hi], gz, pred[lo:hi] = _loss_and_grad(
                z,
                labels[lo:hi],
                None if t_ids is None else t_ids[lo:hi],
                None if t_probs is None else t_probs[lo:hi],
                temperature,
                alpha,
            )
            grad[lo:hi] = (gz.to(matmul_dtype) @ w).to(acc)
        ctx.save_for_backward(grad)
        ctx.in_dtype = feat.dtype
        ctx.mark_non_differentiable(pred)
        return loss, pred

    @staticmethod
    def backward(ctx, grad_rows, _grad_pred):
        (grad,) = ctx.saved_tensors
        return (
            (grad * grad_rows[:, None]).to(ctx.in_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def projected_distill_loss(
    feat: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    t_ids: torch.Tensor | None,
    t_probs: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    chunk: int = 128,
    matmul_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`distill_loss` of the logits ``feat @ weight.T`` without materialising them.

    For a head whose final projection ``weight`` [V, H] is frozen (no gradient reaches it).
    Returns (per-row loss [M], differentiable in ``feat``; the full-vocabulary argmax [M]).
    """
    assert 0.0 <= alpha <= 1.0 and temperature > 0 and chunk >= 1
    if alpha == 0:
        t_ids = t_probs = None
    return _ProjectedDistillLoss.apply(
        feat,
        weight,
        labels,
        t_ids,
        t_probs,
        float(temperature),
        float(alpha),
        int(chunk),
        matmul_dtype,
    )


def teacher_probs(values: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher distribution over its stored top-k (or full) logits: softmax(values / T) [..., K]."""
    return torch.softmax(values.to(torch.float32) / temperature, dim=-1)


def distill_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    t_ids: torch.Tensor | None,
    t_probs: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Per-row loss [M] for draft logits [M, V] (differentiable in ``logits``).

    Args:
        labels: [M] int64 data tokens (for the cross-entropy part).
        t_ids: [M, K] int64 teacher token ids, or None with ``t_probs`` dense [M, V].
        t_probs: [M, K] (or [M, V]) teacher probabilities at temperature T, each row summing to 1;
            may be None when ``alpha == 0``.
        temperature: T of the KL term (its gradient is scaled by T^2, as usual).
        alpha: 1 = pure distillation (forward KL), 0 = pure cross-entropy on labels.
    """
    assert 0.0 <= alpha <= 1.0 and temperature > 0
    if alpha == 0:
        t_ids, t_probs = (
            torch.zeros((logits.shape[0], 1), dtype=torch.int64, device=logits.device),
            torch.zeros((logits.shape[0], 1), dtype=torch.float32, device=logits.device),
        )
    return _DistillLoss.apply(logits, labels, t_ids, t_probs, float(temperature), float(alpha))


def reference_loss(
    logits: torch.Tensor, labels: torch.Tensor, t_ids, t_probs, temperature: float, alpha: float
) -> torch.Tensor:
    """Plain autograd formulation of :func:`distill_loss` (the oracle for its tests)."""
    z = logits if logits.dtype == torch.float64 else logits.to(torch.float32)
    logq = F.log_softmax(z / temperature, dim=-1)
    if alpha > 0:
        lq = logq if t_ids is None else logq.gather(1, t_ids)
        kl = (torch.xlogy(t_probs, t_probs) - t_probs * lq).sum(-1)
    else:
        kl = torch.zeros(z.shape[0], dtype=z.dtype)
    ce = -F.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def depth_weighted_mean(
    row_loss: torch.Tensor, valid: torch.Tensor, depth_weights: torch.Tensor
) -> torch.Tensor:
    """``sum_i w_i * mean_{valid at depth i}(loss) / sum_i w_i`` over the depths with any valid row.

    Args: row_loss [N, D]; valid [N, D] bool; depth_weights [D].
    """
    v = valid.to(row_loss.dtype)
    count = v.sum(0)
    present = (count > 0).to(row_loss.dtype)
    per_depth = (row_loss * v).sum(0) / count.clamp(min=1)
    w = depth_weights.to(row_loss.dtype) * present
    return (per_depth * w).sum() / w.sum().clamp(min=1e-12)


def greedy_chain_tokens_per_step(correct: torch.Tensor) -> float:
    """Expected tokens per step of a single greedy chain: ``1 + mean_t sum_i prod_{j<=i} correct_j``.

    ``correct`` [N, D] bool: depth i's top-1 equals the next token. Exact for the runtime's
    W=1 acceptance when the data are the base model's own greedy outputs.
    """
    if correct.shape[0] == 0:
        return 0.0
    return 1.0 + float(correct.to(torch.int64).cumprod(1).sum(1).to(torch.float64).mean())
