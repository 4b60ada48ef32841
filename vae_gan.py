"""VAE-GAN: report §IV, Fig. 13 (encoder, decoder = generator, discriminator); traversals of encoded images (Fig. 14).

Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric" (ICML; arXiv:1512.09300): the
pixel reconstruction term becomes a Gaussian likelihood of the discriminator's l-th layer features; reconstructions
and prior samples are both GAN fakes; --beta weighs the prior (KL) term, as in the report. The paper's 64x64 nets
(channel widths × --width) and smaller ones for 28x28. Each epoch, on fixed images: each latent's KL and, on sprites,
MIG (Chen et al. 2018); reconstructions.png: beta_vae.py's 8 fixed sprites, titled with pixel MSE and % grey pixels.

    python vae_gan.py --device cpu --latents 10 --width 0.125 --batch-size 32 --steps 2500   # the README's run
"""
import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.nn as nn

import common

SCRIPT = "vae_gan.py"
LOSSES = ("loss_d", "loss_dec", "llike", "kl")  # what train_step returns, in this order
DEFAULTS = {"sprites": dict(
    epochs=26,  # as beta_vae.py: 26 passes of 11,520 steps, about disentanglement_lib's 300,000 steps on dSprites
    epoch_steps=0,  # an epoch is one pass over the 737,280 factor combinations
    batch_size=64,  # as beta_vae.py, for the same images per step
    lr=3e-4,  # Larsen et al.'s RMSprop learning rate
    latents=128, width=1.0,  # Larsen et al.'s latents and channel widths (the README's CPU run: 10 and 0.125)
    beta=1.0,  # 1 = Larsen et al.'s prior term; the report's β weighs it
    gamma=1e-2,  # ours (the paper gives no value): at the README's scale γ·llike starts near 17, the GAN term near 2
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib measures it
DEFAULTS.update({d: {**DEFAULTS["sprites"], "epochs": 20} for d in ("mnist", "celeba")})  # 20 passes: no paper run to follow


def add_flags(p):
    p.add_argument("--beta", type=float, help="weight β of the prior (KL) term in the encoder's loss (default: %(default)s)")
    p.add_argument("--gamma", type=float, help="weight γ of the feature likelihood in the decoder's loss (default: %(default)s)")
    p.add_argument("--latents", type=int, help="latent dimensions (default: %(default)s)")
    p.add_argument("--width", type=float, help="multiplier of the paper's channel widths; < 1 for CPU runs (default: %(default)s)")
    p.add_argument("--lr", type=float, help="RMSprop learning rate of all three networks (default: %(default)s)")
    p.add_argument("--mig-samples", type=int, help="fixed sprites for MIG, the first 2,000 also for the KL (default: %(default)s images)")


def check_flags(a):
    need(all(0 < v < math.inf for v in (a.beta, a.gamma, a.lr)) and 0 < a.width <= 4,
         f"--beta, --gamma, --lr must be finite and > 0 and --width in (0, 4] (got {a.beta}, {a.gamma}, {a.lr}, {a.width})")
    need(1 <= a.latents <= 1000 and 8 <= a.mig_samples <= 100000,
         f"--latents must be in 1-1000 and --mig-samples in 8-100000 (got {a.latents}, {a.mig_samples})")


# ---- Models (Larsen et al.: 5x5 convs, BatchNorm, ReLU; ↓/↑ = stride 2). Images in [-1, 1] --------------------------
def block(c_in, c_out, down=True):
    """5x5 conv ↓ (or transposed conv ↑), stride 2, BatchNorm, ReLU."""
    conv = nn.Conv2d(c_in, c_out, 5, 2, 2) if down else nn.ConvTranspose2d(c_in, c_out, 5, 2, 2, output_padding=1)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


def widths(size, w):
    """Channel widths (encoder, decoder, discriminator convs) of the paper's 64x64 nets × w, or of our 28x28 nets."""
    r = lambda c: max(8, int(round(c * w)))  # noqa: E731
    if size == 64:
        return [r(64), r(128), r(256)], [r(256), r(128), r(32)], [r(32), r(128), r(256), r(256)]
    return [r(64), r(128)], [r(128), r(64)], [r(32), r(64), r(128)]


def larsen_encoder(channels, size, latents, w):
    """64x64: 64↓, 128↓, 256↓, FC 2048 (BN, ReLU), FC [μ, log σ²] (B, 2·latents); 28x28: 64↓, 128↓, FC 512, FC."""
    enc, s, fc = widths(size, w)[0], size // 8 if size == 64 else size // 4, max(64, int((2048 if size == 64 else 512) * w))
    layers = [m for c_in, c_out in zip([channels] + enc, enc) for m in block(c_in, c_out)]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(enc[-1] * s * s, fc), nn.BatchNorm1d(fc), nn.ReLU(), nn.Linear(fc, 2 * latents))


def larsen_decoder(channels, size, latents, w):
    """64x64: FC 8·8·256 (BN, ReLU), 256↑, 128↑, 32↑, conv 5x5 to C, tanh; 28x28: FC 7·7·128, 128↑, 64↑, conv, tanh."""
    dec = widths(size, w)[1]
    c, s = dec[0], size // 2 ** len(dec)  # 256 x 8 x 8 (64x64) or 128 x 7 x 7 (28x28)
    return nn.Sequential(nn.Linear(latents, c * s * s), nn.BatchNorm1d(c * s * s), nn.ReLU(), nn.Unflatten(1, (c, s, s)),
                         *[m for c_in, c_out in zip([c] + dec[:-1], dec) for m in block(c_in, c_out, down=False)],
                         nn.Conv2d(dec[-1], channels, 5, 1, 2), nn.Tanh())


class LarsenDiscriminator(nn.Module):
    """64x64: conv 32 (ReLU), 128↓, 256↓, 256↓ (= Dis_l, 8x8), FC 512 (BN, ReLU), FC 1;
    28x28: conv 32, 64↓, 128↓ (= Dis_l, 7x7), FC 256, FC 1. Returns (logit (B,), Dis_l features (B, F))."""

    def __init__(self, channels, size, w):
        super().__init__()
        dis = widths(size, w)[2]
        layers = [nn.Conv2d(channels, dis[0], 5, 1, 2), nn.ReLU(), *[m for a, b in zip(dis, dis[1:]) for m in block(a, b)]]
        self.features = nn.Sequential(*layers[:-1])  # Dis_l: the last conv block after BN, before its ReLU
        s, fc = size // 2 ** (len(dis) - 1), max(64, int((512 if size == 64 else 256) * w))
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(dis[-1] * s * s, fc), nn.BatchNorm1d(fc),
                                  nn.ReLU(), nn.Linear(fc, 1))

    def forward(self, x):
        f = self.features(x)
        return self.head(f).squeeze(1), f.flatten(1)


