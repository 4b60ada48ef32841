"""Unrolled InfoGAN (Chen et al. 2016; Metz et al. 2017): report §II.B-III; Figs 3-12.

    python unrolled_infogan.py --data-root DATA --width 0.25 --epochs 5 --k 0 5 7 10  # a lab
    python unrolled_infogan.py --dataset ring --k 0 10  # Fig 3
"""
import argparse
import itertools
import json
import math
import os
import time
from datetime import datetime

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common
import evaluation

SCRIPT = "unrolled_infogan.py"
LOSSES = ("loss_d", "loss_g", "li_cat", "li_cont")  # train_step's order
MNIST = dict(  # the InfoGAN paper's, but for K and the unroll
    epochs=15,  # about 14,000 steps
    epoch_steps=0,  # 0: a pass over the data (ring: 500 batches)
    batch_size=64,
    width=1.0,  # 1: the papers' nets; 0.25 fits a CPU
    k=[10],  # the report's largest K; several: a sweep
    unroll_lr=2.5e-5,  # D's / 8: at D's, D wins at K = 10 (docs/unrolling.md)
    g_loss="ns",  # G's f: -log D(G(z)), as in infogan.py
    lr_g=1e-3,  # Adam's; G's also trains Q's head
    lr_d=2e-4,
    beta1=0.5,
    lambda_cat=1.0,  # λ of eq. (3)
    lambda_cont=1.0,  # li_cont: a mean over codes
    n_noise=62,  # z; one 10-way code, 2 continuous
    n_cat=10,
    n_cont=2)
RING = MNIST | dict(  # the Unrolled GAN paper's, where they differ
    epochs=6,  # 3,000 steps; all modes appear early
    batch_size=512,
    unroll_lr=1e-4,  # D's own
    g_loss="saddle",  # eq. (1) as written
    lr_d=1e-4,
    n_noise=256,
    n_cat=0,  # a plain GAN: no codes, no Q (λ unused)
    n_cont=0)
DEFAULTS = {"mnist": MNIST, "ring": RING, "grid": RING}

# ---- Flags: the shared ones, the same in every script, then the script's own ----
RUN_FLAGS = ("resume", "device", "data_root", "epochs", "steps", "log_every", "out")


