"""InfoGAN on MNIST: report §II.A, eq. (1)-(3); Figs 4-5 (the K = 0 traversals of §III.B).

Implements Chen et al. 2016, "InfoGAN: Interpretable Representation Learning by Information Maximizing
Generative Adversarial Nets", with its MNIST networks, latents (62-d noise z, one 10-way categorical code,
two continuous codes) and learning rates. Logs the categorical code's accuracy on the 10,000 MNIST test
digits (categories matched to digits one-to-one). Figures land in the run folder: fig04_traversal_c1.png,
fig05_traversal_c2.png (rows: categorical value; columns: one continuous code from -2 to 2), samples.png.

    python infogan.py --data-root /path/to/mnist --epochs 15
"""
import argparse
import itertools
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SCRIPT = "infogan.py"
LOSS_NAMES = ("loss_d", "loss_g", "li_cat", "li_cont")
MODEL_FLAGS = ("dataset", "batch_size", "n_noise", "n_cat", "n_cont")  # must match when resuming


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="folder holding MNIST/raw (default: %(default)s)")
    p.add_argument("--dataset", default="mnist", choices=["mnist"], help="dataset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="optional cap on total training steps (default: no cap)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--out", default="runs", help="folder for run folders (default: %(default)s)")
    p.add_argument("--resume", default=None, help="checkpoint.pt or run folder to continue (default: none)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines (default: %(default)s)")
    p.add_argument("--lr-g", type=float, default=1e-3, help="Adam learning rate of G and Q's head (default: %(default)s)")
    p.add_argument("--lr-d", type=float, default=2e-4, help="Adam learning rate of D (default: %(default)s)")
    p.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default: %(default)s)")
    p.add_argument("--lambda-cat", type=float, default=1.0, help="λ of the categorical L_I term (default: %(default)s)")
    p.add_argument("--lambda-cont", type=float, default=1.0, help="λ of the continuous L_I term (default: %(default)s)")
    p.add_argument("--n-noise", type=int, default=62, help="dimensions of the noise z (default: %(default)s)")
    p.add_argument("--n-cat", type=int, default=10, help="values of the categorical code (default: %(default)s)")
    p.add_argument("--n-cont", type=int, default=2, help="number of continuous codes (default: %(default)s)")
    args = p.parse_args(argv)
    for flag, low in (("epochs", 1), ("steps", 1), ("batch_size", 1), ("log_every", 1), ("n_noise", 1), ("n_cont", 1)):
        value = getattr(args, flag)
        if value is not None and value < low:
            common.die(f"--{flag.replace('_', '-')} must be >= {low} (got {value})")
    if not 2 <= args.n_cat <= 10:  # the test accuracy matches categories to the 10 digits one-to-one
        common.die(f"--n-cat must be between 2 and 10 (got {args.n_cat})")
    for flag in ("lr_g", "lr_d"):
        if not getattr(args, flag) > 0:
            common.die(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    for flag in ("lambda_cat", "lambda_cont"):
        if not getattr(args, flag) >= 0:
            common.die(f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    if not 0 <= args.beta1 < 1:
        common.die(f"--beta1 must be in [0, 1) (got {args.beta1})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.die("--device cuda but no CUDA GPU is available here; use --device cpu")
    try:
        torch.device(args.device)
    except RuntimeError:
        common.die(f"--device {args.device!r} is not a device; use cpu or cuda")
    return args


# ------------------------------------------------------------------------------------------------
# Models: the InfoGAN paper's MNIST networks (its Table 1). LeakyReLU slope 0.1 as in that paper.
# ------------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """G(z, c): FC1024-BN-ReLU → FC 7·7·128-BN-ReLU → deconv64-BN-ReLU → deconv1-tanh; pixels in [-1, 1]."""

    def __init__(self, n_latent):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(n_latent, 1024), nn.BatchNorm1d(1024), nn.ReLU(),
                                nn.Linear(1024, 128 * 7 * 7), nn.BatchNorm1d(128 * 7 * 7), nn.ReLU())
        self.deconv = nn.Sequential(nn.ConvTranspose2d(128, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh())

    def forward(self, latent):  # (B, n_latent) -> (B, 1, 28, 28)
        return self.deconv(self.fc(latent).view(-1, 128, 7, 7))


class Discriminator(nn.Module):
    """D: conv64-lReLU → conv128-BN-lReLU → FC1024-BN-lReLU → FC1 (a logit). Q shares D's whole body and
    adds its own head, q_head: FC128-BN-lReLU → n_cat categorical logits + n_cont Gaussian means."""

    def __init__(self, n_cat, n_cont):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 64, 4, 2, 1), nn.LeakyReLU(0.1),
                                  nn.Conv2d(64, 128, 4, 2, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.1), nn.Flatten(),
                                  nn.Linear(128 * 7 * 7, 1024), nn.BatchNorm1d(1024), nn.LeakyReLU(0.1))
        self.d_head = nn.Linear(1024, 1)
        self.q_head = nn.Sequential(nn.Linear(1024, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.1),
                                    nn.Linear(128, n_cat + n_cont))

    def forward(self, x):  # (B, 1, 28, 28) -> D logit (B,), Q outputs (B, n_cat + n_cont)
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


# ------------------------------------------------------------------------------------------------
# Latents, losses, metric
# ------------------------------------------------------------------------------------------------
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
    """Figs 4-5 layout, row-major: row r has c_cat = r, column j sets continuous code `code` to values[j];
    the noise z (n_noise,) and the other codes c_cont (n_cont,) are the same in every cell."""
    rows, cols = n_cat, len(values)
    c_cat = torch.arange(rows, device=z.device).repeat_interleave(cols)  # (R*C,)
    cc = c_cont.expand(rows * cols, -1).clone()
    cc[:, code] = values.to(z.device).repeat(rows)
    return make_latent(z.expand(rows * cols, -1), c_cat, cc, n_cat), c_cat, cc


def information_losses(q, c_cat, c_cont, n_cat):
    """L_I terms we minimise (each equals -E[log Q(c|x)] up to a constant, i.e. -L_I(G, Q) + H(c)):
    li_cat = cross-entropy of Q's softmax on the true code, mean over the batch;
    li_cont = 0.5·(μ_Q(x) - c)², mean over batch and codes: the Gaussian NLL with a FIXED σ = 1 minus its
    constant 0.5·log 2π (the paper may learn σ; we fix it, so li_cont is a plain scaled squared error)."""
    li_cat = F.cross_entropy(q[:, :n_cat], c_cat)
    li_cont = 0.5 * (q[:, n_cat:] - c_cont).pow(2).mean()
    return li_cat, li_cont


def hungarian_accuracy(pred, labels, n_cat, n_classes=10):
    """Accuracy of categories `pred` against `labels` under the best one-to-one category→class map
    (n_cat <= n_classes). Exact assignment by a DP over subsets of classes: best[mask] is the largest
    number of hits when categories 0..popcount(mask)-1 take the classes in mask."""
    counts = torch.bincount(pred.cpu() * n_classes + labels.cpu(), minlength=n_cat * n_classes)
    counts = counts.view(n_cat, n_classes).tolist()
    best = [-1] * (1 << n_classes)
    best[0] = 0
    for mask in range(1 << n_classes):
        k = bin(mask).count("1")  # next category to place
        if best[mask] < 0 or k == n_cat:
            continue
        for c in range(n_classes):
            if not mask >> c & 1:
                best[mask | 1 << c] = max(best[mask | 1 << c], best[mask] + counts[k][c])
    return max(b for m, b in enumerate(best) if bin(m).count("1") == n_cat) / max(len(labels), 1)


@torch.no_grad()
def test_accuracy(D, test, n_cat, batch=1000):
    """Categorical-code accuracy on the real test digits: argmax of Q's logits (eval mode), Hungarian-matched."""
    D.eval()
    pred = []
    for idx in torch.arange(len(test), device=test.images.device).split(batch):
        x, _ = test.batch(idx)
        _, q = D(x * 2 - 1)  # [0, 1] -> [-1, 1], as in training
        pred.append(q[:, :n_cat].argmax(1))
    D.train()
    pred = torch.cat(pred)
    return hungarian_accuracy(pred, test.labels, n_cat)


# ------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------
def train_step(G, D, opt_d, opt_g, x, args):
    """One InfoGAN step on a real batch x in [-1, 1]; returns detached (loss_d, loss_g, li_cat, li_cont)."""
    latent, c_cat, c_cont = sample_latents(x.shape[0], args.n_noise, args.n_cat, args.n_cont, x.device)
    fake = G(latent)

    # ---- discriminator step ----
    d_real, _ = D(x)
    d_fake, _ = D(fake.detach())
    # eq. (1): max_D E[log D(x)] + E[log(1 - D(G(z, c)))], as binary cross-entropies, each a mean over the batch
    loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
              + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()

    # ---- generator step ----
    d_fake, q_fake = D(fake)
    # non-saturating generator loss: G minimises -E[log D(G(z, c))] (mean over the batch) instead of eq. (1)'s
    # E[log(1 - D(G(z, c)))], which has vanishing gradients when D wins (Goodfellow et al. 2014)
    loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))

    # ---- information (Q) step ----
    # eq. (3): min_{G,Q} max_D V(D, G) - λ L_I(G, Q); one Adam update of G and Q's head on the G step's loss
    # plus λ·(-L_I). Q's body is D's and is trained by the D step only (D's optimizer owns it).
    li_cat, li_cont = information_losses(q_fake, c_cat, c_cont, args.n_cat)
    opt_g.zero_grad(set_to_none=True)
    (loss_g + args.lambda_cat * li_cat + args.lambda_cont * li_cont).backward()
    opt_g.step()
    return torch.stack([loss_d, loss_g, li_cat, li_cont]).detach()


