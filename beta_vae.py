"""β-VAE and β-TCVAE: report §IV; Figs. 14 (traversals), 15 (KL per latent).

Higgins et al. 2017 (β-VAE; β = 1: the plain VAE); --tcvae: β weighs only the
total correlation (Chen et al. 2018, β-TCVAE). Each epoch, on fixed images: KL
per latent; with known factors, MIG of μ and of sampled z, and the MI matrix.

    python beta_vae.py --dataset squares --tcvae --beta 1 30  # Lab 3: VAE, β-TCVAE
    python beta_vae.py --dataset squares --beta 8  # Lab 3: β-VAE
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

import common
import evaluation

SCRIPT = "beta_vae.py"
LOSSES = ("loss", "recon", "kl", "tc")  # train_step's, in order
DEFAULTS = {"sprites": dict(
    epochs=26,  # 26 x 11,520 steps ≈ disentanglement_lib's 300,000
    epoch_steps=0,  # an epoch: a pass over the 737,280 combinations
    batch_size=64,  # disentanglement_lib's
    lr=5e-4,  # Adam, as Burgess et al. (2018)
    beta=[4.0],  # Higgins et al.'s for dSprites
    tcvae=False,
    latents=10,  # Higgins et al.'s for dSprites
    mig_samples=10000)}  # as disentanglement_lib measures MIG
DEFAULTS["squares"] = {
    **DEFAULTS["sprites"],
    "epochs": 12,  # the lab: 12 x 240 steps (5 passes over the squares each)
    "batch_size": 128,  # β-TCVAE's q(z) is per batch: 64 found the axes less often
    "mig_samples": 6144}  # every square
DEFAULTS["mnist"] = {**DEFAULTS["sprites"], "epochs": 20}  # no paper run to follow
DEFAULTS["celeba"] = DEFAULTS["mnist"]


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
                   help="KL weight (--tcvae: TC weight); 1: plain VAE; several: a sweep")
    p.add_argument("--tcvae", action="store_true", help="β-TCVAE: β weighs only the TC")
    p.add_argument("--latents", type=between(1, 1000, int), help="latent dimensions")
    p.add_argument("--lr", type=between(1e-9, 1), help="Adam learning rate")
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


# ---- Models: disentanglement_lib's (Locatello et al. 2019) ----
def conv_encoder(channels, size, latents):
    """x (B, C, H, W) -> [μ, log σ²] (B, 2L): q(z|x) = N(μ, diag σ²)."""
    if size == 28:
        return nn.Sequential(
            nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 7, 7)
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256), nn.ReLU(),
            nn.Linear(256, 2 * latents))
    return nn.Sequential(
        nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 32, 32)
        nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 16, 16)
        nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 8, 8)
        nn.Conv2d(64, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 4, 4)
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 256), nn.ReLU(),
        nn.Linear(256, 2 * latents))


def conv_decoder(channels, size, latents):
    """The encoder mirrored: z (B, L) -> logits of p(x|z) (B, C, H, W)."""
    if size == 28:
        return nn.Sequential(
            nn.Linear(latents, 256), nn.ReLU(),
            nn.Linear(256, 64 * 7 * 7), nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 14, 14)
            nn.ConvTranspose2d(32, channels, 4, 2, 1))  # (B, C, 28, 28)
    return nn.Sequential(
        nn.Linear(latents, 256), nn.ReLU(),
        nn.Linear(256, 64 * 4 * 4), nn.ReLU(),
        nn.Unflatten(1, (64, 4, 4)),
        nn.ConvTranspose2d(64, 64, 4, 2, 1), nn.ReLU(),  # (B, 64, 8, 8)
        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 16, 16)
        nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ReLU(),  # (B, 32, 32, 32)
        nn.ConvTranspose2d(32, channels, 4, 2, 1))  # (B, C, 64, 64)


# ---- Losses ----
def reconstruction_loss(logits, x, likelihood):
    """−log p(x|z): bernoulli (sprites, MNIST) or gaussian, σ² = ½ (CelebA)."""
    if likelihood == "bernoulli":
        # Σ_pixels BCE(x, sigmoid(logits)), a batch mean
        bce = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        return bce / len(x)
    # Σ_pixels (sigmoid(logits) − x)², a batch mean (constant dropped)
    return nn.functional.mse_loss(torch.sigmoid(logits), x, reduction="sum") / len(x)


def total_correlation(z, mu, logvar):
    """TC = KL(q(z) ‖ Π_j q(z_j)), a batch mean; q(z_i) ≈ 1/B Σ_k q(z_i|x_k). Chen et al.
    (2018) divide by B·N, N the data size: TC + (L − 1) log N, a constant."""
    b = len(z)
    # log N(z_il; μ_kl, σ_kl²): sample i, posterior k, latent l (B, B, L)
    sq = (z[:, None] - mu[None]) ** 2 / logvar.exp()[None]
    log_q = -0.5 * (math.log(2 * math.pi) + logvar[None] + sq)
    log_qz = torch.logsumexp(log_q.sum(2), dim=1) - math.log(b)  # log q(z_i) (B,)
    log_prod = (torch.logsumexp(log_q, dim=1) - math.log(b)).sum(1)  # Σ_l log q(z_il)
    return (log_qz - log_prod).mean()


# ---- ALGO LOGIC: one training step ----
def train_step(nets, opts, x, args):
    """One Adam step on x (B, C, H, W) in [0, 1]; returns the LOSSES."""
    mu, logvar = nets["enc"](x).chunk(2, dim=1)
    # reparameterisation: z = μ + σ ε, ε ~ N(0, I)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    likelihood = "gaussian" if x.shape[1] == 3 else "bernoulli"
    recon = reconstruction_loss(nets["dec"](z), x, likelihood)
    # KL(q(z|x) ‖ N(0, I)): a sum over latents, a batch mean
    kl = evaluation.kl_per_latent(mu, logvar).sum()
    tc = total_correlation(z, mu, logvar)  # logged; a loss term with --tcvae
    if args.tcvae:
        # β-TCVAE (Chen et al. eq. 4, α = γ = 1): KL = MI + TC + Σ_j KL_j, β on the TC
        loss = recon + kl + (args.beta - 1) * tc
    else:
        # β-VAE (Higgins et al. eq. 4), negated: −E_q[log p(x|z)] + β KL
        loss = recon + args.beta * kl
    opts["opt"].zero_grad(set_to_none=True)
    loss.backward()
    opts["opt"].step()
    return torch.stack([loss, recon, kl, tc]).detach()


# ---- Setup, evaluation, figures ----
def build(args, shape):
    """Encoder, decoder and one Adam over both."""
    enc = conv_encoder(*shape[:2], args.latents).to(args.device)
    dec = conv_decoder(*shape[:2], args.latents).to(args.device)
    params = [*enc.parameters(), *dec.parameters()]
    return {"enc": enc, "dec": dec}, {"opt": torch.optim.Adam(params, lr=args.lr)}


def setup(args):
    """Images in [0, 1] (for the sigmoid), fixed evaluation images, 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, args.device)
    x, factors = common.fixed_images(data, args.mig_samples, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(64, args.latents, generator=g).to(args.device)
    return data, {"x": x, "factors": factors, "sizes": getattr(data, "SIZES", None), "z": z}


@torch.no_grad()
def decode(dec, z):
    """Images (B, C, H, W) in [0, 1] of latents z, on the CPU (the decoder in eval mode)."""
    return torch.sigmoid(evaluation.in_chunks(dec, z)).cpu()


@torch.no_grad()
def evaluate(nets, ctx, args):
    """KL per latent; MSE, grey pixels (1,000 images); with factors, MIG, MI matrix."""
    mu, logvar = evaluation.encode_posterior(nets["enc"], ctx["x"])
    rec = decode(nets["dec"], mu[:1000].to(args.device))
    real = ctx["x"][:1000].float().cpu()
    return evaluation.vae_measures(mu, logvar, real, rec, ctx["factors"], ctx["sizes"])


@torch.no_grad()
def save_figures(nets, ctx, args, folder, row):
    """Reconstructions, samples, Figs. 14 (and traversal.gif) and 15, MI matrix, losses."""
    dec = nets["dec"]
    model = f"{'β-TCVAE' if args.tcvae else 'β-VAE'} β = {args.beta:g}"
    mu = evaluation.encode_posterior(nets["enc"], ctx["x"][:8])[0].to(args.device)
    x = ctx["x"][:8].float().cpu()  # (8, C, H, W)
    # Fig. 14: image 0 encoded (first column), then latent j at μ_j ± 3, 10 latents by KL
    order = sorted(range(args.latents), key=lambda j: -row[f"kl_z{j}"])[:10]
    values = torch.linspace(-3, 3, 9)
    offsets = torch.eye(args.latents)[order, None] * values[:, None]  # (rows, 9, L)
    moved = decode(dec, (mu[0] + offsets.to(mu.device)).flatten(0, 1))
    moved = moved.unflatten(0, (len(order), 9))  # (rows, 9, C, H, W)
    inputs = x[:1].expand(len(order), *x.shape[1:])
    common.save_vae_figures(folder, row, model, x, decode(dec, mu), decode(dec, ctx["z"]),
                            moved, order, values, inputs)
    metrics = os.path.join(folder, "metrics.csv")
    common.plot_metrics(metrics, [f"kl_z{j}" for j in order],
                        os.path.join(folder, "fig15_kl_per_latent.png"), x="step",
                        ylabel="KL (nats)")
    common.plot_metrics(metrics, list(LOSSES), os.path.join(folder, "losses.png"), x="step",
                        logy=True, title=f"{model} losses")


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
