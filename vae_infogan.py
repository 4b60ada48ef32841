"""VAE-InfoGAN: report §IV.A, Fig. 14 (encoded images traversed along the information latents) and Fig. 15 (mean KL
per latent, information vs incompressible): a VAE-GAN (Larsen et al. 2016) with β on its KL (Higgins et al. 2017) whose
first --n-info latents also get InfoGAN's L_I (Chen et al. 2016), its GAN part unrolled K steps (Metz et al. 2017).

    python vae_infogan.py --k 3 --width 16 --batch-size 32 --beta 4 --lr 5e-4 --epochs 8 --epoch-steps 500   # README
"""
import argparse
import itertools
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
LOSSES = ("loss_d", "loss_g", "recon", "kl", "li")  # what train_step returns, in this order (loss_g = f_K)
DEFAULTS = {"sprites": dict(
    epochs=26, epoch_steps=0, batch_size=64,  # as beta_vae.py: 26 passes of 11,520 steps, disentanglement_lib's ~300,000
    lr=2e-4, width=32,  # DCGAN's Adam learning rate (β1 = 0.5), everywhere; 32 channels first: small enough for a CPU
    latents=10, n_info=5,  # Higgins et al.'s 10 latents for dSprites; the first 5 (one per factor) get L_I
    k=5, beta=1.0,  # a middle K of the report's sweep; β = 1: Larsen et al.'s prior term (the report's β weighs it)
    lambda_info=20.0)}  # 1,500 sprites steps: KL information vs rest 1.93 vs 1.46 nats; 1.82 vs 1.57 at λ = 1 (README)
DEFAULTS["celeba"] = {**DEFAULTS["sprites"], "epochs": 10, "latents": 32}  # ours: 10 passes; faces vary in more ways


def add_flags(p):
    p.add_argument("--latents", type=int, help="latent dimensions, information + incompressible (default: %(default)s)")
    p.add_argument("--n-info", type=int, help="information latents c, the first ones (default: %(default)s)")
    p.add_argument("--k", type=int, help="unrolling steps of D; 0 = a plain VAE-GAN generator loss (default: %(default)s)")
    p.add_argument("--beta", type=float, help="weight β of the KL term in the encoder's loss (default: %(default)s)")
    p.add_argument("--lambda-info", type=float, help="weight λ of the information term L_I (default: %(default)s)")
    p.add_argument("--lr", type=float, help="Adam learning rate of every network and of the unroll (default: %(default)s)")
    p.add_argument("--width", type=int, help="channels of the first conv; later ones 2x (default: %(default)s)")


def check_flags(a):
    need(1 <= a.n_info < a.latents <= 1000 and 0 <= a.k <= 100 and 1 <= a.width <= 1024, "--n-info must be in 1 to --latents - 1, "
         f"--latents at most 1000, --k in 0-100, --width in 1-1024 (got {a.n_info}, {a.latents}, {a.k}, {a.width})")
    need(all(0 <= v < math.inf for v in (a.beta, a.lambda_info, a.lr)) and a.lr > 0, "--beta, --lambda-info, --lr: finite, >= 0 (--lr > 0)")


# ---- Models for 64x64 images: 4x4 stride-2 convs, BatchNorm, LeakyReLU 0.2 (DCGAN) -------------------------------------
def dcgan_convs(widths, first_bn=True):
    """Convs from widths[0] channels through widths[1:], each halving the size; BatchNorm (DCGAN's D: not on the first)."""
    return [m for i, (a, b) in enumerate(zip(widths, widths[1:]))
            for m in (nn.Conv2d(a, b, 4, 2, 1), *([nn.BatchNorm2d(b)] if i or first_bn else []), nn.LeakyReLU(0.2))]


def dcgan_encoder(channels, size, latents, w):
    """x (B, C, 64, 64) -> [μ, log σ²] (B, 2·latents): convs w, w, 2w, 2w, FC 256, FC."""
    widths, s = (channels, w, w, 2 * w, 2 * w), size // 16
    return nn.Sequential(*dcgan_convs(widths), nn.Flatten(), nn.Linear(widths[-1] * s * s, 256), nn.LeakyReLU(0.2),
                         nn.Linear(256, 2 * latents))


def dcgan_decoder(channels, size, latents, w):
    """The encoder mirrored, z (B, latents) -> image (B, C, H, W) in [0, 1]: FC 256, FC, transposed convs, sigmoid."""
    widths, s = (2 * w, 2 * w, w, w), size // 16
    ups = [m for a, b in zip(widths, widths[1:]) for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2))]
    return nn.Sequential(nn.Linear(latents, 256), nn.LeakyReLU(0.2), nn.Linear(256, widths[0] * s * s), nn.LeakyReLU(0.2),
                         nn.Unflatten(1, (widths[0], s, s)), *ups, nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Sigmoid())


