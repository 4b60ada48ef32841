"""VAE-InfoGAN: report §IV.A, Figs. 14-15. A VAE-GAN (Larsen et al. 2016) with β on its KL
(Higgins et al. 2017) whose first --n-info latents also get InfoGAN's L_I (Chen et al. 2016),
its GAN part unrolled K steps (Metz et al. 2017), balanced by Larsen et al.'s gate.

    S="--dataset squares --batch-size 32 --epoch-steps 500 --epochs 5"  # Lab 4
    python vae_infogan.py $S --k 0 3  # K = 0, then K = 3
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

SCRIPT = "vae_infogan.py"
# loss_g = f_K; d_on, g_on: 1 where the gate let D, G learn (epoch means: shares)
LOSSES = ("loss_d", "loss_g", "recon", "kl", "li", "bce_real", "bce_fake", "d_on", "g_on")
DEFAULTS = {"sprites": dict(
    epochs=26, epoch_steps=0,  # as beta_vae.py: 26 passes of 11,520 steps
    batch_size=64,
    lr=2e-4,  # DCGAN's Adam learning rate (β1 = 0.5), also the unroll's
    width=1.0,  # × 32 channels in the first conv
    latents=10, n_info=5,  # Higgins et al.'s 10 for dSprites; the first 5 get L_I
    k=[5],  # a middle K of the report's sweep
    beta=[1.0],  # Larsen et al.'s prior term; the report's β weighs it
    gamma=1e-2, equilibrium=0.68, margin=0.35,  # as vae_gan.py
    lambda_info=1.0,  # InfoGAN's λ, as infogan.py's
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib
DEFAULTS["squares"] = {
    **DEFAULTS["sprites"],
    "epochs": 6, "k": [0],  # the lab: 6 epochs of 480 steps, 2,880 as beta_vae.py
    "width": 0.25, "n_info": 3,  # 8 channels first, for a CPU; one latent per factor
    "mig_samples": 6144}  # every one of the 6,144 squares
DEFAULTS["celeba"] = {**DEFAULTS["sprites"], "epochs": 10, "latents": 32}  # faces vary more


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
    p.add_argument("--latents", type=between(2, 1000, int), help="information + incompressible")
    p.add_argument("--n-info", type=between(1, 999, int), help="information latents c, the first")
    p.add_argument("--k", type=between(0, 100, int), nargs="+", help="unrolling steps; 0: none")
    p.add_argument("--beta", type=between(0, 1e6), nargs="+", help="weight β of the KL")
    p.add_argument("--gamma", type=between(0, 1e6), help="weight γ of recon in the decoder's")
    p.add_argument("--equilibrium", type=between(0, 100), help="the gate's target BCE of D")
    p.add_argument("--margin", type=between(0, math.inf), help="around it; inf: no gate")
    p.add_argument("--lambda-info", type=between(0, 1e6), help="weight λ of L_I")
    p.add_argument("--li-body", action="store_true", help="L_I also trains Q's body (D's)")
    p.add_argument("--lr", type=between(1e-9, 1), help="Adam learning rate, also the unroll's")
    p.add_argument("--width", type=between(1 / 32, 32), help="× 32 channels of the first conv")
    p.add_argument("--mig-samples", type=between(8, 10 ** 5, int), help="fixed images for MIG")
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


# ---- Models for 64x64 images: 4x4 stride-2 convs, BatchNorm, LeakyReLU 0.2 (DCGAN) ----
def down(c_in, c_out, bn=True):
    """4x4 conv, stride 2, BatchNorm (not on D's first), LeakyReLU 0.2."""
    norm = nn.BatchNorm2d(c_out) if bn else nn.Identity()
    return [nn.Conv2d(c_in, c_out, 4, 2, 1), norm, nn.LeakyReLU(0.2)]


def up(c_in, c_out):
    """4x4 transposed conv, stride 2, BatchNorm, LeakyReLU 0.2."""
    return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]


def dcgan_encoder(channels, latents, w):
    """x (B, C, 64, 64) -> [μ, log σ²] (B, 2·latents)."""
    return nn.Sequential(
        *down(channels, w),  # (B, w, 32, 32)
        *down(w, w),  # (B, w, 16, 16)
        *down(w, 2 * w),  # (B, 2w, 8, 8)
        *down(2 * w, 2 * w),  # (B, 2w, 4, 4)
        nn.Flatten(),
        nn.Linear(2 * w * 4 * 4, 256), nn.LeakyReLU(0.2),
        nn.Linear(256, 2 * latents))


def dcgan_decoder(channels, latents, w):
    """The encoder mirrored: z (B, latents) -> pixel logits (B, C, 64, 64)."""
    return nn.Sequential(
        nn.Linear(latents, 256), nn.LeakyReLU(0.2),
        nn.Linear(256, 2 * w * 4 * 4), nn.LeakyReLU(0.2),
        nn.Unflatten(1, (2 * w, 4, 4)),
        *up(2 * w, 2 * w),  # (B, 2w, 8, 8)
        *up(2 * w, w),  # (B, w, 16, 16)
        *up(w, w),  # (B, w, 32, 32)
        nn.ConvTranspose2d(w, channels, 4, 2, 1))  # (B, C, 64, 64): logits


