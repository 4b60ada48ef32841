"""Measuring every script's runs (the GAN scripts and the VAE family), and comparing them.

Every epoch, on inputs fixed once (the same for every run, seed and K), so that a number means the
same thing in every run it is compared across:
* GAN scripts (infogan.py, unrolled_infogan.py) on MNIST, where a low L_I can come from a generator
  that draws no digits: the categorical code as a classifier of the real test digits
  (Hungarian-matched accuracy); mode coverage of 10,000 samples named by a small CNN digit
  classifier trained here (cached beside the data): classes covered, the KL of their histogram to
  uniform (as the Unrolled GAN, VEEGAN and PacGAN evaluations count modes), the share the
  classifier is confident about; for each continuous code, how strongly it moves slant, stroke
  thickness and width (image moments), how often it changes the digit, and its purity (one
  property, and only one); on the ring/grid, the mode metrics of VEEGAN / PacGAN;
* the VAE family (beta_vae.py, vae_gan.py, vae_infogan.py): each latent's KL, the reconstruction
  error and, where the factors are known, MIG and each latent's MI with each factor.
A metric undefined for a run (a KL over an empty histogram) is NaN, never inf.

    python evaluation.py runs/SWEEP_s1 runs/SWEEP_s2 runs/SWEEP_s3 --out DIR  # one table, 3 seeds
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

PROPERTIES = ("slant", "thickness", "width")
EPOCHS = 3  # of classifier training (batch 128 digits + 32 non-digits, Adam lr 1e-3 linear to 0)
N_COVERAGE = 10_000  # samples for mode coverage
N_TRAVERSAL = 100  # base latents per code traversal
VALUES = torch.linspace(-2, 2, 5)  # values a continuous code takes in a traversal
EPS = 1e-6
VERSION = 1  # of the classifier cache: raise it when the classifier or PROPERTIES change


class Classifier(nn.Sequential):
    """conv3x3 16-ReLU-maxpool → conv3x3 32-ReLU-maxpool → FC128-ReLU → FC10: (B, 1, 28, 28) in
    [-1, 1] → logits; weights ~ U(±1/sqrt(fan_in)) from a generator seeded 0. Trained to give
    uniform probabilities on non-digits too (outlier exposure), so that noise is not read
    confidently as a digit. Buffer `stds`: the s.d. of PROPERTIES over the real test digits."""

    def __init__(self):
        with torch.device("meta"):  # built without drawing from the global RNG; initialised below
            super().__init__(
                nn.Conv2d(1, 16, 3, padding=1),  # (B, 16, 28, 28)
                nn.ReLU(),
                nn.MaxPool2d(2),  # (B, 16, 14, 14)
                nn.Conv2d(16, 32, 3, padding=1),  # (B, 32, 14, 14)
                nn.ReLU(),
                nn.MaxPool2d(2),  # (B, 32, 7, 7)
                nn.Flatten(),
                nn.Linear(32 * 7 * 7, 128),
                nn.ReLU(),
                nn.Linear(128, 10))  # (B, 10)
        self.to_empty(device="cpu")
        self.register_buffer("stds", torch.ones(len(PROPERTIES)))
        self.accuracy = math.nan  # fraction of the real test digits classified right
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in self:
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    bound = 1 / math.sqrt(m.weight[0].numel())
                    m.weight.uniform_(-bound, bound, generator=g)
                    m.bias.uniform_(-bound, bound, generator=g)


def not_digits(n, generator):
    """n images (n, 1, 28, 28) in [-1, 1] that show no digit: uniform noise or checkerboards in
    blocks of 1, 2, 4 or 7 px (a quarter each), each scaled to a random ink level in [0, 1]."""
    out = []
    for k in (1, 2, 4, 7):
        m = n // 4  # images of this block size
        s = 28 // k  # blocks per side
        ink = torch.rand(m, 1, s, s, generator=generator)
        i = torch.arange(s)
        phase = torch.randint(2, (m, 1, 1, 1), generator=generator)
        board = ((i[:, None] + i + phase) % 2).float()
        ink = torch.where(torch.rand(m, 1, 1, 1, generator=generator) < 0.5, ink, board)
        level = torch.rand(m, 1, 1, 1, generator=generator)
        out.append(F.interpolate(ink * level, scale_factor=k))
    return torch.cat(out) * 2 - 1


def load_classifier(data_root, device, steps=None):
    """The digit classifier in eval mode: <data_root>/MNIST/digit_classifier.pt if made from the
    same training data and VERSION, else trained (EPOCHS epochs or `steps` steps) and cached."""
    path = os.path.join(os.path.abspath(os.path.expanduser(data_root)), "MNIST",
                        "digit_classifier.pt")
    train = common.load_mnist(data_root, device, train=True, signed=True)
    # fingerprint: number of training images, integer sum of the first 1,000 images' uint8 pixels
    fingerprint = (len(train), int(train.images[:1000].sum()))
    model = Classifier()
    with contextlib.suppress(Exception):  # missing, unreadable or from another version: retrain
        cache = torch.load(path, weights_only=True, map_location="cpu")
        if (cache["version"], cache["n_train"], cache["pixel_sum"]) == (VERSION, *fingerprint):
            model.load_state_dict(cache["state"])
            model.accuracy = cache["accuracy"]
            return model.to(device).eval()
    start = time.time()
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)  # the batch order
    batch = min(128, len(train))
    total = EPOCHS * train.steps_per_epoch(batch) if steps is None else steps
    epochs = (train.epoch(batch, g) for _ in itertools.count())
    for step, (x, y) in zip(range(total), itertools.chain.from_iterable(epochs)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * (1 - step / total)
        noise = not_digits(32, g).to(x.device)
        digit_logits, noise_logits = model(torch.cat([x, noise])).split([len(x), len(noise)])
        # cross-entropy on the digits + 0.5 x cross-entropy of the non-digits to uniform (means)
        loss = F.cross_entropy(digit_logits, y) - 0.5 * F.log_softmax(noise_logits, 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    test = common.load_mnist(data_root, device, train=False, signed=True)
    with torch.no_grad():
        order = torch.arange(len(test), device=test.images.device)
        chunks = [test.batch(i)[0] for i in order.split(1000)]
        pred = torch.cat([model(x).argmax(1) for x in chunks])
        model.stds.copy_(torch.cat([properties(x) for x in chunks]).std(0))  # each property's s.d.
    model.accuracy = (pred == test.labels).float().mean().item()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    cache = {"state": state, "accuracy": model.accuracy, "version": VERSION,
             "n_train": fingerprint[0], "pixel_sum": fingerprint[1]}
    where = f"cached at {path}"
    tmp = f"{path}.{os.getpid()}.tmp"  # renamed onto path: two runs at once leave one whole file
    try:
        torch.save(cache, tmp)
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        where = "not cached"
        print(f"warning: cannot write {path} ({type(e).__name__}); "
              "the classifier will be retrained next time")
    print(f"training the digit classifier ... test accuracy {100 * model.accuracy:.2f}% "
          f"in {time.time() - start:.0f} s, {where}")
    return model


def properties(images):
    """(B, 3) properties of the digits in images (B, 1, H, W) in [-1, 1], from the ink
    I = (x + 1) / 2 in [0, 1]. Moments use pixel coordinates, x to the right and y down;
    mu_pq = sum I dx^p dy^q / sum I (central, px^(p+q)).
    slant = -mu11 / mu02: horizontal shift per pixel upwards (> 0: the top leans right);
    thickness = stroke thickness in px, from area A = sum I (px²) and perimeter
      P = sum sqrt(dx² + dy²) (px, finite differences of I): a strip of length L and thickness t
      has A = L t, P = 2 (L + t), so t = (P / 4)(1 - sqrt(1 - 16 A / P²)) (strokes under 2 px that
      straddle a pixel boundary read thicker);
    width = sqrt(mu20 - mu11² / mu02): horizontal spread in px, the slant (a shear) removed."""
    ink = (images[:, 0].float() + 1) / 2  # (B, H, W)
    y = torch.arange(ink.shape[1], dtype=ink.dtype, device=ink.device)[:, None]
    x = torch.arange(ink.shape[2], dtype=ink.dtype, device=ink.device)
    area = ink.sum((1, 2))

    def mean(f):
        """Ink-weighted mean of f over each image, (B, 1, 1)."""
        return (ink * f).sum((1, 2), keepdim=True) / area.clamp_min(EPS)[:, None, None]

    dx = x - mean(x)
    dy = y - mean(y)
    mu20 = mean(dx * dx).flatten()
    mu02 = mean(dy * dy).flatten()
    mu11 = mean(dx * dy).flatten()
    slant = -mu11 / mu02.clamp_min(EPS)
    width = (mu20 - mu11 ** 2 / mu02.clamp_min(EPS)).clamp_min(0).sqrt()
    p = F.pad(ink, (1, 1, 1, 1))  # zero border, so every edge of the ink counts
    gx = p[:, :-1, 1:] - p[:, :-1, :-1]  # (B, H+1, W+1) horizontal differences
    gy = p[:, 1:] - p[:, :-1]  # (B, H+1, W+2) vertical differences
    # each horizontal difference paired with the vertical ones at its left and at its right end,
    # averaged (one-sided pairs alone would give mirror-image strokes different perimeters)
    edges = (gx ** 2 + gy[:, :, :-1] ** 2).sqrt() + (gx ** 2 + gy[:, :, 1:] ** 2).sqrt()
    perimeter = (edges.sum((1, 2)) / 2).clamp_min(EPS)
    thickness = perimeter / 4 * (1 - (1 - 16 * area / perimeter ** 2).clamp_min(0).sqrt())
    return torch.stack([slant, thickness, width], 1)


@torch.no_grad()
def in_chunks(net, x, chunk=1000):
    """net's outputs for the rows of x (as floats), in chunks, with net in eval mode (then back in
    its own mode): a generator's images for latents, an encoder's (μ, log σ²) for images."""
    was_training = net.training
    net.eval()
    try:
        return torch.cat([net(part.float()) for part in x.split(chunk)])
    finally:
        net.train(was_training)


def class_coverage(counts, n):
    """(classes, kl) of a histogram counts (K,) of the confidently classified among n samples:
    classes = number of classes holding at least 10% of their uniform share (count >= 0.1 n / K);
    kl = KL(p || uniform) = sum p log(K p) in nats of p = counts / counts.sum() (0 balanced, log K
    one class); NaN when no sample was confident (an empty histogram has no KL; classes = 0)."""
    counts = counts.double()
    classes = int((counts >= 0.1 * n / len(counts)).sum())
    p = counts / counts.sum().clamp_min(1)
    kl = (p * (p * len(p)).clamp_min(1e-300).log()).sum().item() if counts.sum() else math.nan
    return classes, kl


def top_property(row, j):
    """Name of the property that continuous code j (1-based) moves most in a metrics row."""
    return max(PROPERTIES, key=lambda name: row[f"c{j}_{name}"])


class Evaluator:
    """Mode coverage and per-code property effects of a generator, on latents fixed once."""

    def __init__(self, data_root, device, n_noise=62, n_cat=10, n_cont=2, classifier=None,
                 stds=None):
        self.device = torch.device(device)
        self.n_cat = n_cat
        classifier = load_classifier(data_root, device) if classifier is None else classifier
        self.classifier = classifier.to(self.device).eval()
        stds = self.classifier.stds if stds is None else stds
        self.stds = torch.as_tensor(stds).float().to(self.device)
        g = torch.Generator().manual_seed(0)
        # coverage set: z ~ N(0, I), c_cat uniform, c_cont ~ U(-1, 1)
        z = torch.randn(N_COVERAGE, n_noise, generator=g)
        c = torch.randint(n_cat, (N_COVERAGE,), generator=g)
        self.latents = self._latent(z, c, torch.rand(N_COVERAGE, n_cont, generator=g) * 2 - 1)
        # traversal set: N_TRAVERSAL base latents (as many per category), each repeated for VALUES
        k = len(VALUES)
        z = torch.randn(N_TRAVERSAL, n_noise, generator=g).repeat_interleave(k, 0)
        c = (torch.arange(N_TRAVERSAL) % n_cat).repeat_interleave(k)
        cont = (torch.rand(N_TRAVERSAL, n_cont, generator=g) * 2 - 1).repeat_interleave(k, 0)
        self.traversals = []  # per code j: (N_TRAVERSAL * k, D), code j set to VALUES (fastest)
        for j in range(n_cont):
            cc = cont.clone()
            cc[:, j] = VALUES.repeat(N_TRAVERSAL)
            self.traversals.append(self._latent(z, c, cc))

    def _latent(self, z, c_cat, c_cont):
        """Generator input (N, D): noise, one-hot category, continuous codes, on the device."""
        return torch.cat([z, F.one_hot(c_cat, self.n_cat).float(), c_cont], 1).to(self.device)

    def __call__(self, G):
        """A metrics row (dict of floats) for G (see the module docstring and the comments)."""
        conf, pred = F.softmax(in_chunks(self.classifier, in_chunks(G, self.latents)), 1).max(1)
        sure = conf >= 0.9  # modes: the digits of the samples the classifier is sure of (not noise)
        classes, kl = class_coverage(torch.bincount(pred[sure], minlength=10), N_COVERAGE)
        row = {"classes": float(classes), "kl_uniform": kl,
               "confident_pct": 100 * sure.float().mean().item()}  # % with max prob >= 0.9
        v = VALUES.to(self.device)
        vc = v - v.mean()
        span = v[-1] - v[0]
        for j, latents in enumerate(self.traversals, 1):
            images = in_chunks(G, latents)
            props = properties(images).view(N_TRAVERSAL, len(v), len(PROPERTIES))
            digit = F.softmax(in_chunks(self.classifier, images), 1).argmax(1).view(N_TRAVERSAL, -1)
            slope = (props * vc[:, None]).sum(1) / vc.pow(2).sum()  # (M, 3) least squares, per unit
            # effect: |mean slope| x (v_max - v_min), in standard deviations of the real digits
            effect = slope.mean(0).abs() * span / self.stds.clamp_min(EPS)
            switch = (digit[:, 0] != digit[:, -1]).float().mean().item()  # share changing the digit
            row.update({f"c{j}_{name}": e for name, e in zip(PROPERTIES, effect.tolist())})
            row[f"c{j}_switch"] = switch
            # purity: the largest effect's share of the three x the share keeping the digit; 0 for a
            # code that moves no property by a quarter of its spread over real digits (noise)
            share = (effect.max() / effect.sum().clamp_min(EPS)).item()
            row[f"c{j}_purity"] = share * (1 - switch) if effect.max() >= 0.25 else 0.0
        return row


# ---- Categorical accuracy (infogan.py, unrolled_infogan.py) and the ring/grid's mode metrics -----
def hungarian_accuracy(pred, labels, n_cat, n_classes=10):
    """Accuracy of categories `pred` against `labels` under the best one-to-one category→class map
    (n_cat <= n_classes). Exact assignment by a DP over subsets of classes: best[mask] is the
    largest number of hits when categories 0..popcount(mask)-1 take the classes in mask."""
    counts = torch.bincount(pred.cpu() * n_classes + labels.cpu(), minlength=n_cat * n_classes)
    counts = counts.view(n_cat, n_classes).tolist()
    best = [0] + [-1] * ((1 << n_classes) - 1)
    for mask in range(1 << n_classes):
        k = bin(mask).count("1")  # next category to place
        if best[mask] < 0 or k == n_cat:
            continue
        for c in range(n_classes):
            if not mask >> c & 1:
                best[mask | 1 << c] = max(best[mask | 1 << c], best[mask] + counts[k][c])
    full = [b for m, b in enumerate(best) if bin(m).count("1") == n_cat]
    return max(full) / max(len(labels), 1)


@torch.no_grad()
def test_accuracy(D, test, n_cat, batch=1000):
    """InfoGAN's categorical code as a classifier of the real test digits: argmax of Q's logits
    (D in eval mode; D returns (logit, q)), categories matched to digits one-to-one (Hungarian)."""
    D.eval()
    pred = []
    for idx in torch.arange(len(test), device=test.images.device).split(batch):
        _, q = D(test.batch(idx)[0])  # q: categorical logits, then the continuous codes' parameters
        pred.append(q[:, :n_cat].argmax(1))
    D.train()
    return hungarian_accuracy(torch.cat(pred), test.labels, n_cat)


def mode_metrics(samples, modes, std, min_hq=10):
    """Ring/grid metrics of VEEGAN / PacGAN (on 2,500 samples). A sample is high quality (HQ) when
    within 3σ of its nearest mode. modes: modes with >= 1 HQ sample; modes10: with >= min_hq (the
    one-sample count is lenient); hq_pct: % of samples that are HQ; reverse_kl: KL(q || uniform)
    of q, the histogram of HQ samples over the modes (0 balanced, log M one mode; NaN if no HQ)."""
    dist, nearest = torch.cdist(samples.float(), modes.float()).min(dim=1)
    hq = dist <= 3 * std
    counts = torch.bincount(nearest[hq], minlength=len(modes)).float().cpu()
    q = counts / counts.sum().clamp_min(1)
    kl = float((q * (q * len(modes)).log()).nan_to_num(0.0).sum()) if counts.sum() else math.nan
    return {"modes": int((counts > 0).sum()), "modes10": int((counts >= min_hq).sum()),
            "hq_pct": 100.0 * float(hq.float().mean()), "reverse_kl": kl}


# ---- The VAE family's measures (beta_vae.py, vae_gan.py, vae_infogan.py) on fixed images ---------
ACTIVE_KL = 0.5  # a latent with less KL (nats) than this is switched off (carries ~nothing)


def kl_per_latent(mu, logvar):
    """KL(q(z_j|x) ‖ N(0, 1)) of each latent j, mean over the batch: (L,)."""
    # closed form for Gaussians: KL(N(μ, σ²) ‖ N(0, 1)) = ½ (μ² + σ² − log σ² − 1)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def mi_matrix(codes, factors, sizes, bins=20):
    """I(code_j; factor_k) / H(factor_k), (L, K), as disentanglement_lib: each code (N, L) cut into
    `bins` equal-width bins over its range. A constant factor's column is NaN (H = 0)."""
    lo = codes.min(0).values
    width = (codes.max(0).values - lo).clamp_min(1e-12) / bins
    binned = ((codes - lo) / width).long().clamp(0, bins - 1)  # (N, L)
    columns = []
    for k, size in enumerate(sizes):
        f = factors[:, k].long()
        counts = [torch.bincount(b * size + f, minlength=bins * size) for b in binned.T]
        p_bf = torch.stack(counts).view(-1, bins, size).double() / len(f)  # (L, bins, size)
        p_b = p_bf.sum(2, keepdim=True)
        p_f = torch.bincount(f, minlength=size).double() / len(f)  # exact: a constant f has p = 1
        # H(f) = −Σ_f p(f) log p(f); I(b; f) = Σ p(b, f) log p(b, f) / (p(b) p(f)), in nats
        h_f = -torch.special.xlogy(p_f, p_f).sum()
        mi = (torch.special.xlogy(p_bf, p_bf) - torch.special.xlogy(p_bf, p_b * p_f)).sum((1, 2))
        columns.append(mi / h_f if h_f > 0 else torch.full_like(mi, math.nan))
    return torch.stack(columns, dim=1)


