"""VAE-GAN: report §IV, Fig. 13 (encoder, decoder = generator, discriminator); Fig. 14 traversals.

Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric" (ICML): the
pixel reconstruction term becomes a Gaussian likelihood of the discriminator's l-th layer
features; reconstructions and prior samples are both GAN fakes; --beta weighs the prior (KL) term,
as in the report; --gamma weighs reconstruction against the GAN term in the decoder's loss; and
Larsen et al.'s equilibrium gate keeps the game going. The paper's 64x64 nets (channel widths ×
--width) and smaller ones for 28x28. Each epoch, on fixed images: each latent's KL, reconstruction
error and grey pixels and, with known factors, MIG and the latent × factor MI matrix.

    python vae_gan.py --dataset squares --seed 3   # Lab 4's VAE-GAN row
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

import common

SCRIPT = "vae_gan.py"
# what train_step returns, in this order; d_on and g_on: 1 when the gate let D's / the decoder's
# GAN update through (their epoch means: the share of steps updated)
LOSSES = ("loss_d", "loss_dec", "llike", "kl", "bce_real", "bce_fake", "d_on", "g_on")
DEFAULTS = {"sprites": dict(
    epochs=26,  # as beta_vae.py: 26 passes of 11,520 steps, disentanglement_lib's ~300,000
    epoch_steps=0,  # an epoch is one pass over the 737,280 factor combinations
    batch_size=64,  # as beta_vae.py, for the same images per step
    lr=3e-4,  # Larsen et al.'s RMSprop learning rate
    latents=128, width=1.0,  # Larsen et al.'s latents and channel widths
    beta=1.0,  # 1 = Larsen et al.'s prior term; the report's β weighs it
    gamma=1e-2,  # Larsen et al.'s weight of reconstruction against the GAN term (model/aegan.py)
    equilibrium=0.68, margin=0.35,  # Larsen et al.'s gate (aegan.py); --margin inf: no gate
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib measures it
DEFAULTS["squares"] = {
    **DEFAULTS["sprites"],
    "epochs": 6,  # the lab: 6 epochs of 480 steps, 2,880 as beta_vae.py
    "latents": 10, "width": 0.125,  # β-VAE's 10 latents; an eighth of the widths for a CPU
    "mig_samples": 6144}  # every one of the 6,144 squares
DEFAULTS["mnist"] = {**DEFAULTS["sprites"], "epochs": 20}  # 20 passes: no paper run to follow
DEFAULTS["celeba"] = DEFAULTS["mnist"]
ACTIVE_KL = 0.5  # a latent with less KL (nats) than this is switched off (carries ~nothing)


def add_flags(p):
    p.add_argument("--beta", type=float,
                   help="weight β of the KL term in the encoder's loss (default: %(default)s)")
    p.add_argument("--gamma", type=float,
                   help="weight γ of the feature likelihood in the decoder's loss "
                        "(default: %(default)s)")
    p.add_argument("--equilibrium", type=float,
                   help="the gate's target BCE of D (default: %(default)s)")
    p.add_argument("--margin", type=float,
                   help="the gate's margin around it; inf: no gate (default: %(default)s)")
    p.add_argument("--latents", type=int, help="latent dimensions (default: %(default)s)")
    p.add_argument("--width", type=float,
                   help="multiplier of the paper's channel widths (default: %(default)s)")
    p.add_argument("--lr", type=float,
                   help="RMSprop learning rate of all three networks (default: %(default)s)")
    p.add_argument("--mig-samples", type=int,
                   help="fixed images for MIG and the KL (default: %(default)s images)")


def check_flags(a):
    for flag in ("beta", "gamma", "lr"):
        value = getattr(a, flag)
        need(0 < value < math.inf, f"--{flag} must be finite and > 0 (got {value})")
    need(0 < a.equilibrium < math.inf, f"--equilibrium must be finite, > 0 (got {a.equilibrium})")
    need(a.margin >= 0, f"--margin must be >= 0 or inf (got {a.margin})")
    need(0 < a.width <= 4, f"--width must be in (0, 4] (got {a.width})")
    need(1 <= a.latents <= 1000, f"--latents must be in 1-1000 (got {a.latents})")
    need(8 <= a.mig_samples <= 100000, f"--mig-samples must be in 8-100000 (got {a.mig_samples})")


# ---- Models (Larsen et al.: 5x5 convs, BatchNorm, ReLU; ↓/↑ = stride 2). Images in [-1, 1] ------
def block(c_in, c_out, down=True):
    """5x5 conv ↓ (or transposed conv ↑), stride 2, BatchNorm, ReLU."""
    if down:
        conv = nn.Conv2d(c_in, c_out, 5, 2, 2)
    else:
        conv = nn.ConvTranspose2d(c_in, c_out, 5, 2, 2, output_padding=1)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def scaled(channels, w):
    """The paper's channel count × w, at least 8."""
    return max(8, int(round(channels * w)))