class DCGANDiscriminator(nn.Module):
    """Body: convs w, 2w, 2w = Dis_l; x (B, C, 64, 64) -> (D's logit (B,), Dis_l (B, F), Q's means of c (B, n_info))."""

    def __init__(self, channels, size, n_info, w):
        super().__init__()
        widths, s = (channels, w, 2 * w, 2 * w), size // 8
        self.body = nn.Sequential(*dcgan_convs(widths, first_bn=False), nn.Flatten())
        self.d_head = nn.Linear(widths[-1] * s * s, 1)
        self.q_head = nn.Sequential(nn.Linear(widths[-1] * s * s, 128), nn.LeakyReLU(0.2), nn.Linear(128, n_info))

    def forward(self, x):
        h = self.body(x)
        return self.d_head(h).squeeze(1), h, self.q_head(h)


# ---- Losses and metrics ---------------------------------------------------------------------------------------------
def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: D ascends V(D, G), i.e. descends loss_d = -V = -E_x log D(x) - E_z log(1 - D(G(z))),
    # each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) of each latent j, mean over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1), mean over the batch
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


@torch.no_grad()
def encode_posterior(enc, images, chunk=1000):
    """μ(x), log σ²(x) (N, L) on the CPU, in chunks, the encoder in eval mode (BatchNorm's running statistics)."""
    was, _ = enc.training, enc.eval()
    out = torch.cat([enc(images[i:i + chunk].float()) for i in range(0, len(images), chunk)]).cpu()
    enc.train(was)
    return out.chunk(2, dim=1)


# ---- The unrolled look-ahead (eqs. 8-11), as in unrolled_infogan.py: D's optimised parameters as one flat θ ---------
TINY = 1e-30  # sqrt(v + TINY): d sqrt(v)/dv is infinite at v = 0 (a zero gradient), 0·inf = NaN in the backward


def snapshot_d(D, opt_d):
    """D's state as fresh tensors aliasing nothing of D or opt_d: the parameters opt_d owns as one flat θ (P,), its Adam
    moments m, v (P,) and step, D's other parameters (detached), copies of its buffers (BatchNorm's running stats)."""
    owned = {id(p) for group in opt_d.param_groups for p in group["params"]}
    named = [(n, p) for n, p in D.named_parameters() if id(p) in owned]
    states = [opt_d.state.get(p, {}) for _, p in named]
    moment = lambda key: torch.cat([s[key].reshape(-1) if key in s else torch.zeros_like(p).reshape(-1)  # noqa: E731
                                    for s, (_, p) in zip(states, named)])
    return {"names": [n for n, _ in named], "shapes": [p.shape for _, p in named],
            "theta": torch.cat([p.detach().reshape(-1) for _, p in named]), "m": moment("exp_avg"),
            "v": moment("exp_avg_sq"),  # Adam keeps its step on the CPU (not capturable): int() costs no device sync
            "step": int(states[0]["step"]) if "step" in states[0] else 0,
            "fixed": {n: p.detach() for n, p in D.named_parameters() if id(p) not in owned},
            "buffers": {n: b.clone() for n, b in D.named_buffers()}, **{k: opt_d.param_groups[0][k] for k in ("betas", "eps")}}


def d_forward(D, snap, theta, x):
    """D(x) with the parameters opt_d owns taken from the flat θ (kept in the autograd graph)."""
    sizes = [math.prod(s) for s in snap["shapes"]]
    params = {n: t.view(s) for n, t, s in zip(snap["names"], theta.split(sizes), snap["shapes"])}
    return functional_call(D, {**params, **snap["fixed"], **snap["buffers"]}, (x,))


def adam_step(theta, m, v, grad, t, lr, betas, eps):
    """One differentiable Adam update (torch.optim.Adam's arithmetic); t, the 1-based step, an int: float corrections."""
    b1, b2 = betas
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad * grad
    denom = torch.sqrt(v / (1 - b2 ** t) + TINY) + eps
    return theta - lr / (1 - b1 ** t) * m / denom, m, v


