"""InfoGAN on MNIST: report §II.A, eqs. (1)-(3); Figs 4-5 (the K = 0 traversals of §III.B).

Chen et al. 2016, "InfoGAN: Interpretable Representation Learning by Information Maximizing Generative
Adversarial Nets" (arXiv:1606.03657), with its MNIST networks (Table 1; --width scales every hidden layer),
latents and learning rates. Each epoch: the categorical code's test accuracy and what the generated digits
look like, measured (evaluation.py); figures fig04/fig05_traversal_c1/c2.png, samples.png, losses.png.

    python infogan.py --data-root DATA                       # the paper's networks, 15 epochs
    python infogan.py --data-root DATA --width 0.25 --epochs 5   # a quarter of each layer: fits a CPU (README's labs)
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

import common
import evaluation

SCRIPT = "infogan.py"
LOSSES = ("loss_d", "loss_g", "li_cat", "li_cont")  # what train_step returns, in this order
DEFAULTS = {"mnist": dict(
    epochs=15, epoch_steps=0,  # the InfoGAN paper's MNIST run, about 14,000 steps; an epoch is a pass (937 steps)
    batch_size=64, width=1.0,  # the InfoGAN paper's batch and Table 1 networks (width 1); 0.25 fits a CPU (README's labs)
    lr_g=1e-3, lr_d=2e-4,  # the InfoGAN paper's Adam learning rates (G's Adam also trains Q's head)
    beta1=0.5,  # Adam's β1, as in DCGAN and InfoGAN
    lambda_cat=1.0, lambda_cont=1.0,  # λ of eq. (3), the InfoGAN paper's 1 (li_cont is a mean over the 2 codes, not a sum)
    n_noise=62, n_cat=10, n_cont=2)}  # the InfoGAN paper's latents: z, one 10-way code, two continuous codes


def add_flags(p):
    p.add_argument("--width", type=float, help="multiplier of every hidden layer's size; 1 = the paper's (default: %(default)s)")
    p.add_argument("--lr-g", type=float, help="Adam learning rate of G and Q's head (default: %(default)s)")
    p.add_argument("--lr-d", type=float, help="Adam learning rate of D (default: %(default)s)")


def check_flags(a):
    need(1 / 64 <= a.width <= 4, f"--width must be between 1/64 and 4 (got {a.width})")
    need(all(0 < v < math.inf for v in (a.lr_g, a.lr_d)), "--lr-g and --lr-d must be finite and > 0")


# ---- Models: the InfoGAN paper's MNIST networks (its Table 1), every hidden size × --width; LeakyReLU 0.1 -----------
def generator(n_latent, width=1.0):
    """G(z, c): FC 1024-BN-ReLU → FC 7·7·128-BN-ReLU → deconv 64-BN-ReLU → deconv 1-tanh; (B, n_latent) → (B, 1, 28, 28)."""
    h1, h2, h3 = (max(1, round(n * width)) for n in (1024, 128, 64))
    return nn.Sequential(nn.Linear(n_latent, h1), nn.BatchNorm1d(h1), nn.ReLU(), nn.Linear(h1, h2 * 49), nn.BatchNorm1d(h2 * 49),
                         nn.ReLU(), nn.Unflatten(1, (h2, 7, 7)), nn.ConvTranspose2d(h2, h3, 4, 2, 1), nn.BatchNorm2d(h3), nn.ReLU(),
                         nn.ConvTranspose2d(h3, 1, 4, 2, 1), nn.Tanh())  # pixels in [-1, 1]


class Discriminator(nn.Module):
    """D: conv 64-lReLU → conv 128-BN-lReLU → FC 1024-BN-lReLU → FC 1 (a logit). Q shares D's whole body and
    adds its own head, q_head: FC 128-BN-lReLU → n_cat categorical logits + n_cont Gaussian means."""

    def __init__(self, n_cat, n_cont, width=1.0):
        super().__init__()
        h1, h2, h3, h4 = (max(1, round(n * width)) for n in (64, 128, 1024, 128))
        self.body = nn.Sequential(nn.Conv2d(1, h1, 4, 2, 1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(h1, h2, 4, 2, 1), nn.BatchNorm2d(h2), nn.LeakyReLU(0.1), nn.Flatten(),
                                  nn.Linear(h2 * 7 * 7, h3), nn.BatchNorm1d(h3), nn.LeakyReLU(0.1))
        self.d_head = nn.Linear(h3, 1)
        self.q_head = nn.Sequential(nn.Linear(h3, h4), nn.BatchNorm1d(h4), nn.LeakyReLU(0.1), nn.Linear(h4, n_cat + n_cont))

    def forward(self, x):  # (B, 1, 28, 28) -> D logit (B,), Q outputs (B, n_cat + n_cont)
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


# ---- Latents and losses ---------------------------------------------------------------------------------------------
def make_latent(z, c_cat, c_cont, n_cat):
    """Generator input [z, one-hot(c_cat), c_cont]: (B, n_noise + n_cat + n_cont)."""
    return torch.cat([z, F.one_hot(c_cat, n_cat).to(z.dtype), c_cont], dim=1)


def sample_latents(n, n_noise, n_cat, n_cont, device, generator=None):
    """z ~ N(0, I), c_cat ~ Uniform{0..n_cat-1}, c_cont ~ U(-1, 1); returns (latent, c_cat, c_cont)."""
    z = torch.randn(n, n_noise, device=device, generator=generator)
    c_cat = torch.randint(n_cat, (n,), device=device, generator=generator)
    c_cont = torch.rand(n, n_cont, device=device, generator=generator) * 2 - 1
    return make_latent(z, c_cat, c_cont, n_cat), c_cat, c_cont


def traversal_latents(z, c_cont, code, values, n_cat):
    """Figs 4-11 layout, row-major: row r has c_cat = r, column j sets continuous code `code` to values[j];
    the noise z (n_noise,) and the other codes c_cont (n_cont,) are the same in every cell."""
    rows, cols = n_cat, len(values)
    c_cat = torch.arange(rows, device=z.device).repeat_interleave(cols)  # (R*C,)
    cc = c_cont.expand(rows * cols, -1).clone()
    cc[:, code] = values.to(z.device).repeat(rows)
    return make_latent(z.expand(rows * cols, -1), c_cat, cc, n_cat), c_cat, cc


def d_loss(real_logit, fake_logit):
    # eq. (1), D's side: D ascends V(D, G), i.e. descends loss_d = -V = -E_x log D(x) - E_z log(1 - D(G(z))),
    # each E a mean over the batch
    return (F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
            + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))


def information_losses(q, c_cat, c_cont, n_cat):
    """The L_I terms we minimise, each -E[log Q(c|x)] up to a constant (= -L_I(G, Q) + H(c)): li_cat = cross-entropy of
    Q's softmax on the true code, a batch mean; li_cont = 0.5·(μ_Q(x) - c)², a mean over batch and codes: the Gaussian
    NLL with a FIXED σ = 1, less 0.5·log 2π (the InfoGAN paper may learn σ)."""
    li_cat = F.cross_entropy(q[:, :n_cat], c_cat)
    li_cont = 0.5 * (q[:, n_cat:] - c_cont).pow(2).mean()
    return li_cat, li_cont


# ---- ALGO LOGIC: one training step (Chen et al.: one D step, then one G and Q step) ---------------------------------
def train_step(nets, opts, x, args):
    """One InfoGAN step on a real batch x (B, 1, 28, 28) in [-1, 1]; returns detached (loss_d, loss_g, li_cat, li_cont)."""
    G, D = nets["G"], nets["D"]
    latent, c_cat, c_cont = sample_latents(x.shape[0], args.n_noise, args.n_cat, args.n_cont, x.device)
    fake = G(latent)

    # ---- (1) discriminator step: maximise eq. (1), log D(x) + log(1 - D(G(z, c))) ----
    loss_d = d_loss(D(x)[0], D(fake.detach())[0])
    opts["d"].zero_grad(set_to_none=True)
    loss_d.backward()
    opts["d"].step()

    # ---- (2) generator loss: the non-saturating -log D(G(z, c)) (mean over the batch) in place of eq. (1)'s
    # log(1 - D(G(z, c))), whose gradient vanishes while D wins (Goodfellow et al. 2014) ----
    d_fake, q_fake = D(fake)
    loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))

    # ---- (3) information term and G/Q step, eq. (3): min over G, Q of V(D, G) - λ L_I(G, Q). One Adam update of
    # G and Q's head on loss_g + λ·(-L_I); deviation: Q's body is D's, trained by the D step only, not on L_I ----
    li_cat, li_cont = information_losses(q_fake, c_cat, c_cont, args.n_cat)
    opts["g"].zero_grad(set_to_none=True)
    (loss_g + args.lambda_cat * li_cat + args.lambda_cont * li_cont).backward(inputs=opts["g"].param_groups[0]["params"])
    opts["g"].step()
    return torch.stack([loss_d, loss_g, li_cat, li_cont]).detach()


# ---- Networks, data, evaluation, figures ----------------------------------------------------------------------------
def build(args, shape):
    """G, D (with Q's head) and two Adams: D's owns D's body and head, G's owns G and Q's head."""
    device = torch.device(args.device)
    G = generator(args.n_noise + args.n_cat + args.n_cont, args.width).to(device)
    D = Discriminator(args.n_cat, args.n_cont, args.width).to(device)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(args.beta1, 0.999))  # noqa: E731
    return {"G": G, "D": D}, {"d": adam([*D.body.parameters(), *D.d_head.parameters()], args.lr_d),
                              "g": adam([*G.parameters(), *D.q_head.parameters()], args.lr_g)}