def larsen_encoder(channels, size, latents, w):
    """x (B, C, H, W) -> [μ, log σ²] (B, 2·latents). 64x64: 64↓, 128↓, 256↓, FC 2048 (BN, ReLU),
    FC; 28x28: 64↓, 128↓, FC 512, FC."""
    c1, c2, c3 = scaled(64, w), scaled(128, w), scaled(256, w)
    if size == 28:
        fc = max(64, int(512 * w))
        return nn.Sequential(
            *block(channels, c1),  # (B, c1, 14, 14)
            *block(c1, c2),  # (B, c2, 7, 7)
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, fc), nn.BatchNorm1d(fc), nn.ReLU(),
            nn.Linear(fc, 2 * latents))
    fc = max(64, int(2048 * w))
    return nn.Sequential(
        *block(channels, c1),  # (B, c1, 32, 32)
        *block(c1, c2),  # (B, c2, 16, 16)
        *block(c2, c3),  # (B, c3, 8, 8)
        nn.Flatten(),
        nn.Linear(c3 * 8 * 8, fc), nn.BatchNorm1d(fc), nn.ReLU(),
        nn.Linear(fc, 2 * latents))


def larsen_decoder(channels, size, latents, w):
    """z (B, latents) -> image (B, C, H, W) in [-1, 1]. 64x64: FC 8·8·256 (BN, ReLU), 256↑, 128↑,
    32↑, conv 5x5 to C, tanh; 28x28: FC 7·7·128, 128↑, 64↑, conv, tanh."""
    if size == 28:
        c1, c2 = scaled(128, w), scaled(64, w)
        return nn.Sequential(
            nn.Linear(latents, c1 * 7 * 7), nn.BatchNorm1d(c1 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (c1, 7, 7)),
            *block(c1, c1, down=False),  # (B, c1, 14, 14)
            *block(c1, c2, down=False),  # (B, c2, 28, 28)
            nn.Conv2d(c2, channels, 5, 1, 2), nn.Tanh())
    c1, c2, c3 = scaled(256, w), scaled(128, w), scaled(32, w)
    return nn.Sequential(
        nn.Linear(latents, c1 * 8 * 8), nn.BatchNorm1d(c1 * 8 * 8), nn.ReLU(),
        nn.Unflatten(1, (c1, 8, 8)),
        *block(c1, c1, down=False),  # (B, c1, 16, 16)
        *block(c1, c2, down=False),  # (B, c2, 32, 32)
        *block(c2, c3, down=False),  # (B, c3, 64, 64)
        nn.Conv2d(c3, channels, 5, 1, 2), nn.Tanh())


