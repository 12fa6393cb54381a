"""Muon: momentum, then an orthogonal update for each hidden weight matrix (Jordan et al. 2024).

SGD and Adam step each weight by its own (normalised) gradient. For a weight *matrix* W (d_out x
d_in) that ignores what W is: a linear map. The gradient of a transformer's matrices is nearly
low-rank — a few directions (singular vectors) dominate it — so a plain step mostly grows those few
directions again and again, while the rest of the map barely moves. Muon replaces the update
G = U S V^T (its singular value decomposition) by its orthogonal part U V^T: the same directions,
every singular value set to 1. Every direction the gradient points along then moves by the same
amount, the rare ones as much as the dominant ones; and the size of the step no longer depends on
the size of the gradient (like Adam's sign-like step, but for the matrix as a whole).

Computing U V^T with an SVD each step is slow. Newton–Schulz iteration gets it with matmuls only:
scale G so that its singular values are at most 1, then apply an odd polynomial
X <- a X + b (X X^T) X + c (X X^T)^2 X five times. On a singular value s the polynomial acts as
p(s) = a s + b s^3 + c s^5 (U and V stay as they are), so the iteration pushes every s in (0, 1]
towards 1. Jordan's coefficients (3.4445, -4.7750, 2.0315) are tuned to pull small singular values
up fast, at the price of not converging exactly: after five steps they land in a band around 1
(roughly 0.7 to 1.2), which trains as well as the exact U V^T. A tall matrix is transposed first,
so X X^T is the smaller of the two Gram matrices.

The orthogonal update's entries have RMS sqrt(1 / max(d_out, d_in)); we multiply it by
0.2 * sqrt(max(d_out, d_in)) so its RMS is 0.2, about that of an AdamW update (Liu et al. 2025,
"Muon is Scalable for LLM Training"): a learning rate then means a step of the same size per
weight as it does for AdamW, whatever the matrix's shape, and AdamW's weight decay carries over.

Muon is for the hidden matrices only. An embedding is a lookup table, not a map applied to a
vector (each row is updated by its own tokens), and the gains and biases are vectors: those keep
AdamW, written out here too, so one optimizer holds one state to checkpoint. A parameter group
with `muon=True` gets Muon; `blocks` = k splits each matrix into k stacked blocks of rows that are
orthogonalised separately (the fused q, k, v projection: three maps, not one).

`make_optimizer` builds the training's optimizer (AdamW alone, or Muon with AdamW for the rest)
and `apply_gradients` takes one clipped step with it.
"""

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: the quintic's a, b, c
NS_STEPS = 5
RMS_MATCH = 0.2  # the RMS of a Muon update before the learning rate: about an AdamW update's


class Muon(torch.optim.Optimizer):
    """Muon (momentum 0.95, Nesterov) for groups with muon=True, AdamW for the others."""

    def __init__(self, param_groups, lr=1e-3, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, muon=False, blocks=1)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self.muon_step(p, group)
                else:
                    self.adamw_step(p, group)

    def muon_step(self, p, group):
        """W <- W (1 - lr wd) - lr * scale * orthogonalise(Nesterov momentum of the gradient)."""
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(p.grad, 1 - group["momentum"])  # m <- beta m + (1 - beta) g
        g = p.grad.lerp(buf, group["momentum"])  # Nesterov: look one step ahead along the momentum
        k = group["blocks"]
        blocks = g.view(k, g.shape[0] // k, g.shape[1])  # (k, d_out / k, d_in): q, k, v apart
        update = orthogonalise(blocks).view_as(p)
        scale = RMS_MATCH * max(blocks.shape[1:]) ** 0.5
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"] * scale)

    def adamw_step(self, p, group):
        """AdamW (Loshchilov & Hutter 2019): Adam's step with bias correction, decay apart from it."""
        state = self.state[p]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        beta1, beta2 = group["betas"]
        t = state["step"].add_(1).item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def orthogonalise(G):
    """Newton–Schulz: G (..., m, n) -> about U V^T of its SVD, singular values within ~0.7..1.2."""
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT if tall else G  # (..., min, max): X X^T is the small Gram matrix
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm: every s <= 1
    for _ in range(NS_STEPS):
        A = X @ X.mT  # (..., min, min)
        X = a * X + (b * A + c * A @ A) @ X  # p(s) = a s + b s^3 + c s^5 on each singular value
    return X.mT if tall else X


def make_optimizer(model, tc):
    """tc.optimizer over the trained parameters. AdamW: weight decay on matrices only, since
    decaying biases and LayerNorm gains pulls them towards 0, which only hurts (they are few and do
    not overfit). Muon: muon_groups. Each group keeps its peak lr in `peak_lr` for the schedule."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if tc.optimizer == "muon":
        return Muon(muon_groups(named, tc), betas=(0.9, 0.95), eps=1e-8)
    params = list(named.values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [{**g, "peak_lr": tc.learning_rate} for g in groups]
    # fused: one kernel per tensor for the whole update instead of ~10 elementwise passes over memory
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def apply_gradients(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the gradient norm, step the optimizer, zero the gradients -> the norm before clipping."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def muon_groups(named, tc):
    """Muon for the weight matrices of the blocks, c_attn's as three (q, k and v are three maps);
    AdamW for the rest: embeddings (wte is also the head: tied), gains, biases, LoRA's A and B
    (a fine-tune's only parameters: low-rank factors, not maps of their own)."""
    hidden = {k: p for k, p in named.items() if k.startswith("transformer.h.") and k.endswith(".weight") and p.dim() == 2}
    qkv = [p for k, p in hidden.items() if k.endswith("attn.c_attn.weight")]
    other = [p for k, p in hidden.items() if not k.endswith("attn.c_attn.weight")]
    tables = [p for k, p in named.items() if p.dim() >= 2 and k not in hidden]
    vectors = [p for p in named.values() if p.dim() < 2]
    groups = [dict(params=qkv, muon=True, blocks=3, peak_lr=tc.muon_lr, weight_decay=tc.weight_decay),
              dict(params=other, muon=True, blocks=1, peak_lr=tc.muon_lr, weight_decay=tc.weight_decay),
              dict(params=tables, peak_lr=tc.learning_rate, weight_decay=tc.weight_decay),
              dict(params=vectors, peak_lr=tc.learning_rate, weight_decay=0.0)]
    return [{**g, "lr": g["peak_lr"]} for g in groups if g["params"]]
