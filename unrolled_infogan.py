"""Unrolled InfoGAN: InfoGAN whose generator trains against a K-step unrolled discriminator, with the EXACT
gradient through the unrolled updates (report §II.B-C and §III, eqs. 8-13; Figs 3-12 and the Q-loss table).

Papers: Chen et al. 2016, InfoGAN (arXiv:1606.03657); Metz et al. 2017, Unrolled GANs (arXiv:1611.02163).
Reproduce the report's K sweep (comparison.md, fig12_q_loss.png, fig04/fig05 traversals per K) and Fig 3:
    python unrolled_infogan.py --data-root /path/to/mnist --epochs 15 --k 0 5 7 10
    python unrolled_infogan.py --dataset ring --k 0 10
Unlike the usual ports, the look-ahead keeps the second-order term of eq. (11): G is differentiated through
all K Adam updates of D (`--first-order` drops it, as those ports do, for comparison).
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common

SCRIPT = "unrolled_infogan.py"
TOY = ("ring", "grid")
LOSS_NAMES = ("loss_d", "loss_g", "li_cat", "li_cont")
MODEL_FLAGS = ("dataset", "n_noise", "n_cat", "n_cont", "act")  # must match when resuming
REPORT = {0: (0.14, 0.02), 5: (0.076, 0.006), 7: (0.072, 0.0015), 10: (0.012, 0.0006)}  # report's Q-loss table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (default: %(default)s)")
    p.add_argument("--dataset", default="mnist", choices=("mnist",) + TOY, help="dataset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per K (default: 15 for mnist; 10 for ring/grid, whose epoch is 500 batches)")
    p.add_argument("--steps", type=int, default=None, help="optional cap on training steps per K (default: no cap)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default: 64 mnist, 512 ring/grid)")
    p.add_argument("--out", default="runs", help="folder for run folders (default: %(default)s)")
    p.add_argument("--resume", default=None, help="checkpoint.pt or run folder to continue (default: none)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines (default: %(default)s)")
    p.add_argument("--k", type=int, nargs="+", default=[10],
                   help="unrolling steps K; several values run a sweep, one run per K, same seed (default: 10)")
    p.add_argument("--first-order", action="store_true",
                   help="drop the gradient through the unrolled updates, as the common ports do (default: exact)")
    p.add_argument("--unroll-data", choices=("same", "fresh"), default="same",
                   help="real batches of the unroll steps: the step's own batch, or fresh random ones (default: %(default)s)")
    p.add_argument("--unroll-lr", type=float, default=None, help="Adam learning rate inside the unroll (default: --lr-d)")
    p.add_argument("--g-loss", choices=("saddle", "ns"), default=None,
                   help="generator loss f: saddle = V(D, G) of eq. (1) (the Unrolled GAN paper's), ns = -log D(G(z)) "
                        "(default: saddle for ring/grid, ns for mnist)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="Adam learning rate of G and Q's head (default: %(default)s)")
    p.add_argument("--lr-d", type=float, default=None, help="Adam learning rate of D (default: 2e-4 mnist, 1e-4 ring/grid)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default: %(default)s)")
    p.add_argument("--lambda-cat", type=float, default=1.0, help="λ of the categorical L_I term (default: %(default)s)")
    p.add_argument("--lambda-cont", type=float, default=1.0, help="λ of the continuous L_I term (default: %(default)s)")
    p.add_argument("--n-noise", type=int, default=None, help="dimensions of the noise z (default: 62 mnist, 256 ring/grid)")
    p.add_argument("--n-cat", type=int, default=None, help="values of the categorical code (default: 10; 0 on ring/grid)")
    p.add_argument("--n-cont", type=int, default=None, help="number of continuous codes (default: 2; 0 on ring/grid)")
    p.add_argument("--act", choices=("relu", "tanh"), default="relu", help="ring/grid MLP activation (default: %(default)s)")
    args = p.parse_args(argv)
    toy = args.dataset in TOY
    for flag, mnist, ring in (("epochs", 15, 10), ("batch_size", 64, 512), ("lr_d", 2e-4, 1e-4), ("g_loss", "ns", "saddle"),
                              ("n_noise", 62, 256), ("n_cat", 10, 0), ("n_cont", 2, 0)):
        if getattr(args, flag) is None:
            setattr(args, flag, ring if toy else mnist)
    for flag, low in (("epochs", 1), ("steps", 1), ("batch_size", 2), ("log_every", 1), ("n_noise", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            common.die(f"--{flag.replace('_', '-')} must be >= {low} (got {value})")
    if min(args.k) < 0:
        common.die(f"--k must be >= 0 (got {min(args.k)})")
    if len(set(args.k)) != len(args.k):
        common.die(f"--k lists a value twice ({' '.join(map(str, args.k))}); give each K once")
    if toy and (args.n_cat or args.n_cont):
        common.die(f"--dataset {args.dataset} is a plain unrolled GAN without codes: use --n-cat 0 --n-cont 0 "
                   f"(got --n-cat {args.n_cat} --n-cont {args.n_cont})")
    if not toy and not (2 <= args.n_cat <= 10 and args.n_cont >= 1):
        common.die(f"--n-cat must be between 2 and 10 and --n-cont >= 1 on mnist (got {args.n_cat}, {args.n_cont})")
    for flag in ("lr_g", "lr_d", "unroll_lr"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            common.die(f"--{flag.replace('_', '-')} must be > 0 (got {value})")
    for flag in ("lambda_cat", "lambda_cont"):
        if not getattr(args, flag) >= 0:
            common.die(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    if not 0 <= args.beta1 < 1:
        common.die(f"--beta1 must be in [0, 1) (got {args.beta1})")
    if args.resume is not None and len(args.k) > 1:
        common.die("--resume continues one run: give a single --k")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("--device cuda but no CUDA GPU is available here; use --device cpu")
    try:
        torch.device(args.device)
    except RuntimeError:
        common.die(f"--device {args.device!r} is not a device; use cpu or cuda")
    return args


# ------------------------------------------------------------------------------------------------
# Models. MNIST: the InfoGAN paper's networks (its Table 1), as in infogan.py. LeakyReLU slope 0.1.
# ------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """G(z, c): FC1024-BN-ReLU → FC 7·7·128-BN-ReLU → deconv64-BN-ReLU → deconv1-tanh; pixels in [-1, 1]."""

    def __init__(self, n_latent):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(n_latent, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
                                nn.Linear(1024, 128 * 7 * 7), nn.BatchNorm1d(128 * 7 * 7), nn.ReLU())
        self.deconv = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh())

    def forward(self, latent):  # (B, n_latent) -> (B, 1, 28, 28)
        return self.deconv(self.fc(latent).view(-1, 128, 7, 7))


class Discriminator(nn.Module):
    """D: conv64-lReLU → conv128-BN-lReLU → FC1024-BN-lReLU → FC1 (a logit). Q shares D's whole body and
    adds its own head, q_head: FC128-BN-lReLU → n_cat categorical logits + n_cont Gaussian means."""

    def __init__(self, n_cat, n_cont):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(64, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.1), nn.Flatten(),
                                  nn.Linear(128 * 7 * 7, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.1))
        self.d_head = nn.Linear(1024, 1)
        self.q_head = nn.Sequential(nn.Linear(1024, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.1),
                                    nn.Linear(128, n_cat + n_cont))

    def forward(self, x):  # (B, 1, 28, 28) -> D logit (B,), Q outputs (B, n_cat + n_cont)
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


# Ring/grid: the Unrolled GAN paper's toy MLPs, 2 hidden layers of 128, no codes, no Q. ReLU by default: with
# ReLU a plain GAN (K = 0) collapses on most seeds, so K = 0 vs K = 10 tests what unrolling does; with tanh
# (the official demo's choice, --act tanh) a plain GAN found all 8 modes on the seed tried (issue 3).
def mlp(n_in, n_out, act):
    a = {"relu": nn.ReLU, "tanh": nn.Tanh}[act]
    return nn.Sequential(nn.Linear(n_in, 128), a(), nn.Linear(128, 128), a(), nn.Linear(128, n_out))


class ToyG(nn.Module):
    def __init__(self, n_noise, act):
        super().__init__()
        self.net = mlp(n_noise, 2, act)

    def forward(self, z):  # (B, n_noise) -> (B, 2)
        return self.net(z)


class ToyD(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.net = mlp(2, 1, act)

    def forward(self, x):  # (B, 2) -> logit (B,), no Q outputs
        return self.net(x).squeeze(1), None


# ------------------------------------------------------------------------------------------------
# Latents, losses, metrics (make_latent ... test_accuracy as in infogan.py)
# ------------------------------------------------------------------------------------------------
def make_latent(z, c_cat, c_cont, n_cat):
    """Generator input [z, one-hot(c_cat), c_cont]: (B, n_noise + n_cat + n_cont)."""
    return torch.cat([z, F.one_hot(c_cat, n_cat).to(z.dtype), c_cont], dim=1)


def sample_latents(n, n_noise, n_cat, n_cont, device, generator=None):
    """z ~ N(0, I), c_cat ~ Uniform{0..n_cat-1}, c_cont ~ U(-1, 1); returns (latent, c_cat, c_cont).
    Without codes (ring/grid) the latent is z alone and the codes are None."""
    z = torch.randn(n, n_noise, device=device, generator=generator)
    if n_cat == 0:
        return z, None, None
    c_cat = torch.randint(n_cat, (n,), device=device, generator=generator)
    c_cont = torch.rand(n, n_cont, device=device, generator=generator) * 2 - 1
    return make_latent(z, c_cat, c_cont, n_cat), c_cat, c_cont


def traversal_latents(z, c_cont, code, values, n_cat):
    """Figs 4-11 layout, row-major: row r has c_cat = r, column j sets continuous code `code` to values[j];
    the noise z (n_noise,) and the other codes c_cont (n_cont,) are the same in every cell."""
    rows, cols = n_cat, len(values)
    c_cat = torch.arange(rows, device=z.device).repeat_interleave(cols)  # (R*C,)
    cc = c_cont.expand(rows * cols, -1).clone()
    cc[:, code] = values.to(z.device).repeat(rows)
    return make_latent(z.expand(rows * cols, -1), c_cat, cc, n_cat), c_cat, cc


def information_losses(q, c_cat, c_cont, n_cat):
    """L_I terms we minimise (each equals -E[log Q(c|x)] up to a constant, i.e. -L_I(G, Q) + H(c)):
    li_cat = cross-entropy of Q's softmax on the true code, mean over the batch;
    li_cont = 0.5·(μ_Q(x) - c)², mean over batch and codes: the Gaussian NLL with a FIXED σ = 1 minus its
    constant 0.5·log 2π (the paper may learn σ; we fix it, so li_cont is a plain scaled squared error)."""
    li_cat = F.cross_entropy(q[:, :n_cat], c_cat)
    li_cont = 0.5 * (q[:, n_cat:] - c_cont).pow(2).mean()
    return li_cat, li_cont


def hungarian_accuracy(pred, labels, n_cat, n_classes=10):
    """Accuracy of categories `pred` against `labels` under the best one-to-one category→class map
    (n_cat <= n_classes). Exact assignment by a DP over subsets of classes: best[mask] is the largest
    number of hits when categories 0..popcount(mask)-1 take the classes in mask."""
    counts = torch.bincount(pred.cpu() * n_classes + labels.cpu(), minlength=n_cat * n_classes)
    counts = counts.view(n_cat, n_classes).tolist()
    best = [-1] * (1 << n_classes)
    best[0] = 0
    for mask in range(1 << n_classes):
        k = bin(mask).count("1")  # next category to place
        if best[mask] < 0 or k == n_cat:
            continue
        for c in range(n_classes):
            if not mask >> c & 1:
                best[mask | 1 << c] = max(best[mask | 1 << c], best[mask] + counts[k][c])
    return max(b for m, b in enumerate(best) if bin(m).count("1") == n_cat) / max(len(labels), 1)


@torch.no_grad()
def test_accuracy(D, test, n_cat, batch=1000):
    """Categorical-code accuracy on the real test digits: argmax of Q's logits (eval mode), Hungarian-matched."""
    D.eval()
    pred = []
    for idx in torch.arange(len(test), device=test.images.device).split(batch):
        x, _ = test.batch(idx)
        _, q = D(x * 2 - 1)  # [0, 1] -> [-1, 1], as in training
        pred.append(q[:, :n_cat].argmax(1))
    D.train()
    pred = torch.cat(pred)
    return hungarian_accuracy(pred, test.labels, n_cat)