def factor_gaps(matrix):
    """Per factor, the largest minus the second largest normalised MI: (K,), NaN if constant."""
    top = matrix.sort(dim=0, descending=True).values
    second = top[1] if len(top) > 1 else torch.zeros_like(top[0])
    return top[0] - second


def mig(codes, factors, sizes):
    """Mutual Information Gap (Chen et al. 2018), the mean over the K non-constant factors v_k:
    MIG = 1/K Σ_k (I(z_a; v_k) − max_{j≠a} I(z_j; v_k)) / H(v_k), a = argmax_j I(z_j; v_k)."""
    return float(factor_gaps(mi_matrix(codes, factors, sizes)).nanmean())


def disentanglement(mu, logvar, factors, sizes):
    """The metrics row: MIG on the means μ(x) and on z ~ q(z|x) (one fixed draw), each factor's
    gap (sampled), the sampled MI matrix as mi_z<j>_<factor>, and the active latents."""
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=mu.dtype)
    z = mu + (0.5 * logvar).exp() * noise
    matrix = mi_matrix(z, factors, sizes)
    kept = [k for k, size in enumerate(sizes) if size > 1]
    gaps = factor_gaps(matrix)
    row = {"mig": mig(mu, factors, sizes), "mig_sampled": float(gaps.nanmean())}
    row.update({f"gap_{common.Sprites.FACTORS[k]}": float(gaps[k]) for k in kept})
    row["active"] = int((kl_per_latent(mu, logvar) > ACTIVE_KL).sum())
    for j in range(len(matrix)):
        row.update({f"mi_z{j}_{common.Sprites.FACTORS[k]}": float(matrix[j, k]) for k in kept})
    return row


