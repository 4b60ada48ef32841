"""VAE-GAN: report §IV, Fig. 13 (encoder, decoder = generator, discriminator); Fig. 14 traversals.

Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric" (ICML), as
their code builds it (andersbll/autoencoding_beyond_pixels: model/aegan.py, architectures.py):
the pixel reconstruction term becomes a Gaussian likelihood of D's l-th layer features;
reconstructions and prior samples are both GAN fakes; --beta weighs the prior (KL) term, as in
the report; --gamma weighs reconstruction against the GAN term in the decoder's loss; their
equilibrium gate keeps the game going. Their 64x64 nets, channel widths × --width.

    python vae_gan.py --dataset squares --batch-size 32 --epoch-steps 500 --epochs 5  # Lab 4
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
# train_step's, in this order; bce_*: D's per-image mean BCEs; d_on, g_on: 1 where the gate let
# D, the decoder learn (epoch means: the share of steps)
LOSSES = ("loss_d", "loss_dec", "llike", "kl", "bce_real", "bce_fake", "d_on", "g_on")
DEFAULTS = {"sprites": dict(
    epochs=26,  # as beta_vae.py: 26 passes of 11,520 steps
    epoch_steps=0,  # an epoch: one pass over the 737,280 factor combinations
    batch_size=64,  # as beta_vae.py, and Larsen et al.'s
    lr=3e-4,  # Larsen et al.'s RMSprop learning rate
    latents=128,  # Larsen et al.'s
    width=1.0,  # × their channel widths
    beta=[1.0],  # 1: Larsen et al.'s prior term; the report's β weighs it
    gamma=1e-2,  # aegan.py's default (their CelebA run: 1e-6, CIFAR: 1e-5)
    equilibrium=0.68,  # their gate (aegan.py); --margin inf: no gate
    margin=0.35,  # aegan.py's train(): gan_margin
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib
DEFAULTS["squares"] = {
    **DEFAULTS["sprites"],
    "epochs": 6,  # the lab: 6 epochs of 480 steps, 2,880 as beta_vae.py
    "latents": 10,  # β-VAE's 10 latents
    "width": 0.125,  # an eighth of the widths, for a CPU
    "mig_samples": 6144}  # every one of the 6,144 squares
DEFAULTS["celeba"] = {**DEFAULTS["sprites"], "epochs": 20}


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
    p.add_argument("--beta", type=between(1e-6, 1e6), nargs="+",
                   help="weight β of the KL in the encoder's loss; several values: a sweep")
    p.add_argument("--gamma", type=between(1e-9, 1e6), help="weight γ of L_llike in the decoder's")
    p.add_argument("--equilibrium", type=between(1e-6, 100), help="the gate's target BCE of D")
    p.add_argument("--margin", type=between(0, math.inf), help="around it; inf: no gate")
    p.add_argument("--latents", type=between(1, 1000, int), help="latent dimensions")
    p.add_argument("--width", type=between(1 / 64, 4), help="× the paper's channel widths")
    p.add_argument("--lr", type=between(1e-9, 1), help="RMSprop learning rate of all three")
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


# ---- Models (Larsen et al.: 5x5 convs, BatchNorm, ReLU; ↓/↑ = stride 2). Images in [-1, 1] ----
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


def larsen_encoder(channels, latents, w):
    """x (B, C, 64, 64) -> [μ, log σ²] (B, 2·latents): 64↓, 128↓, 256↓, FC 2048 (BN, ReLU), FC.
    The paper's 2048 (architectures.py's img64x64: 1024)."""
    c1, c2, c3, fc = scaled(64, w), scaled(128, w), scaled(256, w), max(64, int(2048 * w))
    return nn.Sequential(
        *block(channels, c1),  # (B, c1, 32, 32)
        *block(c1, c2),  # (B, c2, 16, 16)
        *block(c2, c3),  # (B, c3, 8, 8)
        nn.Flatten(),
        nn.Linear(c3 * 8 * 8, fc),
        nn.BatchNorm1d(fc),
        nn.ReLU(),
        nn.Linear(fc, 2 * latents))


def larsen_decoder(channels, latents, w):
    """z (B, latents) -> image (B, C, 64, 64) in [-1, 1]: FC 8·8·256 (BN, ReLU), 256↑, 128↑,
    32↑, conv 5x5 to C, tanh."""
    c1, c2, c3 = scaled(256, w), scaled(128, w), scaled(32, w)
    return nn.Sequential(
        nn.Linear(latents, c1 * 8 * 8),
        nn.BatchNorm1d(c1 * 8 * 8),
        nn.ReLU(),
        nn.Unflatten(1, (c1, 8, 8)),
        *block(c1, c1, down=False),  # (B, c1, 16, 16)
        *block(c1, c2, down=False),  # (B, c2, 32, 32)
        *block(c2, c3, down=False),  # (B, c3, 64, 64)
        nn.Conv2d(c3, channels, 5, 1, 2),
        nn.Tanh())


class LarsenDiscriminator(nn.Module):
    """x (B, C, 64, 64) -> logit (B,): conv 32 (ReLU), 128↓, 256↓, 256↓, FC 512
    (BN, ReLU), FC 1. Dis_l is the last conv's output before its BatchNorm (celeba_aegan.py's
    recon_depth = 9 layers of architectures.py's img64x64)."""

    def __init__(self, channels, w):
        super().__init__()
        c0, c1, c2, fc = scaled(32, w), scaled(128, w), scaled(256, w), max(64, int(512 * w))
        self.features = nn.Sequential(
            nn.Conv2d(channels, c0, 5, 1, 2),  # (B, c0, 64, 64)
            nn.ReLU(),
            *block(c0, c1),  # (B, c1, 32, 32)
            *block(c1, c2),  # (B, c2, 16, 16)
            nn.Conv2d(c2, c2, 5, 2, 2))  # (B, c2, 8, 8): Dis_l
        self.head = nn.Sequential(
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 8 * 8, fc),
            nn.BatchNorm1d(fc),
            nn.ReLU(),
            nn.Linear(fc, 1))

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