def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: loss_d = -V(D, G) = -E_x log D(x) - E_z log(1 - D(G(z))), each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def g_loss_fn(kind, real_logit, fake_logit):
    """The generator's f. saddle: f = V(D, G) = -loss_d, G descends it (the real term depends on θ_G once D is
    unrolled). ns: the non-saturating -E log D(G(z)) (mean over the batch), as infogan.py uses."""
    if kind == "saddle":
        return -d_loss(real_logit, fake_logit)
    return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))


def mode_metrics(samples, modes, std, min_hq=10):
    """Ring/grid metrics of VEEGAN / PacGAN (on 2,500 samples). A sample is high quality (HQ) when within 3σ
    of its nearest mode. modes: modes with >= 1 HQ sample; modes10: with >= min_hq HQ samples (the one-sample
    count is lenient); hq_pct: % of samples that are HQ; reverse_kl: KL(q || uniform) of q, the histogram of
    HQ samples over the modes (0 = balanced, log M = one mode, inf = no HQ sample)."""
    dist, nearest = torch.cdist(samples.float(), modes.float()).min(dim=1)
    hq = dist <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(modes)).float()
    q = counts / counts.sum().clamp_min(1)
    kl = (q * (q * len(modes)).log()).nan_to_num(0.0).sum() if hq.any() else torch.tensor(math.inf)
    return {"modes": int((counts > 0).sum()), "modes10": int((counts >= min_hq).sum()),
            "hq_pct": 100.0 * hq.float().mean().item(), "reverse_kl": float(kl)}