class LarsenDiscriminator(nn.Module):
    """x -> (logit (B,), Dis_l features (B, F)). 64x64: conv 32 (ReLU), 128↓, 256↓, 256↓ (= Dis_l,
    after BN, before ReLU), FC 512 (BN, ReLU), FC 1; 28x28: conv 32, 64↓, 128↓ (= Dis_l), FC 256,
    FC 1."""

    def __init__(self, channels, size, w):
        super().__init__()
        c0 = scaled(32, w)
        if size == 28:
            c1, c2, s, fc = scaled(64, w), scaled(128, w), 7, max(64, int(256 * w))
            downs = [*block(c0, c1), *block(c1, c2)[:2]]  # (B, c2, 7, 7), Dis_l: no ReLU
        else:
            c1, c2, s, fc = scaled(128, w), scaled(256, w), 8, max(64, int(512 * w))
            downs = [*block(c0, c1), *block(c1, c2), *block(c2, c2)[:2]]  # (B, c2, 8, 8)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c0, 5, 1, 2), nn.ReLU(),  # (B, c0, H, W)
            *downs)
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * s * s, fc), nn.BatchNorm1d(fc), nn.ReLU(),
            nn.Linear(fc, 1))

    def forward(self, x):
        f = self.features(x)
        return self.head(f).squeeze(1), f.flatten(1)


# ---- Losses ------------------------------------------------------------------------------------
def feature_nll(f_rec, f_real):
    """L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I) without its constant."""
    # ½ Σ_features (Dis_l(x̃) − Dis_l(x))², summed over the features, a mean over the batch
    return 0.5 * (f_rec - f_real).pow(2).sum() / f_rec.shape[0]


def equilibrium_gate(bce_real, bce_fake, equilibrium, margin):
    """Larsen et al.'s gate (aegan.py) as 0/1 tensors (no host sync): the decoder's GAN term
    pauses while D loses badly (a BCE above equilibrium + margin), D while it wins. Deviation: D
    wins when BOTH its BCEs are below equilibrium − margin (aegan.py: either one), else a D that
    calls everything real (real BCE 0.1, fake 0.9) is never trained again; so both never pause."""
    d_on = (bce_real >= equilibrium - margin) | (bce_fake >= equilibrium - margin)
    g_on = (bce_real <= equilibrium + margin) & (bce_fake <= equilibrium + margin)
    return d_on.float(), g_on.float()


# ---- Metrics: the same code in beta_vae.py, vae_gan.py and vae_infogan.py ---------------------
def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) of each latent j, mean over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def mi_matrix(codes, factors, sizes, bins=20):
    """I(code_j; factor_k) / H(factor_k), (L, K), as disentanglement_lib: each code (N, L) cut into
    `bins` equal-width bins over its range. A constant factor's column is NaN (H = 0)."""
    lo = codes.min(0).values
    width = (codes.max(0).values - lo).clamp_min(1e-12) / bins
    binned = ((codes - lo) / width).long().clamp(0, bins - 1)  # (N, L)
    columns = []
    for k, size in enumerate(sizes):
        f = factors[:, k].long()
        counts = [torch.bincount(b * size + f, minlength=bins * size) for b in binned.T]
        p_bf = torch.stack(counts).view(-1, bins, size).double() / len(f)  # (L, bins, size)
        p_b = p_bf.sum(2, keepdim=True)
        p_f = torch.bincount(f, minlength=size).double() / len(f)  # exact: a constant f has p = 1
        # H(f) = −Σ_f p(f) log p(f); I(b; f) = Σ p(b, f) log p(b, f) / (p(b) p(f)), in nats
        h_f = -torch.special.xlogy(p_f, p_f).sum()
        mi = (torch.special.xlogy(p_bf, p_bf) - torch.special.xlogy(p_bf, p_b * p_f)).sum((1, 2))
        columns.append(mi / h_f if h_f > 0 else torch.full_like(mi, math.nan))
    return torch.stack(columns, dim=1)


def factor_gaps(matrix):
    """Per factor, the largest minus the second largest normalised MI: (K,), NaN if constant."""
    top = matrix.sort(dim=0, descending=True).values
    second = top[1] if len(top) > 1 else torch.zeros_like(top[0])
    return top[0] - second


def mig(codes, factors, sizes):
    """Mutual Information Gap (Chen et al. 2018), the mean over the K non-constant factors v_k:
    MIG = 1/K Σ_k (I(z_a; v_k) − max_{j≠a} I(z_j; v_k)) / H(v_k), a = argmax_j I(z_j; v_k)."""
    return float(factor_gaps(mi_matrix(codes, factors, sizes)).nanmean())