def encode_posterior(enc, images, chunk=1000):
    """μ(x), log σ²(x) (N, L) on the CPU, in chunks, the encoder in eval mode."""
    return in_chunks(enc, images, chunk).cpu().chunk(2, dim=1)


def recon_quality(x, rec):
    """Pixel MSE of reconstructions rec against images x (both in [0, 1]) and the % of grey
    reconstructed pixels (0.1 < rec < 0.9: blur, in binary images); each a mean over all pixels."""
    mse = float((rec - x).pow(2).mean())
    grey = 100 * float(((rec > 0.1) & (rec < 0.9)).float().mean())
    return mse, grey


def vae_measures(mu, logvar, real, rec, factors, sizes):
    """A VAE-family metrics row: each latent's KL (mean over the images), pixel MSE and grey pixels
    of rec against real (in [0, 1]) and, with known factors (N, 5), disentanglement's measures."""
    row = {f"kl_z{j}": v for j, v in enumerate(kl_per_latent(mu, logvar).tolist())}
    row["mse"], row["grey_pct"] = recon_quality(real, rec)
    if factors is not None:
        row.update(disentanglement(mu, logvar, factors, sizes))
    return row


# ---- Comparing runs: a K sweep, or the same sweep over several seeds -----------------------------
# the report's Q-loss table: K → (L_I continuous, L_I discrete)
REPORT = {0: (0.14, 0.02), 5: (0.076, 0.006), 7: (0.072, 0.0015), 10: (0.012, 0.0006)}
# (metrics.csv column, header, scale, format)
MNIST_COLUMNS = [
    ("test_acc", "test acc", 100, "{:.1f}%"),
    ("classes", "classes", 1, "{:.1f}"),
    ("kl_uniform", "KL", 1, "{:.3f}"),
    ("confident_pct", "confident", 1, "{:.1f}%"),
    ("c1_purity", "c1 purity", 1, "{:.2f}"),
    ("c2_purity", "c2 purity", 1, "{:.2f}"),
    ("c1_switch", "c1 switch", 100, "{:.0f}%"),
    ("c2_switch", "c2 switch", 100, "{:.0f}%"),
    ("li_cont", "L_I cont", 1, "{:.4f}"),
    ("li_cat", "L_I disc", 1, "{:.4f}")]
