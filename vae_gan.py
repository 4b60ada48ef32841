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
import evaluation

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
    beta=[1.0],  # 1 = Larsen et al.'s prior term; the report's β weighs it
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


# ---- Flags: the shared ones (the same in every script), then this script's own -----------------
RUN_FLAGS = ("resume", "device", "data_root", "epochs", "steps", "log_every", "out")


def parse_args(argv=None):
    """Defaults: DEFAULTS[--dataset], or on --resume the run's own flags (only RUN_FLAGS may
    change). Returns the flags and the checkpoint (or None). Errors: one line, before any data."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = common.die  # argparse's errors: one line, exit status 1
    gpu = torch.cuda.is_available()
    p.add_argument("--dataset", choices=list(DEFAULTS), default=list(DEFAULTS)[0], help="data")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where to train",
                   default="cuda" if gpu else "cpu")
    p.add_argument("--data-root", default="./data", help="holds MNIST/raw or img_align_celeba")
    p.add_argument("--out", default="runs", help="the folder that run folders go in")
    p.add_argument("--resume", help="a run folder to continue, with its own flags")
    p.add_argument("--seed", type=between(0, 2 ** 31, int), default=1, help="weights, noise, order")
    p.add_argument("--epochs", type=between(1, 10 ** 6, int), help="training epochs")
    p.add_argument("--epoch-steps", type=between(0, 10 ** 9, int), help="0: a pass over the data")
    p.add_argument("--steps", type=between(1, 10 ** 12, int), help="stop after this many in all")
    p.add_argument("--batch-size", type=between(2, 4096, int), help="samples per step")
    p.add_argument("--log-every", type=between(1, 10 ** 9, int), default=100, help="steps a line")
    # ---- this script's own ----
    p.add_argument("--beta", type=between(1e-6, 1e6), nargs="+",
                   help="weight β of the KL in the encoder's loss; several values: a sweep")
    p.add_argument("--gamma", type=between(1e-9, 1e6), help="weight γ of L_llike in the decoder's")
    p.add_argument("--equilibrium", type=between(1e-6, 100), help="the gate's target BCE of D")
    p.add_argument("--margin", type=between(0, math.inf), help="around it; inf: no gate")
    p.add_argument("--latents", type=between(1, 1000, int), help="latent dimensions")
    p.add_argument("--width", type=between(1 / 64, 4), help="× the paper's channel widths")
    p.add_argument("--lr", type=between(1e-9, 1), help="RMSprop learning rate of all three")
    p.add_argument("--mig-samples", type=between(8, 10 ** 5, int), help="fixed images for MIG")
    known = p.parse_known_args(argv)[0]  # --dataset and --resume choose the defaults
    ckpt = read_checkpoint(known.resume) if known.resume else None
    p.set_defaults(**(ckpt["args"] if ckpt else DEFAULTS[known.dataset]))
    p.add_argument("-h", "--help", action="help", help="show this help and exit")
    args = p.parse_args(argv)
    common.need(args.device == "cpu" or gpu, "--device cuda: no GPU here; use --device cpu")
    common.need(not os.path.isfile(args.out), f"--out {args.out} is a file; give a folder")
    for flag, value in (ckpt["args"] if ckpt else {}).items():
        common.need(flag in RUN_FLAGS or vars(args)[flag] == value,
                    f"--resume keeps the run's --{flag.replace('_', '-')} {value}; leave it out")
    return args, ckpt


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
    kl = evaluation.kl_per_latent(mu, logvar).sum()
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
def decode(dec, z):
    """Images (B, C, H, W) in [0, 1] of latents z, on the CPU (the decoder in eval mode)."""
    dec.eval()
    images = (dec(z).cpu() + 1) / 2
    dec.train()
    return images


@torch.no_grad()
def evaluate(nets, ctx, args):
    """Each latent's KL on the fixed images; reconstruction error and grey pixels on the first
    1,000 (in [0, 1]); with known factors, MIG both ways and the MI matrix (evaluation.py)."""
    mu, logvar = evaluation.encode_posterior(nets["enc"], ctx["x"])
    rec = decode(nets["dec"], mu[:1000].to(args.device))
    real = (ctx["x"][:1000].float().cpu() + 1) / 2
    return evaluation.vae_measures(mu, logvar, real, rec, ctx["factors"], ctx["sizes"])


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


# ================================================================================================
# PLUMBING: the same text in every script (a test checks it); a reader beside the report may skip
# it. Flag types, run folder, checkpoint, and the loop that calls the hooks above.
def between(lo, hi, kind=float):
    """An argparse type: a `kind` in [lo, hi]; argparse turns the error into one line."""
    def number(text):
        if not lo <= kind(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text} is not in [{lo:g}, {hi:g}]")
        return kind(text)
    return number


def read_checkpoint(path):
    """--resume: a run folder's checkpoint of this script, loaded without running code in it."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:  # weights_only: tensors, numbers, strings, containers; a pickle that runs code is refused
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"--resume {path}: not a checkpoint this project can load ({type(e).__name__})")
    common.need(isinstance(ckpt, dict) and ckpt.get("script") == SCRIPT,
                f"--resume {path}: not a checkpoint of {SCRIPT}")
    return {**ckpt, "folder": os.path.dirname(os.path.abspath(path))}


