"""VAE-InfoGAN with an exactly unrolled GAN part: report §IV.A, Fig 14 (traversals of encoded images along
the information-maximised latents) and Fig 15 (mean KL per latent, information-maximised vs incompressible).

Implements VAE-GAN (Larsen et al., "Autoencoding beyond pixels using a learned similarity metric") with
β on the KL (Higgins et al., β-VAE), the InfoGAN information term (Chen et al.) on the first --n-info
latents, and the GAN part unrolled K steps with the gradient through the updates (Metz et al., Unrolled GAN).
Sprites run reported in the README (12,000 steps, 89 min on the 2-core CPU, MIG every 500 steps):
  python vae_infogan.py --dataset sprites --k 3 --width 16 --batch-size 32 --beta 4 --lr 5e-4 --epochs 24 --epoch-steps 500
The report's CelebA setting:  python vae_infogan.py --dataset celeba --data-root /path --epochs 10
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common

SCRIPT = "vae_infogan.py"
DEFAULT_LATENTS = {"sprites": 10, "mnist": 10, "celeba": 32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/ or img_align_celeba/ (default: %(default)s)")
    p.add_argument("--dataset", default="sprites", choices=("sprites", "mnist", "celeba"), help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optional cap on total training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: %(default)s)")
    p.add_argument("--resume", default=None, help="checkpoint.pt or run folder to continue (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines (default: %(default)s)")
    p.add_argument("--latents", type=int, default=None, help="latent size, information + incompressible "
                   "(default: %s)" % ", ".join(f"{v} for {k}" for k, v in DEFAULT_LATENTS.items()))
    p.add_argument("--n-info", type=int, default=5, help="information-maximised latents c, the first ones (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="unrolling steps of the discriminator, 0 = plain VAE-GAN (default: %(default)s)")
    p.add_argument("--first-order", action="store_true", help="drop the gradient through D's updates (the common port's unroll)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term for the encoder (default: %(default)s)")
    # λ = 1 is InfoGAN's weight against a GAN loss of order 1; here L_I competes with reconstructions summed over
    # pixels (100-200 nats). On sprites (β = 4, 1,500 steps) λ = 1 left the information latents closer to the prior
    # than the rest (KL 1.33 vs 2.09 nats), the reverse of the report's Fig 15; λ = 20 gave 2.86 vs 1.96 (README).
    p.add_argument("--lambda-info", type=float, default=20.0, help="weight λ of the information term L_I (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=1.0, help="weight γ of the reconstruction (feature + pixel terms) in the decoder's loss (default: %(default)s)")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of Larsen et al.'s feature-wise "
                   "reconstruction in D's body, Dis_l (default: %(default)s)")
    p.add_argument("--pixel-weight", type=float, default=1.0, help="weight of a pixel-wise Bernoulli reconstruction "
                   "term added to the feature-wise one; 0 = Larsen et al.'s Dis_l term only (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of every network and of the unroll (default: %(default)s)")
    p.add_argument("--width", type=int, default=32, help="channels of the first conv layer; later layers 2x (default: %(default)s)")
    p.add_argument("--epoch-steps", type=int, default=None, help="cap on steps per epoch, so that metrics/figures come more "
                   "often; one sprites pass is 737280 images (default: %(default)s = a full pass)")
    p.add_argument("--mig-samples", type=int, default=10000, help="sprites images for MIG at each epoch end (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="load at most this many celeba images (default: %(default)s = all)")
    a = p.parse_args(argv)
    a.latents = DEFAULT_LATENTS[a.dataset] if a.latents is None else a.latents
    for name, lo in (("epochs", 1), ("batch_size", 2), ("log_every", 1), ("latents", 2), ("n_info", 1), ("k", 0),
                     ("width", 1), ("mig_samples", 100)):
        if getattr(a, name) < lo:
            common.die(f"--{name.replace('_', '-')} must be >= {lo} (got {getattr(a, name)})")
    for name in ("steps", "epoch_steps", "limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            common.die(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    if a.n_info >= a.latents:
        common.die(f"--n-info must be smaller than --latents, leaving at least one incompressible latent "
                   f"(got --n-info {a.n_info}, --latents {a.latents})")
    for name in ("beta", "lambda_info", "gamma", "feature_weight", "pixel_weight"):
        if not getattr(a, name) >= 0:
            common.die(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(a, name)})")
    if not a.lr > 0:
        common.die(f"--lr must be > 0 (got {a.lr})")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("--device cuda but no CUDA GPU is available here; use --device cpu")
    return a


# ------------------------------------------------------------------------------------------------
# Models: 64x64 (sprites, celeba) use 4 stride-2 layers in the encoder/decoder and 3 in D;
# 28x28 MNIST a smaller net with 2 each (28 -> 14 -> 7).
# ------------------------------------------------------------------------------------------------
def leaky():
    return nn.LeakyReLU(0.2)


def conv_stack(ch, widths, act, bn_first=True):
    layers = []
    for i, w in enumerate(widths):
        bn = bn_first or i > 0
        layers += [nn.Conv2d(ch, w, 4, 2, 1, bias=not bn)] + ([nn.BatchNorm2d(w)] if bn else []) + [act()]
        ch = w
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, ch, H, W) -> (μ, log σ²), each (B, latents)."""

    def __init__(self, ch, size, latents, widths, act=leaky):
        super().__init__()
        s = size // 2 ** len(widths)
        self.net = nn.Sequential(conv_stack(ch, widths, act), nn.Flatten(), nn.Linear(widths[-1] * s * s, 256), act(),
                                 nn.Linear(256, 2 * latents))

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)


