"""The data-aware init of `qkvx convert --init fit`.

Plain least squares on the projections alone cannot help: min ||X Ws - X Wk||^2 + ||X Ws - X Wv||^2
is solved by the average, whatever X is. What matters is what the attention block computes with
the shared tensor, so the objective here is the block's OUTPUT. Per layer l, on the teacher's own
layer inputs h = norm1(x_l) from a few calibration batches:

    J_l = sum || attn_student(h) - attn_teacher(h) ||^2 / sum || attn_teacher(h) ||^2

(relative squared error of the attention block's output, summed over tokens). For each layer:

  1. candidate starts: the paper's avg, keep-k and keep-v, and "split" starts (split_init): the
     shared head's D dims divided into r key dims and D - r value dims, queries reading only the key
     part and o_proj only the value part, each part the best rank-r / rank-(D - r) approximation of
     the teacher's logits q.k / value-output map under the calibration inputs' second moments
     (closed form: eigenvectors of whitened moment products; with RoPE, whole rotation pairs are
     kept in their own slots). r is tried at several fractions of D;
  2. the candidate with the lowest J_l on the calibration batches is kept; its output projection is
     refit in closed form (least squares of the teacher's block output on the student's attention
     mix, bias included);
  3. J_l is minimized over the student block's query, shared and output projections (weights and
     biases) with Adam, full batch, cosine learning rate, keeping the best iterate on the
     calibration batches.

Layer l's input is the teacher's own (`inputs="teacher"`, the default: every layer fitted on what
the teacher feeds it) or the student's residual stream (`inputs="student"`: layer l sees what the
fitted layers before it produce and is fitted to land the residual stream where the teacher's is,
target attn_teacher(h_t) + x_teacher - x_student). J_l is reported on held-out calibration batches
for avg, for the chosen start and for the fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from qkvx.convert.surgery import PAPER_INITS, pool_heads, surgery
from qkvx.errors import QkvxError
from qkvx.models.attention import Attention
from qkvx.models.transformer import Transformer
from qkvx.spec import ModelSpec


@dataclass
class FitOptions:
    batches: int = 8  # calibration batches the fit sees
    heldout_batches: int = 2  # held-out batches J is reported on
    batch_size: int = 8
    seq_len: int = 128
    steps: int = 200  # Adam steps per layer
    lr: float = 3e-3
    inputs: str = "teacher"  # teacher | student: whose residual stream feeds layer l
    refit_output: bool = True
    split_key_fractions: tuple = (0.25, 0.375, 0.5, 0.625, 0.75)  # split starts tried (key dims / D)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batches", "heldout_batches", "batch_size", "seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise QkvxError(f"fit option {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.steps < 0 or not self.lr > 0:
            raise QkvxError(f"fit option steps must be >= 0 and lr > 0, got {self.steps}, {self.lr}")
        if self.inputs not in ("student", "teacher"):
            raise QkvxError(f"fit option inputs must be student or teacher, got {self.inputs!r}")

    def windows_needed(self) -> int:
        return (self.batches + self.heldout_batches) * self.batch_size


def relative_error(y: Tensor, target: Tensor) -> float:
    return ((y - target).pow(2).sum() / target.pow(2).sum()).item()


def _embed(model: Transformer, tokens: Tensor) -> Tensor:
    x = model.tok_emb(tokens)
    if model.pos_emb is not None:
        x = x + model.pos_emb(torch.arange(tokens.shape[1]))
    return x


def _attn_in_parts(attn: Attention, h: Tensor, positions: Tensor, rope) -> Tensor:
    """The attention mix before o_proj ([B, T, H*D]): what the output projection is refit on."""
    o_proj = attn.o_proj
    attn.o_proj = torch.nn.Identity()
    try:
        return attn(h, positions, rope)
    finally:
        attn.o_proj = o_proj


def _student_attention(tspec: ModelSpec, state: dict[str, Tensor], layer: int) -> Attention:
    attn = Attention(tspec)
    prefix = f"blocks.{layer}.attn."
    attn.load_state_dict({k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)})
    return attn


@torch.no_grad()
def _refit_output(attn: Attention, h: Tensor, target: Tensor, positions: Tensor, rope, batch: int) -> None:
    """o_proj <- argmin ||Z W^T + b - target||^2 with Z the attention mix (least squares, with a
    tiny ridge for a rank-deficient Z)."""
    zs, ys = [], []
    for i in range(0, len(h), batch):
        zs.append(
            _attn_in_parts(attn, h[i : i + batch], positions, rope).reshape(-1, attn.o_proj.in_features)
        )
        ys.append(target[i : i + batch].reshape(-1, target.shape[-1]))
    Z, Y = torch.cat(zs).double(), torch.cat(ys).double()
    bias = attn.o_proj.bias is not None
    if bias:
        Z = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], dim=1)
    G = Z.T @ Z
    G += 1e-6 * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
    W = torch.linalg.solve(G, Z.T @ Y).T  # [C, in(+1)]
    attn.o_proj.weight.copy_(W[:, : attn.o_proj.in_features].float())
    if bias:
        attn.o_proj.bias.copy_(W[:, -1].float())


def _objective(attn: Attention, h: Tensor, target: Tensor, positions: Tensor, rope, batch: int) -> float:
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, len(h), batch):
            y = attn(h[i : i + batch], positions, rope)
            num += (y - target[i : i + batch]).pow(2).sum().item()
            den += target[i : i + batch].pow(2).sum().item()
    return num / den


def _sqrt_and_inv_sqrt(S: Tensor) -> tuple[Tensor, Tensor]:
    """S^(1/2) and S^(-1/2) of a second-moment matrix (float64; tiny eigenvalues clamped)."""
    lam, E = torch.linalg.eigh(S)
    lam = lam.clamp_min(lam.max().clamp_min(1e-30) * 1e-8)
    return (E * lam.sqrt()) @ E.T, (E * lam.rsqrt()) @ E.T


def _moments(x: Tensor) -> Tensor:
    """E[x x^T] over the rows of x [N, d] (uncentered: a bias is part of the signal), float64."""
    x = x.double()
    return x.T @ x / len(x)


@torch.no_grad()
def split_init(teacher_attn: Attention, tspec: ModelSpec, h: Tensor, key_dims: int, rope: bool) -> Attention:
    """A student attention whose shared head of D dims holds `key_dims` key dims and D - key_dims
    value dims: queries read only the key part, o_proj only the value part, so the student computes
    the teacher's attention logits through a rank-key_dims approximation and the teacher's output
    through a rank-(D - key_dims) one, both fitted to the calibration inputs h [N, C].

    Keys (no RoPE): with whitened keys k~ = S_k^(-1/2) k, the logit error E(q^T (I - P) k)^2 summed
    over the group's query heads is least for P projecting on the top eigenvectors U of
    S_k^(1/2) (sum_h S_q_h) S_k^(1/2): key part U^T S_k^(-1/2) k, query part U^T S_k^(1/2) q_h.
    Keys (RoPE): the rotation acts on dim pairs (i, i + D/2) with their own frequency, so whole
    pairs are kept in their own slots: the key_dims / 2 pairs with the most logit energy
    E|q_pair|^2 E|k_pair|^2 (summed over the group's query heads).
    Values: with whitened values v~ = S_v^(-1/2) v, the output error is least for the top
    eigenvectors U of S_v^(1/2) (sum_h O_h^T O_h) S_v^(1/2): value part U^T S_v^(-1/2) v,
    o_proj columns O_h S_v^(1/2) U. Teacher kv heads are mean-pooled first when the target has
    fewer (GQA uptraining)."""
    D, H, G = tspec.head_dim, tspec.n_head, tspec.n_kv_head
    src_g = teacher_attn.n_kv_head
    per_group = H // G
    r = key_dims
    b = teacher_attn.o_proj.bias is not None
    Wq = (teacher_attn.q_proj if teacher_attn.q_proj is not None else teacher_attn.k_proj).weight.double()
    bq = (teacher_attn.q_proj if teacher_attn.q_proj is not None else teacher_attn.k_proj).bias
    Wk = pool_heads(teacher_attn.k_proj.weight.double(), src_g, G)
    Wv = pool_heads(teacher_attn.v_proj.weight.double(), src_g, G)
    zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
    bk = pool_heads(teacher_attn.k_proj.bias.double(), src_g, G) if b else zeros(G * D)
    bv = pool_heads(teacher_attn.v_proj.bias.double(), src_g, G) if b else zeros(G * D)
    bq = bq.double() if bq is not None else zeros(H * D)
    Wo = teacher_attn.o_proj.weight.double()  # [C, H*D]
    X = h.reshape(-1, h.shape[-1]).double()
    ones = torch.ones(len(X), 1, dtype=torch.float64)
    Xa = torch.cat([X, ones], dim=1)  # affine: bias as a last input column

    def head(W, bias, i):
        return torch.cat([W[i * D : (i + 1) * D], bias[i * D : (i + 1) * D, None]], dim=1)  # [D, C+1]

    new_q = torch.zeros(H * D, X.shape[1] + 1, dtype=torch.float64)
    new_s = torch.zeros(G * D, X.shape[1] + 1, dtype=torch.float64)
    new_o = torch.zeros_like(Wo)
    for j in range(G):
        heads = range(j * per_group, (j + 1) * per_group)
        Ak, Av = head(Wk, bk, j), head(Wv, bv, j)  # affine maps [D, C+1]
        Aq = {hh: head(Wq, bq, hh) for hh in heads}
        Sk, Sv = _moments(Xa @ Ak.T), _moments(Xa @ Av.T)
        Sq = {hh: _moments(Xa @ A.T) for hh, A in Aq.items()}
        # key part -> slots of the shared head; queries map onto the same slots
        if rope:
            half = D // 2
            energy = torch.stack(
                [
                    sum(Sq[hh].diagonal()[[p, p + half]].sum() for hh in heads)
                    * Sk.diagonal()[[p, p + half]].sum()
                    for p in range(half)
                ]
            )
            pairs = sorted(torch.argsort(energy, descending=True)[: r // 2].tolist())
            key_slots = pairs + [p + half for p in pairs]
            for slot in key_slots:
                new_s[j * D + slot] = Ak[slot]
                for hh in heads:
                    new_q[hh * D + slot] = Aq[hh][slot]
        else:
            Sk_half, Sk_ihalf = _sqrt_and_inv_sqrt(Sk)
            M = Sk_half @ sum(Sq.values()) @ Sk_half
            U = torch.linalg.eigh(M)[1][:, -r:] if r else torch.zeros(D, 0, dtype=torch.float64)
            key_slots = list(range(r))
            new_s[j * D : j * D + r] = U.T @ Sk_ihalf @ Ak
            for hh in heads:
                new_q[hh * D : hh * D + r] = U.T @ Sk_half @ Aq[hh]
        value_slots = [t for t in range(D) if t not in key_slots]
        n_val = len(value_slots)
        Sv_half, Sv_ihalf = _sqrt_and_inv_sqrt(Sv)
        OtO = sum(Wo[:, hh * D : (hh + 1) * D].T @ Wo[:, hh * D : (hh + 1) * D] for hh in heads)
        U = (
            torch.linalg.eigh(Sv_half @ OtO @ Sv_half)[1][:, D - n_val :]
            if n_val
            else torch.zeros(D, 0, dtype=torch.float64)
        )
        vrows = U.T @ Sv_ihalf @ Av  # [n_val, C+1]
        for n, slot in enumerate(value_slots):
            new_s[j * D + slot] = vrows[n]
            for hh in heads:
                new_o[:, hh * D + slot] = (Wo[:, hh * D : (hh + 1) * D] @ Sv_half @ U)[:, n]
    attn = Attention(tspec)
    attn.q_proj.weight.copy_(new_q[:, :-1].float())
    attn.k_proj.weight.copy_(new_s[:, :-1].float())
    attn.o_proj.weight.copy_(new_o.float())
    if b:
        attn.q_proj.bias.copy_(new_q[:, -1].float())
        attn.k_proj.bias.copy_(new_s[:, -1].float())
        attn.o_proj.bias.copy_(teacher_attn.o_proj.bias)
    elif (new_q[:, -1].abs().max() > 0) or (new_s[:, -1].abs().max() > 0):
        raise AssertionError("bias-free model produced a bias")
    return attn


def fit_student(
    teacher: Transformer,
    tspec: ModelSpec,
    source_state: dict[str, Tensor],
    tokens: Tensor,
    opts: FitOptions,
    progress: Callable[[str], None] = lambda s: None,
):
    """The fitted student (eval mode) and a report: per layer J (held-out) for avg, the start and the
    fit, plus the options. tokens: a flat stream, at least windows_needed() * seq_len + 1 long."""
    from qkvx.loaders.common import Checkpoint, build_model

    t0 = time.perf_counter()
    n_fit, n_held = opts.batches * opts.batch_size, opts.heldout_batches * opts.batch_size
    T = min(opts.seq_len, tspec.max_positions)
    need = (n_fit + n_held) * T
    if len(tokens) < need:
        raise QkvxError(f"calibration: {len(tokens):,} tokens, the fit needs {need:,}")
    windows = tokens[:need].view(n_fit + n_held, T)
    positions = torch.arange(T)
    teacher.eval()
    starts = {init: surgery(source_state, teacher.spec, tspec, init) for init in PAPER_INITS}
    state = dict(starts["avg"])  # the student's state; attention tensors replaced layer by layer
    student = build_model(Checkpoint(spec=tspec, state=state, format="native", path="fit")).eval()
    rope = teacher.rope
    layers = []
    gen = torch.Generator().manual_seed(opts.seed)
    with torch.no_grad():
        x_t = _embed(teacher, windows)
        x_s = x_t.clone()
    for i, (t_block, s_block) in enumerate(zip(teacher.blocks, student.blocks, strict=True)):
        progress(f"fit layer {i + 1}/{tspec.n_layer}")
        with torch.no_grad():
            h_t = t_block.norm1(x_t)
            y_t = torch.cat(
                [
                    t_block.attn(h_t[j : j + opts.batch_size], positions, rope)
                    for j in range(0, len(h_t), opts.batch_size)
                ]
            )
            if opts.inputs == "student":
                h, target = s_block.norm1(x_s), y_t + (x_t - x_s)
            else:
                h, target = h_t, y_t
        fit_h, fit_y, held_h, held_y = h[:n_fit], target[:n_fit], h[n_fit:], target[n_fit:]
        candidates = {init: _student_attention(tspec, starts[init], i) for init in PAPER_INITS}
        rope_model = tspec.positions == "rope"
        for r in _key_dim_choices(tspec.head_dim, opts.split_key_fractions):
            candidates[f"split-{r}"] = split_init(t_block.attn, tspec, fit_h, r, rope_model)
        j_start = {
            init: _objective(a, fit_h, fit_y, positions, rope, opts.batch_size)
            for init, a in candidates.items()
        }
        start = min(j_start, key=j_start.get)
        attn = candidates[start]
        row = {
            "layer": i,
            "start": start,
            "heldout_J_avg": _objective(candidates["avg"], held_h, held_y, positions, rope, opts.batch_size),
            "heldout_J_start": _objective(attn, held_h, held_y, positions, rope, opts.batch_size),
        }
        if opts.refit_output:
            _refit_output(attn, fit_h, fit_y, positions, rope, opts.batch_size)
        _adam(attn, fit_h, fit_y, positions, rope, opts, gen)
        row["heldout_J_fit"] = _objective(attn, held_h, held_y, positions, rope, opts.batch_size)
        layers.append(row)
        with torch.no_grad():
            s_block.attn.load_state_dict(attn.state_dict())
            x_t = torch.cat(
                [
                    t_block(x_t[j : j + opts.batch_size], positions, rope, _full())
                    for j in range(0, len(x_t), opts.batch_size)
                ]
            )
            x_s = torch.cat(
                [
                    s_block(x_s[j : j + opts.batch_size], positions, rope, _full())
                    for j in range(0, len(x_s), opts.batch_size)
                ]
            )
    report = {
        "options": asdict(opts),
        "tokens": need,
        "layers": layers,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return student.eval(), report


def _key_dim_choices(D: int, fractions) -> list[int]:
    """Key dims per shared head to try: even (RoPE rotates pairs), within 2 .. D - 2."""
    return sorted({min(D - 2, max(2, 2 * round(f * D / 2))) for f in fractions}) if D >= 4 else []


def _full():
    from qkvx.models.attention import FULL_RECOMPUTE

    return FULL_RECOMPUTE


def _adam(
    attn: Attention,
    h: Tensor,
    target: Tensor,
    positions: Tensor,
    rope,
    opts: FitOptions,
    gen: torch.Generator,
) -> None:
    """Minimize J on (h, target) over every attention parameter; keep the best iterate."""
    if opts.steps == 0:
        return
    params = [p for p in attn.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=opts.lr)
    den = target.pow(2).sum().item()
    best, best_j = {k: v.detach().clone() for k, v in attn.state_dict().items()}, math.inf
    for step in range(opts.steps + 1):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(0, len(h), opts.batch_size):
            loss = (attn(h[j : j + opts.batch_size], positions, rope) - target[j : j + opts.batch_size]).pow(
                2
            ).sum() / den
            if step < opts.steps:
                loss.backward()
            total += loss.item()
        if total < best_j:
            best_j, best = total, {k: v.detach().clone() for k, v in attn.state_dict().items()}
        if step < opts.steps:
            for g in opt.param_groups:  # cosine to zero: the last steps settle
                g["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * step / opts.steps))
            opt.step()
    for p in params:
        p.requires_grad_(False)
    attn.load_state_dict(best)