RING_COLUMNS = [
    ("modes", "modes", 1, "{:.1f}"),
    ("modes10", "modes ≥10", 1, "{:.1f}"),
    ("hq_pct", "HQ", 1, "{:.1f}%"),
    ("reverse_kl", "reverse KL", 1, "{:.3f}")]
VAE_COLUMNS = (  # (metrics.csv column, header, format)
    ("mig_sampled", "MIG (sampled z)", "{:.3f}"),
    ("mig", "MIG (means)", "{:.3f}"),
    ("mse", "recon MSE", "{:.4f}"),
    ("grey_pct", "grey pixels %", "{:.1f}"),
    ("active", "active latents (KL > 0.5)", "{:.1f}"))
GAN_COLUMNS = ("bce_real", "bce_fake", "d_on", "g_on")  # GAN rows: means over the 2nd half


def run_folders(paths):
    """The run folders (with config.json and metrics.csv) among paths and below them, sorted."""
    found = []
    for path in paths:
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            if "config.json" in files and "metrics.csv" in files:
                found.append(folder)
    return found


def spearman(x, y):
    """Spearman's rank correlation of two equal-length lists (ties get their mean rank); NaN when
    a value is NaN (a metric undefined in some run has no rank)."""
    if any(math.isnan(value) for value in [*x, *y]):
        return math.nan

    def ranks(v):
        """Ranks of v from 0 (c ties from rank a: their mean a + (c - 1) / 2), less their mean."""
        s = sorted(v)
        r = torch.tensor([s.index(value) + (s.count(value) - 1) / 2 for value in v])
        return r - r.mean()

    rx = ranks(x)
    ry = ranks(y)
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def load_runs(paths):
    """(config, metrics rows, folder) of every run folder among paths; one-line errors for none, an
    unreadable or empty one, or runs of different datasets."""
    runs = []
    for d in run_folders(paths):
        try:
            cfg = json.load(open(os.path.join(d, "config.json")))
            rows = common.read_metrics(os.path.join(d, "metrics.csv"))
            dataset = cfg["dataset"]
        except (OSError, ValueError, KeyError) as e:
            common.die(f"{d} is not a readable run folder ({type(e).__name__})")
        if not rows or "step" not in rows[0]:
            common.die(f"{d}/metrics.csv has no rows yet")
        if runs and dataset != runs[0][0]["dataset"]:
            common.die("the runs are of different datasets")
        runs.append((cfg, rows, d))
    if not runs:
        common.die(f"no run folders (config.json, metrics.csv) in {' '.join(map(str, paths))}")
    return runs