# ---- Losses and metrics ---------------------------------------------------------------------------------------------
def feature_nll(f_rec, f_real):
    """L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I) without its constant."""
    # ½ Σ_features (Dis_l(x̃) − Dis_l(x))², summed over the features, mean over the batch
    return 0.5 * (f_rec - f_real).pow(2).sum() / f_rec.shape[0]


def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) of each latent j, mean over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1), mean over the batch
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def mig(codes, factors, sizes, bins=20):
    """Mutual Information Gap (Chen et al. 2018) as in disentanglement_lib: each code (N, L) cut into `bins` equal bins
    over its range; per factor (N, K), (largest − second largest MI with a code) / H(factor); mean over the factors."""
    lo, hi = codes.min(0).values, codes.max(0).values
    binned = ((codes - lo) / (hi - lo).clamp_min(1e-12) * bins).long().clamp(0, bins - 1)  # (N, L)
    plogq = lambda p, q: torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))  # noqa: E731  p log(p/q), 0 at p = 0
    gaps = []
    for k, size in enumerate(sizes):
        f = factors[:, k].long()  # p(b, f): each code's bins b against the factor's values f, (L, bins, size)
        joint = torch.stack([torch.bincount(b * size + f, minlength=bins * size) for b in binned.T]).view(-1, bins, size).double() / len(f)
        p_b, p_f = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
        h_f = -plogq(p_f[0], 1).sum()  # H(f) = −Σ_f p(f) log p(f), nats
        mi = plogq(joint, p_b * p_f).sum((1, 2)).sort(descending=True).values  # I(b; f) = Σ p(b, f) log p(b, f) / p(b) p(f)
        if h_f > 0:  # a constant factor carries no information (disentanglement_lib drops it too)
            gaps.append((mi[0] - (mi[1] if len(mi) > 1 else 0)) / h_f)
    return float(torch.stack(gaps).mean())


def fixed_images(data, args):
    """Fixed images as the encoder takes them, and factors: sprites' eval_set (binary: int8), else 1,000 training images."""
    if args.dataset == "sprites":
        x, factors = data.eval_set(args.mig_samples, seed=0)
        return x.to(torch.int8), factors.cpu()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[:1000]
    return data.batch(idx.to(data.images.device))[0], None