# ---- Losses ----
def feature_nll(dis, x_rec, x):
    """L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I) without its constant: ½ Σ_features
    (Dis_l(x̃) − Dis_l(x))², a mean over the batch. x̃ and x pass D as ONE batch, as aegan.py's
    discriminator_recon does (its BatchNorm then sees a global shift of x̃); x is a fixed target."""
    f_rec, f_real = dis.features(torch.cat([x_rec, x])).flatten(1).split(len(x))
    return 0.5 * (f_rec - f_real.detach()).pow(2).sum() / len(x)


def equilibrium_gate(bce_real, bce_fake, equilibrium, margin):
    """Larsen et al.'s gate (aegan.py, GradientDescent.train_epoch) on D's mean BCEs (floats): D
    pauses while it wins (a BCE below equilibrium − margin), the decoder while D loses badly (a
    BCE above equilibrium + margin); where both would pause, both train. Returns (d_on, g_on)."""
    d_on = bce_real >= equilibrium - margin and bce_fake >= equilibrium - margin
    g_on = bce_real <= equilibrium + margin and bce_fake <= equilibrium + margin
    if not (d_on or g_on):
        return True, True
    return d_on, g_on


# ---- ALGO LOGIC: one training step (Larsen et al.'s Algorithm 1, with their gate) ----
def train_step(nets, opts, x, args):
    """One step on a batch x (B, C, H, W) in [-1, 1]. Returns detached LOSSES; reads the gate's
    two BCEs on the host (one sync a step)."""
    enc, dec, dis = nets["enc"], nets["dec"], nets["dis"]
    batch = x.shape[0]
    # ---- forward: encode; decode x̃ = Dec(z), z ~ q(z|x), and x_p = Dec(z_p), z_p ~ N(0, I),
    # as ONE decoder batch (aegan.py's GAN path) ----
    mu, logvar = enc(x).chunk(2, dim=1)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterised
    z_p = torch.randn_like(mu)
    fakes = dec(torch.cat([z, z_p]))  # (2B, C, H, W): x̃, then x_p
    # L_prior = KL(q(z|x) ‖ p(z)), summed over the latents, a mean over the batch
    kl = evaluation.kl_per_latent(mu, logvar).sum()
    llike = feature_nll(dis, fakes[:batch], x)
    # L_GAN = log Dis(x) + log(1 − Dis(x̃)) + log(1 − Dis(x_p)) on x, x̃, x_p as ONE batch of 3B
    # (aegan.py). bce_real, bce_fake: per-image means over the B real and 2B fake images
    real_logit, fake_logit = dis(torch.cat([x, fakes])).split([batch, 2 * batch])
    bce_real = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
    bce_fake = F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
    loss_d = 0.5 * bce_real + 0.5 * bce_fake  # real against generated 0.5 : 0.5 (aegan.py)
    # deviation: the decoder's GAN term is the non-saturating −log Dis(fake) (Goodfellow et al.
    # 2014), not aegan.py's (1 − γ)·log(1 − Dis(fake)), whose gradient vanishes while D wins
    loss_g = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
    loss_dec = args.gamma * llike + loss_g
    d_on, g_on = equilibrium_gate(bce_real.item(), bce_fake.item(), args.equilibrium,
                                  args.margin)
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    # ---- encoder step: β·L_prior + L_llike^Dis_l (no GAN gradient, as aegan.py) ----
    (args.beta * kl + llike).backward(inputs=list(enc.parameters()), retain_graph=True)
    # ---- decoder (generator) step: γ·L_llike^Dis_l − L_GAN ----
    loss_dec.backward(inputs=list(dec.parameters()), retain_graph=True)
    # ---- discriminator step: −L_GAN ----
    loss_d.backward(inputs=list(dis.parameters()))
    # all three gradients at the same parameters (Algorithm 1); the gate skips a paused side's
    # update whole, its optimiser's state included (aegan.py)
    opts["enc_opt"].step()
    if g_on:
        opts["dec_opt"].step()
    if d_on:
        opts["dis_opt"].step()
    stats = [loss_d, loss_dec, llike, kl, bce_real, bce_fake]
    return torch.stack([*stats, x.new_tensor(d_on), x.new_tensor(g_on)]).detach()