def setup(args):
    """MNIST in [-1, 1] (G ends in tanh), the test digits, the figures' fixed latents, the digit measures."""
    device, g, n = torch.device(args.device), torch.Generator().manual_seed(args.seed), 10 * args.n_cat
    fixed = {"z": torch.randn(args.n_noise, generator=g), "c_cont": torch.zeros(args.n_cont), "values": torch.linspace(-2, 2, 10),
             "samples": make_latent(torch.randn(n, args.n_noise, generator=g), torch.arange(args.n_cat).repeat_interleave(10),
                                    torch.rand(n, args.n_cont, generator=g) * 2 - 1, args.n_cat)}  # 10 per category
    return common.load_data(args.dataset, args.data_root, device, signed=True), {
        "test": common.load_data(args.dataset, args.data_root, device, train=False, signed=True),
        "fixed": {k: v.to(device) for k, v in fixed.items()},
        "measure": evaluation.Evaluator(args.data_root, device, args.n_noise, args.n_cat, args.n_cont)}


def evaluate(nets, ctx, args):
    """Q's categorical accuracy on the test digits; classes covered and what each code moves (evaluation.py)."""
    return {"test_acc": evaluation.test_accuracy(nets["D"], ctx["test"], args.n_cat), **ctx["measure"](nets["G"])}