def parse_args(argv=None):
    """Defaults: DEFAULTS[--dataset], or the flags of the run --resume continues
    (only RUN_FLAGS may change). Returns the flags and the checkpoint (or None)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = common.die  # argparse's errors: one line, exit status 1
    gpu = torch.cuda.is_available()
    p.add_argument("--dataset", choices=list(DEFAULTS), default=list(DEFAULTS)[0], help="data")
    p.add_argument("--device", choices=["cpu", "cuda"], help="device",
                   default="cuda" if gpu else "cpu")
    p.add_argument("--data-root", default="./data", help="MNIST/raw or CelebA's")
    p.add_argument("--out", default="runs", help="where run folders go")
    p.add_argument("--resume", help="a run folder to continue")
    p.add_argument("--seed", type=between(0, 2 ** 31, int), default=1, help="seed")
    p.add_argument("--epochs", type=between(1, 10 ** 6, int), help="epochs")
    p.add_argument("--epoch-steps", type=between(0, 10 ** 9, int), help="0: a pass")
    p.add_argument("--steps", type=between(1, 10 ** 12, int), help="steps in all")
    p.add_argument("--batch-size", type=between(2, 4096, int), help="images a step")
    p.add_argument("--log-every", type=between(1, 10 ** 9, int), default=100, help="steps")
    # ---- this script's own ----
    p.add_argument("--width", type=between(1 / 64, 4), help="× every hidden size")
    p.add_argument("--k", type=between(0, 100, int), nargs="+", help="K; several values: a sweep")
    p.add_argument("--first-order", action="store_true", help="drop eq. (11)'s 2nd term")
    p.add_argument("--unroll-lr", type=between(1e-9, 1), help="Adam lr inside the unroll")
    p.add_argument("--lr-g", type=between(1e-9, 1), help="Adam lr of G and Q's head")
    p.add_argument("--lr-d", type=between(1e-9, 1), help="Adam lr of D")
    known = p.parse_known_args(argv)[0]  # --dataset and --resume set the defaults
    ckpt = read_checkpoint(known.resume) if known.resume else None
    p.set_defaults(**(ckpt["args"] if ckpt else DEFAULTS[known.dataset]))
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    common.need(args.device == "cpu" or gpu, "--device cuda: no GPU here; use cpu")
    common.need(not os.path.isfile(args.out), f"--out {args.out} is a file")
    for flag, value in (ckpt["args"] if ckpt else {}).items():
        common.need(flag in RUN_FLAGS or vars(args)[flag] == value,
                    f"--resume keeps the run's {flag} = {value}; leave it out")
    return args, ckpt


# ---- Models (InfoGAN paper's Table 1, sizes × --width), latents, losses ----
def generator(n_latent, width=1.0):
    """G(z, c) -> (B, 1, 28, 28); the shapes below are at width 1."""
    h1, h2, h3 = (max(1, round(n * width)) for n in (1024, 128, 64))
    return nn.Sequential(
        nn.Linear(n_latent, h1),  # (B, 1024)
        nn.BatchNorm1d(h1),
        nn.ReLU(),
        nn.Linear(h1, h2 * 7 * 7),  # (B, 6272)
        nn.BatchNorm1d(h2 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (h2, 7, 7)),  # (B, 128, 7, 7)
        nn.ConvTranspose2d(h2, h3, 4, 2, 1),  # (B, 64, 14, 14)
        nn.BatchNorm2d(h3),
        nn.ReLU(),
        nn.ConvTranspose2d(h3, 1, 4, 2, 1),  # (B, 1, 28, 28)
        nn.Tanh())  # pixels in [-1, 1]


class Discriminator(nn.Module):
    """D = d_head(body(x)); Q = q_head(body(x)): c_cat logits, c_cont means."""
    def __init__(self, n_cat, n_cont, width=1.0):
        super().__init__()
        h1, h2, h3, h4 = (max(1, round(n * width)) for n in (64, 128, 1024, 128))
        self.body = nn.Sequential(
            nn.Conv2d(1, h1, 4, 2, 1),  # (B, 64, 14, 14)
            nn.LeakyReLU(0.1),
            nn.Conv2d(h1, h2, 4, 2, 1),  # (B, 128, 7, 7)
            nn.BatchNorm2d(h2),
            nn.LeakyReLU(0.1),
            nn.Flatten(),  # (B, 6272)
            nn.Linear(h2 * 7 * 7, h3),  # (B, 1024)
            nn.BatchNorm1d(h3),
            nn.LeakyReLU(0.1))
        self.d_head = nn.Linear(h3, 1)  # (B, 1)
        self.q_head = nn.Sequential(
            nn.Linear(h3, h4),  # (B, 128)
            nn.BatchNorm1d(h4),
            nn.LeakyReLU(0.1),
            nn.Linear(h4, n_cat + n_cont))  # (B, n_cat + n_cont)

    def forward(self, x):
        """(B, 1, 28, 28) -> D's logit (B,), Q's outputs (B, n_cat + n_cont)."""
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


def mlp(n_in, n_out, width=1.0):
    """Unrolled GAN's ring/grid nets: (B, n_in) -> (B, n_out)."""
    h = max(1, round(128 * width))
    return nn.Sequential(
        nn.Linear(n_in, h),  # (B, 128)
        nn.ReLU(),  # with it, K = 0 collapses on most seeds
        nn.Linear(h, h),  # (B, 128)
        nn.ReLU(),
        nn.Linear(h, n_out))  # (B, n_out)


class ToyDiscriminator(nn.Sequential):  # mlp(2, 1) -> (logit (B,), no Q)
    def forward(self, x):
        return super().forward(x).squeeze(1), None