class Decoder(nn.Module):
    """The VAE decoder is the GAN generator: z (B, latents) -> image (B, ch, H, W) in [0, 1] (sigmoid)."""

    def __init__(self, ch, size, latents, widths, act=leaky):
        super().__init__()
        widths = widths[::-1]
        self.s0, self.c0 = size // 2 ** len(widths), widths[0]
        layers = []
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), act()]
        self.fc = nn.Sequential(nn.Linear(latents, 256), act(), nn.Linear(256, self.c0 * self.s0 ** 2), act())
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(widths[-1], ch, 4, 2, 1), nn.Sigmoid())

    def forward(self, z):
        return self.net(self.fc(z).view(-1, self.c0, self.s0, self.s0))


class Discriminator(nn.Module):
    """D and Q share the conv body; its output is Dis_l, the layer of the feature-wise reconstruction.
    x -> (logit (B,), Dis_l features (B, F), Q's (mean, log var) of c (B, 2 n_info))."""

    def __init__(self, ch, size, n_info, widths, act=leaky):
        super().__init__()
        s = size // 2 ** len(widths)
        self.body = conv_stack(ch, widths, act, bn_first=False)  # no BatchNorm on D's input layer (DCGAN)
        self.adv = nn.Linear(widths[-1] * s * s, 1)
        self.q = nn.Sequential(nn.Linear(widths[-1] * s * s, 128), act(), nn.Linear(128, 2 * n_info))

    def forward(self, x):
        h = self.body(x).flatten(1)
        return self.adv(h).squeeze(1), h, self.q(h)


def build(args, shape):
    ch, size = shape[0], shape[1]
    w = args.width
    enc_w, d_w = ((w, w, 2 * w, 2 * w), (w, 2 * w, 2 * w)) if size == 64 else ((w, 2 * w), (w, 2 * w))
    return {"enc": Encoder(ch, size, args.latents, enc_w), "dec": Decoder(ch, size, args.latents, enc_w),
            "disc": Discriminator(ch, size, args.n_info, d_w)}


def d_param_names(D):
    """D's adversarial parameters (body + real/fake head); the Q head has its own optimizer with the body."""
    return [n for n, _ in D.named_parameters() if not n.startswith("q.")]


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
def d_loss(logit_real, logit_fake):
    # eq. (1) as D's loss: -[log D(x) + log(1 - D(x~))], each a mean over its batch (x~: reconstructions and samples)
    return (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))