def unroll(D, snap, x_real, x_fake, k, lr, first_order=False):
    """eq. (8): θ_D^{k+1} = θ_D^k + η df/dθ_D^k, here K Adam steps descending loss_d = -f; returns θ_D^K. Exact:
    θ_D^K stays a differentiable function of θ_G (through x_fake, in every step: create_graph=True), so backprop
    through f_K gives both terms of eq. (11); first_order detaches θ_D^k and x_fake, dropping the second term."""
    theta, m, v = snap["theta"].requires_grad_(), snap["m"], snap["v"]
    fake = x_fake.detach() if first_order else x_fake
    for i in range(k):
        if first_order:
            theta = theta.detach().requires_grad_()
        loss = d_loss(d_forward(D, snap, theta, x_real)[0], d_forward(D, snap, theta, fake)[0])
        (grad,) = torch.autograd.grad(loss, theta, create_graph=not first_order)
        theta, m, v = adam_step(theta, m, v, grad, snap["step"] + i + 1, lr, snap["betas"], snap["eps"])
    return theta.detach() if first_order else theta


def unrolled_g_loss(D, opt_d, x_real, x_fake, k, lr, kind="ns", first_order=False):
    """eq. (10): f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)), G's loss against D after K updates (K = 0: the plain GAN's)."""
    snap = snapshot_d(D, opt_d)
    theta = unroll(D, snap, x_real, x_fake, k, lr, first_order)
    fake_logit = d_forward(D, snap, theta, x_fake)[0]
    if kind == "saddle":  # f = V(D, G) = -loss_d, which G descends (once D is unrolled, its real term depends on θ_G too)
        return -d_loss(d_forward(D, snap, theta, x_real)[0], fake_logit)
    return F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))  # ns: -E log D(G(z)), a batch mean


# ---- ALGO LOGIC: one training step ----------------------------------------------------------------------------------
def train_step(nets, opts, x, args):
    """One step on a batch x (B, C, H, W) in [0, 1]. Returns detached (loss_d, loss_g, recon, kl, li); no host sync."""
    enc, dec, D, b, n = nets["enc"], nets["dec"], nets["D"], x.shape[0], args.n_info
    mu, logvar = enc(x).chunk(2, dim=1)
    z, z_p = mu + torch.randn_like(mu) * (0.5 * logvar).exp(), torch.randn_like(mu)  # z ~ q(z|x) (reparameterised), z_p ~ N(0, I)
    fakes = dec(torch.cat([z, z_p]))  # (2B, C, H, W): reconstructions x̃ = Dec(z), then prior samples x_p = Dec(z_p)

    # ---- (1) discriminator step: loss_d = −[log D(x) + log(1 − D(fake))], the fakes both x̃ and x_p ----
    loss_d = d_loss(D(x)[0], D(fakes.detach())[0])
    opts["d"].zero_grad(set_to_none=True)
    loss_d.backward(inputs=opts["d"].param_groups[0]["params"])
    opts["d"].step()

    # ---- (2) unrolled look-ahead, eqs. (8)-(10): f_K, the non-saturating GAN loss of both kinds of fakes against a
    # copy of D (as this step left it) after K more differentiable Adam updates on this step's batches ----
    loss_g = unrolled_g_loss(D, opts["d"], x, fakes, args.k, args.lr)

    # ---- (3) reconstruction and information terms on the live (not unrolled) D and Q, with copies of D's BatchNorm
    # buffers; deviation: one BatchNorm batch mixes x, x̃ and x_p (D's step keeps them apart) ----
    _, feats, q = functional_call(D, {**dict(D.named_parameters()), **{k: t.clone() for k, t in D.named_buffers()}},
                                  (torch.cat([x, fakes]),))
    # Larsen et al.'s L_llike^Dis_l = −log N(Dis_l(x) | Dis_l(x̃), I), + (deviation) a pixel-wise Bernoulli −log p(x|x̃)
    # (with Dis_l alone our CPU-scale runs decoded noise); each summed over features or pixels, a mean over the batch
    recon = (0.5 * (feats[b:2 * b] - feats[:b].detach()).pow(2).sum() / b
             + F.binary_cross_entropy(fakes[:b].clamp(1e-6, 1 - 1e-6), x, reduction="sum") / b)
    kl = kl_per_latent(mu, logvar).sum()  # L_prior = KL(q(z|x) ‖ N(0, I)), summed over the latents, mean over the batch
    # L_I, eqs. (12)-(13): −log Q(c | Dec(z)), c = the first n_info latents of z and z_p, σ FIXED at 1 (as infogan.py's,
    # but summed over the codes): ½ Σ_c (μ_Q − c)², a mean over the 2B fakes. c is DETACHED: the encoder gets L_I only
    # through the decoded image (attached, L_I could fall by shrinking the information latents' σ, raising their KL)
    li = 0.5 * (q[b:] - torch.cat([z, z_p])[:, :n].detach()).pow(2).sum(1).mean()

    # ---- (4) encoder step: β·L_prior + recon + λ·L_I; decoder (generator) and Q head step: recon + f_K + λ·L_I,
    # whose backprop through f_K gives eq. (11), both terms. D's body, Q's body too, is trained by D's step only ----
    opts["enc"].zero_grad(set_to_none=True), opts["dec"].zero_grad(set_to_none=True)
    (args.beta * kl + recon + args.lambda_info * li).backward(inputs=list(enc.parameters()), retain_graph=True)
    (recon + loss_g + args.lambda_info * li).backward(inputs=opts["dec"].param_groups[0]["params"])
    opts["enc"].step(), opts["dec"].step()
    return torch.stack([loss_d, loss_g, recon, kl, li]).detach()


