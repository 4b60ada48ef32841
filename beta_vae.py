"""β-VAE (report §IV; the per-latent KL plot of Fig. 15, traversals of encoded real images as in Fig. 14).

Implements Higgins et al., "β-VAE: Learning basic visual concepts with a constrained variational framework"
(ICLR 2017) and, with --capacity, Burgess et al., "Understanding disentangling in β-VAE" (2018), with the
64x64 conv encoder/decoder of those papers (a smaller pair for 28x28 MNIST). On sprites (dSprites' factor
layout, common.Sprites) it measures MIG (Chen et al. 2018, as in disentanglement_lib); β = 1 is the plain VAE.

Reproduce (CPU, ~20 min each):  python beta_vae.py --dataset sprites --beta 4 --steps 3000   (--beta 1: plain VAE)
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/ or img_align_celeba/ (default: %(default)s)")
    p.add_argument("--dataset", default="sprites", choices=("sprites", "mnist", "celeba"),
                   help="training data (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the data (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optional cap on total training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: %(default)s)")
    p.add_argument("--resume", default=None, help="checkpoint.pt or run folder to continue (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines (default: %(default)s)")
    p.add_argument("--beta", type=float, default=4.0, help="weight β of the KL term; 1 = plain VAE (default: %(default)s)")
    p.add_argument("--capacity", type=float, default=None,
                   help="Burgess et al. capacity C_max in nats; replaces β·KL by γ|KL - C| (default: %(default)s = off)")
    p.add_argument("--gamma", type=float, default=1000.0, help="γ of the capacity variant (default: %(default)s)")
    p.add_argument("--capacity-steps", type=int, default=100000,
                   help="steps over which C grows linearly from 0 to C_max (default: %(default)s)")
    p.add_argument("--latents", type=int, default=10, help="number of latent dimensions (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default: %(default)s, Burgess et al.)")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="steps between metrics rows (MIG, per-latent KL) and checkpoints, besides epoch ends "
                        "(default: %(default)s; 0 = epoch ends only)")
    p.add_argument("--mig-samples", type=int, default=10000,
                   help="size of the fixed sprites evaluation set for MIG, in images (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "log_every", "latents", "capacity_steps"):
        if getattr(args, name) < 1:
            common.die(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.steps is not None and args.steps < 1:
        common.die(f"--steps must be >= 1 (got {args.steps})")
    if args.mig_samples < 8:
        common.die(f"--mig-samples must be >= 8 (the figures use 8 of them; got {args.mig_samples})")
    if args.eval_every < 0:
        common.die(f"--eval-every must be >= 0 (got {args.eval_every})")
    for name in ("beta", "gamma", "lr"):
        if not getattr(args, name) > 0:  # also catches nan
            common.die(f"--{name} must be > 0 (got {getattr(args, name)})")
    if args.capacity is not None and not args.capacity >= 0:
        common.die(f"--capacity must be >= 0 nats (got {args.capacity})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("--device cuda but no CUDA GPU is available here; use --device cpu")
    return args


# ------------------------------------------------------------------------------------------------
# Models: q(z|x) = N(μ(x), diag σ²(x)); p(x|z) Bernoulli (logits) or Gaussian (mean = sigmoid(logits))
# ------------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """64x64: 4 conv 4x4 stride 2 (32, 32, 64, 64), FC 256, FC 2·latents (Higgins/Burgess et al.).
    28x28: 2 conv 4x4 stride 2 (32, 64), FC 256, FC 2·latents."""

    def __init__(self, channels, size, latents):
        super().__init__()
        widths = (32, 32, 64, 64) if size == 64 else (32, 64)
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.ReLU()]
            c = w
        s = size // 2 ** len(widths)  # 4 for 64x64, 7 for 28x28
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, 256), nn.ReLU(), nn.Linear(256, 2 * latents))

    def forward(self, x):  # (B, C, H, W) -> μ (B, L), log σ² (B, L)
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """The encoder mirrored: FC 256, FC to the conv shape, transposed convs 4x4 stride 2; returns logits."""

    def __init__(self, channels, size, latents):
        super().__init__()
        widths = (64, 64, 32, 32) if size == 64 else (64, 32)
        self.s, self.c = size // 2 ** len(widths), widths[0]
        self.fc = nn.Sequential(nn.Linear(latents, 256), nn.ReLU(), nn.Linear(256, self.c * self.s * self.s), nn.ReLU())
        layers = []
        for w_in, w_out in zip(widths, widths[1:] + (channels,)):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])  # no ReLU on the logits

    def forward(self, z):  # (B, L) -> logits (B, C, H, W)
        return self.net(self.fc(z).view(-1, self.c, self.s, self.s))


# ------------------------------------------------------------------------------------------------
# Losses and metrics
# ------------------------------------------------------------------------------------------------
def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) for each latent, averaged over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def reconstruction_loss(logits, x, likelihood):
    """−log p(x|z) summed over pixels (and channels), averaged over the batch.
    bernoulli: BCE-with-logits (binary sprites, grey MNIST). gaussian: squared error of sigmoid(logits), i.e.
    −log N(x; mean, σ² = ½) with the constant dropped (colour CelebA)."""
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    return F.mse_loss(torch.sigmoid(logits), x, reduction="sum") / x.shape[0]


def mig(codes, factors, sizes, bins=20):
    """Mutual Information Gap (Chen et al. 2018) as in disentanglement_lib: each code dimension (N, L)
    discretised into `bins` equal-width bins over its range; discrete MI (nats) with each factor (N, K)
    from the joint histogram; for each factor, (largest MI − second largest MI) / H(factor); mean over factors."""
    n, num_latents = codes.shape
    lo, hi = codes.min(0).values, codes.max(0).values
    binned = ((codes - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp(0, bins - 1)  # (N, L)
    gaps = []
    for k, size in enumerate(sizes):
        f = factors[:, k].long()
        p_f = torch.bincount(f, minlength=size).double() / n
        h_f = -(p_f[p_f > 0] * p_f[p_f > 0].log()).sum()
        if h_f <= 0:
            continue  # a constant factor carries no information (disentanglement_lib drops it too)
        mi = torch.empty(num_latents, dtype=torch.float64)
        for j in range(num_latents):
            joint = torch.bincount(binned[:, j] * size + f, minlength=bins * size).double().view(bins, size) / n
            outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
            nz = joint > 0
            mi[j] = (joint[nz] * (joint[nz] / outer[nz]).log()).sum()
        top = mi.sort(descending=True).values
        gaps.append((top[0] - (top[1] if num_latents > 1 else 0.0)) / h_f)
    return float(torch.stack(gaps).mean())


@torch.no_grad()
def encode_means(enc, images, chunk=1000):
    """Posterior means μ(x) of images (N, C, H, W) (any dtype, values in {0, 1} or [0, 1]), in chunks."""
    was = enc.training
    enc.eval()
    mus = [enc(images[i:i + chunk].float())[0] for i in range(0, len(images), chunk)]
    enc.train(was)
    return torch.cat(mus).cpu()


# ------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------
def train_step(enc, dec, opt, x, beta, likelihood, capacity=None, gamma=1.0):
    """One Adam step on a batch x (B, C, H, W) in [0, 1]. Returns detached (loss, recon, kl, kl per latent)."""
    # ---- encoder / decoder step (one loss, both networks) ----
    mu, logvar = enc(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation: z = μ + σ ε, ε ~ N(0, I)
    recon = reconstruction_loss(dec(z), x, likelihood)
    kl_z = kl_per_latent(mu, logvar)
    kl = kl_z.sum()  # summed over latents, mean over the batch
    if capacity is None:
        # β-VAE objective (Higgins et al.; §IV of the report numbers no equation), negated, batch-averaged:
        # L = E_q[log p(x|z)] − β KL(q(z|x) ‖ p(z))
        loss = recon + beta * kl
    else:
        # capacity variant (Burgess et al.): L = E_q[log p(x|z)] − γ |KL(q(z|x) ‖ p(z)) − C|, C growing linearly
        loss = recon + gamma * (kl - capacity).abs()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), recon.detach(), kl.detach(), kl_z.detach()


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_figures(enc, dec, fixed_x, fixed_z, kl_z, run, step):
    enc.eval(), dec.eval()
    mu, _ = enc(fixed_x)  # (8, L)
    rec = torch.sigmoid(dec(mu))
    common.save_grid(torch.cat([fixed_x, rec]), os.path.join(run, "reconstructions.png"), nrow=len(fixed_x),
                     row_labels=["real", "recon"], title=f"β-VAE reconstructions (posterior mean), step {step}")
    common.save_grid(torch.sigmoid(dec(fixed_z)), os.path.join(run, "samples.png"), nrow=8,
                     title=f"β-VAE samples from the prior N(0, I), step {step}")
    order = kl_z.argsort(descending=True).tolist()  # latents by KL, most informative first
    values = torch.linspace(-3, 3, 9)
    for i, name in enumerate(("fig14_traversals.png", "fig14_traversals_b.png")):
        base = mu[i].repeat(len(order), len(values), 1)  # (L rows, 9 cols, L)
        for r, j in enumerate(order):
            base[r, :, j] += values.to(base.device)  # ±3 around the posterior mean of latent j
        imgs = torch.sigmoid(dec(base.flatten(0, 1))).view(len(order), len(values), *fixed_x.shape[1:])
        common.save_traversal(imgs, os.path.join(run, name), values,
                              row_labels=[f"z{j} KL {float(kl_z[j]):.2f}" for j in order],
                              title=f"traversals of encoded real image {i} (rows by KL), step {step}",
                              xlabel="offset from posterior mean μ_j")
    enc.train(), dec.train()


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    # ---- seeding ----
    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)  # data order
    device = torch.device(args.device)

    # ---- data ----
    data = common.load_data(args.dataset, args.data_root, device)
    channels, size = data.shape[0], data.shape[1]
    likelihood = "gaussian" if channels == 3 else "bernoulli"
    steps_per_epoch = len(data) // args.batch_size
    if steps_per_epoch < 1:
        common.die(f"--batch-size {args.batch_size} is larger than the dataset ({len(data)} images)")
    total = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)
    if args.dataset == "sprites":
        eval_x, eval_f = data.eval_set(args.mig_samples, seed=0)
        eval_x = eval_x.to(torch.uint8)  # binary images: store compactly
        fixed_x = eval_x[:8].float()
    else:
        eval_x = eval_f = None
        fixed_x = data.batch(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:8].to(device))[0]

    # ---- models, optimizer, fixed noise ----
    enc, dec = Encoder(channels, size, args.latents).to(device), Decoder(channels, size, args.latents).to(device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=args.lr)
    fixed = {"z": torch.randn(64, args.latents, generator=torch.Generator().manual_seed(args.seed)).to(device)}
    step = epoch = 0

    # ---- run folder / resume ----
    if args.resume:
        path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
        try:
            ckpt = torch.load(path, map_location=device, weights_only=False)
        except Exception as e:
            common.die(f"{path} is not a checkpoint ({type(e).__name__})")
        if not isinstance(ckpt, dict) or ckpt.get("script") != "beta_vae.py":
            common.die(f"{path} is a checkpoint of {ckpt.get('script') if isinstance(ckpt, dict) else '?'}, not of beta_vae.py")
        for flag in ("dataset", "latents"):
            if ckpt["args"][flag] != getattr(args, flag):
                common.die(f"{path} was trained with --{flag} {ckpt['args'][flag]}, not {getattr(args, flag)}")
        try:
            enc.load_state_dict(ckpt["models"]["enc"]), dec.load_state_dict(ckpt["models"]["dec"])
        except RuntimeError as e:
            common.die(f"{path} does not fit this model ({str(e).splitlines()[0]})")
        opt.load_state_dict(ckpt["optims"]["opt"])
        step, epoch, fixed = ckpt["step"], ckpt["epoch"], ckpt["fixed"]
        torch.set_rng_state(ckpt["rng"]), data_gen.set_state(ckpt["data_rng"])
        run = os.path.dirname(os.path.abspath(path))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = os.path.join(args.out, f"beta_vae__{args.dataset}__s{args.seed}__{stamp}")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump({**vars(args), "torch": torch.__version__, "likelihood": likelihood,
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, f, indent=1)
    print(f"run folder: {run}", flush=True)
    metrics_csv = os.path.join(run, "metrics.csv")

    def record(seconds, n_steps, sums):
        """Metrics row (means since the last row), figures and checkpoint."""
        s = (sums / max(n_steps, 1)).tolist()  # host sync, only here
        row = {"epoch": epoch, "step": step, "seconds": round(seconds, 2), "steps_per_s": n_steps / max(seconds, 1e-9),
               "recon": s[1], "kl": s[2], **{f"kl_z{j}": s[3 + j] for j in range(args.latents)}}
        row["mig"] = mig(encode_means(enc, eval_x), eval_f.cpu(), data.SIZES) if eval_x is not None else float("nan")
        common.append_metrics(metrics_csv, row)
        save_figures(enc, dec, fixed_x, fixed["z"], sums[3:] / max(n_steps, 1), run, step)
        common.plot_metrics(metrics_csv, [f"kl_z{j}" for j in range(args.latents)],
                            os.path.join(run, "fig15_kl_per_latent.png"), x="step",
                            title=f"mean KL per latent (β = {args.beta})", ylabel="KL (nats)")
        common.plot_metrics(metrics_csv, ["recon", "kl"], os.path.join(run, "losses.png"), x="step", logy=True)
        ckpt = {"script": "beta_vae.py", "args": vars(args), "models": {"enc": enc.state_dict(), "dec": dec.state_dict()},
                "optims": {"opt": opt.state_dict()}, "step": step, "epoch": epoch, "fixed": fixed,
                "rng": torch.get_rng_state(), "data_rng": data_gen.get_state()}
        torch.save(ckpt, os.path.join(run, "checkpoint.pt.tmp"))
        os.replace(os.path.join(run, "checkpoint.pt.tmp"), os.path.join(run, "checkpoint.pt"))
        return row

    # ---- training loop ----
    names = ("loss", "recon", "kl")
    hist = torch.zeros(args.log_every, 3, device=device)
    sums = torch.zeros(3 + args.latents, device=device)  # loss, recon, kl, kl_z* summed since the last metrics row
    t_start = t_row = t_log = time.time()
    n_row, step0, step_log, row = 0, step, step, None
    while step < total:
        # a resumed run starts a fresh pass over the data, shortened to the rest of its epoch
        left_in_epoch = steps_per_epoch - (step - epoch * steps_per_epoch)
        for i, (x, _) in enumerate(data.epoch(args.batch_size, data_gen)):
            if i >= left_in_epoch or step >= total:
                break
            c = None if args.capacity is None else args.capacity * min(1.0, step / args.capacity_steps)
            loss, recon, kl, kl_z = train_step(enc, dec, opt, x, args.beta, likelihood, c, args.gamma)
            hist[step % args.log_every] = torch.stack([loss, recon, kl])
            sums += torch.cat([torch.stack([loss, recon, kl]), kl_z])
            step, n_row = step + 1, n_row + 1
            end_of_epoch = i + 1 == left_in_epoch
            if step % args.log_every == 0 or end_of_epoch or step == total:
                h = hist[:min(step - step0, args.log_every)]
                bad = ~torch.isfinite(h)
                if bad.any():
                    s_bad, k_bad = bad.nonzero()[0].tolist()  # ring slot -> the latest step that wrote it
                    common.die(f"{names[k_bad]} became {float(h[s_bad, k_bad])} at step "
                               f"{step - (step - 1 - s_bad) % args.log_every}; lower the learning rate or check the data")
                now = time.time()
                rate = (step - step_log) / max(now - t_log, 1e-9)  # this log interval only
                m = h.mean(0).tolist()
                eta = (total - step) / max(rate, 1e-9)
                print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{total}  loss {m[0]:.2f}  recon {m[1]:.2f}  "
                      f"kl {m[2]:.3f}  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
                t_log, step_log = now, step
            if end_of_epoch:
                epoch += 1
            if end_of_epoch or step == total or (args.eval_every and step % args.eval_every == 0):
                t_rec = time.time()
                row = record(t_rec - t_row, n_row, sums)
                t_log += time.time() - t_rec  # evaluation time does not count in steps/s
                print(f"  metrics at step {step}: recon {row['recon']:.2f}  kl {row['kl']:.3f}  mig {row['mig']:.4f}", flush=True)
                sums.zero_()
                n_row, t_row = 0, time.time()
    if row is None:  # a resumed run with nothing left to train: redraw the figures, add no metrics row
        row = common.read_metrics(metrics_csv)[-1]
        save_figures(enc, dec, fixed_x, fixed["z"], torch.tensor([row[f"kl_z{j}"] for j in range(args.latents)]), run, step)
    wall = time.time() - t_start
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB" if device.type == "cuda" else ""
    print(f"done: {step - step0} steps in {wall:.1f} s ({(step - step0) / max(wall, 1e-9):.1f} steps/s){mem}, "
          f"final mig {row['mig']:.4f}, run folder {run}", flush=True)


if __name__ == "__main__":
    main()