def make_latent(z, c_cat, c_cont, n_cat):
    """G's input [z, one-hot(c_cat), c_cont]: (B, n_noise + n_cat + n_cont)."""
    return torch.cat([z, F.one_hot(c_cat, n_cat).to(z.dtype), c_cont], dim=1)


def sample_latents(n, n_noise, n_cat, n_cont, device, generator=None):
    """z ~ N(0, I), c_cat ~ U{0..n_cat-1}, c_cont ~ U(-1, 1)."""
    z = torch.randn(n, n_noise, device=device, generator=generator)
    c_cat = torch.randint(n_cat, (n,), device=device, generator=generator)
    c_cont = torch.rand(n, n_cont, device=device, generator=generator) * 2 - 1
    return make_latent(z, c_cat, c_cont, n_cat), c_cat, c_cont


def traversal_latents(z, c_cont, code, values, n_cat):
    """Figs 4-11, row-major: c_cat = row, c_cont[code] = values[col]; z fixed."""
    rows, cols = n_cat, len(values)
    c_cat = torch.arange(rows, device=z.device).repeat_interleave(cols)  # (R*C,)
    cc = c_cont.expand(rows * cols, -1).clone()
    cc[:, code] = values.to(z.device).repeat(rows)
    return make_latent(z.expand(rows * cols, -1), c_cat, cc, n_cat), c_cat, cc


def fixed_latents(args, device):
    """Fixed latents: a traversal's z (codes at 0), 10 samples per c_cat."""
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n_noise, generator=g)
    samples_cat = torch.arange(args.n_cat).repeat_interleave(10)
    samples_z = torch.randn(len(samples_cat), args.n_noise, generator=g)
    samples_cont = torch.rand(len(samples_cat), args.n_cont, generator=g) * 2 - 1
    fixed = dict(z=z, c_cont=torch.zeros(args.n_cont), values=torch.linspace(-2, 2, 10),
                 samples=make_latent(samples_z, samples_cat, samples_cont, args.n_cat))
    return {name: t.to(device) for name, t in fixed.items()}


def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: D ascends V(D, G), i.e. descends
    # loss_d = -V = -E_x log D(x) - E_z log(1 - D(G(z))), each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def information_losses(q, c_cat, c_cont, n_cat):
    """-L_I + H(c), less constants: cross-entropy, Gaussian NLL (σ = 1)."""
    li_cat = F.cross_entropy(q[:, :n_cat], c_cat)  # a batch mean
    li_cont = 0.5 * (q[:, n_cat:] - c_cont).pow(2).mean()  # over batch and codes
    return li_cat, li_cont


# ---- The unrolled look-ahead (eqs. 8-11) ----
# The parameters opt_d owns as ONE flat vector θ (P,): the differentiable Adam is a few vector
# operations, and views of θ feed functional_call. No host sync.
TINY = 1e-30  # sqrt(v + TINY): d sqrt(v)/dv is infinite at v = 0, and 0·inf = NaN


def flat_adam_state(opt, p, key):
    """opt's Adam state `key` of parameter p, flat; zeros before its first step."""
    state = opt.state.get(p, {})
    return state[key].reshape(-1) if key in state else torch.zeros_like(p).reshape(-1)


def snapshot_d(D, opt_d):
    """D where the look-ahead starts, as fresh tensors: θ, Adam's m, v (P,), its step t
    and settings; in "rest", D's other parameters and copies of its buffers."""
    owned = {id(p) for p in opt_d.param_groups[0]["params"]}
    named = [(name, p) for name, p in D.named_parameters() if id(p) in owned]
    params = [p for _, p in named]
    rest = {name: p.detach() for name, p in D.named_parameters() if id(p) not in owned}
    rest.update({name: b.clone() for name, b in D.named_buffers()})
    return {"names": [name for name, _ in named],
            "shapes": [p.shape for p in params],
            "theta": torch.cat([p.detach().reshape(-1) for p in params]),
            "m": torch.cat([flat_adam_state(opt_d, p, "exp_avg") for p in params]),
            "v": torch.cat([flat_adam_state(opt_d, p, "exp_avg_sq") for p in params]),
            "t": int(opt_d.state.get(params[0], {}).get("step", 0)),  # a CPU count
            "rest": rest,
            "group": opt_d.param_groups[0]}  # lr, betas, eps