# ------------------------------------------------------------------------------------------------
# The unrolled look-ahead (eqs. 8-11), pure functions of tensors: no .item(), no branching on tensor values.
# D's optimised parameters are ONE flat vector θ (P,), so the differentiable Adam is a few vector operations
# instead of a few per parameter tensor (a speed lever of issue 6); views of θ feed functional_call.
# ------------------------------------------------------------------------------------------------
TINY = 1e-30  # sqrt(v + TINY): d sqrt(v)/dv is infinite at v = 0 (a zero gradient), 0·inf = NaN in the backward


def snapshot_d(D, opt_d):
    """D's state as fresh tensors that alias nothing of D or opt_d: the parameters opt_d owns as one flat θ (P,),
    Adam's moments m, v (P,) and integer step from the real optimizer (an empty state would make the
    second-order term ill-conditioned), D's other parameters (Q's head: fixed, detached) and copies of its
    buffers (BatchNorm running stats move inside the unroll as in a real D step, on the copy only)."""
    owned = {id(p) for group in opt_d.param_groups for p in group["params"]}
    named = [(n, p) for n, p in D.named_parameters() if id(p) in owned]
    states = [opt_d.state.get(p, {}) for _, p in named]
    moment = lambda key: torch.cat([s[key].reshape(-1) if key in s else torch.zeros(p.numel(), dtype=p.dtype,
                                    device=p.device) for s, (_, p) in zip(states, named)])
    group = opt_d.param_groups[0]
    return {"names": [n for n, _ in named], "shapes": [p.shape for _, p in named],
            "theta": torch.cat([p.detach().reshape(-1) for _, p in named]), "m": moment("exp_avg"),
            "v": moment("exp_avg_sq"),  # Adam keeps its step on the CPU (not capturable): int() costs no device sync
            "step": int(states[0]["step"]) if "step" in states[0] else 0,
            "fixed": {n: p.detach() for n, p in D.named_parameters() if id(p) not in owned},
            "buffers": {n: b.clone() for n, b in D.named_buffers()},
            "lr": group["lr"], "betas": group["betas"], "eps": group["eps"]}