# ------------------------------------------------------------------------------------------------
# Figures, checkpoint
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_figures(G, fixed, run_dir, n_cat):
    """fig04/fig05 (one traversal per continuous code), samples.png and losses.png, from fixed latents."""
    G.eval()  # BatchNorm running statistics: a traversal batch shares one z, batch statistics would distort it
    values = fixed["values"]
    for code in range(fixed["c_cont"].shape[0]):
        latent, _, _ = traversal_latents(fixed["z"], fixed["c_cont"], code, values, n_cat)
        images = (G(latent) + 1) / 2  # [-1, 1] -> [0, 1]
        name = {0: "fig04_traversal_c1", 1: "fig05_traversal_c2"}.get(code, f"traversal_c{code + 1}")
        common.save_traversal(images.view(n_cat, len(values), 1, 28, 28), os.path.join(run_dir, name + ".png"),
                              values, row_labels=[f"c_cat={r}" for r in range(n_cat)],
                              title=f"continuous code c{code + 1} (rows: categorical code; z, other codes fixed)",
                              xlabel=f"c{code + 1}")
    common.save_grid((G(fixed["samples"]) + 1) / 2, os.path.join(run_dir, "samples.png"), nrow=10,
                     row_labels=[f"c_cat={r}" for r in range(n_cat)], title="samples (row: categorical code)")
    G.train()
    metrics = os.path.join(run_dir, "metrics.csv")
    if os.path.exists(metrics):
        common.plot_metrics(metrics, list(LOSS_NAMES), os.path.join(run_dir, "losses.png"), title="InfoGAN losses")


