"""InfoGAN on MNIST: report §II.A, eqs. (1)-(3); Figs 4-5 (the K = 0 traversals of §III.B).

Chen et al. 2016, "InfoGAN: Interpretable Representation Learning by Information Maximizing
Generative Adversarial Nets" (arXiv:1606.03657), with its MNIST networks (Table 1; --width scales
every hidden layer), latents and learning rates. Each epoch: the categorical code's test accuracy
and what the generated digits look like, measured (evaluation.py); figures
fig04/fig05_traversal_c1/c2.png, samples.png, losses.png.

    python infogan.py --data-root DATA                            # the paper's networks, 15 epochs
    python infogan.py --data-root DATA --width 0.25 --epochs 5    # fits a CPU (README's labs)
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

SCRIPT = "infogan.py"
LOSSES = ("loss_d", "loss_g", "li_cat", "li_cont")  # what train_step returns, in this order
DEFAULTS = {"mnist": dict(
    epochs=15,  # the InfoGAN paper's MNIST run, about 14,000 steps
    epoch_steps=0,  # an epoch is a pass over the data (937 steps of 64)
    batch_size=64,  # the InfoGAN paper's
    width=1.0,  # 1 = the paper's Table 1 networks; 0.25 fits a CPU (README's labs)
    lr_g=1e-3,  # the InfoGAN paper's Adam learning rates (G's Adam also trains Q's head)
    lr_d=2e-4,
    beta1=0.5,  # Adam's β1, as in DCGAN and InfoGAN
    lambda_cat=1.0,  # λ of eq. (3), the InfoGAN paper's 1
    lambda_cont=1.0,  # the same 1; li_cont is a mean over the 2 codes, not a sum
    n_noise=62,  # the InfoGAN paper's latents: z, one 10-way code, two continuous codes
    n_cat=10,
    n_cont=2)}


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
    p.add_argument("--width", type=between(1 / 64, 4), help="× every hidden size; 1: the paper's")
    p.add_argument("--lr-g", type=between(1e-9, 1), help="Adam learning rate of G and Q's head")
    p.add_argument("--lr-d", type=between(1e-9, 1), help="Adam learning rate of D")
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


# ---- Models: the InfoGAN paper's MNIST networks (its Table 1) ----------------------------------
# Every hidden size × --width (the shapes below are at width 1); D's and Q's LeakyReLU slope 0.1.
def generator(n_latent, width=1.0):
    """G(z, c): FC 1024-BN-ReLU, FC 7·7·128-BN-ReLU, deconv 64-BN-ReLU, deconv 1-tanh."""
    h1, h2, h3 = (max(1, round(n * width)) for n in (1024, 128, 64))
    return nn.Sequential(
        nn.Linear(n_latent, h1),  # (B, 1024)
        nn.BatchNorm1d(h1),
        nn.ReLU(),
        nn.Linear(h1, h2 * 7 * 7),  # (B, 6272)
        nn.BatchNorm1d(h2 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (h2, 7, 7)),  # (B, 128, 7, 7)
        nn.ConvTranspose2d(h2, h3, 4, 2, 1),  # (B, 64, 14, 14)
        nn.BatchNorm2d(h3),
        nn.ReLU(),
        nn.ConvTranspose2d(h3, 1, 4, 2, 1),  # (B, 1, 28, 28)
        nn.Tanh())  # pixels in [-1, 1]


class Discriminator(nn.Module):
    """D: conv 64-lReLU, conv 128-BN-lReLU, FC 1024-BN-lReLU, FC 1 (a logit). Q shares D's whole
    body and adds its own head, q_head: FC 128-BN-lReLU, then n_cat categorical logits and n_cont
    Gaussian means."""

    def __init__(self, n_cat, n_cont, width=1.0):
        super().__init__()
        h1, h2, h3, h4 = (max(1, round(n * width)) for n in (64, 128, 1024, 128))
        self.body = nn.Sequential(
            nn.Conv2d(1, h1, 4, 2, 1),  # (B, 64, 14, 14)
            nn.LeakyReLU(0.1),
            nn.Conv2d(h1, h2, 4, 2, 1),  # (B, 128, 7, 7)
            nn.BatchNorm2d(h2),
            nn.LeakyReLU(0.1),
            nn.Flatten(),  # (B, 6272)
            nn.Linear(h2 * 7 * 7, h3),  # (B, 1024)
            nn.BatchNorm1d(h3),
            nn.LeakyReLU(0.1))
        self.d_head = nn.Linear(h3, 1)  # (B, 1)
        self.q_head = nn.Sequential(
            nn.Linear(h3, h4),  # (B, 128)
            nn.BatchNorm1d(h4),
            nn.LeakyReLU(0.1),
            nn.Linear(h4, n_cat + n_cont))  # (B, n_cat + n_cont)

    def forward(self, x):
        """(B, 1, 28, 28) -> D's logit (B,), Q's outputs (B, n_cat + n_cont)."""
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


# ---- Latents and losses ------------------------------------------------------------------------
def make_latent(z, c_cat, c_cont, n_cat):
    """Generator input [z, one-hot(c_cat), c_cont]: (B, n_noise + n_cat + n_cont)."""
    return torch.cat([z, F.one_hot(c_cat, n_cat).to(z.dtype), c_cont], dim=1)


def sample_latents(n, n_noise, n_cat, n_cont, device, generator=None):
    """z ~ N(0, I), c_cat ~ U{0..n_cat-1}, c_cont ~ U(-1, 1); returns (latent, c_cat, c_cont)."""
    z = torch.randn(n, n_noise, device=device, generator=generator)
    c_cat = torch.randint(n_cat, (n,), device=device, generator=generator)
    c_cont = torch.rand(n, n_cont, device=device, generator=generator) * 2 - 1
    return make_latent(z, c_cat, c_cont, n_cat), c_cat, c_cont


def traversal_latents(z, c_cont, code, values, n_cat):
    """Figs 4-11 layout, row-major: row r has c_cat = r, column j sets continuous code `code` to
    values[j]; the noise z (n_noise,) and the other codes c_cont (n_cont,) are the same in every
    cell."""
    rows, cols = n_cat, len(values)
    c_cat = torch.arange(rows, device=z.device).repeat_interleave(cols)  # (R*C,)
    cc = c_cont.expand(rows * cols, -1).clone()
    cc[:, code] = values.to(z.device).repeat(rows)
    return make_latent(z.expand(rows * cols, -1), c_cat, cc, n_cat), c_cat, cc


def fixed_latents(args, device):
    """The figures' latents, the same every epoch: one z (the codes at 0) for the traversals,
    and 10 latents per categorical value for samples.png."""
    g = torch.Generator().manual_seed(args.seed)
    n = 10 * args.n_cat
    z = torch.randn(args.n_noise, generator=g)
    samples_z = torch.randn(n, args.n_noise, generator=g)
    samples_cat = torch.arange(args.n_cat).repeat_interleave(10)
    samples_cont = torch.rand(n, args.n_cont, generator=g) * 2 - 1
    samples = make_latent(samples_z, samples_cat, samples_cont, args.n_cat)
    values = torch.linspace(-2, 2, 10)  # the traversals' columns
    fixed = dict(z=z, c_cont=torch.zeros(args.n_cont), values=values, samples=samples)
    return {name: t.to(device) for name, t in fixed.items()}


def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: D ascends V(D, G), i.e. descends
    # loss_d = -V = -E_x log D(x) - E_z log(1 - D(G(z))), each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def information_losses(q, c_cat, c_cont, n_cat):
    """The L_I terms we minimise, each -E[log Q(c|x)] up to a constant (= -L_I(G, Q) + H(c)).
    li_cat: the cross-entropy of Q's softmax on the true code, a batch mean. li_cont:
    0.5·(μ_Q(x) - c)², a mean over batch and codes: the Gaussian NLL with a FIXED σ = 1, less
    0.5·log 2π (the InfoGAN paper may learn σ)."""
    li_cat = F.cross_entropy(q[:, :n_cat], c_cat)
    li_cont = 0.5 * (q[:, n_cat:] - c_cont).pow(2).mean()
    return li_cat, li_cont


# ---- ALGO LOGIC: one training step (Chen et al.: one D step, then one G and Q step) -------------
def train_step(nets, opts, x, args):
    """One InfoGAN step on a real batch x (B, 1, 28, 28) in [-1, 1]; returns the detached
    (loss_d, loss_g, li_cat, li_cont)."""
    G, D = nets["G"], nets["D"]
    B = x.shape[0]
    latent, c_cat, c_cont = sample_latents(B, args.n_noise, args.n_cat, args.n_cont, x.device)
    fake = G(latent)

    # ---- (1) discriminator step: maximise eq. (1), log D(x) + log(1 - D(G(z, c))) ----
    real_logit, _ = D(x)
    fake_logit, _ = D(fake.detach())
    loss_d = d_loss(real_logit, fake_logit)
    opts["d"].zero_grad(set_to_none=True)
    loss_d.backward()
    opts["d"].step()

    # ---- (2) generator loss: the non-saturating -log D(G(z, c)) (a batch mean) in place of
    # eq. (1)'s log(1 - D(G(z, c))), whose gradient vanishes while D wins (Goodfellow et al.) ----
    fake_logit, q = D(fake)
    loss_g = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))

    # ---- (3) information term and G/Q step, eq. (3): min over G, Q of V(D, G) - λ L_I(G, Q).
    # One Adam update of G and Q's head on loss_g + λ·(-L_I). Deviation: Q's body is D's, trained
    # by the D step only, not on L_I ----
    li_cat, li_cont = information_losses(q, c_cat, c_cont, args.n_cat)
    loss_gq = loss_g + args.lambda_cat * li_cat + args.lambda_cont * li_cont
    opts["g"].zero_grad(set_to_none=True)
    loss_gq.backward(inputs=opts["g"].param_groups[0]["params"])  # no gradient for D
    opts["g"].step()
    return torch.stack([loss_d, loss_g, li_cat, li_cont]).detach()


# ---- Networks, data, evaluation, figures -------------------------------------------------------
def build(args, shape):
    """G, D (with Q's head) and two Adams: D's owns D's body and head, G's owns G and Q's head."""
    device = torch.device(args.device)
    G = generator(args.n_noise + args.n_cat + args.n_cont, args.width).to(device)
    D = Discriminator(args.n_cat, args.n_cont, args.width).to(device)
    d_params = [*D.body.parameters(), *D.d_head.parameters()]
    g_params = [*G.parameters(), *D.q_head.parameters()]
    betas = (args.beta1, 0.999)
    opts = {"d": torch.optim.Adam(d_params, lr=args.lr_d, betas=betas),
            "g": torch.optim.Adam(g_params, lr=args.lr_g, betas=betas)}
    return {"G": G, "D": D}, opts


def setup(args):
    """MNIST in [-1, 1] (G ends in tanh), the test digits, the figures' fixed latents, the digit
    measures."""
    device = torch.device(args.device)
    train = common.load_data(args.dataset, args.data_root, device, signed=True)
    test = common.load_data(args.dataset, args.data_root, device, train=False, signed=True)
    measure = evaluation.Evaluator(args.data_root, device, args.n_noise, args.n_cat, args.n_cont)
    return train, {"test": test, "fixed": fixed_latents(args, device), "measure": measure}


def evaluate(nets, ctx, args):
    """Q's categorical accuracy on the test digits; classes covered and what each code moves."""
    test_acc = evaluation.test_accuracy(nets["D"], ctx["test"], args.n_cat)
    return {"test_acc": test_acc, **ctx["measure"](nets["G"])}


def save_figures(nets, ctx, args, folder, row):
    """fig04/fig05 traversals and samples.png (fixed latents); losses.png from metrics.csv."""
    save_digit_figures(nets["G"], ctx["fixed"], args, folder, row["step"])
    common.plot_metrics(os.path.join(folder, "metrics.csv"), list(LOSSES),
                        os.path.join(folder, "losses.png"), title="losses")


@torch.no_grad()
def save_digit_figures(G, fixed, args, folder, step, title=""):
    """fig04/fig05: one traversal per continuous code (rows: categorical code), and samples.png."""
    G.eval()  # BatchNorm's running statistics: a traversal shares one z, skewing batch statistics
    row_labels = [f"c_cat={r}" for r in range(args.n_cat)]
    for code in range(args.n_cont):
        latent, _, _ = traversal_latents(fixed["z"], fixed["c_cont"], code, fixed["values"],
                                         args.n_cat)
        images = (G(latent) + 1).view(args.n_cat, -1, 1, 28, 28) / 2  # (rows, columns, 1, 28, 28)
        name = f"traversal_c{code + 1}"
        if code < 2:  # the report's Figs 4 and 5
            name = f"fig0{code + 4}_{name}"
        common.save_traversal(images, os.path.join(folder, name + ".png"), fixed["values"],
                              row_labels=row_labels, xlabel=f"c{code + 1}",
                              title=f"{title}continuous code c{code + 1} "
                                    "(rows: categorical code; z, other codes fixed)")
    common.save_grid((G(fixed["samples"]) + 1) / 2, os.path.join(folder, "samples.png"), nrow=10,
                     row_labels=row_labels, title=f"{title}samples, step {step}")
    G.train()


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