def save_figures(nets, ctx, run, args):
    save_digit_figures(nets["G"], ctx["fixed"], run, args)
    common.plot_metrics(os.path.join(run.dir, "metrics.csv"), list(LOSSES), os.path.join(run.dir, "losses.png"), title="losses")


@torch.no_grad()
def save_digit_figures(G, fixed, run, args, title=""):
    """fig04/fig05: one traversal per continuous code (rows: categorical code), and samples.png; fixed latents."""
    G.eval()  # BatchNorm's running statistics: a traversal batch shares one z, batch statistics would distort it
    for code in range(args.n_cont):
        latent, _, _ = traversal_latents(fixed["z"], fixed["c_cont"], code, fixed["values"], args.n_cat)
        name = {0: "fig04_traversal_c1", 1: "fig05_traversal_c2"}.get(code, f"traversal_c{code + 1}")
        common.save_traversal((G(latent) + 1).view(args.n_cat, -1, 1, 28, 28) / 2, os.path.join(run.dir, name + ".png"),
                              fixed["values"], row_labels=[f"c_cat={r}" for r in range(args.n_cat)], xlabel=f"c{code + 1}",
                              title=f"{title}continuous code c{code + 1} (rows: categorical code; z, other codes fixed)")
    common.save_grid((G(fixed["samples"]) + 1) / 2, os.path.join(run.dir, "samples.png"), nrow=10,
                     row_labels=[f"c_cat={r}" for r in range(args.n_cat)], title=f"{title}samples, step {run.step}")
    G.train()


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