def save_checkpoint(path, **state):
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: an interrupted write never leaves a half checkpoint


def load_checkpoint(path, args):
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        common.die(f"{path} is not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        common.die(f"{path} is a checkpoint of {other or 'something else'}, not of {SCRIPT}")
    for flag in MODEL_FLAGS:
        if ckpt["args"][flag] != getattr(args, flag):
            common.die(f"--{flag.replace('_', '-')} is {getattr(args, flag)} but {path} was trained with "
                       f"{ckpt['args'][flag]}; pass the same value to resume")
    return path, ckpt


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    ckpt_path, ckpt = load_checkpoint(args.resume, args) if args.resume else (None, None)

    # ---- seeding ----
    torch.manual_seed(args.seed)  # latents of the training steps
    data_gen = torch.Generator().manual_seed(args.seed)  # order of the data
    fixed_gen = torch.Generator().manual_seed(args.seed)  # fixed latents of the figures

    # ---- data: [0, 1] -> [-1, 1] to match the tanh generator ----
    train = common.load_data(args.dataset, args.data_root, device)
    test = common.load_data(args.dataset, args.data_root, device, train=False)
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        common.die(f"--batch-size {args.batch_size} is larger than the {len(train)} training images")
    total = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)

    # ---- models, optimizers ----
    G = Generator(args.n_noise + args.n_cat + args.n_cont).to(device)
    D = Discriminator(args.n_cat, args.n_cont).to(device)
    opt_d = torch.optim.Adam([*D.body.parameters(), *D.d_head.parameters()], lr=args.lr_d, betas=(args.beta1, 0.999))
    opt_g = torch.optim.Adam([*G.parameters(), *D.q_head.parameters()], lr=args.lr_g, betas=(args.beta1, 0.999))
    n = 10 * args.n_cat  # samples.png: 10 per categorical value, one row each
    fixed = {"z": torch.randn(args.n_noise, generator=fixed_gen), "c_cont": torch.zeros(args.n_cont),
             "values": torch.linspace(-2, 2, 10),
             "samples": make_latent(torch.randn(n, args.n_noise, generator=fixed_gen),
                                    torch.arange(args.n_cat).repeat_interleave(10),
                                    torch.rand(n, args.n_cont, generator=fixed_gen) * 2 - 1, args.n_cat)}
    step, seconds = 0, 0.0
    if ckpt is not None:
        try:
            G.load_state_dict(ckpt["models"]["G"])
            D.load_state_dict(ckpt["models"]["D"])
            opt_d.load_state_dict(ckpt["optims"]["d"])
            opt_g.load_state_dict(ckpt["optims"]["g"])
        except (RuntimeError, ValueError, KeyError) as e:
            common.die(f"{ckpt_path} does not fit these models ({type(e).__name__}); resume with the flags it was made with")
        step, seconds, fixed = ckpt["step"], ckpt["seconds"], ckpt["fixed"]
        torch.set_rng_state(ckpt["rng"])
        data_gen.set_state(ckpt["data_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
    fixed = {k: v.to(device) for k, v in fixed.items()}

    # ---- run folder ----
    if ckpt is not None:
        run_dir = os.path.dirname(os.path.abspath(ckpt_path))
    else:
        run_dir = os.path.join(args.out, f"infogan__{args.dataset}__s{args.seed}__{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**vars(args), "torch": torch.__version__, "device_name": torch.cuda.get_device_name(device)
                       if device.type == "cuda" else "cpu"}, f, indent=2)
    print(f"run folder {run_dir}  ({'resumed at step %d' % step if ckpt else 'new run'})", flush=True)

    # ---- training loop ----
    hist = torch.zeros(args.log_every, len(LOSS_NAMES), device=device)  # ring buffer of the last steps' losses
    start_step, t_start = step, time.time()
    t_log, step_log = t_start, step

    def check_and_report(epoch):
        """NaN check over the ring buffer, then a progress line with its means. Syncs with the device."""
        nonlocal t_log, step_log
        filled = min(step - start_step, args.log_every)
        rows = hist.tolist()
        for s in range(step - filled + 1, step + 1):
            for name, v in zip(LOSS_NAMES, rows[s % args.log_every]):
                if v != v or abs(v) == float("inf"):
                    common.die(f"{name} became {v} at step {s}; lower the learning rate or check the data")
        means = torch.tensor([rows[s % args.log_every] for s in range(step - filled + 1, step + 1)]).mean(0)
        t_now = time.time()
        rate = (step - step_log) / max(t_now - t_log, 1e-9)
        eta = (total - step) / max(rate, 1e-9)
        print(f"epoch {epoch}/{args.epochs}  step {step}/{total}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in zip(LOSS_NAMES, means.tolist()))
              + f"  |  {rate:.1f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)
        t_log, step_log = t_now, step

    while step < total:
        epoch = step // steps_per_epoch + 1
        epoch_rng = data_gen.get_state()  # the state this epoch's permutation is drawn from
        batches = itertools.islice(train.epoch(args.batch_size, data_gen), step % steps_per_epoch, None)
        epoch_sum, epoch_n, t_epoch = torch.zeros(len(LOSS_NAMES), device=device), 0, time.time()
        t_log = t_epoch  # the speed on progress lines leaves out evaluation and figures
        for x, _ in batches:
            losses = train_step(G, D, opt_d, opt_g, x * 2 - 1, args)
            step += 1
            hist[step % args.log_every] = losses
            epoch_sum += losses
            epoch_n += 1
            if step % args.log_every == 0:
                check_and_report(epoch)
            if step >= total:
                break
        if step != step_log:  # the tail of the epoch since the last progress line
            check_and_report(epoch)
        steps_per_s = epoch_n / max(time.time() - t_epoch, 1e-9)  # training only: no evaluation, no figures
        means = (epoch_sum / epoch_n).tolist()  # epoch means of the step losses
        row = {"epoch": round(step / steps_per_epoch, 3), "step": step,
               "seconds": round(seconds + time.time() - t_start, 2),  # wall seconds, summed over resumed sessions
               "steps_per_s": steps_per_s, **dict(zip(LOSS_NAMES, means)),
               "test_acc": test_accuracy(D, test, args.n_cat)}
        common.append_metrics(os.path.join(run_dir, "metrics.csv"), row)
        print(f"epoch {epoch} done: test_acc {row['test_acc']:.4f}", flush=True)
        save_figures(G, fixed, run_dir, args.n_cat)
        save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), script=SCRIPT, args=vars(args),
                        models={"G": G.state_dict(), "D": D.state_dict()},
                        optims={"d": opt_d.state_dict(), "g": opt_g.state_dict()},
                        step=step, epoch=step // steps_per_epoch, seconds=row["seconds"],
                        fixed={k: v.cpu() for k, v in fixed.items()}, rng=torch.get_rng_state(),
                        data_rng=data_gen.get_state() if step % steps_per_epoch == 0 else epoch_rng,
                        cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    # ---- summary ----
    wall = time.time() - t_start
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
            if device.type == "cuda" else "")
    print(f"done: {step - start_step} steps in {wall:.1f} s ({(step - start_step) / max(wall, 1e-9):.1f} steps/s)"
          f"{peak}, run folder {run_dir}", flush=True)


if __name__ == "__main__":
    main()