def d_forward(D, snap, theta, x):
    """D(x) -> (logit, q) with the parameters opt_d owns taken from the flat θ (kept in the autograd graph)."""
    sizes = [math.prod(s) for s in snap["shapes"]]
    params = {n: t.view(s) for n, t, s in zip(snap["names"], theta.split(sizes), snap["shapes"])}
    return functional_call(D, {**params, **snap["fixed"], **snap["buffers"]}, (x,))


def adam_step(theta, m, v, grad, t, lr, betas, eps):
    """One differentiable Adam update descending loss_d (torch.optim.Adam's arithmetic, weight decay 0);
    t = this update's 1-based step number, an int: the bias correction comes from the integer step."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    denom = torch.sqrt(v / (1 - b2 ** t) + TINY) + eps
    return theta - lr / (1 - b1 ** t) * m / denom, m, v


def unroll(D, snap, x_reals, x_fake, k, lr, first_order=False):
    """eq. (8): θ_D^{k+1} = θ_D^k + η df/dθ_D^k, here K Adam steps descending loss_d = -f; returns θ_D^K.

    Exact (default): θ_D^K stays a differentiable function of θ_G (through x_fake, in every step) and of each
    update (create_graph=True), so backprop through f_K gives both terms of eq. (11). first_order: each θ_D^k
    and the fake batch are detached, which drops eq. (11)'s second term (the popular ports' behaviour)."""
    theta, m, v = snap["theta"].requires_grad_(), snap["m"], snap["v"]
    for i in range(k):
        if first_order:
            theta = theta.detach().requires_grad_()
        fake = x_fake.detach() if first_order else x_fake
        loss = d_loss(d_forward(D, snap, theta, x_reals[i])[0], d_forward(D, snap, theta, fake)[0])
        (grad,) = torch.autograd.grad(loss, theta, create_graph=not first_order)
        theta, m, v = adam_step(theta, m, v, grad, snap["step"] + i + 1, lr, snap["betas"], snap["eps"])
    return theta.detach() if first_order else theta


def unrolled_g_loss(D, opt_d, x_reals, x_fake, k, lr=None, kind="ns", first_order=False):
    """eq. (10): f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)), the generator's loss against the unrolled D (a scalar).
    x_reals: K + 1 real batches, x_reals[i] for unroll step i and x_reals[K] for f_K itself. K = 0 is the plain
    GAN generator loss. D, its buffers and opt_d are left bit-for-bit as they were."""
    snap = snapshot_d(D, opt_d)
    theta = unroll(D, snap, x_reals, x_fake, k, snap["lr"] if lr is None else lr, first_order)
    fake_logit = d_forward(D, snap, theta, x_fake)[0]
    real_logit = d_forward(D, snap, theta, x_reals[k])[0] if kind == "saddle" else None
    return g_loss_fn(kind, real_logit, fake_logit)


# ------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------
def generator_step(G, D, opt_g, opt_d, fake, c_cat, c_cont, x_reals, k, args):
    """G (and Q's head) update against the K-step unrolled D; D and opt_d are left exactly as they were.
    Returns detached (loss_g, li_cat, li_cont)."""
    # ---- unrolled look-ahead (eq. 8-10) ----
    # K differentiable Adam steps of D on a functional copy, then f_K on the unrolled parameters. The fake batch
    # is the step's own G(z, c): f_K is differentiated through G in every unrolled update.
    loss_g = unrolled_g_loss(D, opt_d, x_reals, fake, k, args.unroll_lr, args.g_loss, args.first_order)

    # ---- generator step ----
    # eq. (11): loss_g.backward() gives df_K/dθ_G, both terms (the second one unless --first-order)
    total = loss_g
    zero = torch.zeros((), device=fake.device)
    li_cat = li_cont = zero
    # ---- information (Q) step ----
    # eq. (12)-(13): g_K = f_K - λ L_I, with L_I on the current, NOT unrolled, D/Q (report §III.A). One Adam update
    # of G and Q's head on f_K + λ·(-L_I); Q's body is D's and is trained by the D step only. Q runs on copies
    # of D's BatchNorm buffers, so the generator step leaves all of D's state as the D step left it (infogan.py
    # runs this forward on the real D, whose running stats then also see this fake batch).
    if args.n_cat:
        params_and_copies = {**dict(D.named_parameters()), **{n: b.clone() for n, b in D.named_buffers()}}
        _, q_fake = functional_call(D, params_and_copies, (fake,))
        li_cat, li_cont = information_losses(q_fake, c_cat, c_cont, args.n_cat)
        total = loss_g + args.lambda_cat * li_cat + args.lambda_cont * li_cont
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    return torch.stack([loss_g, li_cat, li_cont]).detach()


def train_step(G, D, opt_d, opt_g, x, unroll_reals, k, args):
    """One step on a real batch x (images in [-1, 1], or ring/grid points); unroll_reals: the K real batches of
    the look-ahead (real_batches_for_unroll). Returns detached (loss_d, loss_g, li_cat, li_cont), no host sync."""
    latent, c_cat, c_cont = sample_latents(x.shape[0], args.n_noise, args.n_cat, args.n_cont, x.device)
    fake = G(latent)

    # ---- discriminator step ----
    d_real, _ = D(x)
    d_fake, _ = D(fake.detach())
    loss_d = d_loss(d_real, d_fake)  # eq. (1), a sum of two batch means
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    # the look-ahead starts from D as this step's update left it (θ_D, its Adam state and buffers)
    rest = generator_step(G, D, opt_g, opt_d, fake, c_cat, c_cont, unroll_reals + [x], k, args)
    return torch.cat([loss_d.detach()[None], rest])


def real_batches_for_unroll(train, x, k, args, gen):
    """Real batches of the K unroll steps. same (default, as the official Unrolled GAN demo): the step's own batch
    each time, so f_K is eq. (10) on one minibatch, a deterministic function of θ_G and θ_D. fresh: K new batches
    drawn at random (own generator, so the data order of the run is the same for every K), closer to the K steps
    D will really take next, at the price of a noisier surrogate."""
    if args.unroll_data == "same" or k == 0:
        return [x] * k
    if args.dataset in TOY:
        return [train.sample(x.shape[0], gen)[0] for _ in range(k)]
    idx = torch.randint(len(train), (k, x.shape[0]), generator=gen).to(x.device)
    return [train.batch(i)[0] * 2 - 1 for i in idx]


# ------------------------------------------------------------------------------------------------
# Figures, checkpoint
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_figures(G, fixed, run_dir, args, panels):
    """MNIST: fig04/fig05 traversals, samples.png, fig12_q_loss.png, losses.png. Ring/grid: fig03_scatter.png."""
    metrics = os.path.join(run_dir, "metrics.csv")
    common.plot_metrics(metrics, ["loss_d", "loss_g"], os.path.join(run_dir, "losses.png"), ylabel="loss",
                        title=f"losses, K = {args.k_run}")
    if args.dataset in TOY:
        common.save_scatter_rows({f"K = {args.k_run}": panels[-8:]}, os.path.join(run_dir, "fig03_scatter.png"),
                                 modes=fixed["modes"], lim=5.5 if args.dataset == "grid" else 2.8)
        return
    common.plot_metrics(metrics, ["li_cont"], os.path.join(run_dir, "fig12_q_loss.png"),
                        title=f"L_I continuous, K = {args.k_run}")
    G.eval()  # BatchNorm running statistics: a traversal batch shares one z, batch statistics would distort it
    values, n_cat = fixed["values"], args.n_cat
    for code in range(fixed["c_cont"].shape[0]):
        latent, _, _ = traversal_latents(fixed["z"], fixed["c_cont"], code, values, n_cat)
        images = (G(latent) + 1) / 2  # [-1, 1] -> [0, 1]
        name = {0: "fig04_traversal_c1", 1: "fig05_traversal_c2"}.get(code, f"traversal_c{code + 1}")
        common.save_traversal(images.view(n_cat, len(values), 1, 28, 28), os.path.join(run_dir, name + ".png"),
                              values, row_labels=[f"c_cat={r}" for r in range(n_cat)], xlabel=f"c{code + 1}",
                              title=f"K = {args.k_run}: continuous code c{code + 1} (rows: categorical code)")
    common.save_grid((G(fixed["samples"]) + 1) / 2, os.path.join(run_dir, "samples.png"), nrow=10,
                     row_labels=[f"c_cat={r}" for r in range(n_cat)], title=f"K = {args.k_run}: samples")
    G.train()


def save_checkpoint(path, **state):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: an interrupted write never leaves a half checkpoint


def load_checkpoint(path, args):
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        common.die(f"{path} is not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        common.die(f"{path} is a checkpoint of {other or 'something else'}, not of {SCRIPT}")
    for flag in MODEL_FLAGS:
        if ckpt["args"][flag] != getattr(args, flag):
            common.die(f"--{flag.replace('_', '-')} is {getattr(args, flag)} but {path} was trained with "
                       f"{ckpt['args'][flag]}; pass the same value to resume")
    return path, ckpt


# ------------------------------------------------------------------------------------------------
# One run (one K), then the sweep's comparison
# ------------------------------------------------------------------------------------------------
def build(args, device):
    """Models and optimizers: D's optimizer owns D's body and head, G's owns G and Q's head (as infogan.py)."""
    toy = args.dataset in TOY
    n_latent = args.n_noise + args.n_cat + args.n_cont
    G = (ToyG(n_latent, args.act) if toy else Generator(n_latent)).to(device)
    D = (ToyD(args.act) if toy else Discriminator(args.n_cat, args.n_cont)).to(device)
    d_params = list(D.parameters()) if toy else [*D.body.parameters(), *D.d_head.parameters()]
    g_params = list(G.parameters()) + ([] if toy else list(D.q_head.parameters()))
    opt_d = torch.optim.Adam(d_params, lr=args.lr_d, betas=(args.beta1, 0.999))
    opt_g = torch.optim.Adam(g_params, lr=args.lr_g, betas=(args.beta1, 0.999))
    return G, D, opt_d, opt_g


def train(args, k, out_dir):
    args.k_run = k
    device = torch.device(args.device)
    toy = args.dataset in TOY
    ckpt_path, ckpt = load_checkpoint(args.resume, args) if args.resume else (None, None)

    # ---- seeding: the same seed gives every K the same initial networks, data order and fixed latents ----
    torch.manual_seed(args.seed)  # latents of the training steps, initial weights
    data_gen = torch.Generator().manual_seed(args.seed)  # order of the data (ring/grid: the samples)
    fixed_gen = torch.Generator().manual_seed(args.seed)  # fixed latents of the figures
    unroll_gen = torch.Generator().manual_seed(args.seed + 1)  # --unroll-data fresh batches

    # ---- data: MNIST [0, 1] -> [-1, 1] to match the tanh generator ----
    train_data = common.load_data(args.dataset, args.data_root, device)
    test = None if toy else common.load_data(args.dataset, args.data_root, device, train=False)
    steps_per_epoch = train_data.steps_per_epoch if toy else len(train_data) // args.batch_size
    if steps_per_epoch == 0:
        common.die(f"--batch-size {args.batch_size} is larger than the {len(train_data)} training images")
    total = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)

    G, D, opt_d, opt_g = build(args, device)
    if toy:
        fixed = {"z": torch.randn(2500, args.n_noise, generator=fixed_gen), "modes": train_data.modes.cpu()}
    else:
        n = 10 * args.n_cat  # samples.png: 10 per categorical value, one row each
        fixed = {"z": torch.randn(args.n_noise, generator=fixed_gen), "c_cont": torch.zeros(args.n_cont),
                 "values": torch.linspace(-2, 2, 10),
                 "samples": make_latent(torch.randn(n, args.n_noise, generator=fixed_gen),
                                        torch.arange(args.n_cat).repeat_interleave(10),
                                        torch.rand(n, args.n_cont, generator=fixed_gen) * 2 - 1, args.n_cat)}
    step, seconds, track, panels = 0, 0.0, {}, []  # track (ring/grid): when all modes were first reached, hq per log point
    if ckpt is not None:
        try:
            G.load_state_dict(ckpt["models"]["G"])
            D.load_state_dict(ckpt["models"]["D"])
            opt_d.load_state_dict(ckpt["optims"]["d"])
            opt_g.load_state_dict(ckpt["optims"]["g"])
        except (RuntimeError, ValueError, KeyError) as e:
            common.die(f"{ckpt_path} does not fit these models ({type(e).__name__}); resume with the flags it was made with")
        step, seconds, fixed, track, panels = ckpt["step"], ckpt["seconds"], ckpt["fixed"], ckpt["track"], ckpt["panels"]
        torch.set_rng_state(ckpt["rng"])
        data_gen.set_state(ckpt["data_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    fixed = {key: v.to(device) for key, v in fixed.items()}

    # ---- run folder ----
    if ckpt is not None:
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join(out_dir, f"unrolled_infogan__{args.dataset}__k{k}__s{args.seed}__{stamp}")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**vars(args), "k": k, "torch": torch.__version__, "device_name": torch.cuda.get_device_name(device)
                       if device.type == "cuda" else "cpu"}, f, indent=2)
    print(f"run folder {run_dir}  (K = {k}, {'first-order' if args.first_order else 'exact'} unroll; "
          f"{'resumed at step %d' % step if ckpt else 'new run'})", flush=True)

    @torch.no_grad()
    def evaluate():
        """ring/grid: mode metrics of 2,500 fixed-noise samples; mnist: categorical test accuracy."""
        if toy:
            return mode_metrics(G(fixed["z"]), train_data.modes, train_data.std)
        return {"test_acc": test_accuracy(D, test, args.n_cat)}

    # ---- training loop ----
    hist = torch.zeros(args.log_every, len(LOSS_NAMES), device=device)  # ring buffer of the last steps' losses
    start_step, t_start = step, time.time()
    t_log, step_log = t_start, step

    def check_and_report(epoch):
        """NaN check over the ring buffer, then a progress line with its means. Syncs with the device."""
        nonlocal t_log, step_log
        filled = min(step - start_step, args.log_every)
        rows = hist.tolist()
        for s in range(step - filled + 1, step + 1):
            for name, v in zip(LOSS_NAMES, rows[s % args.log_every]):
                if v != v or abs(v) == float("inf"):
                    common.die(f"{name} became {v} at step {s}; lower the learning rate or check the data")
        means = torch.tensor([rows[s % args.log_every] for s in range(step - filled + 1, step + 1)]).mean(0)
        t_now = time.time()
        rate = (step - step_log) / max(t_now - t_log, 1e-9)
        eta = (total - step) / max(rate, 1e-9)
        extra = ""
        if toy:  # cheap (2,500 points through an MLP): also tells when all modes were first reached
            mm = evaluate()
            for key in ("modes", "modes10"):
                if mm[key] == len(train_data.modes) and key not in track:
                    track[key] = (step, seconds + t_now - t_start)
            track.setdefault("hq", []).append((step, mm["hq_pct"]))  # hq jitters from one log point to the next
            extra = (f"  modes {mm['modes']}  modes10 {mm['modes10']}  hq {mm['hq_pct']:.1f}%  "
                     f"rkl {mm['reverse_kl']:.3f}")
        shown = LOSS_NAMES[:2] if toy else LOSS_NAMES
        print(f"epoch {epoch}/{args.epochs}  step {step}/{total}  "
              + "  ".join(f"{name} {v:.3f}" for name, v in zip(shown, means.tolist())) + extra
              + f"  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        t_log, step_log = time.time(), step  # the next interval's speed leaves out this evaluation

    while step < total:
        epoch = step // steps_per_epoch + 1
        epoch_rng = data_gen.get_state()  # the state this epoch's permutation is drawn from
        batches = itertools.islice(train_data.epoch(args.batch_size, data_gen), step % steps_per_epoch, None)
        epoch_sum, epoch_n, t_epoch = torch.zeros(len(LOSS_NAMES), device=device), 0, time.time()
        t_log = t_epoch  # the speed on progress lines leaves out evaluation and figures
        for x, _ in batches:
            x = x if toy else x * 2 - 1
            losses = train_step(G, D, opt_d, opt_g, x, real_batches_for_unroll(train_data, x, k, args, unroll_gen), k, args)
            step += 1
            hist[step % args.log_every] = losses
            epoch_sum += losses
            epoch_n += 1
            if step % args.log_every == 0:
                check_and_report(epoch)
            if step >= total:
                break
        if step != step_log:  # the tail of the epoch since the last progress line
            check_and_report(epoch)
        steps_per_s = epoch_n / max(time.time() - t_epoch, 1e-9)  # training only: no evaluation, no figures
        means = dict(zip(LOSS_NAMES, (epoch_sum / epoch_n).tolist()))  # epoch means of the step losses
        if toy:
            del means["li_cat"], means["li_cont"]
        row = {"epoch": round(step / steps_per_epoch, 3), "step": step,
               "seconds": round(seconds + time.time() - t_start, 2),  # wall seconds, summed over resumed sessions
               "steps_per_s": steps_per_s, **means, **evaluate()}
        if device.type == "cuda":  # issue 6: peak memory per epoch, to see that create_graph keeps no graph alive
            row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        common.append_metrics(os.path.join(run_dir, "metrics.csv"), row)
        print(f"epoch {epoch} done: " + "  ".join(f"{c} {row[c]:.4g}" for c in row if c in
                                                  ("test_acc", "modes", "modes10", "hq_pct", "reverse_kl")), flush=True)
        if toy:
            with torch.no_grad():
                panels.append((f"step {step}", G(fixed["z"]).cpu()))
        save_figures(G, fixed, run_dir, args, panels)
        save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), script=SCRIPT, args={**vars(args), "k": [k]},
                        models={"G": G.state_dict(), "D": D.state_dict()},
                        optims={"d": opt_d.state_dict(), "g": opt_g.state_dict()},
                        step=step, epoch=step // steps_per_epoch, seconds=row["seconds"],
                        fixed={key: v.cpu() for key, v in fixed.items()}, track=track, panels=panels,
                        rng=torch.get_rng_state(),
                        data_rng=data_gen.get_state() if step % steps_per_epoch == 0 else epoch_rng,
                        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    # ---- summary ----
    wall = time.time() - t_start
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            if device.type == "cuda" else "")
    reached = ""
    if toy:
        f = track.get("modes10")
        last_hq = sorted(h for s, h in track.get("hq", []) if s > step - steps_per_epoch)
        track["hq_median_last_epoch"] = last_hq[len(last_hq) // 2] if last_hq else math.nan
        reached = f", all modes with >= 10 HQ samples first at {'step %d (%.0f s)' % f if f else 'no log point'}"
    print(f"done: {step - start_step} steps in {wall:.1f} s ({(step - start_step) / max(wall, 1e-9):.1f} steps/s)"
          f"{peak}{reached}, run folder {run_dir}", flush=True)
    rows = common.read_metrics(os.path.join(run_dir, "metrics.csv"))
    return {"run_dir": run_dir, "row": rows[-1], "seconds": rows[-1]["seconds"], "steps": step,
            "steps_per_s": sum(r["steps_per_s"] for r in rows) / len(rows), "track": track, "panels": panels,
            "centres": fixed.get("modes")}


def write_comparison(sweep_dir, args, results, argv):
    """comparison.md (the report's table, with what we measured) and the sweep's figures."""
    order = "first-order (the report's setting)" if args.first_order else "exact second-order"
    lines = [f"# Unrolled InfoGAN, {args.dataset}: K sweep, seed {args.seed}, {order} unroll", "",
             f"command: `python unrolled_infogan.py {' '.join(argv)}`", "",
             "steps/s: mean over epochs of training-only speed; values at the last epoch (means over its steps)", ""]
    if args.dataset in TOY:
        lines += ["| K | steps | seconds | steps/s | modes | modes10 | hq % | hq % median, last epoch | reverse KL | "
                  "modes10 = all, first at step (s) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k, r in results.items():
            f, row = r["track"].get("modes10"), r["row"]
            lines.append(f"| {k} | {r['steps']} | {r['seconds']:.0f} | {r['steps_per_s']:.2f} | {row['modes']:.0f} | "
                         f"{row['modes10']:.0f} | {row['hq_pct']:.1f} | {r['track']['hq_median_last_epoch']:.1f} | {row['reverse_kl']:.3f} | "
                         f"{'never (at log points)' if f is None else '%d (%.0f)' % f} |")
        common.save_scatter_rows({f"K = {k}": r["panels"][-6:] for k, r in results.items()},
                                 os.path.join(sweep_dir, "fig03_scatter.png"), modes=next(iter(results.values()))["centres"],
                                 lim=5.5 if args.dataset == "grid" else 2.8, title=f"{args.dataset}: one row per K (Fig. 3)")
    else:
        lines += ["| K | steps | seconds | steps/s | L_I cont | L_I disc | test acc | report L_I cont | report L_I disc |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, r in results.items():
            row, (rc, rd) = r["row"], REPORT.get(k, ("-", "-"))
            lines.append(f"| {k} | {r['steps']} | {r['seconds']:.0f} | {r['steps_per_s']:.2f} | {row['li_cont']:.4f} | "
                         f"{row['li_cat']:.4f} | {row['test_acc']:.3f} | {rc} | {rd} |")
        lines += ["", "L_I: the minimised -E log Q(c|x) terms of infogan.py (cont: 0.5·squared error, fixed σ = 1; "
                  "disc: cross-entropy); the report's values may use another constant. Look at the traversals too: "
                  "a low L_I alone can come from a generator that draws no digits."]
        common.plot_metrics({f"K={k}": os.path.join(r["run_dir"], "metrics.csv") for k, r in results.items()},
                            ["li_cont"], os.path.join(sweep_dir, "fig12_q_loss.png"), ylabel="L_I continuous",
                            title=f"Fig. 12: L_I continuous vs epoch ({order})")
    with open(os.path.join(sweep_dir, "comparison.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if len(args.k) == 1:
        train(args, args.k[0], args.out)
        return
    order = "-first-order" if args.first_order else ""
    sweep_dir = os.path.join(args.out, f"unrolled_infogan__{args.dataset}__sweep-k{'-'.join(map(str, args.k))}{order}"
                                       f"__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(sweep_dir, exist_ok=True)
    results = {k: train(args, k, sweep_dir) for k in args.k}  # one after the other, same seed and data
    write_comparison(sweep_dir, args, results, [str(a) for a in argv])
    print(f"sweep folder {sweep_dir}", flush=True)


if __name__ == "__main__":
    main()