def stat(values, scale, fmt):
    """'mean ± s.d.' of scale × values in format fmt (s.d. over seeds, left out for one value)."""
    text = fmt.format(scale * sum(values) / len(values))
    if len(values) > 1:
        sd = fmt.format(scale * float(torch.tensor(values, dtype=torch.float64).std()))
        text += f" ± {sd.rstrip('%')}"
    return text


def at_common_step(runs):
    """The last step every run reached, and each run's rows up to it (compared at one step)."""
    step = min(rows[-1]["step"] for _, rows, _ in runs)
    return step, [(cfg, [r for r in rows if r["step"] <= step], d) for cfg, rows, d in runs]


def curves_by(runs, label):
    """{label(cfg, folder): [metrics.csv of each of its runs]}, for common.plot_metrics."""
    curves = {}
    for cfg, _, d in runs:
        curves.setdefault(label(cfg, d), []).append(os.path.join(d, "metrics.csv"))
    return curves


def write_comparison(out, lines):
    """out/comparison.md holds lines; they are printed too."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def run_label(cfg):
    """A GAN run's legend: its K, and whether the unroll is first-order."""
    return f"K={cfg.get('k', 0)}" + (" first-order" if cfg.get("first_order", False) else "")


def save_gan_figures(runs, step, out, ring):
    """Fig 3 (the last samples of each ring/grid run, a row each) or Fig 12 (L_I cont by step)."""
    if ring:
        saved = [(cfg, os.path.join(d, "ring_samples.pt")) for cfg, _, d in runs]
        snaps = {run_label(cfg): list(torch.load(path, weights_only=True).items())[-6:]  # last six
                 for cfg, path in saved if os.path.exists(path)}
        modes = common.ToyData(runs[0][0]["dataset"], "cpu").modes
        common.save_scatter_rows(snaps, os.path.join(out, "fig03_scatter.png"), modes=modes,
                                 lim=1.4 * float(modes.abs().max()),
                                 title="Fig. 3: one row per run")
    else:
        curves = curves_by(runs, lambda cfg, d: run_label(cfg))
        title = "Fig. 12: L_I continuous vs step (mean over seeds, band: min-max)"
        common.plot_metrics(curves, ["li_cont"], os.path.join(out, "fig12_q_loss.png"),
                            ylabel="L_I continuous", title=title, x="step", upto=step)