def disentanglement(mu, logvar, factors, sizes):
    """The metrics row: MIG on the means μ(x) and on z ~ q(z|x) (one fixed draw), each factor's
    gap (sampled), the sampled MI matrix as mi_z<j>_<factor>, and the active latents."""
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * noise
    matrix = mi_matrix(z, factors, sizes)
    kept = [k for k, size in enumerate(sizes) if size > 1]
    gaps = factor_gaps(matrix)
    row = {"mig": mig(mu, factors, sizes), "mig_sampled": float(gaps.nanmean())}
    row.update({f"gap_{common.Sprites.FACTORS[k]}": float(gaps[k]) for k in kept})
    row["active"] = int((kl_per_latent(mu, logvar) > ACTIVE_KL).sum())
    for j in range(len(matrix)):
        row.update({f"mi_z{j}_{common.Sprites.FACTORS[k]}": float(matrix[j, k]) for k in kept})
    return row


@torch.no_grad()
def encode_posterior(enc, images, chunk=1000):
    """μ(x), log σ²(x) (N, L) on the CPU, in chunks, the encoder in eval mode."""
    was_training = enc.training
    enc.eval()
    out = torch.cat([enc(images[i:i + chunk].float()) for i in range(0, len(images), chunk)])
    enc.train(was_training)
    return out.cpu().chunk(2, dim=1)


def recon_quality(x, rec):
    """Pixel MSE of reconstructions rec against images x (both in [0, 1]) and the % of grey
    reconstructed pixels (0.1 < rec < 0.9: blur, in binary images); each a mean over all pixels."""
    mse = float((rec - x).pow(2).mean())
    grey = 100 * float(((rec > 0.1) & (rec < 0.9)).float().mean())
    return mse, grey