@torch.no_grad()
def encode_posterior(enc, images, chunk=1000):
    """μ(x), log σ²(x) (N, L) on the CPU, in chunks, the encoder in eval mode (BatchNorm's running statistics)."""
    was, _ = enc.training, enc.eval()
    out = torch.cat([enc(images[i:i + chunk].float()) for i in range(0, len(images), chunk)]).cpu()
    enc.train(was)
    return out.chunk(2, dim=1)


def recon_quality(x, rec):
    """Pixel MSE of reconstructions rec against images x (both in [0, 1]) and the % of grey reconstructed pixels."""
    # MSE: mean over images, channels, pixels of (rec − x)²; grey: 100 · share of 0.1 < rec < 0.9 (blur, in binary images)
    return float((rec - x).pow(2).mean()), 100 * float(((rec > 0.1) & (rec < 0.9)).float().mean())


# ---- ALGO LOGIC: one training step (Larsen et al.'s Algorithm 1) ----------------------------------------------------
def train_step(nets, opts, x, args):
    """One step on a batch x (B, C, H, W) in [-1, 1]. Returns detached (loss_d, loss_dec, llike, kl)."""
    enc, dec, dis = nets["enc"], nets["dec"], nets["dis"]
    # ---- forward pass: encode, decode, and the discriminator on real images, reconstructions, prior samples ----
    mu, logvar = enc(x).chunk(2, dim=1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # z ~ q(z|x) by reparameterisation
    x_rec = dec(z)  # x̃ = Dec(z), z ~ Enc(x)
    x_p = dec(torch.randn_like(mu))  # x_p = Dec(z_p), z_p ~ N(0, I)
    (d_real, f_real), (d_rec, f_rec), (d_p, _) = dis(x), dis(x_rec), dis(x_p)
    ones, zeros, bce = torch.ones_like(d_real), torch.zeros_like(d_real), nn.functional.binary_cross_entropy_with_logits
    # L_prior = KL(q(z|x) ‖ p(z)), summed over the latents, mean over the batch (Larsen et al. §2)
    kl = kl_per_latent(mu, logvar).sum()
    # L_llike^Dis_l = −E_q[log p(Dis_l(x) | z)]; the real features are a fixed target
    llike = feature_nll(f_rec, f_real.detach())
    # L_GAN = log Dis(x) + log(1 − Dis(x̃)) + log(1 − Dis(x_p)); loss_d = −L_GAN: three BCEs, each a mean over the batch
    loss_d = bce(d_real, ones) + bce(d_rec, zeros) + bce(d_p, zeros)
    # deviation: the decoder's −L_GAN is the non-saturating −log Dis(x̃) − log Dis(x_p) (each a mean over the batch;
    # Goodfellow et al. 2014) in place of log(1 − Dis(x̃)) + log(1 − Dis(x_p)), whose gradient vanishes while Dis wins
    loss_g = bce(d_rec, ones) + bce(d_p, ones)
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    # ---- encoder step: β·L_prior + L_llike^Dis_l ----
    (args.beta * kl + llike).backward(inputs=list(enc.parameters()), retain_graph=True)
    # ---- decoder (generator) step: γ·L_llike^Dis_l − L_GAN ----
    loss_dec = args.gamma * llike + loss_g
    loss_dec.backward(inputs=list(dec.parameters()), retain_graph=True)
    # ---- discriminator step: −L_GAN ----
    loss_d.backward(inputs=list(dis.parameters()))
    for o in opts.values():  # all three gradients were taken at the same parameters, as in Algorithm 1
        o.step()
    return torch.stack([loss_d, loss_dec, llike, kl]).detach()


# ---- Setup, evaluation, figures -------------------------------------------------------------------------------------
def build(args, shape):
    """Encoder, decoder, discriminator, and one RMSprop each (Larsen et al.)."""
    c, size, device = shape[0], shape[1], torch.device(args.device)
    nets = {k: f(c, size, args.latents, args.width).to(device) for k, f in (("enc", larsen_encoder), ("dec", larsen_decoder))}
    nets["dis"] = LarsenDiscriminator(c, size, args.width).to(device)
    return nets, {f"{k}_opt": torch.optim.RMSprop(m.parameters(), lr=args.lr) for k, m in nets.items()}


def setup(args):
    """Images in [-1, 1] (the decoder's tanh), the fixed evaluation images and the figures' 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, torch.device(args.device), signed=True)
    z = torch.randn(64, args.latents, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    return data, dict(zip(("x", "factors"), fixed_images(data, args)), sizes=getattr(data, "SIZES", None), z=z)


def evaluate(nets, ctx, args):
    """KL of each latent on the fixed images (sprites: the first 2,000) and, on sprites, MIG on all of them."""
    mu, logvar = encode_posterior(nets["enc"], ctx["x"])
    row = {f"kl_z{j}": v for j, v in enumerate(kl_per_latent(mu[:2000], logvar[:2000]).tolist())}
    return {**row, "mig": mig(mu, ctx["factors"], ctx["sizes"]) if ctx["factors"] is not None else math.nan}


@torch.no_grad()
def save_figures(nets, ctx, run, args):
    """reconstructions.png, samples.png, fig14_traversals.png (image 0, latents by KL), fig15_kl_per_latent.png, losses.png."""
    enc, dec, path = nets["enc"], nets["dec"], lambda name: os.path.join(run.dir, name)  # noqa: E731
    enc.eval(), dec.eval()  # BatchNorm's running statistics
    x = ctx["x"][:8].float()
    mu = enc(x).chunk(2, dim=1)[0]
    real, rec = (x + 1) / 2, (dec(mu) + 1) / 2  # [-1, 1] -> [0, 1]
    mse, grey = recon_quality(real, rec)
    common.save_grid(torch.cat([real, rec]), path("reconstructions.png"), nrow=8, row_labels=["real", "VAE-GAN"],
                     title=f"VAE-GAN reconstructions (posterior mean), step {run.step}\npixel MSE {mse:.4f}, grey pixels {grey:.1f}%")
    common.save_grid((dec(ctx["z"]) + 1) / 2, path("samples.png"), nrow=8, title=f"VAE-GAN prior samples, step {run.step}")
    order, values = sorted(range(args.latents), key=lambda j: -run.row[f"kl_z{j}"])[:10], torch.linspace(-3, 3, 9)
    z = mu[0] + torch.eye(args.latents, device=mu.device)[order, None] * values.to(mu.device)[:, None]  # row r moves z_order[r]
    common.save_traversal((dec(z.flatten(0, 1)) + 1).view(len(order), 9, *x.shape[1:]) / 2, path("fig14_traversals.png"),
                          values, row_labels=[f"z{j} KL {run.row[f'kl_z{j}']:.2f}" for j in order], xlabel="offset from μ_j",
                          title=f"VAE-GAN: ±3 around μ(fixed image 0), rows by KL, step {run.step}")
    enc.train(), dec.train()
    common.plot_metrics(path("metrics.csv"), [f"kl_z{j}" for j in order], path("fig15_kl_per_latent.png"), x="step", ylabel="KL (nats)")
    common.plot_metrics(path("metrics.csv"), list(LOSSES), path("losses.png"), x="step", logy=True, title="VAE-GAN losses")


def main(argv=None):
    train(parse_args(argv))


# ================================================================================================
# PLUMBING — the same text in every script (a test checks it); a reader beside the report may skip it. The shared
# flags; a run's folder, checkpoint, resume, data order, progress line and NaN check; the loop that calls the hooks.
RUN_FLAGS = ("device", "data_root", "epochs", "steps", "out", "resume", "log_every")  # may change on --resume


def parse_args(argv=None):
    """The shared flags, then the script's own (add_flags), with the defaults of DEFAULTS[--dataset]."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", choices=tuple(DEFAULTS), default=tuple(DEFAULTS)[0])
    dataset = pre.parse_known_args(argv)[0].dataset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"(defaults of --dataset {dataset})")
    p.add_argument("--dataset", choices=tuple(DEFAULTS), help="training data (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw or img_align_celeba (default: %(default)s)")
    p.add_argument("--out", default="runs", help="parent folder of the run folder (default: %(default)s)")
    p.add_argument("--resume", help="checkpoint.pt or run folder to continue (default: none)")
    numbers = (("seed", 1, 0, 2 ** 31, "seed of the weights, data order and noise"), ("epochs", None, 1, 10 ** 6, "training epochs"),
               ("epoch-steps", None, 0, 10 ** 9, "steps per epoch, 0 = a pass over the data; metrics, figures, checkpoint "
                "at each epoch's end"), ("steps", None, 1, 10 ** 9, "stop after this many steps in all; none = no cap"),
               ("batch-size", None, 2, 4096, "samples per step"), ("log-every", 100, 1, 10 ** 9, "steps between progress lines"))
    for flag, default, _, _, text in numbers:
        p.add_argument("--" + flag, type=int, default=default, help=text + " (default: %(default)s)")
    add_flags(p)
    pre.error = p.error = lambda message: common.die(message)  # argparse's own errors: one line, exit status 1 too
    p.set_defaults(dataset=dataset, **DEFAULTS[dataset])
    args = p.parse_args(argv)
    for flag, _, low, high, _ in numbers:
        value = getattr(args, flag.replace("-", "_"))
        need(value is None or low <= value <= high, f"--{flag} must be between {low} and {high} (got {value})")
    need(args.device in ("cpu", "cuda") or args.device[5:].isdigit() and args.device.startswith("cuda:"),
         f"--device {args.device} is not a device here; use cpu or cuda")
    need(args.device == "cpu" or int(args.device[5:] or 0) < torch.cuda.device_count(), f"--device {args.device}: no such CUDA "
         "GPU here; use --device cpu")
    need(not os.path.isfile(args.out), f"--out {args.out} is a file; give a folder")
    check_flags(args)
    return args


