"""β-VAE: report §IV (the per-latent KL of Fig. 15; traversals of encoded real images, as in Fig. 14).

Higgins et al. 2017, "β-VAE: Learning basic visual concepts with a constrained variational framework" (ICLR),
with the 64x64 conv nets of disentanglement_lib (Locatello et al. 2019, the β-VAE baselines of dSprites), and
smaller ones for 28x28 MNIST; β = 1 is the plain VAE. Each epoch, on fixed images: each latent's KL and, on sprites
(dSprites' factor layout), MIG (Chen et al. 2018, as in disentanglement_lib).

    python beta_vae.py --device cpu --beta 4 --steps 4500   # the README's runs (and --beta 1): metrics at the end
    python beta_vae.py --device cpu --beta 4 --epochs 9 --epoch-steps 500   # metrics every 500 steps (each a new order)
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

SCRIPT = "beta_vae.py"
LOSSES = ("loss", "recon", "kl")  # what train_step returns, in this order
DEFAULTS = {"sprites": dict(
    epochs=26,  # 26 passes of 11,520 steps: about disentanglement_lib's 300,000 β-VAE steps on dSprites
    epoch_steps=0,  # an epoch is one pass over the 737,280 factor combinations
    batch_size=64, lr=5e-4,  # disentanglement_lib's batch size; Burgess et al.'s (2018) Adam learning rate
    beta=4.0, latents=10,  # Higgins et al.'s for dSprites
    mig_samples=10000)}  # MIG on 10,000 fixed images, as disentanglement_lib measures it
DEFAULTS.update({d: {**DEFAULTS["sprites"], "epochs": 20} for d in ("mnist", "celeba")})  # 20 passes: no paper run to follow


def add_flags(p):
    p.add_argument("--beta", type=float, help="weight β of the KL term; 1 = the plain VAE (default: %(default)s)")
    p.add_argument("--latents", type=int, help="latent dimensions (default: %(default)s)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--mig-samples", type=int, help="fixed sprites for MIG, the first 2,000 also for the KL (default: %(default)s images)")


def check_flags(a):
    need(0 < a.beta < math.inf and 0 < a.lr < math.inf, f"--beta and --lr must be finite and > 0 (got {a.beta}, {a.lr})")
    need(1 <= a.latents <= 1000 and 8 <= a.mig_samples <= 100000,
         f"--latents must be in 1-1000 and --mig-samples in 8-100000 (got {a.latents}, {a.mig_samples})")


# ---- Models (disentanglement_lib's): q(z|x) = N(μ(x), diag σ²(x)); p(x|z) Bernoulli or Gaussian, from logits ---------------
def conv_encoder(channels, size, latents):
    """64x64: conv 32, 32, 64, 64 (4x4, stride 2, ReLU), FC 256, FC [μ, log σ²]; 28x28: conv 32, 64, FC 256, FC [μ, log σ²]."""
    w, s = ((channels, 32, 32, 64, 64), 4) if size == 64 else ((channels, 32, 64), 7)  # s: the last conv's size
    return nn.Sequential(*[m for a, b in zip(w, w[1:]) for m in (nn.Conv2d(a, b, 4, 2, 1), nn.ReLU())],
                         nn.Flatten(), nn.Linear(w[-1] * s * s, 256), nn.ReLU(), nn.Linear(256, 2 * latents))


def conv_decoder(channels, size, latents):
    """The encoder mirrored: FC 256, FC 64·s·s, transposed convs 4x4 stride 2 with ReLUs between; (B, L) -> logits."""
    w, s = ((64, 64, 32, 32, channels), 4) if size == 64 else ((64, 32, channels), 7)
    return nn.Sequential(nn.Linear(latents, 256), nn.ReLU(), nn.Linear(256, 64 * s * s), nn.ReLU(), nn.Unflatten(1, (64, s, s)),
                         *[m for a, b in zip(w, w[1:]) for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU())][:-1])


# ---- Losses and metrics ---------------------------------------------------------------------------------------------
def reconstruction_loss(logits, x, likelihood):
    """−log p(x|z): bernoulli (binary sprites, grey MNIST) or gaussian with σ² = ½, constant dropped (colour CelebA)."""
    if likelihood == "bernoulli":  # Σ_pixels BCE(x, sigmoid(logits)), / B
        return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]
    return nn.functional.mse_loss(torch.sigmoid(logits), x, reduction="sum") / x.shape[0]  # Σ_pixels (sigmoid(logits) − x)², / B


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


# ---- ALGO LOGIC: one training step ----------------------------------------------------------------------------------
def train_step(nets, opts, x, args):
    """One Adam step on a batch x (B, C, H, W) in [0, 1]. Returns detached (loss, recon, kl)."""
    # ---- encoder and decoder step: one loss, one optimizer over both ----
    mu, logvar = nets["enc"](x).chunk(2, dim=1)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation: z = μ + σ ε, ε ~ N(0, I)
    recon = reconstruction_loss(nets["dec"](z), x, "gaussian" if x.shape[1] == 3 else "bernoulli")
    kl = kl_per_latent(mu, logvar).sum()  # KL(q(z|x) ‖ N(0, I)): summed over the latents, mean over the batch
    # the β-VAE objective (Higgins et al.), negated and batch-averaged: loss = −E_q[log p(x|z)] + β KL(q(z|x) ‖ p(z))
    loss = recon + args.beta * kl
    opts["opt"].zero_grad(set_to_none=True)
    loss.backward()
    opts["opt"].step()
    return torch.stack([loss, recon, kl]).detach()


# ---- Setup, evaluation, figures -------------------------------------------------------------------------------------
def build(args, shape):
    """Encoder, decoder and one Adam over both."""
    enc, dec = (f(shape[0], shape[1], args.latents).to(args.device) for f in (conv_encoder, conv_decoder))
    return {"enc": enc, "dec": dec}, {"opt": torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=args.lr)}


def setup(args):
    """Images in [0, 1] (the decoder's sigmoid), the fixed evaluation images and the figures' 64 prior samples."""
    data = common.load_data(args.dataset, args.data_root, torch.device(args.device))
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
    enc.eval(), dec.eval()
    x = ctx["x"][:8].float()
    mu = enc(x).chunk(2, dim=1)[0]
    rec = torch.sigmoid(dec(mu))
    mse, grey = recon_quality(x, rec)
    common.save_grid(torch.cat([x, rec]), path("reconstructions.png"), nrow=8, row_labels=["real", "β-VAE"],
                     title=f"β-VAE reconstructions (posterior mean), step {run.step}\npixel MSE {mse:.4f}, grey pixels {grey:.1f}%")
    common.save_grid(torch.sigmoid(dec(ctx["z"])), path("samples.png"), nrow=8, title=f"β-VAE prior samples, step {run.step}")
    order, values = sorted(range(args.latents), key=lambda j: -run.row[f"kl_z{j}"])[:10], torch.linspace(-3, 3, 9)
    z = mu[0] + torch.eye(args.latents, device=mu.device)[order, None] * values.to(mu.device)[:, None]  # row r moves z_order[r]
    common.save_traversal(torch.sigmoid(dec(z.flatten(0, 1))).view(len(order), 9, *x.shape[1:]), path("fig14_traversals.png"),
                          values, row_labels=[f"z{j} KL {run.row[f'kl_z{j}']:.2f}" for j in order], xlabel="offset from μ_j",
                          title=f"β-VAE: ±3 around μ(fixed image 0), rows by KL, step {run.step}")
    enc.train(), dec.train()
    common.plot_metrics(path("metrics.csv"), [f"kl_z{j}" for j in order], path("fig15_kl_per_latent.png"), x="step", ylabel="KL (nats)")
    common.plot_metrics(path("metrics.csv"), list(LOSSES), path("losses.png"), x="step", logy=True, title="β-VAE losses")


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