class DCGANDiscriminator(nn.Module):
    """x (B, C, 64, 64) -> D's logit (B,), Dis_l (B, F), Q's means of c (B, n_info)."""

    def __init__(self, channels, n_info, w):
        super().__init__()
        self.body = nn.Sequential(  # Dis_l: the body's output
            *down(channels, w, bn=False),  # (B, w, 32, 32)
            *down(w, 2 * w),  # (B, 2w, 16, 16)
            *down(2 * w, 2 * w),  # (B, 2w, 8, 8)
            nn.Flatten())
        self.d_head = nn.Linear(2 * w * 8 * 8, 1)
        self.q_head = nn.Sequential(
            nn.Linear(2 * w * 8 * 8, 128), nn.LeakyReLU(0.2),
            nn.Linear(128, n_info))

    def forward(self, x):
        h = self.body(x)
        return self.d_head(h).squeeze(1), h, self.q_head(h)


# ---- Losses ----
def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: D ascends V(D, G), i.e. descends
    # loss_d = -V = -E_x log D(x) - E_z log(1 - D(G(z))), each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def equilibrium_gate(bce_real, bce_fake, equilibrium, margin):
    """Larsen et al.'s gate (aegan.py, GradientDescent.train_epoch) on D's mean BCEs (floats): D
    pauses while it wins (a BCE below equilibrium − margin), the decoder while D loses badly (a
    BCE above equilibrium + margin); where both would pause, both train. Returns (d_on, g_on)."""
    d_on = bce_real >= equilibrium - margin and bce_fake >= equilibrium - margin
    g_on = bce_real <= equilibrium + margin and bce_fake <= equilibrium + margin
    if not (d_on or g_on):
        return True, True
    return d_on, g_on


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