# ---- ALGO LOGIC: one training step (Larsen et al.'s Algorithm 1, with their gate) --------------
def train_step(nets, opts, x, args):
    """One step on a batch x (B, C, H, W) in [-1, 1]. Returns detached LOSSES; no host sync."""
    enc, dec, dis = nets["enc"], nets["dec"], nets["dis"]
    # ---- forward: encode, decode, and the discriminator on real, reconstructed, prior images ----
    mu, logvar = enc(x).chunk(2, dim=1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # z ~ q(z|x), reparameterised
    x_rec = dec(z)  # x̃ = Dec(z), z ~ Enc(x)
    x_p = dec(torch.randn_like(mu))  # x_p = Dec(z_p), z_p ~ N(0, I)
    d_real, f_real = dis(x)
    d_rec, f_rec = dis(x_rec)
    d_p, _ = dis(x_p)
    # L_prior = KL(q(z|x) ‖ p(z)), summed over the latents, a mean over the batch (Larsen et al. §2)
    kl = kl_per_latent(mu, logvar).sum()
    # L_llike^Dis_l = −E_q[log p(Dis_l(x) | z)]; the real features are a fixed target
    llike = feature_nll(f_rec, f_real.detach())
    # L_GAN = log Dis(x) + log(1 − Dis(x̃)) + log(1 − Dis(x_p)); D descends loss_d = −L_GAN, the
    # sum of three BCEs, each a mean over the batch; bce_fake: the mean of the two fake ones
    bce_real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    bce_rec = F.binary_cross_entropy_with_logits(d_rec, torch.zeros_like(d_rec))
    bce_p = F.binary_cross_entropy_with_logits(d_p, torch.zeros_like(d_p))
    loss_d = bce_real + bce_rec + bce_p
    bce_fake = (bce_rec + bce_p) / 2
    # deviation: the decoder's GAN term is the non-saturating −log Dis(x̃) − log Dis(x_p)
    # (Goodfellow et al. 2014), not log(1 − Dis(x̃)) + log(1 − Dis(x_p)), whose gradient vanishes
    # while D wins
    loss_g = (F.binary_cross_entropy_with_logits(d_rec, torch.ones_like(d_rec))
              + F.binary_cross_entropy_with_logits(d_p, torch.ones_like(d_p)))
    d_on, g_on = equilibrium_gate(bce_real.detach(), bce_fake.detach(), args.equilibrium,
                                  args.margin)
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    # ---- encoder step: β·L_prior + L_llike^Dis_l ----
    (args.beta * kl + llike).backward(inputs=list(enc.parameters()), retain_graph=True)
    # ---- decoder (generator) step: γ·L_llike^Dis_l − L_GAN, the GAN term only while g_on ----
    loss_dec = args.gamma * llike + g_on * loss_g
    loss_dec.backward(inputs=list(dec.parameters()), retain_graph=True)
    # ---- discriminator step: −L_GAN, only while d_on. A paused update is a zero gradient, which
    # RMSprop (no momentum) turns into no move at all ----
    (d_on * loss_d).backward(inputs=list(dis.parameters()))
    for opt in opts.values():  # all three gradients at the same parameters, as in Algorithm 1
        opt.step()
    return torch.stack([loss_d, loss_dec, llike, kl, bce_real, bce_fake, d_on, g_on]).detach()


# ---- Setup, evaluation, figures ----------------------------------------------------------------
def build(args, shape):
    """Encoder, decoder, discriminator, and one RMSprop each (Larsen et al.)."""
    channels, size = shape[0], shape[1]
    nets = {"enc": larsen_encoder(channels, size, args.latents, args.width),
            "dec": larsen_decoder(channels, size, args.latents, args.width),
            "dis": LarsenDiscriminator(channels, size, args.width)}
    nets = {name: net.to(args.device) for name, net in nets.items()}
    opts = {f"{name}_opt": torch.optim.RMSprop(net.parameters(), lr=args.lr)
            for name, net in nets.items()}
    return nets, opts


def setup(args):
    """Images in [-1, 1] (the decoder's tanh), the fixed evaluation images, 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, torch.device(args.device), signed=True)
    x, factors = common.fixed_images(data, args.mig_samples, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(64, args.latents, generator=g).to(args.device)
    return data, {"x": x, "factors": factors, "sizes": getattr(data, "SIZES", None), "z": z}


@torch.no_grad()
def evaluate(nets, ctx, args):
    """Each latent's KL on the fixed images; reconstruction error and grey pixels on the first
    1,000 (in [0, 1]); with known factors, MIG both ways and the MI matrix."""
    mu, logvar = encode_posterior(nets["enc"], ctx["x"])
    row = {f"kl_z{j}": v for j, v in enumerate(kl_per_latent(mu, logvar).tolist())}
    nets["dec"].eval()
    rec = (nets["dec"](mu[:1000].to(args.device)).cpu() + 1) / 2
    nets["dec"].train()
    row["mse"], row["grey_pct"] = recon_quality((ctx["x"][:1000].float().cpu() + 1) / 2, rec)
    if ctx["factors"] is not None:
        row.update(disentanglement(mu, logvar, ctx["factors"], ctx["sizes"]))
    return row


@torch.no_grad()
def save_figures(nets, ctx, args, folder, row):
    """reconstructions.png, samples.png, fig14_traversals.png, fig15_kl_per_latent.png,
    mi_matrix.png (known factors), losses.png."""
    enc, dec = nets["enc"], nets["dec"]
    step = row["step"]
    enc.eval()  # BatchNorm's running statistics
    dec.eval()
    x = ctx["x"][:8].float()
    mu = enc(x).chunk(2, dim=1)[0]
    real = (x + 1) / 2  # [-1, 1] -> [0, 1]
    rec = (dec(mu) + 1) / 2
    title = (f"VAE-GAN reconstructions (posterior mean), step {step}\n"
             f"pixel MSE {row['mse']:.4f}, grey pixels {row['grey_pct']:.1f}% (evaluation images)")
    common.save_grid(torch.cat([real, rec]), os.path.join(folder, "reconstructions.png"), nrow=8,
                     row_labels=["real", "VAE-GAN"], title=title)
    common.save_grid((dec(ctx["z"]) + 1) / 2, os.path.join(folder, "samples.png"), nrow=8,
                     title=f"VAE-GAN prior samples, step {step}")
    # Fig. 14: the encoded image 0 in the first column, then latent j moved ±3 around μ_j
    order = sorted(range(args.latents), key=lambda j: -row[f"kl_z{j}"])[:10]
    values = torch.linspace(-3, 3, 9)
    offsets = torch.eye(args.latents)[order, None] * values[:, None]  # (rows, 9, L)
    moved = (dec((mu[0] + offsets.to(mu.device)).flatten(0, 1)) + 1) / 2
    labels = [f"z{j} KL {row[f'kl_z{j}']:.2f} {common.carried(row, j)}" for j in order]
    common.save_traversal(moved.unflatten(0, (len(order), 9)),
                          os.path.join(folder, "fig14_traversals.png"), values, labels,
                          f"VAE-GAN: latents by KL, the factor each carries, step {step}",
                          inputs=real[:1].expand(len(order), *x.shape[1:]))
    enc.train()
    dec.train()
    metrics = os.path.join(folder, "metrics.csv")
    common.plot_metrics(metrics, [f"kl_z{j}" for j in order],
                        os.path.join(folder, "fig15_kl_per_latent.png"), x="step",
                        ylabel="KL (nats)")
    common.plot_metrics(metrics, ["loss_d", "loss_dec", "llike", "kl", "bce_real", "bce_fake"],
                        os.path.join(folder, "losses.png"), x="step", logy=True,
                        title="VAE-GAN losses")
    if ctx["factors"] is not None:
        common.save_mi_matrix(row, args.latents, os.path.join(folder, "mi_matrix.png"),
                              f"normalised MI of sampled z with each factor, step {step}")


def main(argv=None):
    train(parse_args(argv))


# ================================================================================================
# PLUMBING: the same text in every script (a test checks it); a reader beside the report may skip
# it. The shared flags, run folder, checkpoint, progress line; train(), the loop calling the hooks.
RUN_FLAGS = ("device", "data_root", "epochs", "steps", "out", "resume", "log_every")


def parse_args(argv=None):
    """The shared flags, then the script's own (add_flags); defaults: DEFAULTS[--dataset]."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", choices=list(DEFAULTS), default=list(DEFAULTS)[0])
    pre.error = common.die  # argparse's own errors: one line, exit status 1 too
    dataset = pre.parse_known_args(argv)[0].dataset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"(defaults of --dataset {dataset})")
    p.error = common.die
    p.add_argument("--dataset", choices=list(DEFAULTS), help="training data (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--data-root", default="./data",
                   help="folder holding MNIST/raw or img_align_celeba (default: %(default)s)")
    p.add_argument("--out", default="runs", help="where the run folder goes (default: %(default)s)")
    p.add_argument("--resume", help="checkpoint.pt or run folder to continue (default: none)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the weights, data order and noise (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="training epochs (default: %(default)s)")
    p.add_argument("--epoch-steps", type=int, help="steps per epoch, at most a pass (0: a pass); "
                   "metrics, figures, checkpoint at each epoch's end (default: %(default)s)")
    p.add_argument("--steps", type=int, help="stop after this many steps in all (default: no cap)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=100,
                   help="steps between progress lines (default: %(default)s)")
    add_flags(p)
    p.set_defaults(dataset=dataset, **DEFAULTS[dataset])
    args = p.parse_args(argv)
    need(0 <= args.seed <= 2 ** 31, "--seed must be between 0 and 2**31")
    need(1 <= args.epochs <= 10 ** 6, "--epochs must be between 1 and 10**6")
    need(args.epoch_steps >= 0, "--epoch-steps must be 0 or more")
    need(args.steps is None or args.steps >= 1, "--steps must be 1 or more")
    need(2 <= args.batch_size <= 4096, "--batch-size must be between 2 and 4096")
    need(1 <= args.log_every <= 10 ** 9, "--log-every must be between 1 and 10**9")
    cuda = args.device.startswith("cuda:") and args.device[5:].isdigit() or args.device == "cuda"
    need(args.device == "cpu" or cuda, f"--device {args.device} is not a device; use cpu or cuda")
    need(args.device == "cpu" or int(args.device[5:] or 0) < torch.cuda.device_count(),
         f"--device {args.device}: no such CUDA GPU here; use --device cpu")
    need(not os.path.isfile(args.out), f"--out {args.out} is a file; give a folder")
    check_flags(args)
    return args


def need(ok, message):  # stop with a one-line error (no traceback) unless ok
    if not ok:
        common.die(message)


def make_run_folder(args):
    """runs/<script>__<dataset>[__k<K>[-first-order]]__s<seed>__<time>/ and its config.json."""
    name = f"{SCRIPT[:-3]}__{args.dataset}"
    if "k" in vars(args):  # the unrolled scripts
        name += f"__k{args.k}" + ("-first-order" if getattr(args, "first_order", False) else "")
    # to the microsecond: a sweep's short runs, or runs begun together, never share a folder
    folder = os.path.join(args.out, f"{name}__s{args.seed}__{datetime.now():%Y%m%d-%H%M%S-%f}")
    chip = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu"
    try:
        os.makedirs(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({**vars(args), "torch": torch.__version__, "device_name": chip}, f, indent=1)
    except OSError as e:
        common.die(f"cannot write the run folder {folder} ({e.strerror}); choose another --out")
    return folder


def load_checkpoint(args, nets, opts, data_gen):
    """--resume: a checkpoint of this script with the same experiment flags, loaded without running
    any code in it, into nets, opts and the RNGs. Returns its folder, step and seconds."""
    path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
    need(os.path.exists(path), f"--resume {path}: no such file or folder")
    try:  # weights_only: tensors, numbers, strings, containers; a pickle that runs code is refused
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"{path} is not a checkpoint this project can load safely ({type(e).__name__})")
    need(isinstance(ckpt, dict) and ckpt.get("script") == SCRIPT,
         f"{path} is not a checkpoint of {SCRIPT}")
    keys = ("args", "step", "seconds", "models", "optims", "rng")
    need(all(key in ckpt for key in keys), f"{path} is not a complete checkpoint")
    for flag in sorted(set(vars(args)) | set(ckpt["args"])):  # only RUN_FLAGS may change
        now, then = vars(args).get(flag), ckpt["args"].get(flag)
        need(flag in RUN_FLAGS or now == then, f"--{flag.replace('_', '-')} is {now} but {path} "
             f"was trained with {then}; resume with the same value")
    try:
        for name, net in nets.items():
            net.load_state_dict(ckpt["models"][name])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optims"][name])
        torch.set_rng_state(ckpt["rng"]["torch"])
        data_gen.set_state(ckpt["rng"]["data"])
        if args.device != "cpu" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], args.device)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        common.die(f"{path} does not fit these networks ({type(e).__name__}); "
                   "resume with the flags it was made with")
    folder = os.path.dirname(os.path.abspath(path))
    common.truncate_metrics(os.path.join(folder, "metrics.csv"), ckpt["step"])  # rows past it go
    return folder, ckpt["step"], ckpt["seconds"]