def g_loss(logit_fake):
    # generator side of eq. (1), non-saturating -log D(x~) (mean over the batch), as GAN/VAE-GAN practice
    # (deviation from eq. (1)'s log(1 - D), which gives vanishing gradients early on)
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def kl_per_latent(mu, logvar):
    # KL(N(μ, σ²) || N(0, 1)) = ½ (μ² + σ² - log σ² - 1) per latent, mean over the batch -> (latents,)
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).mean(0)


def kl_split(kl_lat, n_info):
    """Mean KL per latent of the information latents (the first n_info) and of the incompressible ones (Fig 15)."""
    return kl_lat[:n_info].mean(), kl_lat[n_info:].mean()


def gaussian_nll(q, c):
    # L_I of eq. (3): -log Q(c | x~) with Q a factored Gaussian (mean, log var); sum over the
    # information latents, mean over the batch. log var clamped to >= -6 (σ >= 0.05) so L_I stays bounded.
    mean, logvar = q.chunk(2, dim=1)
    logvar = logvar.clamp(min=-6.0)
    return 0.5 * (logvar + (c - mean) ** 2 / logvar.exp() + math.log(2 * math.pi)).sum(1).mean()


def feature_recon(feat_real, feat_rec):
    # VAE-GAN's L_llike^Dis_l: -log N(Dis_l(x) | Dis_l(x~), I) up to a constant, summed over the features, mean over the batch
    return 0.5 * (feat_real - feat_rec).pow(2).sum(1).mean()


def pixel_recon(x, x_rec):
    # -log Bernoulli(x | x~) summed over pixels, mean over the batch. Deviation: Larsen et al. use the feature term
    # alone; with it alone our CPU-budget sprites runs decoded texture noise (D won within 50 steps), so by default
    # this pixel term is added (--pixel-weight 0 turns it off). The clamp keeps log() finite.
    return F.binary_cross_entropy(x_rec.clamp(1e-6, 1 - 1e-6), x, reduction="sum") / x.shape[0]