# ---- ALGO LOGIC: one training step ----
def train_step(nets, opts, x, args):
    """One step on images x (B, C, H, W) in [0, 1]; detached LOSSES."""
    enc, dec, D = nets["enc"], nets["dec"], nets["D"]
    batch = len(x)
    mu, logvar = enc(x).chunk(2, dim=1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # z ~ q(z|x), reparameterised
    z_p = torch.randn_like(mu)  # z_p ~ N(0, I)
    logits = dec(torch.cat([z, z_p]))  # (2B, C, H, W): x̃ = Dec(z), then x_p = Dec(z_p)
    fakes = torch.sigmoid(logits)
    # ---- (1) discriminator step, eq. (1) on x and the fakes x̃, x_p: real and fake in separate
    # BatchNorm batches, as the unroll takes them; skipped while the gate pauses D ----
    real_logit = D(x)[0]
    fake_logit = D(fakes.detach())[0]  # BCEs: per-image means over B real, 2B fake images
    bce_real = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
    bce_fake = F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
    loss_d = bce_real + bce_fake  # d_loss(real_logit, fake_logit)
    d_on, g_on = equilibrium_gate(bce_real.item(), bce_fake.item(), args.equilibrium,
                                  args.margin)  # the step's one host sync
    if d_on:
        opts["d"].zero_grad(set_to_none=True)
        loss_d.backward(inputs=opts["d"].param_groups[0]["params"])
        opts["d"].step()

    # ---- (2) look-ahead, eqs. (8)-(10): f_K, the fakes' non-saturating GAN loss against D
    # after K more differentiable Adam steps (also while D is paused: f_K is G's objective) ----
    loss_g = unrolled_g_loss(D, opts["d"], x, fakes, args.k, args.lr)

    # ---- (3) reconstruction and information terms on the live (not unrolled) D and Q: x, x̃
    # and x_p in one batch, on copies of D's BatchNorm buffers ----
    _, feats, q = forward_with_copied_buffers(D, torch.cat([x, fakes]))
    real_feats, rec_feats, _ = feats.split(batch)
    # L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I), plus (deviation) the pixels' Bernoulli
    # −log p(x|x̃): with Dis_l alone our CPU-scale runs decoded noise. Sums, batch means
    llike = 0.5 * (rec_feats - real_feats.detach()).pow(2).sum() / batch
    pixels = F.binary_cross_entropy_with_logits(logits[:batch], x, reduction="sum") / batch
    recon = llike + pixels
    # L_prior = KL(q(z|x) ‖ N(0, I)), summed over the latents, a mean over the batch
    kl = evaluation.kl_per_latent(mu, logvar).sum()
    # li = −L_I + const, eqs. (12)-(13): −log Q(c | Dec(z)) with σ = 1, c the first n_info latents
    # of z and z_p: ½ Σ_c (μ_Q − c)², a mean over the 2B fakes. c is detached: the encoder gets li
    # only through the image (else li could fall as the codes' σ shrinks)
    codes = torch.cat([z, z_p])[:, :args.n_info].detach()
    li = 0.5 * (q[batch:] - codes).pow(2).sum(1).mean()  # q: Q's means of c

    # ---- (4) encoder step: β·L_prior + recon + λ·li; decoder and Q head step: γ·recon + f_K +
    # λ·li (through f_K: eq. (11), both terms), skipped whole while the gate pauses it ----
    opts["enc"].zero_grad(set_to_none=True)
    opts["dec"].zero_grad(set_to_none=True)
    if args.li_body:  # eq. (3) minimises L_I over all of Q: its body (D's) too, else D's step only
        opts["q_body"].zero_grad(set_to_none=True)
        (args.lambda_info * li).backward(inputs=list(D.body.parameters()), retain_graph=True)
    enc_loss = args.beta * kl + recon + args.lambda_info * li
    enc_loss.backward(inputs=list(enc.parameters()), retain_graph=True)
    dec_loss = args.gamma * recon + loss_g + args.lambda_info * li
    dec_loss.backward(inputs=opts["dec"].param_groups[0]["params"])
    opts["enc"].step()
    if g_on:
        opts["dec"].step()
    if g_on and args.li_body:
        opts["q_body"].step()
    stats = [loss_d, loss_g, recon, kl, li, bce_real, bce_fake]
    return torch.stack([*stats, x.new_tensor(d_on), x.new_tensor(g_on)]).detach()


# ---- Setup, evaluation, figures ----
def build(args, shape):
    """Encoder, decoder, D with Q's head; Adams (β1 = 0.5): enc, dec with Q's head, d (q_body)."""
    common.need(args.n_info < args.latents, "--n-info must be less than --latents")
    w = max(1, round(32 * args.width))  # the first conv's channels
    enc = dcgan_encoder(shape[0], args.latents, w).to(args.device)
    dec = dcgan_decoder(shape[0], args.latents, w).to(args.device)
    D = DCGANDiscriminator(shape[0], args.n_info, w).to(args.device)
    groups = {"enc": [*enc.parameters()],
              "dec": [*dec.parameters(), *D.q_head.parameters()],
              "d": [*D.body.parameters(), *D.d_head.parameters()]}
    if args.li_body:  # Q's body (D's) on L_I, eq. (3): a second Adam of the same parameters
        groups["q_body"] = [*D.body.parameters()]
    opts = {k: torch.optim.Adam(ps, args.lr, betas=(0.5, 0.999)) for k, ps in groups.items()}
    return {"enc": enc, "dec": dec, "D": D}, opts


def setup(args):
    """Images in [0, 1]; the fixed evaluation images; 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, torch.device(args.device))
    x, factors = common.fixed_images(data, args.mig_samples, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(64, args.latents, generator=g).to(args.device)
    return data, {"x": x, "factors": factors, "sizes": getattr(data, "SIZES", None), "z": z}


@torch.no_grad()
def decode(dec, z):
    """Images (B, C, H, W) in [0, 1] of latents z, on the CPU, as vae_gan.py decodes."""
    return torch.sigmoid(evaluation.in_chunks(dec, z)).cpu()


@torch.no_grad()
def evaluate(nets, ctx, args):
    """As beta_vae.py's, and the mean KL of the information and other latents (Fig. 15)."""
    mu, logvar = evaluation.encode_posterior(nets["enc"], ctx["x"])
    rec = decode(nets["dec"], mu[:1000].to(args.device))
    real = ctx["x"][:1000].float().cpu()
    row = evaluation.vae_measures(mu, logvar, real, rec, ctx["factors"], ctx["sizes"])
    kl = evaluation.kl_per_latent(mu, logvar)
    row["kl_info"] = float(kl[:args.n_info].mean())
    row["kl_rest"] = float(kl[args.n_info:].mean())
    return row


@torch.no_grad()
def save_figures(nets, ctx, args, folder, row):
    """Reconstructions, samples, Figs. 14 (and traversal.gif) and 15, MI matrix, losses."""
    dec = nets["dec"]
    n = args.n_info
    mu = evaluation.encode_posterior(nets["enc"], ctx["x"][:max(8, n)])[0].to(args.device)
    x = ctx["x"][:max(8, n)].float().cpu()
    # Fig. 14: row j: image j encoded (first column), then information latent j at μ_j ± 3
    values = torch.linspace(-3, 3, 9)
    offsets = torch.eye(args.latents)[:n, None] * values[:, None]  # (n, 9, L)
    moved = decode(dec, (mu[:n, None] + offsets.to(mu.device)).flatten(0, 1))
    common.save_vae_figures(folder, row, "VAE-InfoGAN", x[:8], decode(dec, mu[:8]),
                            decode(dec, ctx["z"]), moved.unflatten(0, (n, 9)), range(n), values,
                            x[:n])
    metrics = os.path.join(folder, "metrics.csv")
    common.plot_metrics(metrics, ["kl_info", "kl_rest"],
                        os.path.join(folder, "fig15_kl_per_latent.png"), x="step",
                        ylabel="KL per latent (nats)", title="information vs other latents")
    common.plot_metrics(metrics, ["loss_d", "loss_g", "recon", "kl", "li", "bce_real", "bce_fake"],
                        os.path.join(folder, "losses.png"), x="step", logy=True,
                        title="VAE-InfoGAN losses")


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