def compare(paths, out, command):
    """comparison.md of GAN runs: one row per setting (K, exact or first-order, unroll lr): minutes,
    training speed, the mean ± s.d. over seeds of each metric at the last step every run reached;
    on MNIST also the property each code moves, the report's L_I, each metric's Spearman correlation
    with K over the exact runs (the report: disentanglement improves with K); Fig 12 or Fig 3."""
    step, runs = at_common_step(load_runs(paths))
    runs.sort(key=lambda run: (run[0].get("first_order", False), run[0].get("k", 0)))
    ring = runs[0][0]["dataset"] != "mnist"
    groups = {}
    for cfg, rows, d in runs:
        k = cfg.get("k", 0)
        # (first-order, K, unroll learning rate); K = 0 does not unroll: one setting whatever flags
        setting = (k > 0 and cfg.get("first_order", False), k, k and cfg.get("unroll_lr", 0))
        groups.setdefault(setting, []).append(rows)
    columns = RING_COLUMNS if ring else MNIST_COLUMNS
    header = ["K", "unroll", "unroll lr", "runs", "minutes", "steps/s", *(c[1] for c in columns)]
    if not ring:
        header += ["c1 moves", "c2 moves", "report L_I cont", "report L_I disc"]
    seeds = sorted({c["seed"] for c, _, _ in runs})
    lines = [f"# {runs[0][0]['dataset']}: {len(runs)} runs, seeds {seeds}", "",
             f"command: `{command}`", "",
             f"values at step {step:.0f}, mean ± s.d. over seeds; minutes: wall time of a run to "
             "there (training, evaluation, figures); steps/s: training only; c1/c2 moves: the "
             "property each code moves most", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for (first_order, k, lr), members in sorted(groups.items()):
        last = [rows[-1] for rows in members]
        kind = "—" if k == 0 else "first-order" if first_order else "exact"
        rates = [sum(x["steps_per_s"] for x in rows) / len(rows) for rows in members]
        cells = [str(k), kind, f"{lr:g}" if k else "—", str(len(members)),
                 stat([r["seconds"] / 60 for r in last], 1, "{:.1f}"), stat(rates, 1, "{:.2f}")]
        cells += [stat([r[c] for r in last], scale, fmt) for c, _, scale, fmt in columns]
        if not ring:  # the property each code moves most in the mean row; the report's L_I
            mean = {c: sum(r[c] for r in last) / len(last) for c in last[0]}
            cells += [top_property(mean, 1), top_property(mean, 2)]
            cells += [str(value) for value in REPORT.get(k, ("-", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    exact = [(cfg["k"], rows[-1]) for cfg, rows, _ in runs if not cfg.get("first_order", True)]
    ks = [k for k, _ in exact]
    if not ring and len(set(ks)) > 1:  # each column's Spearman correlation with K (exact runs)
        rhos = [f"{spearman(ks, [r[c] for _, r in exact]):+.2f}" for c, *_ in columns]
        lines += ["", "Spearman correlation with K over the exact runs (+1: the metric rises with "
                  "K, -1: it falls):", "", "| " + " | ".join(c[1] for c in columns) + " |",
                  "|---" * len(columns) + "|", "| " + " | ".join(rhos) + " |"]
    write_comparison(out, lines)
    save_gan_figures(runs, step, out, ring)
    return lines


def vae_label(cfg, folder):
    """A VAE-family run's setting, from its folder's script name and its config."""
    script = os.path.basename(folder).split("__")[0]
    if script == "beta_vae" and cfg["beta"] == 1:
        return "VAE (β = 1)"  # with --tcvae too: β = 1 weighs the TC as the plain VAE does
    if script == "beta_vae":
        return f"{'β-TCVAE' if cfg.get('tcvae') else 'β-VAE'} β = {cfg['beta']:g}"
    if script == "vae_gan":
        return f"VAE-GAN β = {cfg['beta']:g}"
    body = ", Q's body on L_I" if cfg.get("li_body") else ""  # --li-body
    return f"VAE-InfoGAN K = {cfg['k']} β = {cfg['beta']:g}{body}"


def carriers(row, factors):
    """For each factor, the latent with the largest sampled MI with it: {factor: 'z<j>'}."""
    latents = sorted({int(k.split("_")[1][1:]) for k in row if k.startswith("mi_z")})
    return {f: "z%d" % max(latents, key=lambda j: row[f"mi_z{j}_{f}"]) for f in factors}


def save_beta_sweep(runs, step, out):
    """fig_vae_sweep.png, when a line has two β or more: sampled MIG and recon MSE of the β-VAE and
    β-TCVAE runs against β, mean over seeds, band min-max (β = 1, the VAE, starts both lines)."""
    finals = {}
    for cfg, rows, d in runs:
        if os.path.basename(d).startswith("beta_vae__"):
            kinds = ["β-TCVAE" if cfg.get("tcvae") else "β-VAE"]
            for kind in ("β-VAE", "β-TCVAE") if cfg["beta"] == 1 else kinds:
                finals.setdefault(kind, {}).setdefault(cfg["beta"], []).append(rows[-1])
    if not any(len(by_beta) > 1 for by_beta in finals.values()):
        return
    panels = {}
    for column, ylabel in (("mig_sampled", "MIG (sampled z)"), ("mse", "recon MSE")):
        panels[ylabel] = {}
        for kind, by_beta in finals.items():
            xs = sorted(by_beta)
            values = [[r[column] for r in by_beta[b]] for b in xs]
            panels[ylabel][kind] = (xs, [sum(v) / len(v) for v in values],
                                    [min(v) for v in values], [max(v) for v in values])
    common.save_panels(panels, os.path.join(out, "fig_vae_sweep.png"), xlabel="β",
                       title=f"{runs[0][0]['dataset']}, step {step:.0f}: seeds' mean, min-max")


def compare_vae(paths, out, command):
    """comparison.md of VAE-family runs: a row per setting, mean ± s.d. over seeds at the last step
    all reached, the latent carrying each factor in each seed, GAN_COLUMNS over the second half;
    fig_mig_steps.png (MIG against steps) and fig_vae_sweep.png (MIGs, recon error against β)."""
    step, runs = at_common_step(load_runs(paths))
    groups = {}
    for cfg, rows, d in runs:
        groups.setdefault(vae_label(cfg, d), []).append((cfg, rows))
    factors = [k[len("gap_"):] for k in runs[0][1][-1] if k.startswith("gap_")]
    header = ["setting", "seeds", *(h for _, h, _ in VAE_COLUMNS), *(f"gap {f}" for f in factors),
              *(f"{c} 2nd half" for c in GAN_COLUMNS), *(f"{f} on" for f in factors)]
    lines = [f"# {runs[0][0]['dataset']}: {len(runs)} runs at step {step:.0f}", "",
             f"command: `{command}`", "",
             "mean ± s.d. over seeds; MIG and gaps on z sampled from q(z|x) unless marked; "
             "recon MSE and grey pixels on 1,000 fixed images; '<factor> on': the latent with "
             "the most information about that factor, one per seed", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, members in groups.items():
        last = [rows[-1] for _, rows in members]
        for row in last:  # as the scripts' ACTIVE_KL counts them (0.5 nats), also in older rows
            row["active"] = sum(v > ACTIVE_KL for k, v in row.items() if k.startswith("kl_z"))
        cells = [label, " ".join(str(cfg["seed"]) for cfg, _ in members)]
        cells += [stat([r[c] for r in last], 1, fmt) for c, _, fmt in VAE_COLUMNS]
        cells += [stat([r[f"gap_{f}"] for r in last], 1, "{:.3f}") for f in factors]
        for c in GAN_COLUMNS:  # each run's mean over its second half, then over seeds
            half = [[r[c] for r in rows if c in r and r["step"] > step / 2] for _, rows in members]
            cells.append(stat([sum(h) / len(h) for h in half], 1, "{:.2f}") if c in last[0]
                         else "—")
        on = [carriers(r, factors) for r in last]
        cells += ["/".join(c[f] for c in on) for f in factors]
        lines.append("| " + " | ".join(cells) + " |")
    write_comparison(out, lines)
    common.plot_metrics(curves_by(runs, vae_label), ["mig_sampled"],
                        os.path.join(out, "fig_mig_steps.png"), x="step",
                        ylabel="MIG (sampled z)", upto=step,
                        title="MIG against steps (mean over seeds, band: min-max)")
    save_beta_sweep(runs, step, out)
    return lines


def compare_runs(paths, out, command):
    """comparison.md of GAN runs (compare) or of VAE-family runs (compare_vae)."""
    scripts = {os.path.basename(d).split("__")[0] for d in run_folders(paths)}
    vae = scripts and scripts <= {"beta_vae", "vae_gan", "vae_infogan"}
    return (compare_vae if vae else compare)(paths, out, command)


def sweep(train, args, script, argv=None):
    """A script's runs: one per value of --k and --beta (each combination), one after the other.
    Several go in one sweep folder with their comparison.md. Returns the last run's folder."""
    swept = [flag for flag in ("k", "beta") if isinstance(vars(args).get(flag), list)]
    settings = list(itertools.product(*(vars(args)[flag] for flag in swept)))
    out = args.out
    if len(settings) > 1:
        name = f"{script[:-3]}__{args.dataset}__sweep__s{args.seed}"
        out = os.path.join(out, f"{name}__{time.strftime('%Y%m%d-%H%M%S')}")
    runs = [train(argparse.Namespace(**{**vars(args), **dict(zip(swept, values)), "out": out}))
            for values in settings]
    if len(runs) > 1:
        command = " ".join(["python", script, *(sys.argv[1:] if argv is None else argv)])
        compare_runs(runs, out, command)
    return runs[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description="evaluation.py measures every script's runs (GAN and "
                                "VAE family); this compares them: comparison.md and its figures.")
    p.add_argument("runs", nargs="+", help="run or sweep folders (a sweep stands for its runs)")
    p.add_argument("--out", default="comparison",
                   help="folder for comparison.md and the figures (default: %(default)s)")
    args = p.parse_args(argv)
    command = "python evaluation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    compare_runs(args.runs, args.out, command)


if __name__ == "__main__":
    main()