def need(ok, message):  # stop with a one-line error (no traceback) unless ok
    if not ok:
        common.die(message)


def load_checkpoint(args):
    """A checkpoint of this script with the same experiment flags, loaded without running any code in it."""
    path = os.path.join(args.resume, "checkpoint.pt") if os.path.isdir(args.resume) else args.resume
    try:  # weights_only: tensors, numbers, strings and containers of them; a pickle that would run code is refused
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        common.die(f"{path} is not a checkpoint this project can load safely ({type(e).__name__})" if os.path.exists(path)
                   else f"--resume {path}: no such file or folder")
    need(isinstance(ckpt, dict) and ckpt.get("script") == SCRIPT, f"{path} is not a checkpoint of {SCRIPT}")
    need(all(key in ckpt for key in ("args", "step", "seconds", "models", "optims", "rng")), f"{path} is not a complete checkpoint")
    for flag in sorted(set(vars(args)) | set(ckpt["args"])):
        need(flag in RUN_FLAGS or vars(args).get(flag) == ckpt["args"].get(flag), f"--{flag.replace('_', '-')} is "
             f"{vars(args).get(flag)} but {path} was trained with {ckpt['args'].get(flag)}; resume with the same value")
    return path, ckpt


class Run:
    """One run's folder (config.json, metrics.csv, checkpoint.pt), its data order, resume (bit for bit from
    where the last checkpoint stopped), progress lines and NaN check."""

    def __init__(self, args, nets, opts):
        self.args, self.nets, self.opts, self.device = args, nets, opts, torch.device(args.device)
        self.step, self.seconds, self.data_gen = 0, 0.0, torch.Generator().manual_seed(args.seed)
        if args.resume:
            path, ckpt = load_checkpoint(args)
            try:
                for part, group in (("models", nets), ("optims", opts)):
                    for name, module in group.items():
                        module.load_state_dict(ckpt[part][name])
                torch.set_rng_state(ckpt["rng"]["torch"])
                self.data_gen.set_state(ckpt["rng"]["data"])
                if self.device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                    torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                common.die(f"{path} does not fit these networks ({type(e).__name__}); resume with the flags it was made with")
            self.dir, self.step, self.seconds = os.path.dirname(os.path.abspath(path)), ckpt["step"], ckpt["seconds"]
            common.truncate_metrics(os.path.join(self.dir, "metrics.csv"), self.step)
        else:
            k = f"__k{args.k}{'-first-order' * vars(args).get('first_order', False)}" if "k" in vars(args) else ""
            self.dir = os.path.join(args.out, f"{SCRIPT[:-3]}__{args.dataset}{k}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                os.makedirs(self.dir)
                with open(os.path.join(self.dir, "config.json"), "w") as f:
                    json.dump({**vars(args), "torch": torch.__version__, "device_name": torch.cuda.get_device_name(
                        self.device) if self.device.type == "cuda" else "cpu"}, f, indent=1)
            except OSError as e:
                common.die(f"cannot write the run folder {self.dir} ({e.strerror}); choose another --out")
        print(f"run folder {self.dir} ({f'resumed at step {self.step}' if args.resume else 'new run'})", flush=True)
        self.first, self.t_start = self.step, time.time()

    def batches(self, data):
        """The training batches, epoch after epoch, from where a resumed run stopped to --epochs or --steps."""
        full = data.steps_per_epoch(self.args.batch_size)
        self.per_epoch = min(full, self.args.epoch_steps or full)
        need(self.per_epoch > 0, f"--batch-size {self.args.batch_size} is larger than the training set")
        self.total = min(self.args.epochs * self.per_epoch, self.args.steps or 10 ** 18)
        self.bad = torch.full((len(LOSSES),), -1, device=self.device)  # the first step at which a loss was not finite
        while self.step < self.total:
            self.epoch_rng = self.data_gen.get_state()  # this epoch's order is drawn from it (saved for resume)
            self.sums = self.epoch_sums = self.epoch_n = 0
            self.line_step, self.t_line, self.t_epoch, skip = self.step, time.time(), time.time(), self.step % self.per_epoch
            for i, batch in enumerate(itertools.islice(data.epoch(self.args.batch_size, self.data_gen), self.per_epoch)):
                if i >= skip:
                    self.epoch_end = i + 1 == self.per_epoch or self.step + 1 == self.total
                    yield batch
                    if self.step == self.total:
                        return

    def log(self, losses):
        """Count a step, add its losses (no host sync); every --log-every steps: NaN check, progress. True at an epoch's end."""
        self.step, self.epoch_n = self.step + 1, self.epoch_n + 1
        self.sums, self.epoch_sums = self.sums + losses, self.epoch_sums + losses
        self.bad = torch.where((self.bad < 0) & ~torch.isfinite(losses), self.step, self.bad)
        if self.step % self.args.log_every == 0 or self.epoch_end:
            for name, at in zip(LOSSES, self.bad.tolist()):
                need(at < 0, f"{name} became NaN or infinite at step {at}; lower the learning rate or check the data")
            rate = (self.step - self.line_step) / max(time.time() - self.t_line, 1e-9)
            means, eta = (self.sums / (self.step - self.line_step)).tolist(), (self.total - self.step) / max(rate, 1e-9)
            print(f"epoch {math.ceil(self.step / self.per_epoch)}/{self.args.epochs}  step {self.step}/{self.total}  "
                  + "  ".join(f"{name} {v:.3f}" for name, v in zip(LOSSES, means))
                  + f"  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
            self.sums, self.line_step, self.t_line = 0, self.step, time.time()
        self.train_seconds = time.time() - self.t_epoch  # read at an epoch's end: training only, no evaluation
        return self.epoch_end

    def save(self, row):
        """At an epoch's end: a metrics.csv row (mean losses, speed, evaluation), then the checkpoint, atomically."""
        self.row = {"epoch": round(self.step / self.per_epoch, 3), "step": self.step, "steps_per_s": self.epoch_n /
                    self.train_seconds, "seconds": round(self.seconds + time.time() - self.t_start, 1),  # over resumes too
                    **dict(zip(LOSSES, (self.epoch_sums / self.epoch_n).tolist())), **row}
        common.append_metrics(os.path.join(self.dir, "metrics.csv"), self.row)
        rng = {"torch": torch.get_rng_state(), "data": self.epoch_rng if self.step % self.per_epoch else self.data_gen.get_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        torch.save({"script": SCRIPT, "args": vars(self.args), "step": self.step, "seconds": self.row["seconds"], "rng": rng,
                    "models": {k: m.state_dict() for k, m in self.nets.items()},
                    "optims": {k: o.state_dict() for k, o in self.opts.items()}}, os.path.join(self.dir, "checkpoint.tmp"))
        os.replace(os.path.join(self.dir, "checkpoint.tmp"), os.path.join(self.dir, "checkpoint.pt"))


def train(args):
    """One run: data, networks; per step train_step; per epoch an evaluation row, a checkpoint and figures."""
    torch.manual_seed(args.seed)  # the weights and the training noise
    data, ctx = setup(args)
    nets, opts = build(args, data.shape)
    run = Run(args, nets, opts)
    for x, _ in run.batches(data):
        if run.log(train_step(nets, opts, x, args)):  # True at each epoch's end
            run.save(evaluate(nets, ctx, args))
            save_figures(nets, ctx, run, args)
    wall, n = time.time() - run.t_start, run.step - run.first
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated(run.device) / 2 ** 20:.0f} MiB" if run.device.type == "cuda" else ""
    print(f"done: {n} steps in {wall:.1f} s ({n / max(wall, 1e-9):.2f} steps/s){peak}, run folder {run.dir}", flush=True)
    return run.dir
# ==================================== (end of the plumbing) ====================================


if __name__ == "__main__":
    main()