# ---- Setup, evaluation, figures -------------------------------------------------------------------------------------
def build(args, shape):
    """Encoder, decoder, D with Q's head; three Adams (β1 = 0.5): "d" owns D's body and head, "dec" the decoder and Q's head."""
    c, size, device = shape[0], shape[1], torch.device(args.device)
    enc, dec = (f(c, size, args.latents, args.width).to(device) for f in (dcgan_encoder, dcgan_decoder))
    D = DCGANDiscriminator(c, size, args.n_info, args.width).to(device)
    adam = lambda params: torch.optim.Adam(params, lr=args.lr, betas=(0.5, 0.999))  # noqa: E731
    opts = {"enc": adam(enc.parameters()), "dec": adam([*dec.parameters(), *D.q_head.parameters()]),
            "d": adam([*D.body.parameters(), *D.d_head.parameters()])}
    return {"enc": enc, "dec": dec, "D": D}, opts


def setup(args):
    """Images in [0, 1] (the decoder's sigmoid); fixed images for the KL (2,000 sprites or 1,000 photos); 64 prior samples."""
    data, g = common.load_data(args.dataset, args.data_root, torch.device(args.device)), torch.Generator().manual_seed(args.seed)
    x = data.eval_set(2000)[0] if args.dataset == "sprites" else data.batch(torch.randperm(len(data), generator=g)[:1000].to(data.device))[0]
    return data, {"x": x, "z": torch.randn(64, args.latents, generator=g).to(args.device)}


def evaluate(nets, ctx, args):
    """Each latent's KL on the fixed images, and its mean over the information and the incompressible latents (Fig. 15)."""
    kl = kl_per_latent(*encode_posterior(nets["enc"], ctx["x"]))
    return {**{f"kl_z{j}": v for j, v in enumerate(kl.tolist())}, "kl_info": float(kl[:args.n_info].mean()),
            "kl_rest": float(kl[args.n_info:].mean())}


@torch.no_grad()
def save_figures(nets, ctx, run, args):
    """fig14_traversals.png, fig15_kl_per_latent.png, reconstructions.png, samples.png, losses.png."""
    enc, dec, path, x = nets["enc"], nets["dec"], lambda name: os.path.join(run.dir, name), ctx["x"][:8].float()  # noqa: E731
    enc.eval(), dec.eval()  # BatchNorm's running statistics
    mu = enc(x).chunk(2, dim=1)[0]
    common.save_grid(torch.cat([x, dec(mu)]), path("reconstructions.png"), nrow=8, row_labels=["real", "recon"], title=f"step {run.step}")
    common.save_grid(dec(ctx["z"]), path("samples.png"), nrow=8, title=f"VAE-InfoGAN prior samples, step {run.step}")
    values, n = torch.linspace(-3, 3, 9), args.n_info  # Fig. 14: row (i, j) moves information latent j of image i
    z = mu[:3, None, None] + torch.eye(args.latents, device=mu.device)[:n, None] * values.to(mu.device)[:, None]  # (3, n, 9, L)
    common.save_traversal(dec(z.flatten(0, 2)).view(3 * n, 9, *x.shape[1:]), path("fig14_traversals.png"), values,
                          row_labels=[f"img{i} z{j}" for i in range(3) for j in range(n)],
                          xlabel="offset from μ_j", title=f"VAE-InfoGAN: information latents ±3 around μ(image), step {run.step}")
    enc.train(), dec.train()
    common.plot_metrics(path("metrics.csv"), ["kl_info", "kl_rest"], path("fig15_kl_per_latent.png"), x="step",
                        ylabel="KL per latent (nats)", title="mean KL per latent: information vs incompressible latents")
    common.plot_metrics(path("metrics.csv"), list(LOSSES), path("losses.png"), x="step", logy=True, title="VAE-InfoGAN losses")


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