def make_run_folder(args):
    """runs/<script>__<dataset>[__k<K>][__beta<β>][__tcvae]__s<seed>__<time>/ with config.json."""
    tags = [f"{flag}{vars(args)[flag]:g}" for flag in ("k", "beta") if flag in vars(args)]
    tags += [flag.replace("_", "-") for flag in ("tcvae", "first_order") if vars(args).get(flag)]
    tags += [f"s{args.seed}", f"{datetime.now():%Y%m%d-%H%M%S-%f}"]  # μs: no two runs collide
    folder = os.path.join(args.out, "__".join([SCRIPT[:-3], args.dataset, *tags]))
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**vars(args), "torch": torch.__version__}, f, indent=1)
    return folder


def save_checkpoint(folder, args, step, seconds, nets, opts, data_rng):
    """checkpoint.pt: networks, optimizers, flags, step, RNG states; atomic (temp file, rename)."""
    ckpt = {"script": SCRIPT, "args": vars(args), "step": step, "seconds": seconds,
            "models": {name: net.state_dict() for name, net in nets.items()},
            "optims": {name: opt.state_dict() for name, opt in opts.items()},
            "rng": [torch.get_rng_state(), data_rng, torch.cuda.get_rng_state_all()]}
    torch.save(ckpt, os.path.join(folder, "checkpoint.tmp"))
    os.replace(os.path.join(folder, "checkpoint.tmp"), os.path.join(folder, "checkpoint.pt"))


def train(args, ckpt=None):
    """One run: seed, data, networks, run folder; then train_step epoch after epoch and, at each
    epoch's end, a metrics.csv row, the checkpoint and the figures. Returns the run folder."""
    # TRY NOT TO MODIFY: seeding
    torch.manual_seed(args.seed)  # the weights and the training noise
    data_gen = torch.Generator().manual_seed(args.seed)  # the order of the training data
    data, ctx = setup(args)
    nets, opts = build(args, data.shape)
    per_epoch = min(data.steps_per_epoch(args.batch_size), args.epoch_steps or math.inf)
    common.need(per_epoch > 0, f"--batch-size {args.batch_size} is larger than the training set")
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
        common.truncate_metrics(os.path.join(folder, "metrics.csv"), step)  # rows after it go
    else:
        folder, step, seconds = make_run_folder(args), 0, 0.0
    print(f"run folder {folder} ({'resumed' if ckpt else 'new run'} at step {step})", flush=True)
    t_start = time.time()
    bad = torch.full((len(LOSSES),), -1, device=args.device)  # each loss's first non-finite step
    while step < total:
        epoch = step // per_epoch  # 0-based
        epoch_rng = data_gen.get_state()  # this epoch's order is drawn from it
        begin, end = epoch * per_epoch, min((epoch + 1) * per_epoch, total)
        epoch_start, epoch_sums, t_epoch = step, 0, time.time()
        batches = data.epoch(args.batch_size, data_gen)  # a resumed run skips its first batches
        for x, _ in itertools.islice(batches, step - begin, end - begin):
            losses = train_step(nets, opts, x, args)
            step += 1
            epoch_sums = epoch_sums + losses  # on the device: no host sync per step
            bad = torch.where((bad < 0) & ~torch.isfinite(losses), step, bad)
            if step % args.log_every == 0 or step == end:
                for name, at in zip(LOSSES, bad.tolist()):
                    common.need(at < 0, f"{name} became NaN or infinite at step {at}; lower the lr")
                rate = (step - epoch_start) / (time.time() - t_epoch)  # the epoch's so far
                means = (epoch_sums / (step - epoch_start)).tolist()
                shown = "  ".join(f"{n} {v:.3f}" for n, v in zip(LOSSES, means))
                print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{total}  {shown}  |  "
                      f"{rate:.1f} steps/s  ETA {(total - step) / rate / 60:.1f} min", flush=True)
        # the epoch's end (or --steps): a metrics.csv row, the checkpoint, the figures
        row = {"epoch": round(step / per_epoch, 3),
               "step": step,
               "steps_per_s": rate,  # training alone, before evaluate
               "seconds": round(seconds + time.time() - t_start, 1),  # over resumes too
               **dict(zip(LOSSES, (epoch_sums / (step - epoch_start)).tolist())),
               **evaluate(nets, ctx, args)}
        common.append_metrics(os.path.join(folder, "metrics.csv"), row)
        data_rng = epoch_rng if step % per_epoch else data_gen.get_state()  # mid-epoch: replay
        save_checkpoint(folder, args, step, row["seconds"], nets, opts, data_rng)
        save_figures(nets, ctx, args, folder, row)
    return folder


def main(argv=None):
    """One run; with several --k or --beta values a sweep, one run per value (evaluation.py)."""
    args, ckpt = parse_args(argv)
    return train(args, ckpt) if ckpt else evaluation.sweep(train, args, SCRIPT, argv)
# ==================================== (end of the plumbing) ====================================



if __name__ == "__main__":
    main()