def save_checkpoint(folder, args, step, seconds, nets, opts, data_rng):
    """checkpoint.pt: networks, optimizers, flags, step, RNG states; atomic (temp file, rename)."""
    cuda_rng = torch.cuda.get_rng_state(args.device) if args.device != "cpu" else None
    ckpt = {"script": SCRIPT, "args": vars(args), "step": step, "seconds": seconds,
            "models": {name: net.state_dict() for name, net in nets.items()},
            "optims": {name: opt.state_dict() for name, opt in opts.items()},
            "rng": {"torch": torch.get_rng_state(), "data": data_rng, "cuda": cuda_rng}}
    torch.save(ckpt, os.path.join(folder, "checkpoint.tmp"))
    os.replace(os.path.join(folder, "checkpoint.tmp"), os.path.join(folder, "checkpoint.pt"))


def progress(epoch, step, total, mean_losses, rate, args):
    """The progress line: epoch, step, the mean losses since the last line, speed, time left."""
    eta = (total - step) / max(rate, 1e-9)
    losses = "  ".join(f"{name} {value:.3f}" for name, value in zip(LOSSES, mean_losses.tolist()))
    print(f"epoch {epoch}/{args.epochs}  step {step}/{total}  {losses}"
          f"  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)


def train(args):
    """One run: seed, data, networks, the run folder; then epoch after epoch of train_step, and at
    each epoch's end a metrics.csv row, the checkpoint and the figures. Returns the run folder."""
    # TRY NOT TO MODIFY: seeding
    torch.manual_seed(args.seed)  # the weights and the training noise
    data_gen = torch.Generator().manual_seed(args.seed)  # the order of the training data
    data, ctx = setup(args)
    nets, opts = build(args, data.shape)
    per_epoch = min(data.steps_per_epoch(args.batch_size), args.epoch_steps or math.inf)
    need(per_epoch > 0, f"--batch-size {args.batch_size} is larger than the training set")
    total = min(args.epochs * per_epoch, args.steps or math.inf)
    if args.resume:
        folder, step, seconds = load_checkpoint(args, nets, opts, data_gen)
    else:
        folder, step, seconds = make_run_folder(args), 0, 0.0
    how = f"resumed at step {step}" if args.resume else "new run"
    print(f"run folder {folder} ({how})", flush=True)
    first_step, t_start = step, time.time()
    first_bad = torch.full((len(LOSSES),), -1, device=args.device)  # each loss's first NaN/inf step

    # THE LOOP: epoch after epoch, batch after batch
    while step < total:
        epoch = step // per_epoch  # 0-based
        epoch_rng = data_gen.get_state()  # this epoch's order is drawn from it (saved mid-epoch)
        begin, end = epoch * per_epoch, min((epoch + 1) * per_epoch, total)  # steps begin+1..end
        epoch_start, line_start = step, step
        epoch_sums = line_sums = 0
        t_epoch = t_line = time.time()
        batches = data.epoch(args.batch_size, data_gen)  # a resumed run skips its first batches
        for x, _ in itertools.islice(batches, step - begin, end - begin):
            losses = train_step(nets, opts, x, args)
            step += 1
            epoch_sums = epoch_sums + losses  # on the device: no host sync per step
            line_sums = line_sums + losses
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses), step, first_bad)
            if step % args.log_every == 0 or step == end:
                for name, at in zip(LOSSES, first_bad.tolist()):
                    need(at < 0, f"{name} became NaN or infinite at step {at}; "
                         "lower the learning rate or check the data")
                rate = (step - line_start) / max(time.time() - t_line, 1e-9)
                progress(epoch + 1, step, total, line_sums / (step - line_start), rate, args)
                line_sums, line_start, t_line = 0, step, time.time()

        # the epoch's end (or --steps): a metrics.csv row, the checkpoint, the figures
        row = {"epoch": round(step / per_epoch, 3),
               "step": step,
               "steps_per_s": (step - epoch_start) / (time.time() - t_epoch),  # before evaluate
               "seconds": round(seconds + time.time() - t_start, 1),  # over resumes too
               **dict(zip(LOSSES, (epoch_sums / (step - epoch_start)).tolist())),
               **evaluate(nets, ctx, args)}
        common.append_metrics(os.path.join(folder, "metrics.csv"), row)
        data_rng = epoch_rng if step % per_epoch else data_gen.get_state()  # mid-epoch: replay it
        save_checkpoint(folder, args, step, row["seconds"], nets, opts, data_rng)
        save_figures(nets, ctx, args, folder, row)

    wall, n = time.time() - t_start, step - first_step
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(args.device) / 2 ** 20:.0f} MiB"
            if args.device != "cpu" else "")
    print(f"done: {n} steps in {wall:.1f} s ({n / max(wall, 1e-9):.2f} steps/s){peak}, "
          f"run folder {folder}", flush=True)
    return folder
# ==================================== (end of the plumbing) ====================================



if __name__ == "__main__":
    main()