# ---- Setup, evaluation, figures ----
def build(args, shape):
    """Encoder, decoder, discriminator, and one RMSprop each (Larsen et al.)."""
    channels = shape[0]
    nets = {"enc": larsen_encoder(channels, args.latents, args.width),
            "dec": larsen_decoder(channels, args.latents, args.width),
            "dis": LarsenDiscriminator(channels, args.width)}
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
    """Images (B, C, H, W) in [0, 1] of latents z, on the CPU. Eval mode: the running statistics
    of BatchNorm, which one decoder batch of posterior and prior codes a step trains."""
    return (evaluation.in_chunks(dec, z).cpu() + 1) / 2


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
    """Reconstructions, samples, Figs. 14 (and traversal.gif) and 15, MI matrix, losses."""
    dec = nets["dec"]
    mu = evaluation.encode_posterior(nets["enc"], ctx["x"][:8])[0].to(args.device)
    x = (ctx["x"][:8].float().cpu() + 1) / 2  # [-1, 1] -> [0, 1]
    # Fig. 14: image 0 encoded (first column), then latent j at μ_j ± 3, 10 latents by KL
    order = sorted(range(args.latents), key=lambda j: -row[f"kl_z{j}"])[:10]
    values = torch.linspace(-3, 3, 9)
    offsets = torch.eye(args.latents)[order, None] * values[:, None]  # (rows, 9, L)
    moved = decode(dec, (mu[0] + offsets.to(mu.device)).flatten(0, 1))
    moved = moved.unflatten(0, (len(order), 9))  # (rows, 9, C, H, W)
    inputs = x[:1].expand(len(order), *x.shape[1:])
    common.save_vae_figures(folder, row, "VAE-GAN", x, decode(dec, mu), decode(dec, ctx["z"]),
                            moved, order, values, inputs)
    metrics = os.path.join(folder, "metrics.csv")
    common.plot_metrics(metrics, [f"kl_z{j}" for j in order],
                        os.path.join(folder, "fig15_kl_per_latent.png"), x="step",
                        ylabel="KL (nats)")
    common.plot_metrics(metrics, ["loss_d", "loss_dec", "llike", "kl", "bce_real", "bce_fake"],
                        os.path.join(folder, "losses.png"), x="step", logy=True,
                        title="VAE-GAN losses")


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
