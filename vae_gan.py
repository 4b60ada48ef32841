"""VAE-GAN (report §IV, Fig. 13: encoder, decoder = generator, discriminator; traversals of encoded images).

Implements Larsen et al., "Autoencoding beyond pixels using a learned similarity metric" (ICML 2016): the
pixel reconstruction term is replaced by a Gaussian likelihood of the discriminator's l-th layer features;
reconstructions and prior samples are both GAN fakes; `--beta` weighs the prior (KL) term as in the report.
The paper's 64x64 nets (channel widths x --width; CPU runs use 0.125), smaller ones for 28x28. MIG on sprites.

Reproduce (CPU, ~35 min):  python vae_gan.py --dataset sprites --latents 10 --width 0.125 --batch-size 32 \
    --steps 2500 --compare-with runs/<β=1 beta_vae run> runs/<β=4 run> --compare-out docs/vae_gan_vs_beta_vae.png
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
    p.add_argument("--beta", type=float, default=1.0, help="weight β of the prior (KL) term in the encoder loss (default: %(default)s)")
    p.add_argument("--gamma", type=float, default=1e-2,
                   help="weight γ of the feature reconstruction term in the decoder loss (default: %(default)s)")
    p.add_argument("--latents", type=int, default=128, help="number of latent dimensions (default: %(default)s, the paper's)")
    p.add_argument("--width", type=float, default=1.0,
                   help="multiplier of the paper's channel widths; < 1 scales the nets down for CPU (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="RMSprop learning rate, as in the paper (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="steps between metrics rows (MIG, per-latent KL) and checkpoints, besides epoch ends "
                        "(default: %(default)s; 0 = epoch ends only)")
    p.add_argument("--mig-samples", type=int, default=10000,
                   help="size of the fixed sprites evaluation set for MIG, in images (default: %(default)s)")
    p.add_argument("--compare-with", nargs="+", default=None, metavar="CKPT",
                   help="beta_vae.py checkpoint(s) (or run folders) on the same data: at the end, write real / "
                        "β-VAE / VAE-GAN reconstructions of the same fixed images (default: %(default)s)")
    p.add_argument("--compare-out", default=None,
                   help="path of that comparison figure (default: %(default)s = <run folder>/vae_gan_vs_beta_vae.png)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "log_every", "latents"):
        if getattr(args, name) < 1:
            common.die(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.steps is not None and args.steps < 1:
        common.die(f"--steps must be >= 1 (got {args.steps})")
    if args.mig_samples < 8:
        common.die(f"--mig-samples must be >= 8 (the figures use 8 of them; got {args.mig_samples})")
    if args.eval_every < 0:
        common.die(f"--eval-every must be >= 0 (got {args.eval_every})")
    for name in ("beta", "gamma", "lr", "width"):
        if not getattr(args, name) > 0:  # also catches nan
            common.die(f"--{name} must be > 0 (got {getattr(args, name)})")
    for path in args.compare_with or []:
        if not os.path.exists(path):
            common.die(f"--compare-with {path}: no such file or folder")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("--device cuda but no CUDA GPU is available here; use --device cpu")
    return args


# ------------------------------------------------------------------------------------------------
# Models (Larsen et al., Table: 5x5 convs, BatchNorm, ReLU; "↓"/"↑" = stride 2). Images in [-1, 1].
# ------------------------------------------------------------------------------------------------
def block(c_in, c_out, down=True):
    """5x5 conv ↓ (or transposed conv ↑), stride 2, BatchNorm, ReLU."""
    conv = nn.Conv2d(c_in, c_out, 5, 2, 2) if down else nn.ConvTranspose2d(c_in, c_out, 5, 2, 2, output_padding=1)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def widths(size, w):
    """Channel widths (encoder convs, decoder convs, discriminator convs) of the 64x64 paper nets × w, or of
    our smaller 28x28 nets (two ↓/↑ instead of three)."""
    r = lambda c: max(8, int(round(c * w)))  # noqa: E731
    if size == 64:
        return [r(64), r(128), r(256)], [r(256), r(128), r(32)], [r(32), r(128), r(256), r(256)]
    return [r(64), r(128)], [r(128), r(64)], [r(32), r(64), r(128)]


class Encoder(nn.Module):
    """64x64: 64↓, 128↓, 256↓, FC 2048 (BN, ReLU), FC 2·latents; 28x28: 64↓, 128↓, FC 512, FC 2·latents."""

    def __init__(self, channels, size, latents, w):
        super().__init__()
        enc, _, _ = widths(size, w)
        layers, c = [], channels
        for c_out in enc:
            layers += block(c, c_out)
            c = c_out
        s, fc = size // 2 ** len(enc), (max(64, int(2048 * w)) if size == 64 else max(64, int(512 * w)))
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, fc), nn.BatchNorm1d(fc), nn.ReLU(),
                                 nn.Linear(fc, 2 * latents))

    def forward(self, x):  # (B, C, H, W) -> μ, log σ² (B, L)
        return self.net(x).chunk(2, dim=1)


class Decoder(nn.Module):
    """64x64: FC 8·8·256 (BN, ReLU), 256↑, 128↑, 32↑, conv 5x5 to C, tanh; 28x28: FC 7·7·128, 128↑, 64↑ -> C."""

    def __init__(self, channels, size, latents, w):
        super().__init__()
        dec = widths(size, w)[1]
        self.c, self.s = dec[0], size // 2 ** len(dec)  # 256 x 8 x 8 (64x64) or 128 x 7 x 7 (28x28)
        self.fc = nn.Sequential(nn.Linear(latents, self.c * self.s ** 2), nn.BatchNorm1d(self.c * self.s ** 2), nn.ReLU())
        layers = []
        for c_in, c_out in zip([dec[0]] + dec[:-1], dec):
            layers += block(c_in, c_out, down=False)
        self.net = nn.Sequential(*layers, nn.Conv2d(dec[-1], channels, 5, 1, 2), nn.Tanh())

    def forward(self, z):  # (B, L) -> images (B, C, H, W) in [-1, 1]
        return self.net(self.fc(z).view(-1, self.c, self.s, self.s))


class Discriminator(nn.Module):
    """64x64: conv 32 (ReLU), 128↓, 256↓, 256↓ (= Dis_l, 8x8), FC 512 (BN, ReLU), FC 1;
    28x28: conv 32, 64↓, 128↓ (= Dis_l, 7x7), FC 256, FC 1. Returns (logit (B,), Dis_l features (B, F))."""

    def __init__(self, channels, size, w):
        super().__init__()
        dis = widths(size, w)[2]
        layers = [nn.Conv2d(channels, dis[0], 5, 1, 2), nn.ReLU()]
        for c_in, c_out in zip(dis, dis[1:]):
            layers += block(c_in, c_out)
        self.features = nn.Sequential(*layers[:-1])  # Dis_l: the last conv block after BN, before its ReLU
        s, fc = size // 2 ** (len(dis) - 1), max(64, int((512 if size == 64 else 256) * w))
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(dis[-1] * s * s, fc), nn.BatchNorm1d(fc),
                                  nn.ReLU(), nn.Linear(fc, 1))

    def forward(self, x):
        f = self.features(x)
        return self.head(f).squeeze(1), f.flatten(1)


# ------------------------------------------------------------------------------------------------
# Losses and metrics
# ------------------------------------------------------------------------------------------------
def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) for each latent, averaged over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def feature_nll(f_rec, f_real):
    """L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I), constant dropped: ½ Σ (squared error) over the
    features, mean over the batch."""
    return 0.5 * (f_rec - f_real).pow(2).sum() / f_rec.shape[0]


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
    """Posterior means μ(x) of images (N, C, H, W) in [0, 1] (any dtype), in chunks; eval-mode BatchNorm."""
    was = enc.training
    enc.eval()
    mus = [enc(images[i:i + chunk].float() * 2 - 1)[0] for i in range(0, len(images), chunk)]
    enc.train(was)
    return torch.cat(mus).cpu()


# ------------------------------------------------------------------------------------------------
# Training step (Larsen et al., Algorithm 1): all three losses from one forward pass, then
#   encoder       ← β·L_prior + L_llike^Dis_l
#   decoder       ← γ·L_llike^Dis_l − L_GAN        (−L_GAN as the non-saturating  −log Dis(fake), see below)
#   discriminator ← L_GAN                          (Dis maximises the GAN log-likelihood: BCE real/fakes)
# ------------------------------------------------------------------------------------------------
def train_step(enc, dec, dis, opts, x, beta, gamma):
    """x: (B, C, H, W) in [-1, 1]. Returns detached (loss_d, loss_dec, llike, kl, kl per latent)."""
    mu, logvar = enc(x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # z ~ q(z|x) by reparameterisation
    x_rec = dec(z)  # x̃ = Dec(z), z ~ Enc(x)
    x_p = dec(torch.randn_like(mu))  # x_p = Dec(z_p), z_p ~ N(0, I)
    d_real, f_real = dis(x)
    d_rec, f_rec = dis(x_rec)
    d_p, _ = dis(x_p)
    ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_real)
    kl_z = kl_per_latent(mu, logvar)
    # Larsen et al. §2 (§IV of the report numbers no equation):
    # L_prior = KL(q(z|x) ‖ p(z)), summed over latents, mean over the batch
    kl = kl_z.sum()
    # L_llike^Dis_l = −E_q[log p(Dis_l(x) | z)]; the real features are a fixed target
    llike = feature_nll(f_rec, f_real.detach())
    # L_GAN = log Dis(x) + log(1 − Dis(x̃)) + log(1 − Dis(x_p)); as BCE (means over the batch),
    # loss_d = −L_GAN
    loss_d = (F.binary_cross_entropy_with_logits(d_real, ones) + F.binary_cross_entropy_with_logits(d_rec, zeros)
              + F.binary_cross_entropy_with_logits(d_p, zeros))
    # deviation: the decoder's −L_GAN is the non-saturating form −log Dis(x̃) − log Dis(x_p) (Goodfellow et al.)
    loss_g = F.binary_cross_entropy_with_logits(d_rec, ones) + F.binary_cross_entropy_with_logits(d_p, ones)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    # ---- encoder step ----
    (beta * kl + llike).backward(inputs=list(enc.parameters()), retain_graph=True)
    # ---- decoder (generator) step ----
    loss_dec = gamma * llike + loss_g
    loss_dec.backward(inputs=list(dec.parameters()), retain_graph=True)
    # ---- discriminator step ----
    loss_d.backward(inputs=list(dis.parameters()))
    for o in opts.values():  # all gradients were taken at the same parameters, as in Algorithm 1
        o.step()
    return loss_d.detach(), loss_dec.detach(), llike.detach(), kl.detach(), kl_z.detach()


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def to01(x):
    return (x + 1) / 2


@torch.no_grad()
def save_figures(enc, dec, fixed_x, fixed_z, kl_z, run, step):
    enc.eval(), dec.eval()
    mu, _ = enc(fixed_x * 2 - 1)  # (8, L)
    common.save_grid(torch.cat([fixed_x, to01(dec(mu))]), os.path.join(run, "reconstructions.png"), nrow=len(fixed_x),
                     row_labels=["real", "VAE-GAN"], title=f"VAE-GAN reconstructions (posterior mean), step {step}")
    common.save_grid(to01(dec(fixed_z)), os.path.join(run, "samples.png"), nrow=8,
                     title=f"VAE-GAN samples from the prior N(0, I), step {step}")
    order = kl_z.argsort(descending=True)[:10].tolist()  # the 10 latents with the largest KL, largest first
    values = torch.linspace(-3, 3, 9)
    base = mu[0].repeat(len(order), len(values), 1)  # (rows, 9, L)
    for r, j in enumerate(order):
        base[r, :, j] += values.to(base.device)  # ±3 around the posterior mean of latent j
    imgs = to01(dec(base.flatten(0, 1))).view(len(order), len(values), *fixed_x.shape[1:])
    common.save_traversal(imgs, os.path.join(run, "fig14_traversals.png"), values,
                          row_labels=[f"z{j} KL {float(kl_z[j]):.2f}" for j in order],
                          title=f"VAE-GAN traversals of encoded real image 0 (rows by KL), step {step}",
                          xlabel="offset from posterior mean μ_j")
    enc.train(), dec.train()


def load_checkpoint(path, device, flag=""):
    """A checkpoint dict from a checkpoint.pt or its run folder; a one-line error for anything else."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        common.die(f"{flag}{path} is not a checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict):
        common.die(f"{flag}{path} is not a checkpoint (holds a {type(ckpt).__name__})")
    return path, ckpt