def safe_sqrt(v):
    """sqrt with a zero (not infinite) derivative at 0: a coordinate with zero gradient gives 0·inf = NaN otherwise."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


def unrolled_g_loss(D, d_opt, x_real, x_fake, k, first_order=False):
    """eq. (10): f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)), the generator's GAN loss against D after K Adam steps.

    The K steps (eq. 8) run on a functional copy of D: parameters in a dict that stays in the autograd graph,
    gradients by autograd.grad(create_graph=True), Adam started from d_opt's moments and integer step count,
    BatchNorm buffers cloned. Back-propagating the result gives both terms of eq. (11). D, its buffers and
    d_opt are never written: the copy is simply dropped. K = 0 is the plain GAN generator loss.
    first_order=True: fake batch detached and updates outside the graph (drops eq. (11)'s second term)."""
    group = d_opt.param_groups[0]
    lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
    live = dict(D.named_parameters())
    names = d_param_names(D)
    params = {n: p.detach() for n, p in live.items()}  # the Q head is not unrolled (L_I uses the live D/Q, eq. 12-13)
    params.update({n: live[n].detach().requires_grad_() for n in names})
    buffers = {n: b.clone() for n, b in D.named_buffers()}
    moments = []
    for n in names:
        st = d_opt.state.get(live[n], {})
        if st:
            moments.append((st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
        else:
            moments.append((torch.zeros_like(live[n]), torch.zeros_like(live[n])))
    st = d_opt.state.get(live[names[0]], {})
    step0 = st["step"].detach().double().cpu() if st else torch.zeros((), dtype=torch.float64)
    fake_in = x_fake.detach() if first_order else x_fake
    for i in range(k):
        # eq. (8): θ_D^{i+1} = θ_D^i + Adam(∇ f(θ_G, θ_D^i)), f evaluated as D's loss (descent)
        loss = d_loss(functional_call(D, (params, buffers), (x_real,))[0], functional_call(D, (params, buffers), (fake_in,))[0])
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
        t = step0 + i + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections from the integer step, as torch.optim.Adam
        for j, (n, g) in enumerate(zip(names, grads)):
            g = torch.zeros_like(params[n]) if g is None else g
            m, v = moments[j]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            moments[j] = (m, v)
            new = params[n] - lr * (m / bc1.to(m)) / (safe_sqrt(v / bc2.to(v)) + eps)
            params[n] = new.detach().requires_grad_() if first_order else new
    return g_loss(functional_call(D, (params, buffers), (x_fake,))[0])


# ------------------------------------------------------------------------------------------------
# Which loss updates which network (one optimizer each; d_opt and q_opt share D's conv body)
#
#   loss term                                   | encoder | decoder | D (body+adv head) | Q (head+body)
#   β·KL(q(z|x) || N(0,I))                      |   yes   |         |                   |
#   --feature-weight · L_llike^Dis_l (D's body) |   yes   |  γ·yes  |                   |
#     + --pixel-weight · pixel Bernoulli recon  |   yes   |  γ·yes  |                   |
#   GAN: D's loss (eq. 1), live D               |         |         |        yes        |
#   GAN: f_K (eq. 10), unrolled D, non-sat.     |         |   yes   |                   |
#   λ·L_I on Q(Dec(z)), live D/Q (eq. 12-13)    |   yes   |   yes   |                   |      yes
#
# L_I is taken on reconstructions (target: the encoder's sampled c) and prior samples (target: c ~ N(0, I));
# the encoder gets it through the reconstruction path (its c must be recoverable from the decoded image).
# ------------------------------------------------------------------------------------------------
def forward(enc, dec, x):
    """Encode, sample z (reparameterisation) and z_p ~ N(0, I), decode both in one batch."""
    mu, logvar = enc(x)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    z_p = torch.randn_like(mu)
    fakes = dec(torch.cat([z, z_p]))  # (2B, ch, H, W): reconstructions, then prior samples
    return mu, logvar, z, z_p, fakes


def d_call(D, x):
    """D(x) on D's live parameters with its BatchNorm running statistics left untouched."""
    return functional_call(D, (dict(D.named_parameters()), {n: b.clone() for n, b in D.named_buffers()}), (x,))


def generator_step(nets, opts, x, mu, logvar, z, z_p, fakes, args):
    """Encoder and decoder update (the unrolled look-ahead inside); D, its buffers and d_opt are left as they were."""
    enc, dec, D = nets["enc"], nets["dec"], nets["disc"]
    n, b = args.n_info, x.shape[0]
    # ---- unrolled look-ahead (eq. 8-10) ----
    loss_g = unrolled_g_loss(D, opts["disc"], x, fakes, args.k, args.first_order)
    # ---- generator step ----
    _, feat, q = d_call(D, torch.cat([x, fakes]))  # live D/Q: Dis_l of x and x~, and Q(c | x~)
    recon = args.feature_weight * feature_recon(feat[:b].detach(), feat[b:2 * b]) + args.pixel_weight * pixel_recon(x, fakes[:b])
    li = gaussian_nll(q[b:], torch.cat([z[:, :n], z_p[:, :n]]))  # eq. (12)-(13): L_I with the non-unrolled Q
    kl_lat = kl_per_latent(mu, logvar)
    kl = kl_lat.sum()
    loss_enc = args.beta * kl + recon + args.lambda_info * li
    loss_dec = args.gamma * recon + loss_g + args.lambda_info * li
    enc_p, dec_p = list(enc.parameters()), list(dec.parameters())
    for p, g in zip(enc_p, torch.autograd.grad(loss_enc, enc_p, retain_graph=True)):
        p.grad = g
    for p, g in zip(dec_p, torch.autograd.grad(loss_dec, dec_p)):
        p.grad = g
    opts["enc"].step()
    opts["dec"].step()
    return loss_g.detach(), recon.detach(), kl.detach(), li.detach(), kl_lat.detach()


def train_step(nets, opts, x, args):
    enc, dec, D = nets["enc"], nets["dec"], nets["disc"]
    mu, logvar, z, z_p, fakes = forward(enc, dec, x)
    # ---- discriminator step ----
    opts["disc"].zero_grad(set_to_none=True)
    loss_d = d_loss(D(x)[0], D(fakes.detach())[0])
    loss_d.backward()
    opts["disc"].step()
    loss_g, recon, kl, li, kl_lat = generator_step(nets, opts, x, mu, logvar, z, z_p, fakes, args)
    # ---- information (Q) step ----  (Q head and the shared body, on the decoded images of this step)
    opts["q"].zero_grad(set_to_none=True)
    c = torch.cat([z[:, :args.n_info], z_p[:, :args.n_info]]).detach()
    (args.lambda_info * gaussian_nll(D(fakes.detach())[2], c)).backward()
    opts["q"].step()
    return torch.stack([loss_d.detach(), loss_g, recon, kl, li]), kl_lat


# ------------------------------------------------------------------------------------------------
# MIG (Chen et al. 2018), disentanglement_lib style: encoder means discretised in 20 equal-width bins per latent
# ------------------------------------------------------------------------------------------------
def discretize(codes, bins=20):
    """(N, L) -> (N, L) bin indices in [0, bins): np.digitize(x, np.histogram(x, bins)[1][:-1]) - 1."""
    lo, hi = codes.min(0).values, codes.max(0).values
    return ((codes - lo) / (hi - lo).clamp_min(1e-12) * bins).floor().long().clamp(0, bins - 1)


def mutual_info(a, b):
    """I(a; b) in nats of two discrete (N,) int samples (sklearn's mutual_info_score)."""
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = torch.bincount(a * nb + b, minlength=na * nb).view(na, nb).double() / a.numel()
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nz = joint > 0
    return (joint[nz] * (joint[nz] / outer[nz]).log()).sum()


def mig(codes, factors, bins=20):
    """MIG = mean over factors k of (I(z_j*; v_k) - I(z_j°; v_k)) / H(v_k) (top two latents). Returns (MIG, MI (L, K))."""
    d, f = discretize(codes, bins).cpu(), factors.cpu()
    mi = torch.stack([torch.stack([mutual_info(d[:, j], f[:, k]) for k in range(f.shape[1])]) for j in range(d.shape[1])])
    h = torch.stack([mutual_info(f[:, k], f[:, k]) for k in range(f.shape[1])])
    top = mi.sort(0, descending=True).values
    gap = top[0] - (top[1] if top.shape[0] > 1 else 0)
    return float((gap / h).mean()), mi


@torch.no_grad()
def encode_means(enc, x, chunk=500):
    enc.eval()
    mu = torch.cat([enc(x[i:i + chunk])[0] for i in range(0, len(x), chunk)])
    enc.train()
    return mu


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_figures(nets, fixed, run, args, offsets=torch.linspace(-3, 3, 10)):
    enc, dec = nets["enc"], nets["dec"]
    enc.eval(), dec.eval()
    x, n_show = fixed["x"], 3
    mu = enc(x)[0]
    rows, labels = [], []
    for i in range(n_show):  # Fig 14: image i, info latent j moved from its encoded value by the offsets
        for j in range(args.n_info):
            z = mu[i].repeat(len(offsets), 1)
            z[:, j] += offsets.to(z)
            rows.append(torch.cat([x[i:i + 1], dec(z)]))
            labels.append(f"img{i + 1} c{j + 1}")
    common.save_grid(torch.cat(rows), os.path.join(run, "fig14_traversals.png"), nrow=len(offsets) + 1, row_labels=labels,
                     col_labels=["input"] + [f"{float(v):+.1f}" for v in offsets], xlabel="offset from the encoded value",
                     title="Fig 14: one information latent varied per row")
    common.save_grid(torch.cat([x, dec(mu)]), os.path.join(run, "reconstructions.png"), nrow=len(x),
                     row_labels=["input", "recon"], title="reconstructions Dec(μ(x))")
    common.save_grid(dec(fixed["z"]), os.path.join(run, "samples.png"), nrow=8, title="samples Dec(z), z ~ N(0, I)")
    enc.train(), dec.train()
    csv = os.path.join(run, "metrics.csv")
    common.plot_metrics(csv, ["kl_info", "kl_rest"], os.path.join(run, "fig15_kl_per_latent.png"), x="step",
                        title="Fig 15: mean KL per latent", ylabel="KL per latent (nats)")
    common.plot_metrics(csv, ["loss_d", "loss_g", "li"], os.path.join(run, "losses.png"), title="GAN and Q losses")
    if args.dataset == "sprites":
        common.plot_metrics(csv, ["mig_info", "mig_all"], os.path.join(run, "mig.png"), x="step", title="MIG", ylabel="MIG")


# ------------------------------------------------------------------------------------------------
def load_checkpoint(path, args):
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ckpt = torch.load(path, map_location=args.device, weights_only=False)
        assert isinstance(ckpt, dict)
    except Exception as e:
        common.die(f"{path} is not a checkpoint ({type(e).__name__})")
    if ckpt.get("script") != SCRIPT:
        common.die(f"{path} is a checkpoint of {ckpt.get('script')}, not of {SCRIPT}")
    for flag in ("dataset", "latents", "n_info", "width"):
        if ckpt["args"].get(flag) != getattr(args, flag):
            common.die(f"{path} was trained with --{flag.replace('_', '-')} {ckpt['args'].get(flag)}, "
                       f"not {getattr(args, flag)}")
    return path, ckpt


def main(argv=None):
    args = parse_args(argv)
    # ---- seeding ----
    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)  # data order
    device = torch.device(args.device)

    data = common.load_data(args.dataset, args.data_root, device, image_size=64, limit=args.limit)
    if len(data) < args.batch_size:
        common.die(f"--batch-size {args.batch_size} is larger than the dataset ({len(data)} images)")
    nets = {k: v.to(device) for k, v in build(args, data.shape).items()}
    D = nets["disc"]
    adam = lambda ps: torch.optim.Adam(ps, lr=args.lr, betas=(0.5, 0.999))
    opts = {"enc": adam(nets["enc"].parameters()), "dec": adam(nets["dec"].parameters()),
            "disc": adam([p for n, p in D.named_parameters() if n in d_param_names(D)]),
            "q": adam([p for n, p in D.named_parameters() if not n.startswith("adv.")])}
    g = torch.Generator().manual_seed(args.seed + 1)  # fixed figure images and noise, chosen once
    fixed = {"x": data.batch(torch.randperm(len(data), generator=g)[:8].to(device))[0],
             "z": torch.randn(64, args.latents, generator=g).to(device)}
    step, epoch = 0, 0
    if args.resume:
        path, ckpt = load_checkpoint(args.resume, args)
        try:
            for k, m in nets.items():
                m.load_state_dict(ckpt["models"][k])
            for k, o in opts.items():
                o.load_state_dict(ckpt["optims"][k])
        except (RuntimeError, ValueError, KeyError) as e:
            common.die(f"{path} does not fit these networks (check --width/--latents/--n-info): {str(e).splitlines()[0]}")
        step, epoch, fixed = ckpt["step"], ckpt["epoch"], ckpt["fixed"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        run = os.path.dirname(os.path.abspath(path))
    else:
        run = os.path.join(args.out, f"vae_infogan__{args.dataset}__k{args.k}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.json"), "w") as f:
            dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            json.dump({**vars(args), "torch": torch.__version__, "device_name": dev_name}, f, indent=1)
    print(f"run folder {run}")
    eval_x, eval_f = data.eval_set(args.mig_samples, seed=0) if args.dataset == "sprites" else (None, None)

    per_epoch = min(len(data) // args.batch_size, args.epoch_steps or 10 ** 12)
    total = min(args.epochs * per_epoch, args.steps or 10 ** 12)
    names = ["loss_d", "loss_g", "recon", "kl", "li"]
    hist = torch.zeros(args.log_every, len(names), device=device)
    t_start, t_log, step_log, stop = time.time(), time.time(), step, step >= total
    while epoch < args.epochs and not stop:
        epoch += 1
        sums, n_ep, t_ep = torch.zeros(len(names) + args.latents, device=device), 0, time.time()
        for i, (x, _) in enumerate(data.epoch(args.batch_size, data_gen)):
            if i >= per_epoch:
                break
            losses, kl_lat = train_step(nets, opts, x, args)
            hist[step % args.log_every] = losses
            sums += torch.cat([losses, kl_lat])
            step, n_ep = step + 1, n_ep + 1
            stop = step >= total
            if step % args.log_every == 0 or stop or i == per_epoch - 1:
                filled = hist[:min(step, args.log_every)]
                bad = ~torch.isfinite(filled)
                if bad.any():
                    row, col = [int(v) for v in bad.nonzero()[0]]
                    at = step - ((step - 1 - row) % args.log_every)  # the latest step written to that row
                    common.die(f"{names[col]} became {float(filled[row, col])} at step {at}; "
                               "lower the learning rate or check the data")
                now = time.time()
                sps = (step - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                means = "  ".join(f"{k} {v:.3f}" for k, v in zip(names, filled.mean(0).tolist()))
                eta = (total - step) / max(sps, 1e-9)
                print(f"epoch {epoch}/{args.epochs}  step {step}/{total}  {means}  |  {sps:.2f} steps/s  "
                      f"ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            if stop:
                break
        # ---- epoch end: metrics, MIG, figures, checkpoint ----
        m = (sums / max(n_ep, 1)).tolist()
        kl_info, kl_rest = kl_split(torch.tensor(m[len(names):]), args.n_info)
        row = {"epoch": epoch, "step": step, "seconds": round(time.time() - t_start, 1),
               "steps_per_s": n_ep / max(time.time() - t_ep, 1e-9), **dict(zip(names, m)),
               "kl_info": float(kl_info), "kl_rest": float(kl_rest),
               **{f"kl_z{j}": v for j, v in enumerate(m[len(names):])}}
        if args.dataset == "sprites":
            mu = encode_means(nets["enc"], eval_x)
            row["mig_info"], mi = mig(mu[:, :args.n_info], eval_f)
            row["mig_all"], mi = mig(mu, eval_f)
            h = torch.stack([mutual_info(eval_f[:, k].cpu(), eval_f[:, k].cpu()) for k in range(5)])
            lines = [f"epoch {epoch} step {step}: MIG info {row['mig_info']:.4f}, all {row['mig_all']:.4f}",
                     "latent  factor(max MI)  MI/H(v) for " + " ".join(f"{f:>11s}" for f in common.Sprites.FACTORS)]
            for j in range(args.latents):
                kind = "c" if j < args.n_info else "n"
                lines.append(f"z{j} ({kind})  {common.Sprites.FACTORS[int(mi[j].argmax())]:>14s}  "
                             + " ".join(f"{float(v):11.3f}" for v in mi[j] / h))
            with open(os.path.join(run, "factors.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
            print("\n".join(lines[:2] + lines[2:2 + args.n_info]))
        common.append_metrics(os.path.join(run, "metrics.csv"), row)
        save_figures(nets, fixed, run, args)
        ckpt = {"script": SCRIPT, "args": vars(args), "models": {k: v.state_dict() for k, v in nets.items()},
                "optims": {k: o.state_dict() for k, o in opts.items()}, "step": step, "epoch": epoch, "fixed": fixed,
                "rng": {"torch": torch.get_rng_state(), "data": data_gen.get_state()}}
        torch.save(ckpt, os.path.join(run, "checkpoint.tmp"))
        os.replace(os.path.join(run, "checkpoint.tmp"), os.path.join(run, "checkpoint.pt"))
    wall = time.time() - t_start
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB" if device.type == "cuda" else ""
    print(f"done: {step} steps in {wall:.1f} s ({step / max(wall, 1e-9):.2f} steps/s){mem}, run folder {run}")


if __name__ == "__main__":
    main()
