"""β-VAE and β-TCVAE: report §IV; traversals and KL per latent drawn as its Figs. 14 and 15.

Higgins et al. 2017, "β-VAE: Learning basic visual concepts with a constrained variational
framework" (ICLR); with --tcvae, β weighs only the total correlation of the aggregate posterior
(Chen et al. 2018, "Isolating sources of disentanglement in VAEs", β-TCVAE). The 64x64 conv nets
of disentanglement_lib (Locatello et al. 2019), smaller ones for 28x28 MNIST; β = 1 is the plain
VAE. Each epoch, on fixed images: each latent's KL and, on sprites and squares (known factors),
MIG on the posterior means and on z sampled from q(z|x), and the latent × factor MI matrix.

    python beta_vae.py --dataset squares --beta 1 8 --seed 3   # Lab 3: plain β-VAE, β = 1 and 8
    python beta_vae.py --dataset squares --tcvae --beta 30 --seed 3   # Lab 3: β-TCVAE, β = 30
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
LOSSES = ("loss", "recon", "kl", "tc")  # what train_step returns, in this order
DEFAULTS = {"sprites": dict(
    epochs=26,  # 26 passes of 11,520 steps: about disentanglement_lib's 300,000 steps on dSprites
    epoch_steps=0,  # an epoch is one pass over the 737,280 factor combinations
    batch_size=64,  # disentanglement_lib's batch size
    lr=5e-4,  # Burgess et al.'s (2018) Adam learning rate
    beta=[4.0],  # Higgins et al.'s for dSprites
    tcvae=False,
    latents=10,  # Higgins et al.'s for dSprites
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib measures it
DEFAULTS["squares"] = {
    **DEFAULTS["sprites"],
    "epochs": 12,  # the lab: 12 epochs of 240 steps (5 passes over the 6,144 squares each)
    "batch_size": 128,  # β-TCVAE estimates q(z) on the batch: at 64 it found the axes less often
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
                   help="weight β of the KL (with --tcvae: of the total correlation); 1: the "
                        "plain VAE; several values: a sweep, one run after the other")
    p.add_argument("--tcvae", action="store_true", help="β-TCVAE: β weighs only the TC")
    p.add_argument("--latents", type=between(1, 1000, int), help="latent dimensions")
    p.add_argument("--lr", type=between(1e-9, 1), help="Adam learning rate")
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


# ---- Models (disentanglement_lib's): q(z|x) = N(μ(x), diag σ²(x)); p(x|z) from logits ----------
def conv_encoder(channels, size, latents):
    """x (B, C, H, W) -> [μ, log σ²] (B, 2·latents): 4x4 stride-2 convs, FC 256, FC."""
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
    """The encoder mirrored: z (B, latents) -> logits (B, C, H, W)."""
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


# ---- Losses ------------------------------------------------------------------------------------
def reconstruction_loss(logits, x, likelihood):
    """−log p(x|z): bernoulli (binary sprites, grey MNIST) or gaussian, σ² = ½ (colour CelebA)."""
    if likelihood == "bernoulli":
        # Σ_pixels BCE(x, sigmoid(logits)), a mean over the batch
        bce = nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        return bce / x.shape[0]
    # Σ_pixels (sigmoid(logits) − x)², a mean over the batch (the Gaussian's constant dropped)
    return nn.functional.mse_loss(torch.sigmoid(logits), x, reduction="sum") / x.shape[0]


def total_correlation(z, mu, logvar):
    """TC = KL(q(z) ‖ Π_j q(z_j)), a mean over the batch, estimated as Chen et al. (2018) do, with
    the batch's posteriors: q(z_i) ≈ 1/B Σ_k q(z_i | x_k). (Their minibatch-weighted sampling
    divides by B·N, N the data size; that adds (L − 1)·log N to TC, a constant without gradient.)"""
    batch = z.shape[0]
    # log N(z_il; μ_kl, σ_kl²) = −½ (log 2π + log σ_kl² + (z_il − μ_kl)² / σ_kl²) of sample i under
    # posterior k, latent l: (B, B, L)
    var = logvar.exp()
    log_q = -0.5 * (math.log(2 * math.pi) + logvar[None] + (z[:, None] - mu[None]) ** 2 / var[None])
    log_qz = torch.logsumexp(log_q.sum(2), dim=1) - math.log(batch)  # log q(z_i), (B,)
    log_prod = (torch.logsumexp(log_q, dim=1) - math.log(batch)).sum(1)  # Σ_l log q(z_il), (B,)
    return (log_qz - log_prod).mean()


# ---- ALGO LOGIC: one training step -------------------------------------------------------------
def train_step(nets, opts, x, args):
    """One Adam step on a batch x (B, C, H, W) in [0, 1]. Returns detached (loss, recon, kl, tc)."""
    mu, logvar = nets["enc"](x).chunk(2, dim=1)
    # reparameterisation: z = μ + σ ε, ε ~ N(0, I)
    z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    likelihood = "gaussian" if x.shape[1] == 3 else "bernoulli"
    recon = reconstruction_loss(nets["dec"](z), x, likelihood)
    # KL(q(z|x) ‖ N(0, I)): summed over the latents, a mean over the batch
    kl = evaluation.kl_per_latent(mu, logvar).sum()
    tc = total_correlation(z, mu, logvar)  # logged always; a term of the loss with --tcvae
    if args.tcvae:
        # β-TCVAE (Chen et al. eq. 4, α = γ = 1): KL = index-code MI + TC + dimension-wise KL, and
        # only the TC gets β: loss = recon + KL + (β − 1) TC
        loss = recon + kl + (args.beta - 1) * tc
    else:
        # β-VAE (Higgins et al. eq. 4), negated: loss = −E_q[log p(x|z)] + β KL(q(z|x) ‖ p(z))
        loss = recon + args.beta * kl
    opts["opt"].zero_grad(set_to_none=True)
    loss.backward()
    opts["opt"].step()
    return torch.stack([loss, recon, kl, tc]).detach()


# ---- Setup, evaluation, figures ----------------------------------------------------------------
def build(args, shape):
    """Encoder, decoder and one Adam over both."""
    enc = conv_encoder(shape[0], shape[1], args.latents).to(args.device)
    dec = conv_decoder(shape[0], shape[1], args.latents).to(args.device)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=args.lr)
    return {"enc": enc, "dec": dec}, {"opt": opt}


def setup(args):
    """Images in [0, 1] (the decoder's sigmoid), the fixed evaluation images, 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, torch.device(args.device))
    x, factors = common.fixed_images(data, args.mig_samples, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(64, args.latents, generator=g).to(args.device)
    return data, {"x": x, "factors": factors, "sizes": getattr(data, "SIZES", None), "z": z}


@torch.no_grad()
def decode(dec, z):
    """Images (B, C, H, W) in [0, 1] of latents z, on the CPU (the decoder in eval mode)."""
    dec.eval()
    images = torch.sigmoid(dec(z)).cpu()
    dec.train()
    return images


@torch.no_grad()
def evaluate(nets, ctx, args):
    """Each latent's KL on the fixed images; reconstruction error and grey pixels on the first
    1,000; with known factors, MIG both ways and the MI matrix (evaluation.py)."""
    mu, logvar = evaluation.encode_posterior(nets["enc"], ctx["x"])
    rec = decode(nets["dec"], mu[:1000].to(args.device))
    real = ctx["x"][:1000].float().cpu()
    return evaluation.vae_measures(mu, logvar, real, rec, ctx["factors"], ctx["sizes"])


@torch.no_grad()
def save_figures(nets, ctx, args, folder, row):
    """reconstructions.png, samples.png, fig14_traversals.png, fig15_kl_per_latent.png,
    mi_matrix.png (known factors), losses.png."""
    enc, dec = nets["enc"], nets["dec"]
    step = row["step"]
    model = f"β-TCVAE β = {args.beta:g}" if args.tcvae else f"β-VAE β = {args.beta:g}"
    enc.eval()
    dec.eval()
    x = ctx["x"][:8].float()
    mu = enc(x).chunk(2, dim=1)[0]
    rec = torch.sigmoid(dec(mu))
    title = (f"{model} reconstructions (posterior mean), step {step}\n"
             f"pixel MSE {row['mse']:.4f}, grey pixels {row['grey_pct']:.1f}% (evaluation images)")
    common.save_grid(torch.cat([x, rec]), os.path.join(folder, "reconstructions.png"), nrow=8,
                     row_labels=["real", "recon"], title=title)
    common.save_grid(torch.sigmoid(dec(ctx["z"])), os.path.join(folder, "samples.png"), nrow=8,
                     title=f"{model} prior samples, step {step}")
    # Fig. 14: the encoded image 0 in the first column, then latent j moved ±3 around μ_j
    order = sorted(range(args.latents), key=lambda j: -row[f"kl_z{j}"])[:10]
    values = torch.linspace(-3, 3, 9)
    offsets = torch.eye(args.latents)[order, None] * values[:, None]  # (rows, 9, L)
    moved = torch.sigmoid(dec((mu[0] + offsets.to(mu.device)).flatten(0, 1)))
    labels = [f"z{j} KL {row[f'kl_z{j}']:.2f} {common.carried(row, j)}" for j in order]
    common.save_traversal(moved.unflatten(0, (len(order), 9)),
                          os.path.join(folder, "fig14_traversals.png"), values, labels,
                          f"{model}: latents by KL, the factor each carries, step {step}",
                          inputs=x[:1].expand(len(order), *x.shape[1:]))
    enc.train()
    dec.train()
    metrics = os.path.join(folder, "metrics.csv")
    common.plot_metrics(metrics, [f"kl_z{j}" for j in order],
                        os.path.join(folder, "fig15_kl_per_latent.png"), x="step",
                        ylabel="KL (nats)")
    common.plot_metrics(metrics, list(LOSSES), os.path.join(folder, "losses.png"), x="step",
                        logy=True, title=f"{model} losses")
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