@torch.no_grad()
def save_comparison(ckpt_paths, enc, dec, fixed_x, dataset, path, device):
    """real / β-VAE reconstruction(s) / VAE-GAN reconstruction of the same fixed images, from beta_vae.py
    checkpoints. The β-VAE model classes come from the sibling script beta_vae.py (imported only here)."""
    import beta_vae  # noqa: E402  (only for this optional figure)
    enc.eval(), dec.eval()
    rows, labels = [fixed_x], ["real"]
    for p in ckpt_paths:
        p, ckpt = load_checkpoint(p, device, "--compare-with ")
        if ckpt.get("script") != "beta_vae.py" or ckpt["args"]["dataset"] != dataset:
            common.die(f"--compare-with {p} is not a beta_vae.py checkpoint on {dataset}")
        c, s, lat = fixed_x.shape[1], fixed_x.shape[2], ckpt["args"]["latents"]
        b_enc, b_dec = beta_vae.Encoder(c, s, lat).to(device), beta_vae.Decoder(c, s, lat).to(device)
        b_enc.load_state_dict(ckpt["models"]["enc"]), b_dec.load_state_dict(ckpt["models"]["dec"])
        rows.append(torch.sigmoid(b_dec(b_enc(fixed_x)[0])))
        labels.append(f"β-VAE β={ckpt['args']['beta']:g}")
    rows.append(to01(dec(enc(fixed_x * 2 - 1)[0])))
    labels.append("VAE-GAN")
    enc.train(), dec.train()
    lines = []
    for label, rec in zip(labels[1:], rows[1:]):  # pixel MSE; share of grey (neither black nor white) pixels = blur
        mse, grey = float((rec - fixed_x).pow(2).mean()), float(((rec > 0.1) & (rec < 0.9)).float().mean())
        lines.append(f"{label}: MSE {mse:.4f}, grey px {100 * grey:.1f}%")
    common.save_grid(torch.cat(rows), path, nrow=len(fixed_x), row_labels=labels, title="\n".join(lines))
    print(f"comparison {path}: " + "; ".join(lines), flush=True)


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    # ---- seeding ----
    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)  # data order
    device = torch.device(args.device)

    # ---- data (the decoder is tanh: images are mapped to [-1, 1] for training) ----
    data = common.load_data(args.dataset, args.data_root, device)
    channels, size = data.shape[0], data.shape[1]
    steps_per_epoch = len(data) // args.batch_size
    if steps_per_epoch < 1:
        common.die(f"--batch-size {args.batch_size} is larger than the dataset ({len(data)} images)")
    total = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)
    if args.dataset == "sprites":
        eval_x, eval_f = data.eval_set(args.mig_samples, seed=0)
        eval_x = eval_x.to(torch.uint8)
        fixed_x = eval_x[:8].float()  # the same 8 images as beta_vae.py's figures
    else:
        eval_x = eval_f = None
        fixed_x = data.batch(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:8].to(device))[0]

    # ---- models, optimizers (RMSprop as in the paper), fixed noise ----
    enc = Encoder(channels, size, args.latents, args.width).to(device)
    dec = Decoder(channels, size, args.latents, args.width).to(device)
    dis = Discriminator(channels, size, args.width).to(device)
    nets = {"enc": enc, "dec": dec, "dis": dis}
    opts = {k: torch.optim.RMSprop(m.parameters(), lr=args.lr) for k, m in nets.items()}
    fixed = {"z": torch.randn(64, args.latents, generator=torch.Generator().manual_seed(args.seed)).to(device)}
    step = epoch = 0

    # ---- run folder / resume ----
    if args.resume:
        path, ckpt = load_checkpoint(args.resume, device)
        if ckpt.get("script") != "vae_gan.py":
            common.die(f"{path} is a checkpoint of {ckpt.get('script', '?')}, not of vae_gan.py")
        for flag in ("dataset", "latents", "width"):
            if ckpt["args"][flag] != getattr(args, flag):
                common.die(f"{path} was trained with --{flag} {ckpt['args'][flag]}, not {getattr(args, flag)}")
        try:
            for k, m in nets.items():
                m.load_state_dict(ckpt["models"][k])
        except RuntimeError as e:
            common.die(f"{path} does not fit this model ({str(e).splitlines()[0]})")
        for k, o in opts.items():
            o.load_state_dict(ckpt["optims"][k])
        step, epoch, fixed = ckpt["step"], ckpt["epoch"], ckpt["fixed"]
        torch.set_rng_state(ckpt["rng"]), data_gen.set_state(ckpt["data_rng"])
        run = os.path.dirname(os.path.abspath(path))
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run = os.path.join(args.out, f"vae_gan__{args.dataset}__s{args.seed}__{stamp}")
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.json"), "w") as f:
            json.dump({**vars(args), "torch": torch.__version__,
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, f, indent=1)
    print(f"run folder: {run}", flush=True)
    metrics_csv = os.path.join(run, "metrics.csv")

    def record(seconds, n_steps, sums):
        """Metrics row (means since the last row), figures and checkpoint."""
        s = (sums / max(n_steps, 1)).tolist()  # host sync, only here
        row = {"epoch": epoch, "step": step, "seconds": round(seconds, 2), "steps_per_s": n_steps / max(seconds, 1e-9),
               "loss_d": s[0], "loss_dec": s[1], "llike": s[2], "kl": s[3],
               **{f"kl_z{j}": s[4 + j] for j in range(args.latents)}}
        row["mig"] = mig(encode_means(enc, eval_x), eval_f.cpu(), data.SIZES) if eval_x is not None else float("nan")
        common.append_metrics(metrics_csv, row)
        save_figures(enc, dec, fixed_x, fixed["z"], sums[4:] / max(n_steps, 1), run, step)
        common.plot_metrics(metrics_csv, [f"kl_z{j}" for j in range(min(args.latents, 10))],
                            os.path.join(run, "fig15_kl_per_latent.png"), x="step",
                            title="mean KL per latent (first 10 latents)", ylabel="KL (nats)")
        common.plot_metrics(metrics_csv, ["loss_d", "loss_dec", "llike", "kl"], os.path.join(run, "losses.png"),
                            x="step", logy=True, title="VAE-GAN losses")
        ckpt = {"script": "vae_gan.py", "args": vars(args), "models": {k: m.state_dict() for k, m in nets.items()},
                "optims": {k: o.state_dict() for k, o in opts.items()}, "step": step, "epoch": epoch, "fixed": fixed,
                "rng": torch.get_rng_state(), "data_rng": data_gen.get_state()}
        torch.save(ckpt, os.path.join(run, "checkpoint.pt.tmp"))
        os.replace(os.path.join(run, "checkpoint.pt.tmp"), os.path.join(run, "checkpoint.pt"))
        return row

    # ---- training loop ----
    names = ("loss_d", "loss_dec", "llike", "kl")
    hist = torch.zeros(args.log_every, 4, device=device)
    sums = torch.zeros(4 + args.latents, device=device)  # the 4 losses and kl_z* summed since the last metrics row
    t_start = t_row = t_log = time.time()
    n_row, step0, step_log, row = 0, step, step, None
    while step < total:
        # a resumed run starts a fresh pass over the data, shortened to the rest of its epoch
        left_in_epoch = steps_per_epoch - (step - epoch * steps_per_epoch)
        for i, (x, _) in enumerate(data.epoch(args.batch_size, data_gen)):
            if i >= left_in_epoch or step >= total:
                break
            losses = train_step(enc, dec, dis, opts, x * 2 - 1, args.beta, args.gamma)
            hist[step % args.log_every] = torch.stack(losses[:4])
            sums += torch.cat([torch.stack(losses[:4]), losses[4]])
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
                print(f"epoch {epoch + 1}/{args.epochs}  step {step}/{total}  loss_d {m[0]:.3f}  loss_dec {m[1]:.3f}  "
                      f"llike {m[2]:.1f}  kl {m[3]:.2f}  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s",
                      flush=True)
                t_log, step_log = now, step
            if end_of_epoch:
                epoch += 1
            if end_of_epoch or step == total or (args.eval_every and step % args.eval_every == 0):
                t_rec = time.time()
                row = record(t_rec - t_row, n_row, sums)
                t_log += time.time() - t_rec  # evaluation time does not count in steps/s
                print(f"  metrics at step {step}: llike {row['llike']:.1f}  kl {row['kl']:.2f}  mig {row['mig']:.4f}",
                      flush=True)
                sums.zero_()
                n_row, t_row = 0, time.time()
    if row is None:  # a resumed run with nothing left to train: redraw the figures, add no metrics row
        row = common.read_metrics(metrics_csv)[-1]
        save_figures(enc, dec, fixed_x, fixed["z"], torch.tensor([row[f"kl_z{j}"] for j in range(args.latents)]), run, step)
    if args.compare_with:
        save_comparison(args.compare_with, enc, dec, fixed_x, args.dataset,
                        args.compare_out or os.path.join(run, "vae_gan_vs_beta_vae.png"), device)
    wall = time.time() - t_start
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MiB" if device.type == "cuda" else ""
    print(f"done: {step - step0} steps in {wall:.1f} s ({(step - step0) / max(wall, 1e-9):.1f} steps/s){mem}, "
          f"final mig {row['mig']:.4f}, run folder {run}", flush=True)


if __name__ == "__main__":
    main()