def d_forward(D, snap, theta, x):
    """D's outputs for x, with opt_d's parameters the views of the flat θ."""
    views = theta.split([math.prod(shape) for shape in snap["shapes"]])
    params = {n: t.view(s) for n, t, s in zip(snap["names"], views, snap["shapes"])}
    return functional_call(D, {**params, **snap["rest"]}, (x,))


def adam_step(theta, m, v, grad, t, lr, betas, eps):
    """One differentiable Adam update, torch.optim.Adam's arithmetic; t: the step."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    denom = torch.sqrt(v / (1 - b2 ** t) + TINY) + eps
    return theta - lr / (1 - b1 ** t) * m / denom, m, v


def unroll(D, snap, x_real, x_fake, k, lr, first_order=False):
    """eq. (8): θ_D^{k+1} = θ_D^k + η df/dθ_D^k, K Adam steps descending loss_d = -f.
    Exact: θ_D^K stays a function of θ_G (create_graph), so backprop through f_K gives
    both terms of eq. (11); first_order detaches θ_D^k and x_fake: the first alone."""
    theta, m, v = snap["theta"].requires_grad_(), snap["m"], snap["v"]
    betas, eps = snap["group"]["betas"], snap["group"]["eps"]
    fake = x_fake.detach() if first_order else x_fake
    for i in range(k):
        if first_order:
            theta = theta.detach().requires_grad_()
        real_logit, *_ = d_forward(D, snap, theta, x_real)
        fake_logit, *_ = d_forward(D, snap, theta, fake)
        loss = d_loss(real_logit, fake_logit)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=not first_order)
        t = snap["t"] + i + 1
        theta, m, v = adam_step(theta, m, v, grad, t, lr, betas, eps)
    return theta.detach() if first_order else theta


def unrolled_g_loss(D, opt_d, x_real, x_fake, k, lr, kind="ns", first_order=False):
    """eq. (10): f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)), G's loss against D after K
    updates (K = 0: the plain GAN's). ns: -E log D(G(z)); saddle: eq. (1)'s V."""
    snap = snapshot_d(D, opt_d)
    theta = unroll(D, snap, x_real, x_fake, k, lr, first_order)
    fake_logit, *_ = d_forward(D, snap, theta, x_fake)
    if kind == "ns":
        return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
    real_logit, *_ = d_forward(D, snap, theta, x_real)  # unrolled, a function of θ_G too
    return -d_loss(real_logit, fake_logit)


def forward_with_copied_buffers(D, x):
    """D(x) on copies of D's buffers: BatchNorm's running statistics stay as they were;
    gradients reach D's parameters."""
    buffers = {name: b.clone() for name, b in D.named_buffers()}
    return functional_call(D, buffers, (x,))


# ---- ALGO LOGIC: one training step (D step, look-ahead, G and Q step) ----
def train_step(nets, opts, x, args):
    """One step on real x (digits in [-1, 1], or points) -> LOSSES."""
    G, D = nets["G"], nets["D"]
    B = x.shape[0]
    if args.n_cat:
        latent, c_cat, c_cont = sample_latents(B, args.n_noise, args.n_cat, args.n_cont, x.device)
    else:  # ring/grid: a plain unrolled GAN, no codes
        latent = torch.randn(B, args.n_noise, device=x.device)
    fake = G(latent)

    # ---- (1) discriminator step: maximise eq. (1), log D(x) + log(1 - D(G(z, c))) ----
    real_logit, _ = D(x)
    fake_logit, _ = D(fake.detach())
    loss_d = d_loss(real_logit, fake_logit)
    opts["d"].zero_grad(set_to_none=True)
    loss_d.backward()
    opts["d"].step()

    # ---- (2) unrolled look-ahead, eqs. (8)-(10): f_K, G's loss after K more D steps ----
    loss_g = unrolled_g_loss(D, opts["d"], x, fake, args.k, args.unroll_lr, args.g_loss,
                             args.first_order)

    # ---- (3) information term, eqs. (12)-(13): g_K = f_K - λ L_I, L_I on the live D ----
    li_cat = li_cont = torch.zeros((), device=x.device)
    if args.n_cat:
        _, q = forward_with_copied_buffers(D, fake)
        li_cat, li_cont = information_losses(q, c_cat, c_cont, args.n_cat)

    # ---- (4) G and Q step on g_K: both terms of eq. (11) (the report's code: the 1st) ----
    loss_gq = loss_g + args.lambda_cat * li_cat + args.lambda_cont * li_cont
    opts["g"].zero_grad(set_to_none=True)
    loss_gq.backward(inputs=opts["g"].param_groups[0]["params"])  # no gradient for D
    opts["g"].step()
    return torch.stack([loss_d, loss_g, li_cat, li_cont]).detach()


# ---- Networks, data, evaluation, figures ----
def build(args, shape):
    """G, D (MNIST: with Q's head); Adams for D but q_head and for G, q_head."""
    if args.dataset == "mnist":
        G = generator(args.n_noise + args.n_cat + args.n_cont, args.width).to(args.device)
        D = Discriminator(args.n_cat, args.n_cont, args.width).to(args.device)
    else:  # no codes: G(z)
        G = mlp(args.n_noise, 2, args.width).to(args.device)
        D = ToyDiscriminator(*mlp(2, 1, args.width)).to(args.device)
    q_head = [p for n, p in D.named_parameters() if n.startswith("q_head.")]
    d_params = [p for n, p in D.named_parameters() if not n.startswith("q_head.")]
    betas = (args.beta1, 0.999)
    opts = {"d": torch.optim.Adam(d_params, lr=args.lr_d, betas=betas),
            "g": torch.optim.Adam([*G.parameters(), *q_head], lr=args.lr_g, betas=betas)}
    return {"G": G, "D": D}, opts


def setup(args):
    """MNIST as in infogan.py; ring/grid: the points, Fig 3's fixed noise."""
    device = torch.device(args.device)
    train = common.load_data(args.dataset, args.data_root, device, signed=True)
    if args.dataset != "mnist":
        z = torch.randn(2500, args.n_noise, generator=torch.Generator().manual_seed(args.seed))
        return train, {"z": z.to(device), "modes": train.modes, "std": train.std}
    test = common.load_data(args.dataset, args.data_root, device, train=False, signed=True)
    measure = evaluation.Evaluator(args.data_root, device, args.n_noise, args.n_cat, args.n_cont)
    return train, {"test": test, "fixed": fixed_latents(args, device), "measure": measure}


def evaluate(nets, ctx, args):
    """MNIST as in infogan.py; ring/grid: the mode metrics."""
    if args.dataset != "mnist":
        return evaluation.mode_metrics(nets["G"](ctx["z"]), ctx["modes"], ctx["std"])
    test_acc = evaluation.test_accuracy(nets["D"], ctx["test"], args.n_cat)
    return {"test_acc": test_acc, **ctx["measure"](nets["G"])}


def save_figures(nets, ctx, args, folder, row):
    """losses.png; MNIST: Figs 4-11, samples.png, fig12; ring: Fig 3's row."""
    metrics = os.path.join(folder, "metrics.csv")
    title = f"K = {args.k}" + (" first-order" if args.first_order else "")
    common.plot_metrics(metrics, ["loss_d", "loss_g"], os.path.join(folder, "losses.png"),
                        title=f"{title}: losses")
    if args.dataset == "mnist":
        save_digit_figures(nets["G"], ctx["fixed"], args, folder, row["step"], f"{title}: ")
        common.plot_metrics(metrics, ["li_cont"], os.path.join(folder, "fig12_q_loss.png"),
                            title=f"{title}: L_I continuous")
    else:  # Fig 3, here and in the sweep, from ring_samples.pt
        samples = nets["G"](ctx["z"]).detach()
        common.save_scatter_history(folder, f"step {row['step']}", samples, title, ctx["modes"])


@torch.no_grad()
def save_digit_figures(G, fixed, args, folder, step, title=""):
    """fig04/05: a traversal per continuous code (rows: c_cat); samples.png."""
    G.eval()  # BN's running statistics: a traversal's one z skews a batch's
    row_labels = [f"c_cat={r}" for r in range(args.n_cat)]
    moved = []  # each code's traversal, for traversal.gif
    for j in range(args.n_cont):  # continuous code c{j + 1}
        latent = traversal_latents(fixed["z"], fixed["c_cont"], j, fixed["values"], args.n_cat)[0]
        images = (G(latent) + 1).view(args.n_cat, -1, 1, 28, 28) / 2  # (rows, cols, 1, 28, 28)
        moved.append(images)
        name = f"fig0{j + 4}_traversal_c{j + 1}" if j < 2 else f"traversal_c{j + 1}"
        label = f"{title}continuous code c{j + 1} (rows: categorical code; z, other codes fixed)"
        common.save_traversal(images, os.path.join(folder, name + ".png"), fixed["values"],
                              row_labels=row_labels, xlabel=f"c{j + 1}", title=label)
    common.save_grid((G(fixed["samples"]) + 1) / 2, os.path.join(folder, "samples.png"), nrow=10,
                     row_labels=row_labels, title=f"{title}samples, step {step}")
    frames = torch.stack(moved).permute(2, 0, 1, 3, 4, 5)  # (values, codes, c_cat, 1, 28, 28)
    common.save_traversal_gif(frames, os.path.join(folder, "traversal.gif"), fixed["values"],
                              [f"c{j + 1}" for j in range(args.n_cont)], f"{title}c_cat 0-9")
    G.train()


# ==== PLUMBING: the same text in every script (a test checks it); a reader beside the report
# may skip it. Flag types, run folder, checkpoint, and the loop that calls the hooks above.
def between(lo, hi, kind=float):
    """An argparse type: a `kind` in [lo, hi]."""
    def number(text):
        if not lo <= kind(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text} is not in [{lo:g}, {hi:g}]")
        return kind(text)
    return number


def read_checkpoint(path):
    """--resume: a run folder's checkpoint (or its path) of this script."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:  # weights_only: a pickle that would run code is refused
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"--resume {path}: not a checkpoint that loads safely ({type(e).__name__})")
    common.need(isinstance(ckpt, dict) and ckpt.get("script") == SCRIPT,
                f"--resume {path}: not a checkpoint of {SCRIPT}")
    return {**ckpt, "folder": os.path.dirname(os.path.abspath(path))}


def make_run_folder(args):
    """runs/<script>__<dataset>[__k<K>][__beta<β>][__<each flag set>]__s<seed>__<time>/"""
    tags = [f"{f}{vars(args)[f]:g}" for f in ("k", "beta") if f in vars(args)]
    tags += [f.replace("_", "-") for f in ("tcvae", "first_order", "li_body") if vars(args).get(f)]
    tags += [f"s{args.seed}", f"{datetime.now():%Y%m%d-%H%M%S-%f}"]  # μs: unique
    folder = os.path.join(args.out, "__".join([SCRIPT[:-3], args.dataset, *tags]))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**vars(args), "torch": torch.__version__}, f, indent=1)
    return folder


def save_checkpoint(folder, args, step, seconds, nets, opts, data_rng):
    """checkpoint.pt: networks, optimizers, flags, step, RNG states; atomic (rename)."""
    ckpt = {"script": SCRIPT, "args": vars(args), "step": step, "seconds": seconds,
            "models": {k: net.state_dict() for k, net in nets.items()},
            "optims": {k: opt.state_dict() for k, opt in opts.items()},
            "rng": [torch.get_rng_state(), data_rng, torch.cuda.get_rng_state_all()]}
    torch.save(ckpt, os.path.join(folder, "checkpoint.tmp"))
    os.replace(os.path.join(folder, "checkpoint.tmp"), os.path.join(folder, "checkpoint.pt"))


def train(args, ckpt=None):
    """One run: train_step epoch after epoch; at each epoch's end a metrics.csv
    row, the checkpoint and the figures. Returns the run folder."""
    # TRY NOT TO MODIFY: seeding
    torch.manual_seed(args.seed)  # weights and training noise
    data_gen = torch.Generator().manual_seed(args.seed)  # data order
    data, ctx = setup(args)
    nets, opts = build(args, data.shape)
    per_epoch = min(data.steps_per_epoch(args.batch_size), args.epoch_steps or math.inf)
    common.need(per_epoch > 0, "--batch-size is larger than the data")
    total = min(args.epochs * per_epoch, args.steps or math.inf)
    if ckpt:  # continue that run: its folder, step and states
        folder, step, seconds = ckpt["folder"], ckpt["step"], ckpt["seconds"]
        for name, net in nets.items():
            net.load_state_dict(ckpt["models"][name])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optims"][name])
        torch.set_rng_state(ckpt["rng"][0])
        data_gen.set_state(ckpt["rng"][1])
        torch.cuda.set_rng_state_all(ckpt["rng"][2])
        common.truncate_metrics(os.path.join(folder, "metrics.csv"), step)  # rows after it
    else:
        folder, step, seconds = make_run_folder(args), 0, 0.0
    print(f"run folder {folder} ({'resumed' if ckpt else 'new run'} at step {step})", flush=True)
    t_start = time.time()
    bad = torch.full((len(LOSSES),), -1, device=args.device)  # first non-finite steps
    while step < total:
        epoch = step // per_epoch  # 0-based
        epoch_rng = data_gen.get_state()  # draws this epoch's order
        begin, end = epoch * per_epoch, min((epoch + 1) * per_epoch, total)
        epoch_start, epoch_sums, t_epoch = step, 0, time.time()
        # a resumed run skips the batches it has seen
        batches = data.epoch(args.batch_size, data_gen)
        for x, _ in itertools.islice(batches, step - begin, end - begin):
            losses = train_step(nets, opts, x, args)
            step += 1
            epoch_sums = epoch_sums + losses  # no host sync per step
            bad = torch.where((bad < 0) & ~losses.isfinite(), step, bad)
            if step % args.log_every == 0 or step == end:
                for name, at in zip(LOSSES, bad.tolist()):
                    common.need(at < 0, f"{name} became NaN or inf at step {at}; lower the lr")
                rate = (step - epoch_start) / (time.time() - t_epoch)
                means = (epoch_sums / (step - epoch_start)).tolist()
                shown = "  ".join(f"{n} {v:.3f}" for n, v in zip(LOSSES, means))
                print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{total}  {shown}  |  "
                      f"{rate:.1f} steps/s  ETA {(total - step) / rate / 60:.1f} min", flush=True)
        # the epoch's end: a metrics.csv row, the checkpoint, the figures
        row = {"epoch": round(step / per_epoch, 3),
               "step": step,
               "steps_per_s": rate,  # training alone
               "seconds": round(seconds + time.time() - t_start, 1),
               **dict(zip(LOSSES, means)),
               **evaluate(nets, ctx, args)}
        common.append_metrics(os.path.join(folder, "metrics.csv"), row)
        data_rng = epoch_rng if step % per_epoch else data_gen.get_state()  # mid-epoch: replay
        save_checkpoint(folder, args, step, row["seconds"], nets, opts, data_rng)
        save_figures(nets, ctx, args, folder, row)
    return folder


def main(argv=None):
    """One run; several --k or --beta values: a sweep (evaluation.py)."""
    args, ckpt = parse_args(argv)
    return train(args, ckpt) if ckpt else evaluation.sweep(train, args, SCRIPT, argv)
# ==== end of the plumbing ====


if __name__ == "__main__":
    main()
