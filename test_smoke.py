"""Tests, a section per file: common.py, evaluation.py, the plumbing every script shares, each
script's math, and the line budgets last. Run: python -m pytest -q test_smoke.py. The data is made
here: a tiny MNIST in the IDX format, JPEGs in the CelebA layout; nothing is downloaded."""
import ast
import copy
import itertools
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import beta_vae
import common
import evaluation
import infogan
import unrolled_infogan as ui
import vae_gan
import vae_infogan as vi

HERE = os.path.dirname(os.path.abspath(__file__))
# the tests' own arithmetic is tiny; one thread per process keeps two cores free of contention
torch.set_num_threads(1)


# ---- Tiny data in the real formats, and helpers ------------------------------------------------
def make_mnist(root, n_train=256, n_test=128, seed=0):
    """A tiny MNIST in the IDX format under root/MNIST/raw: blurry class-dependent blobs."""
    g = torch.Generator().manual_seed(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        blob = torch.exp(-((xx - 6 - 1.6 * labels[:, None, None]) ** 2 + (yy - 14) ** 2) / 18)
        pixels = (blob + 0.1 * torch.rand(n, 28, 28, generator=g)).clamp(0, 1) * 255
        for name, array, magic in (("images-idx3", pixels, 2051), ("labels-idx1", labels, 2049)):
            with open(os.path.join(raw, f"{prefix}-{name}-ubyte"), "wb") as f:
                f.write(struct.pack(f">{1 + array.dim()}i", magic, *array.shape))  # big-endian
                f.write(array.to(torch.uint8).numpy().tobytes())
    return root


@pytest.fixture(scope="session")
def roots(tmp_path_factory):
    """A tiny MNIST (256 train, 128 test, its classifier cached) and 24 JPEGs (CelebA layout)."""
    mnist = make_mnist(str(tmp_path_factory.mktemp("mnist")))
    evaluation.load_classifier(mnist, "cpu", steps=4)
    celeba = tmp_path_factory.mktemp("celeba")
    (celeba / "img_align_celeba").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        img = (torch.rand(40, 32, 3, generator=g) * 255).to(torch.uint8)
        PIL.Image.fromarray(img.numpy()).save(celeba / "img_align_celeba" / f"{i + 1:06d}.jpg")
    return {"mnist": mnist, "celeba": str(celeba)}


def run(module, out, *argv):
    """module.main on the CPU with --out out, in this process; returns its run folder."""
    return module.main([str(a) for a in (*argv, "--device", "cpu", "--out", out)])


def one_line(fn, *args):
    """The one-line error (no traceback) that fn(*args) stops the program with."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value), str(e.value)
    return str(e.value)


def error_of(module, *argv):
    return one_line(module.main, [str(a) for a in argv])


def same(a, b):
    """Equal bit for bit: tensors (dtypes too), numbers, and dicts and lists of them."""
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def metrics(folder):
    return common.read_metrics(os.path.join(folder, "metrics.csv"))


def checkpoint(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)


def without_timing(rows):
    """metrics.csv rows less the timing columns; repr: an empty cell (NaN) equals an empty one."""
    return [{k: repr(v) for k, v in r.items() if k not in ("seconds", "steps_per_s")} for r in rows]


# ---- common.py ---------------------------------------------------------------------------------
SQUARES = (1, 6, 1, 32, 32)  # the squares' factor layout: shape and orientation constant


def test_data_loads_bad_data_stops_in_one_line_metrics_round_trip_sprites_render(roots, tmp_path):
    train = common.load_mnist(roots["mnist"], "cpu", train=True)
    assert len(train) == 256 and len(common.load_mnist(roots["mnist"], "cpu", train=False)) == 128
    x, y = next(train.epoch(32, torch.Generator().manual_seed(0)))
    assert x.shape == (32, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    signed = common.load_mnist(roots["mnist"], "cpu", train=True, signed=True)  # for tanh: 2x - 1
    assert torch.equal(next(signed.epoch(32, torch.Generator().manual_seed(0)))[0], x * 2 - 1)
    seen = torch.cat([y for _, y in train.epoch(32, torch.Generator().manual_seed(0))])
    assert torch.equal(seen.bincount(), train.labels.bincount())  # each image once (drop-last)
    photos = common.load_image_folder(roots["celeba"], "cpu", size=64)
    assert len(photos) == 24 and photos.shape == (3, 64, 64)
    ring = common.ToyData("ring", "cpu")  # 8 modes on a circle of radius 2, std 0.02
    assert torch.cdist(ring.modes, ring.modes).add(10 * torch.eye(8)).min() > 1.5
    assert torch.allclose(ring.modes.norm(dim=1), torch.full((8,), 2.0))
    x, k = ring.sample(4000, torch.Generator().manual_seed(0))
    assert (x - ring.modes[k]).norm(dim=1).max() < 0.02 * 6
    batches = list(ring.epoch(16, torch.Generator().manual_seed(0)))  # drawn at the epoch's start
    assert len(batches) == ring.steps_per_epoch(16) == 500 and batches[0][0].shape == (16, 2)
    assert common.ToyData("grid", "cpu").modes.shape == (25, 2)
    msg = one_line(common.load_mnist, str(tmp_path / "nowhere"), "cpu")
    assert "nowhere/MNIST/raw" in msg and "--data-root" in msg
    bad = make_mnist(str(tmp_path / "bad"), n_train=20, n_test=20)
    path = tmp_path / "bad" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    one_line(common.load_mnist, bad, "cpu")
    msg = one_line(common.load_image_folder, str(tmp_path / "bad" / "MNIST"), "cpu")  # no images
    assert "img_align_celeba" in msg and "--data-root" in msg
    path = str(tmp_path / "metrics.csv")
    for e in range(3):
        common.append_metrics(path, {"epoch": e + 1, "step": 10 * (e + 1), "loss_d": 0.5 / (e + 1)})
    rows = common.read_metrics(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and abs(rows[2]["loss_d"] - 0.5 / 3) < 1e-5
    common.plot_metrics({"one": path, "mean": [path, path]}, ["loss_d"], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
    common.truncate_metrics(path, 20)  # rows written after a checkpoint at step 20 go on resume
    assert [r["step"] for r in common.read_metrics(path)] == [10, 20]
    s = common.Sprites("cpu")  # the sprites and the squares: the factors asked for
    assert len(s) == 3 * 6 * 40 * 32 * 32 and s.SIZES == (3, 6, 40, 32, 32)
    idx = torch.tensor([0, 12345, len(s) - 1])
    radix = torch.tensor([6 * 40 * 32 * 32, 40 * 32 * 32, 32 * 32, 32, 1])
    assert torch.equal((s.factors(idx) * radix).sum(1), idx)  # mixed-radix round trip
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for shape in range(3):
        small = s.render(torch.tensor([[shape, 0, 0, 16, 16]]))[0, 0]
        big = s.render(torch.tensor([[shape, 5, 0, 16, 16]]))[0, 0]
        assert 3.0 < big.sum() / small.sum() < 5.0  # area ~ scale², scale 1.0 vs 0.5
        for px, py in ((0, 0), (31, 0), (0, 31), (31, 31), (10, 20)):
            img = s.render(torch.tensor([[shape, 5, 7, px, py]]))[0, 0]
            cx, cy = (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()
            ex, ey = 64 * (0.2 + 0.6 * px / 31) - 0.5, 64 * (0.2 + 0.6 * py / 31) - 0.5
            tol = 2.5 if shape == 2 else 0.6  # the heart's centroid is off its centre by design
            assert abs(cx - ex) < tol and abs(cy - ey) < tol, (shape, px, py, cx, cy)
            assert img[0].sum() == img[-1].sum() == img[:, 0].sum() == img[:, -1].sum() == 0
    # a square is symmetric under a quarter turn (10 orientation steps), an ellipse is not
    sq = s.render(torch.tensor([[0, 5, 0, 16, 16], [0, 5, 10, 16, 16]]))
    el = s.render(torch.tensor([[1, 5, 0, 16, 16], [1, 5, 10, 16, 16]]))
    assert (sq[0] != sq[1]).float().sum() <= 8 and (el[0] != el[1]).float().sum() > 50
    assert torch.equal(el[1, 0], el[0, 0].T) or (el[1, 0] != el[0, 0].T).float().sum() <= 8
    squares = common.load_data("squares", ".", "cpu")
    assert squares.SIZES == SQUARES and len(squares) == 5 * 6144
    assert squares.steps_per_epoch(64) == 480
    x, f = squares.batch(torch.tensor([0, 6144, 6143]))
    assert torch.equal(x[0], x[1]) and torch.equal(f[0], f[1])  # index 6144 is square 0 again
    assert f[:, 0].eq(0).all() and f[:, 2].eq(0).all()
    assert torch.equal(f[2], torch.tensor([0, 5, 0, 31, 31]))
    ink = x[0, 0].nonzero()  # an axis-aligned square: its ink fills its bounding box
    assert len(ink) == math.prod(ink.max(0).values - ink.min(0).values + 1)


# ---- evaluation.py: image moments of strokes drawn here ----------------------------------------
SHEARS = (-0.4, -0.2, 0.0, 0.2, 0.4)
THICKNESSES = (1.5, 2.0, 3.0, 4.0, 5.0)


def render(inside, n=1, ss=16):
    """Images (n, 1, 28, 28) in [-1, 1]: ink, the share of ss x ss points where inside(x, y)."""
    c = (torch.arange(28 * ss, dtype=torch.float64) + 0.5) / ss - 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    ink = inside(x.expand(n, -1, -1), y.expand(n, -1, -1)).double()
    return (ink.view(n, 28, ss, 28, ss).mean((2, 4)) * 2 - 1).float().unsqueeze(1)


def props(inside, n):
    """(slant, thickness, width) of n rendered images, (n, 3)."""
    return evaluation.properties(render(inside, n)).double()


def bar(s=0.0, t=3.0, cx=13.75, cy=13.6):
    """A vertical bar t thick and 18 high, sheared by s: x + s (cy - y) (s > 0 leans it right)."""
    s, t = (torch.as_tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in (s, t))
    return lambda x, y: ((x - s * (cy - y) - cx).abs() <= t / 2) & ((y - cy).abs() <= 9)


def ring(s=0.0, t=3.0, cx=13.75, cy=13.6):
    """A ring t thick of mean radius 8.5, sheared by s."""
    s, t = (torch.as_tensor(v, dtype=torch.float64).view(-1, 1, 1) for v in (s, t))
    return lambda x, y: ((x - s * (cy - y) - cx).hypot(y - cy) - 8.5).abs() <= t / 2


def two_bars(d, s=0.0):
    return lambda x, y: bar(s, 2.0, 13.75 - d)(x, y) | bar(s, 2.0, 13.75 + d)(x, y)


def test_slant_thickness_and_width_of_strokes_drawn_sheared_and_thickened():
    for shape in (bar, ring, lambda s: two_bars(4.0, s)):
        p = props(shape(list(SHEARS)), len(SHEARS))[:, 0]
        assert torch.allclose(p, torch.tensor(SHEARS, dtype=torch.float64), atol=0.03), p
    for shape, shear in itertools.product((bar, ring), (-0.3, 0.0, 0.3)):
        p = props(shape(shear, list(THICKNESSES)), len(THICKNESSES))[:, 0]
        assert (p - shear).abs().max() <= 0.03, p
    img = -torch.ones(1, 1, 28, 28)
    img[0, 0, torch.arange(4, 24), 20 - torch.arange(20) // 2] = 1  # a pixel a row, rising right
    assert evaluation.properties(img)[0, 0] > 0.3  # the top leaning right: positive
    p = evaluation.properties(torch.stack([-torch.ones(1, 28, 28), torch.ones(1, 28, 28)]))
    assert torch.isfinite(p).all()  # an empty and a full image
    for cx, shape in itertools.product((13.5, 13.75, 14.0), (bar, ring)):
        # a 1.5 px stroke centred on a pixel boundary is two half-inked pixels: it reads as 2 px
        ts = [t for t in THICKNESSES if t >= 2 or cx != 13.5]
        p, t = props(shape(0.0, ts, cx=cx), len(ts))[:, 1], torch.tensor(ts).double()
        assert ((p - t).abs() <= 0.1 * t).all(), (cx, p)
    s, t = torch.tensor(list(itertools.product(SHEARS, THICKNESSES)), dtype=torch.float64).T
    p = props(bar(s, t), len(s))[:, 1]
    perpendicular = t / (1 + s ** 2).sqrt()  # a shear thins a bar: 7% at s = 0.4
    assert ((p - perpendicular).abs() <= 0.1 * perpendicular).all(), p
    p = props(ring(s, t), len(s))[:, 1].view(len(SHEARS), len(THICKNESSES))
    assert ((p - p[2]).abs() <= 0.1 * p[2]).all(), p  # each thickness as at shear 0
    for d in (2.5, 4.0, 6.0):  # the width of two bars, whatever the shear
        p, want = props(two_bars(d, list(SHEARS)), len(SHEARS))[:, 2], math.sqrt(d ** 2 + 4 / 12)
        assert ((p - want).abs() <= 0.05 * want).all(), (p, want)


# ---- evaluation.py: known answers (coverage, accuracy, the VAEs' measures), the Evaluator ------
def test_coverage_mode_metrics_accuracy_kl_reconstruction_and_mig_known_answers():
    assert evaluation.class_coverage(torch.tensor([0, 0, 0, 500, 0, 0, 0, 0, 0, 0]), 500) == (
        1, pytest.approx(math.log(10)))
    assert evaluation.class_coverage(torch.full((10,), 100), 1000) == (10, pytest.approx(0.0))
    counts = torch.tensor([1300] * 7 + [701, 100, 99])  # N = 10,000: 10% of a share is 100
    classes, kl = evaluation.class_coverage(counts, 10000)
    p = counts / counts.sum()
    assert classes == 9 and kl == pytest.approx(float((p * (10 * p).log()).sum()))
    # among 4 times as many samples: 10% of a share is 400, which 8 reach
    assert evaluation.class_coverage(counts, 40000)[0] == 8
    classes, kl = evaluation.class_coverage(torch.zeros(10), 10000)
    assert classes == 0 and math.isnan(kl)  # no confident sample: no mode, no histogram, no KL
    ring = common.ToyData("ring", "cpu")
    m, s = ring.modes.double(), ring.std
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)
    pts = [m[i].expand(100, 2) for i in range(4)]          # 400 exact hits on modes 0-3
    pts.append(m[4] + 2.9 * s * direction.expand(5, 2))    # 5 high quality (2.9σ) on mode 4
    pts.append(m[5] + 3.1 * s * direction.expand(45, 2))   # 45 just outside 3σ of mode 5
    pts.append(torch.zeros(50, 2, dtype=torch.float64))    # 50 at the centre, far from every mode
    r = evaluation.mode_metrics(torch.cat(pts), m, s)
    assert (r["modes"], r["modes10"], r["hq_pct"]) == (5, 4, pytest.approx(100 * 405 / 500))
    q = [100 / 405] * 4 + [5 / 405]
    assert r["reverse_kl"] == pytest.approx(sum(p * math.log(8 * p) for p in q), rel=1e-5)
    r = evaluation.mode_metrics(m.repeat(10, 1), m, s)
    assert (r["modes"], r["modes10"], r["hq_pct"], r["reverse_kl"]) == (8, 8, 100.0, 0.0)
    r = evaluation.mode_metrics(m[:1].repeat(20, 1), m, s)
    assert (r["modes"], r["modes10"], r["reverse_kl"]) == (1, 1, pytest.approx(math.log(8)))
    assert math.isnan(evaluation.mode_metrics(torch.zeros(7, 2), m, s)["reverse_kl"])
    labels = torch.arange(1000) % 10
    perm = torch.tensor([3, 7, 0, 9, 1, 4, 8, 2, 6, 5])
    assert evaluation.hungarian_accuracy(perm[labels], labels, 10) == 1.0  # categories permuted
    pred = perm[labels].clone()
    pred[labels == 9] = perm[4]  # two digits share one category: a one-to-one map gets one
    assert evaluation.hungarian_accuracy(pred, labels, 10) == 0.9
    assert evaluation.hungarian_accuracy(torch.zeros(1000).long(), labels, 10) == 0.1
    assert evaluation.hungarian_accuracy(labels % 4, labels, 4) == 0.4  # n_cat < n_classes
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # random confusions: the DP equals brute force over all 5! maps
        y = torch.randint(5, (60,), generator=g)
        pred = torch.where(torch.rand(60, generator=g) < 0.5, (y + 2) % 5,
                           torch.randint(5, (60,), generator=g))
        hits = [sum(int(to[c]) == int(d) for c, d in zip(pred, y))
                for to in itertools.permutations(range(5))]
        assert evaluation.hungarian_accuracy(pred, y, 5, n_classes=5) == max(hits) / 60
    # by hand: N(1, 1) -> 0.5; N(0, e^2) -> 0.5 (e^2 - 2 - 1); N(0, 1) -> 0; means over the batch
    mu, logvar = torch.tensor([[1.0, 0.0, 0.0]] * 2), torch.tensor([[0.0, 2.0, 0.0]] * 2)
    by_hand = torch.tensor([0.5, 0.5 * (math.e ** 2 - 3), 0.0])
    assert torch.allclose(evaluation.kl_per_latent(mu, logvar), by_hand, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 64, 10, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0, 1)).mean(0)
    assert torch.allclose(evaluation.kl_per_latent(mu, logvar), expected, atol=1e-12)
    x = torch.zeros(2, 1, 4, 4)
    assert evaluation.recon_quality(x, x) == (0.0, 0.0)
    assert evaluation.recon_quality(x, torch.full_like(x, 0.5)) == (0.25, 100.0)  # all grey
    rec = x.index_fill(2, torch.arange(2), 1.0)  # half the pixels white: MSE 0.5, no grey pixel
    assert evaluation.recon_quality(x, rec) == (0.5, 0.0)
    sizes = (3, 6, 10)
    f = torch.stack([torch.randint(s, (10000,), generator=g) for s in sizes], dim=1)
    noise = torch.randn(len(f), 3, generator=g)
    # every factor copied into its own latent (plus 3 noise latents): each gap ~ 1
    assert evaluation.mig(torch.cat([f.float(), noise], 1), f, sizes) > 0.97
    # one latent equal to factor 1, the rest noise: gaps ~1, ~0, ~0 -> MIG ~ 1/3
    one_copy = torch.cat([noise, f[:, 1:2].float() * 0.3 + 2.0], 1)
    assert abs(evaluation.mig(one_copy, f, sizes) - 1 / 3) < 0.02
    # the same codes, shuffled against the factors: independent -> ~0
    shuffled = torch.cat([f.float(), noise], 1)[torch.randperm(len(f), generator=g)]
    assert 0 <= evaluation.mig(shuffled, f, sizes) < 0.02
    # a factor shared by two latents gives no gap, even though both latents are informative
    shared = torch.cat([f[:, :1].float(), f[:, :1].float() * 2], 1)
    assert abs(evaluation.mig(shared, f[:, :1], sizes[:1])) < 1e-9
    # a constant factor is left out of the mean (its entropy is 0)
    const = torch.cat([torch.zeros(len(f), 1, dtype=torch.long), f[:, :1]], 1)
    assert evaluation.mig(f[:, :1].float(), const, (2, 3)) == pytest.approx(1.0)
    f = torch.stack([torch.randint(s, (20000,), generator=g) for s in SQUARES], dim=1)
    scale, x, y = (2 * f[:, k].float() / (SQUARES[k] - 1) - 1 for k in (1, 3, 4))  # in [-1, 1]
    noise = 0.01 * torch.randn(len(f), 3, generator=g)
    # 20 bins of 32 positions: each factor's gap can reach about log 20 / log 32 = 0.86
    assert evaluation.mig(torch.stack([scale, x, y], 1) + noise, f, SQUARES) > 0.8
    rotated = torch.stack([scale, (x + y) / 2 ** 0.5, (x - y) / 2 ** 0.5], 1) + noise  # by 45°
    gaps = evaluation.factor_gaps(evaluation.mi_matrix(rotated, f, SQUARES))
    assert gaps[3] < 0.1 and gaps[4] < 0.1  # x and y each spread over two latents: no gap
    assert evaluation.mig(rotated, f, SQUARES) < 0.45
    assert torch.isnan(gaps[0]) and torch.isnan(gaps[2])  # constant factors are left out
    mu = torch.stack([scale, x, 0.01 * y], 1)  # latent 2 wobbles with y, but its σ is 1: off
    logvar = torch.tensor([-12.0, -12.0, 0.0]).expand(len(f), 3)
    row = evaluation.disentanglement(mu, logvar, f, SQUARES)
    assert row["mig"] > 0.8  # on the means, y is read perfectly from the wobble
    assert row["gap_pos_y"] < 0.05 and row["mig_sampled"] < 0.65  # sampled: y carries nothing
    assert row["gap_scale"] > 0.8 and row["gap_pos_x"] > 0.8 and row["active"] == 2
    assert common.carried(row, 1) == f"pos_x {row['mi_z1_pos_x']:.2f}"


N_NOISE, N_CAT, N_CONT = 4, 10, 2
STDS = (0.25, 0.75, 1.15)  # about the real MNIST test digits' standard deviations


class CentreInk(nn.Module):
    """Digit 1 when the 4 x 2 pixels at the centre hold ink (a bar), 0 when not (a ring)."""

    def forward(self, x):
        m = (x[:, 0, 12:16, 13:15].mean((1, 2)) + 1) / 2  # ink in [0, 1] at the centre
        return F.pad(torch.stack([-20 * (m - 0.5), 20 * (m - 0.5)], 1), (0, 8))  # digits 0, 1


class FakeG(nn.Module):
    """A stroke of the codes (c1, c2). 'shear_thick': a bar sheared 0.1 c1, 2.5 + 0.5 c2 thick
    (codes rounded to 0.1: few drawings for 10,000 samples); 'switch': c1 < 0 a bar, else a ring."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.dummy = kind, nn.Linear(1, 1)  # something for train()/eval() to act on

    def forward(self, latent):
        if self.kind == "switch":
            return torch.where(latent[:, -2, None, None, None] < 0, render(bar()), render(ring()))
        codes, inverse = torch.unique((latent[:, -2:].double() * 10).round() / 10, dim=0,
                                      return_inverse=True)
        return render(bar(0.1 * codes[:, 0], 2.5 + 0.5 * codes[:, 1]), len(codes), ss=4)[inverse]


def test_the_evaluator_and_its_digit_classifier(tmp_path, capsys, monkeypatch):
    state, d = torch.get_rng_state(), N_NOISE + N_CAT + N_CONT
    evaluator, again = (evaluation.Evaluator("unused", "cpu", N_NOISE, N_CAT, N_CONT,
                                             classifier=CentreInk(), stds=STDS) for _ in range(2))
    assert torch.equal(again.latents, evaluator.latents)  # fixed once, the same every time
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert evaluator.latents.shape == (evaluation.N_COVERAGE, d)
    cat = evaluator.latents[:, N_NOISE:N_NOISE + N_CAT]
    assert torch.equal(cat.sum(1), torch.ones(len(cat))) and cat.argmax(1).bincount().min() > 900
    assert evaluator.latents[:, -N_CONT:].abs().max() <= 1
    t = evaluator.traversals[1].view(evaluation.N_TRAVERSAL, len(evaluation.VALUES), d)
    # code 2 moves, the rest stays; 10 traversals per category
    assert torch.equal(t[:, :, -1], evaluation.VALUES.expand(evaluation.N_TRAVERSAL, -1))
    assert torch.equal(t[:, :, :-1], t[:, :1, :-1].expand_as(t[:, :, :-1]))
    assert torch.equal(t[:, 0, N_NOISE:N_NOISE + N_CAT].argmax(1).bincount(), torch.full((10,), 10))
    G = FakeG("shear_thick").train()
    row = evaluator(G)
    assert G.training and all(isinstance(v, float) for v in row.values())  # mode restored
    assert row["classes"] == 1 and row["kl_uniform"] == pytest.approx(math.log(10))  # all bars
    assert row["c1_slant"] == pytest.approx(0.4 / STDS[0], rel=0.1)  # slant -0.2 .. 0.2
    assert row["c2_thickness"] == pytest.approx(2.0 / STDS[1], rel=0.1)  # thickness 1.5 .. 3.5
    assert row["c1_purity"] > 0.8 and row["c1_switch"] == 0 and row["c2_purity"] > 0.7
    assert [evaluation.top_property(row, c) for c in (1, 2)] == ["slant", "thickness"]
    row = evaluator(FakeG("switch"))  # c1 changes the digit: not pure; c2 does nothing at all
    assert row["classes"] == 2 and row["kl_uniform"] == pytest.approx(math.log(5), abs=0.02)
    assert (row["c1_switch"], row["c1_purity"], row["c2_switch"], row["c2_purity"]) == (1, 0, 0, 0)
    # the digit classifier: cached beside the data, reloaded, retrained when the data changes
    x = evaluation.not_digits(32, torch.Generator().manual_seed(0))  # its outlier images
    assert x.shape == (32, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    root, path = make_mnist(str(tmp_path)), tmp_path / "MNIST" / "digit_classifier.pt"
    state = torch.get_rng_state()
    first = evaluation.load_classifier(root, "cpu", steps=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert "training the digit classifier" in capsys.readouterr().out and path.exists()
    assert not first.training and 0 <= first.accuracy <= 1 and (first.stds > 0).all()
    again = evaluation.load_classifier(root, "cpu", steps=3)
    assert capsys.readouterr().out == ""  # loaded, not retrained
    same(first.state_dict(), again.state_dict())
    assert again.accuracy == first.accuracy and not again.training
    make_mnist(root, seed=1)  # other training pixels: another fingerprint
    evaluation.load_classifier(root, "cpu", steps=3)
    assert "training the digit classifier" in capsys.readouterr().out
    path.write_bytes(b"not a checkpoint")  # retrained, and returned though it cannot be cached
    monkeypatch.setattr(evaluation.torch, "save", None)  # torch.save fails
    assert isinstance(evaluation.load_classifier(root, "cpu", steps=2), evaluation.Classifier)
    out = capsys.readouterr().out
    assert "training the digit" in out and "warning: cannot write" in out and "not cached" in out


# ---- Every script: the plumbing they share, and what it promises -------------------------------
SCRIPTS = ("infogan.py", "unrolled_infogan.py", "beta_vae.py", "vae_gan.py", "vae_infogan.py")
VAES = (beta_vae, vae_gan, vi)
SMALL = {infogan: ["--width", "0.125", "--batch-size", "16"],  # small, fast flags per script
         beta_vae: ["--batch-size", "8", "--mig-samples", "64", "--latents", "4"]}
SMALL[ui] = [*SMALL[infogan], "--k", "2"]
SMALL[vae_gan] = [*SMALL[beta_vae], "--width", "0.125"]
SMALL[vi] = [*SMALL[vae_gan], "--n-info", "2", "--k", "2"]
TAGS = {infogan: "", ui: "__k2", beta_vae: "__beta4", vae_gan: "__beta1", vi: "__k2__beta1"}
CASES = [(infogan, "mnist"), (ui, "mnist"), (ui, "ring"), (beta_vae, "squares"),
         (vae_gan, "squares"), (vi, "squares")]
# smoke runs only: beta_vae's 28x28 nets, and the image folder
MORE = [(beta_vae, "mnist"), (beta_vae, "celeba"), (vae_gan, "celeba"), (vi, "celeba")]
FIGURES = {  # what a run writes into its folder
    infogan: ["fig04_traversal_c1.png", "fig05_traversal_c2.png", "samples.png", "losses.png"],
    "vae": ["reconstructions.png", "samples.png", "fig14_traversals.png",
            "fig15_kl_per_latent.png", "losses.png"],
    "ring": ["fig03_scatter.png", "losses.png"]}
FIGURES[ui] = [*FIGURES[infogan], "fig12_q_loss.png"]


def case_argv(module, dataset, roots):
    root = ["--data-root", roots[dataset]] if dataset in roots else []
    return ["--dataset", dataset, *root, *SMALL[module]]


@pytest.fixture(params=CASES, ids=lambda case: f"{case[0].__name__}-{case[1]}")
def case(request, roots):
    return request.param[0], case_argv(*request.param, roots)


def parsed(module, *argv):
    """module's flags for one run on the CPU (a sweep's --k or --beta: its first value)."""
    args, _ = module.parse_args([*map(str, argv), "--device", "cpu"])
    for flag in ("k", "beta"):
        if isinstance(getattr(args, flag, None), list):
            setattr(args, flag, getattr(args, flag)[0])
    return args


@pytest.mark.parametrize("smoke", CASES + MORE, ids=lambda case: f"{case[0].__name__}-{case[1]}")
def test_smoke_run_writes_its_folder(smoke, roots, tmp_path, capsys):
    module, dataset = smoke
    folder = run(module, tmp_path, *case_argv(module, dataset, roots), "--steps", "3",
                 "--log-every", "2")
    name = rf"{module.SCRIPT[:-3]}__{dataset}{TAGS[module]}__s1__\d{{8}}-\d{{6}}-\d{{6}}"  # μs
    assert re.fullmatch(name, os.path.basename(folder)), folder
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"run folder {folder} (new run at step 0)"
    progress = r"epoch 1/\d+  step ([23])/3  (.+)  \|  [\d.]+ steps/s  ETA [\d.]+ min"
    shown = [re.fullmatch(progress, line) for line in lines[1:]]
    assert [m.group(1) for m in shown] == ["2", "3"], lines
    for m in shown:  # the epoch's mean of each loss, in the order of LOSSES
        assert [pair.split()[0] for pair in m.group(2).split("  ")] == list(module.LOSSES)
    kind = "ring" if dataset == "ring" else "vae" if module in VAES else module
    for file in ["config.json", "metrics.csv", "checkpoint.pt", *FIGURES[kind]]:
        assert os.path.getsize(os.path.join(folder, file)) > 0, file
    (row,) = metrics(folder)
    head = ["epoch", "step", "steps_per_s", "seconds", *module.LOSSES]
    assert list(row)[:len(head)] == head and row["step"] == 3
    assert all(math.isfinite(row[loss]) for loss in module.LOSSES)
    if kind == "vae":  # each latent's KL, reconstruction, and MIG where the factors are known
        assert list(row)[len(head):len(head) + 4] == [f"kl_z{j}" for j in range(4)]
        assert "mse" in row and "grey_pct" in row and all(map(math.isfinite, row.values())), row
        known = dataset == "squares"
        assert os.path.exists(os.path.join(folder, "mi_matrix.png")) == known
        assert ("mig" in row) == ("mig_sampled" in row) == known
        assert not known or 0 <= row["mig"] <= 1 and 0 <= row["mig_sampled"] <= 1
    else:  # the mode metrics on the ring, the code's accuracy and what each code moves on MNIST
        assert {"modes", "reverse_kl"} <= set(row) if kind == "ring" else 0 <= row["test_acc"] <= 1
    ckpt = checkpoint(folder)
    assert set(ckpt) == {"script", "args", "step", "seconds", "models", "optims", "rng"}
    assert ckpt["script"] == module.SCRIPT and ckpt["step"] == 3 and len(ckpt["rng"]) == 3
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == {**ckpt["args"], "torch": torch.__version__}


def test_resume_is_bit_for_bit_and_evaluation_leaves_the_training_state_alone(case, tmp_path):
    """--steps 4 straight, and --steps 2 then --resume to 4 (mid-epoch: epochs of 3 steps; the
    other flags from the checkpoint): the same weights, optimizer and RNG states and measures.
    The loss means of the row after a mid-epoch resume cover the steps since the resume."""
    module, argv = case
    straight = run(module, tmp_path / "a", *argv, "--epoch-steps", "3", "--steps", "4")
    half = run(module, tmp_path / "b", *argv, "--epoch-steps", "3", "--steps", "2")
    assert run(module, tmp_path / "b", "--resume", half, "--steps", "4") == half  # its own folder
    a, b = checkpoint(straight), checkpoint(half)
    assert a["step"] == b["step"] == 4
    same([a["models"], a["optims"], a["rng"]], [b["models"], b["optims"], b["rng"]])
    assert [r["step"] for r in metrics(half)] == [2, 3, 4]
    rows_a, rows_b = without_timing(metrics(straight)), without_timing(metrics(half)[1:])
    assert rows_a[1] == rows_b[1]  # step 4, a new epoch
    measures = [k for k in rows_a[0] if k not in module.LOSSES]
    assert [rows_a[0][k] for k in measures] == [rows_b[0][k] for k in measures]
    # evaluate and save_figures: no global random draw, no state changed, networks in training
    args = parsed(module, *argv)
    data, ctx = module.setup(args)
    nets, opts = module.build(args, data.shape)
    module.train_step(nets, opts, next(data.epoch(args.batch_size, torch.Generator()))[0], args)
    before = copy.deepcopy([[n.state_dict() for n in nets.values()],
                            [o.state_dict() for o in opts.values()], torch.get_rng_state()])
    measured = module.evaluate(nets, ctx, args)
    assert all(isinstance(v, (int, float)) for v in measured.values())
    row = {"epoch": 1.0, "step": 1, **dict.fromkeys(module.LOSSES, 1.0), **measured}
    common.append_metrics(os.path.join(tmp_path, "metrics.csv"), row)
    module.save_figures(nets, ctx, args, str(tmp_path), row)
    same(before, [[n.state_dict() for n in nets.values()],
                  [o.state_dict() for o in opts.values()], torch.get_rng_state()])
    assert all(m.training for net in nets.values() for m in net.modules())


class HostTraffic(TorchFunctionMode):
    """Notes each call into torch (TorchFunctionMode: public API) reading a device tensor on the
    host (.item(), bool(), ...), copying host data to the device (.to, .copy_, torch.tensor) or
    mixing host tensors (not 0-d scalars) with device ones. The device: meta (no GPU needed)."""

    READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
    COPIES = {"to", "cuda", "copy_"}
    FROM_HOST = {"tensor", "as_tensor", "new_tensor", "from_numpy"}

    def __init__(self):
        super().__init__()
        self.found, self.calls = [], 0

    @staticmethod
    def tensors_in(obj):
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, (list, tuple)):
            return [t for item in obj for t in HostTraffic.tensors_in(item)]
        return [obj] if isinstance(obj, torch.Tensor) else []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        host = [t for t in self.tensors_in([args, kwargs]) if t.device.type == "cpu"]
        device = [t for t in self.tensors_in([args, kwargs]) if t.device.type != "cpu"]
        self.calls += 1
        if name in self.READS and device:  # noted before the call: a meta tensor cannot be read
            self.found.append(f"{name} reads a device tensor on the host")
        out = func(*args, **kwargs)
        to_device = any(t.device.type != "cpu" for t in self.tensors_in(out))
        if to_device and (name in self.FROM_HOST or name in self.COPIES and host):
            self.found.append(f"{name} copies host data to the device")
        elif device and any(t.dim() > 0 for t in host):
            shapes = [tuple(t.shape) for t in host]
            self.found.append(f"{name} mixes host tensors {shapes} with device tensors")
        return out


def test_the_host_traffic_check_catches_reads_copies_and_mixing():
    x = torch.ones(3, device="meta")
    with HostTraffic() as mode:
        x * 2.0 + torch.ones(())  # a number and a 0-d host scalar: allowed
    assert mode.found == [] and mode.calls == 3
    with HostTraffic() as mode:
        torch.ones(3).to("meta")  # as a bias correction made on the CPU would be
        torch.tensor([1.0, 2.0], device="meta")
        x[torch.tensor([0, 2])]  # as a batch index drawn on the host would be
        with pytest.raises(RuntimeError):  # a meta tensor holds no number; a GPU would sync
            x.sum().item()
    assert [note.split()[0] for note in mode.found] == ["to", "tensor", "__getitem__", "item"]


def test_a_training_step_moves_nothing_between_host_and_device(case):
    """On the meta device; the loaders copy an epoch's order to the device once, at its start."""
    module, argv = case
    if module in (vae_gan, vi):
        pytest.skip("reads the gate's two BCEs on the host each step, by design")
    args = parsed(module, *argv)
    args.device = "meta"
    data = common.load_data(args.dataset, args.data_root, "meta")
    nets, opts = module.build(args, data.shape)
    batches = data.epoch(args.batch_size, torch.Generator().manual_seed(0))
    module.train_step(nets, opts, next(batches)[0], args)  # it makes the optimizers' states
    with HostTraffic() as mode:
        losses = module.train_step(nets, opts, next(batches)[0], args)
    assert mode.found == [] and mode.calls > 100
    assert losses.device.type == "meta" and losses.shape == (len(module.LOSSES),)


def test_bad_flags_checkpoints_and_losses_stop_runs_with_one_line_errors(roots, tmp_path,
                                                                         monkeypatch):
    out = ["--device", "cpu", "--out", tmp_path / "runs"]
    cases = [
        (beta_vae, ["--lr", "-1"], "error: argument --lr: -1 is not in [1e-09, 1]"),
        (infogan, ["--width", "99"], "error: argument --width: 99 is not in [0.015625, 4]"),
        (vae_gan, ["--gamma", "nan"], "error: argument --gamma: nan is not in"),
        (ui, ["--k", "1", "2.5"], "error: argument --k: invalid"),  # an integer flag
        (vi, ["--dataset", "squares", "--latents", "3", "--n-info", "3", "--mig-samples", "8"],
         "error: --n-info must be less than --latents"),
        (beta_vae, ["--dataset", "celeba", "--data-root", roots["celeba"], "--batch-size", "32"],
         "is larger than the data")]
    for module, argv, words in cases:
        assert words in error_of(module, *argv, *out), (module.SCRIPT, argv)
    if not torch.cuda.is_available():
        assert "no GPU" in error_of(infogan, "--device", "cuda", "--out", tmp_path / "runs")

    class RunsCode:  # unpickling it calls os.system: what a shared checkpoint could do
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    # --resume reads its checkpoint safely, before any data (this MNIST root does not exist)
    torch.save({"script": infogan.SCRIPT, "trap": RunsCode()}, tmp_path / "evil.pt")
    torch.save({"script": beta_vae.SCRIPT, "args": {}, "step": 1}, tmp_path / "other.pt")
    resume = [*out, "--data-root", tmp_path / "no_mnist", "--resume"]
    msg = error_of(infogan, *resume, tmp_path / "evil.pt")
    assert f"--resume {tmp_path / 'evil.pt'}: not a checkpoint that loads safely" in msg
    assert not (tmp_path / "ran").exists()  # the command in the pickle never ran
    msg = error_of(infogan, *resume, tmp_path / "other.pt")
    assert msg.endswith(f"{tmp_path / 'other.pt'}: not a checkpoint of infogan.py")
    assert not (tmp_path / "runs").exists()  # none of these made a run folder
    (tmp_path / "runs").write_text("")
    assert "is a file" in error_of(vae_gan, *out)
    # from the command line: one line on stderr, exit status 1
    command = [sys.executable, os.path.join(HERE, "vae_infogan.py"), "--dataset", "cifar"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: argument --dataset: invalid choice: 'cifar'")
    real, calls = beta_vae.train_step, []

    def diverging(nets, opts, x, args):  # the fourth step's tc is infinite
        calls.append(1)
        losses = real(nets, opts, x, args)
        return torch.where(torch.arange(4) == 3, math.inf, losses) if len(calls) == 4 else losses

    monkeypatch.setattr(beta_vae, "train_step", diverging)
    msg = error_of(beta_vae, *SMALL[beta_vae], "--dataset", "squares", "--steps", "6",
                   "--log-every", "5", "--out", tmp_path / "nan", "--device", "cpu")
    assert msg == "error: tc became NaN or inf at step 4; lower the lr"


HOOKS = {"parse_args", "build", "setup", "train_step", "evaluate", "save_figures", "decode"}
SHARED = {
    "plumbing": ("# ==== PLUMBING", "end of the plumbing"),
    "shared flags": ("# ---- Flags:", '"--log-every"'),
    "flag checks": ("p.set_defaults(", "return args, ckpt")}


def block(source, first, last):
    """The lines of source from the first one holding `first` through the next holding `last`."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    return lines[start:next(i for i in range(start, len(lines)) if last in lines[i]) + 1]


def drift(sources):
    """'what: script vs script' where shared blocks or top-level copies (hooks aside) differ."""
    found = []
    for what, (start, end) in SHARED.items():
        texts = {name: block(src, start, end) for name, src in sources.items()}
        found += [f"{what}: {SCRIPTS[0]} vs {name}" for name in texts
                  if texts[name] != texts[SCRIPTS[0]]]
    copies = {}  # each top-level function's and class's text, by name
    for name, src in sources.items():
        for n in ast.parse(src).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                copies.setdefault(n.name, []).append((name, ast.get_source_segment(src, n)))
    for fn, ((first, first_text), *others) in copies.items():
        if fn not in HOOKS:
            found += [f"{fn}: {first} vs {other}" for other, text in others if text != first_text]
    return found


def test_copies_are_identical_and_an_edited_copy_is_caught():
    sources = {name: pathlib.Path(HERE, name).read_text() for name in SCRIPTS}
    found = drift(sources)
    assert not found, "\n".join(found)
    one_unroll = {"flat_adam_state", "snapshot_d", "d_forward", "adam_step", "unroll",
                  "unrolled_g_loss", "forward_with_copied_buffers"}
    assert one_unroll <= set(dir(ui)) & set(dir(vi))  # so each of them is one text
    parts = {"generator", "Discriminator", "make_latent", "sample_latents", "traversal_latents",
             "fixed_latents", "d_loss", "information_losses", "save_digit_figures"}
    assert parts <= set(dir(ui)) & set(dir(infogan))  # infogan.py's parts
    assert "equilibrium_gate" in set(dir(vae_gan)) & set(dir(vi))
    edits = [("plumbing", "vae_gan.py", "weights_only=True", "weights_only=False"),
             ("shared flags", "beta_vae.py", "default=1, help=", "default=2, help="),
             ("flag checks", "vae_infogan.py", "RUN_FLAGS or", "RUN_FLAGS and"),
             ("adam_step", "vae_infogan.py", "(1 - b2) * grad", "(1.0 - b2) * grad")]
    for what, name, text, edit in edits:  # each edit found, as what drift reports of it
        assert sources[name].count(text) == 1, (name, text)
        first = "unrolled_infogan.py" if what == "adam_step" else "infogan.py"
        edited = dict(sources, **{name: sources[name].replace(text, edit)})
        assert f"{what}: {first} vs {name}" in set(drift(edited)) - set(found)


# ---- infogan.py --------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1.0, 0.25])
def test_networks_information_losses_and_traversal_latents(width):
    G, D = infogan.generator(74, width).eval(), infogan.Discriminator(10, 2, width).eval()
    latent, c_cat, c_cont = infogan.sample_latents(5, 62, 10, 2, "cpu")
    assert c_cont.min() >= -1 and c_cont.max() <= 1 and c_cat.max() < 10
    x = G(latent)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    d, q = D(x)
    assert d.shape == (5,) and q.shape == (5, 12)
    assert D.body[0].out_channels == round(64 * width) and G[0].out_features == round(1024 * width)
    li_cat, li_cont = infogan.information_losses(q, c_cat, c_cont, 10)
    assert torch.allclose(li_cat, -torch.log_softmax(q[:, :10], 1)[torch.arange(5), c_cat].mean())
    nll = -torch.distributions.Normal(q[:, 10:], 1.0).log_prob(c_cont).mean()  # σ = 1
    assert torch.allclose(li_cont, nll - 0.5 * math.log(2 * math.pi))  # less its constant
    n_noise, n_cat, values = 62, 10, torch.linspace(-2, 2, 10)  # the traversals' layout
    z, c_cont = torch.randn(n_noise), torch.tensor([0.3, -0.7])
    rows, cols = torch.meshgrid(torch.arange(n_cat), torch.arange(len(values)), indexing="ij")
    for code in (0, 1):
        latent, c_cat, cc = infogan.traversal_latents(z, c_cont, code, values, n_cat)
        grid = latent.view(n_cat, len(values), -1)  # (rows, columns, latent)
        one_hot = grid[..., n_noise:n_noise + n_cat]
        assert torch.equal(one_hot.argmax(-1), rows) and torch.equal(c_cat, rows.flatten())
        assert torch.equal(one_hot.sum(-1), torch.ones(n_cat, len(values)))  # one-hot
        assert torch.equal(grid[..., n_noise + n_cat + code], values[cols])  # the varied code
        held = torch.full((n_cat, 10), float(c_cont[1 - code]))
        assert torch.equal(grid[..., n_noise + n_cat + 1 - code], held)  # the other code: held
        assert torch.equal(grid[..., :n_noise], z.expand(n_cat, len(values), -1))  # noise fixed
        assert torch.equal(cc.view(n_cat, 10, 2)[..., code], values[cols])


# ---- unrolled_infogan.py: the look-ahead (vae_infogan.py's is the same text: tested once) -------
# Tiny float64 nets, smooth (finite differences fail at ReLU kinks), BatchNorm in D (unroll: kept)
class TinyD(nn.Module):
    """InfoGAN's layout in miniature: a body with BatchNorm shared by D's head and Q's head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.SiLU(), nn.Linear(6, 5),
                                  nn.Softplus())
        self.d_head, self.q_head = nn.Linear(5, 1), nn.Linear(5, 3 + 1)

    def forward(self, x):
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


def tiny_setup(dtype=torch.float64):
    """Tiny G, D, D's Adam (on body and d_head, as the scripts) after 3 steps, a batch, latents."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(dtype)
    D = TinyD().to(dtype)
    opt_d = torch.optim.Adam([*D.body.parameters(), *D.d_head.parameters()], lr=0.05,
                             betas=(0.5, 0.999))
    x = torch.randn(16, 4, dtype=dtype) + 1.0
    z = ui.make_latent(torch.randn(16, 2, dtype=dtype), torch.arange(16) % 3,
                       torch.rand(16, 1, dtype=dtype) * 2 - 1, 3)
    for _ in range(3):
        opt_d.zero_grad()
        ui.d_loss(D(x)[0], D(G(z[torch.randperm(16)]).detach())[0]).backward()
        opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    return G, D, opt_d, x, z


def g_grad(G, D, opt_d, x, z, k, kind, first_order=False):
    """G's gradient (flat) of f_K."""
    G.zero_grad(set_to_none=True)
    ui.unrolled_g_loss(D, opt_d, x, G(z), k, 0.05, kind=kind, first_order=first_order).backward()
    return torch.cat([p.grad.reshape(-1) for p in G.parameters()])


@pytest.mark.parametrize("kind", ["saddle", "ns"])
def test_the_exact_unrolled_gradient_matches_central_finite_differences_and_k0_the_plain_one(kind):
    G, D, opt_d, x, z = tiny_setup()
    k, h = 3, 1e-6  # Adam's normalisation is strongly curved: the O(h²) error is ~1e-6 at h = 1e-5
    exact = g_grad(G, D, opt_d, x, z, k, kind)
    first_order = g_grad(G, D, opt_d, x, z, k, kind, first_order=True)
    theta = torch.nn.utils.parameters_to_vector(G.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # derivatives along random directions u
        u = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        f = []
        for sign in (1, -1):
            torch.nn.utils.vector_to_parameters(theta + sign * h * u, G.parameters())
            f.append(ui.unrolled_g_loss(D, opt_d, x, G(z), k, 0.05, kind=kind).item())
        torch.nn.utils.vector_to_parameters(theta, G.parameters())
        fd, ad = (f[0] - f[1]) / (2 * h), float(exact @ u)
        assert abs(fd - ad) <= 1e-5 * abs(fd), (kind, fd, ad)
        # the first-order ("popular port") gradient misses eq. (11)'s 2nd term: another vector
        assert abs(float(first_order @ u) - fd) > 1e-3 * abs(fd), (kind, fd, float(first_order @ u))
    unrolled = g_grad(G, D, opt_d, x, z, 0, kind)  # K = 0: the plain GAN's gradient
    G.zero_grad()
    logit = D(G(z))[0]
    plain = {"saddle": -ui.d_loss(D(x)[0], logit),
             "ns": F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))}
    plain[kind].backward()
    assert torch.equal(unrolled, torch.cat([p.grad.reshape(-1) for p in G.parameters()]))


def test_the_look_ahead_is_torch_adam_d_moves_by_its_own_step_only_and_ops_grow_with_k():
    G, D, opt_d, x, z = tiny_setup()
    before = copy.deepcopy((D.state_dict(), opt_d.state_dict()))
    for first_order in (False, True):
        g_grad(G, D, opt_d, x, z, 5, "ns", first_order)
    same(before, (D.state_dict(), opt_d.state_dict()))  # weights, BatchNorm stats, Adam's state
    assert all(p.grad is None for p in D.parameters())  # nothing leaked into the real D
    # forward_with_copied_buffers: D's outputs, gradients for D's parameters, D's buffers kept
    logit, q = ui.forward_with_copied_buffers(D, x)
    same(before[0], D.state_dict())
    q.sum().backward()
    assert D.q_head.weight.grad is not None and D.body[0].weight.grad is not None
    expected_logit, expected_q = D(x)
    assert torch.equal(logit, expected_logit) and torch.equal(q, expected_q)
    # the differentiable Adam does what torch.optim.Adam does (moments, step count, correction)
    fake = G(z).detach()
    snap = ui.snapshot_d(D, opt_d)
    assert snap["t"] == 3 and isinstance(snap["t"], int)  # tiny_setup's 3 steps of opt_d
    theta = ui.unroll(D, snap, x, fake, 2, 0.05, first_order=True)
    D2 = copy.deepcopy(D)
    d2_params = [*D2.body.parameters(), *D2.d_head.parameters()]
    opt2 = torch.optim.Adam(d2_params, lr=0.05, betas=(0.5, 0.999))
    opt2.load_state_dict(opt_d.state_dict())
    for _ in range(2):
        opt2.zero_grad()
        ui.d_loss(D2(x)[0], D2(fake)[0]).backward()
        opt2.step()
    # atol: the bias before BatchNorm has a zero gradient up to rounding (BN cancels it); Adam turns
    # that rounding noise (~1e-17, different in the two code paths) into moves of ~1e-10
    real = torch.nn.utils.parameters_to_vector(d2_params)
    assert torch.allclose(theta, real, rtol=1e-10, atol=1e-8)
    assert (theta - snap["theta"]).abs().max() > 1e-2  # and the steps did move D
    for name, b in D2.named_buffers():  # the copy's BatchNorm stats moved like a real D's
        assert torch.allclose(snap["rest"][name].double(), b.double(), rtol=1e-10, atol=1e-8)
        assert not torch.equal(b, dict(D.named_buffers())[name])
    # train_step: D after a step is the same whatever K (the look-ahead works on a copy), G is
    # not; the only gradients computed for D are its own step's (infogan.py's train_step too)
    after = []
    for module, k in ((infogan, 0), (ui, 0), (ui, 3)):
        G, D, opt_d, x, _ = tiny_setup(torch.float32)  # train_step's latents: float32
        opt_g = torch.optim.Adam([*G.parameters(), *D.q_head.parameters()], betas=(0.5, 0.999))
        args = SimpleNamespace(n_cat=3, n_cont=1, n_noise=2, k=k, unroll_lr=0.05, g_loss="ns",
                               first_order=False, lambda_cat=1.0, lambda_cont=1.0)
        owned = [name for name, p in D.named_parameters() if not name.startswith("q_head")]
        grads = []  # the gradients computed for D's own parameters: D's step's alone, once each
        for name in owned:
            D.get_parameter(name).register_hook(lambda g, name=name, got=grads: got.append(name))
        torch.manual_seed(5)
        losses = module.train_step({"G": G, "D": D}, {"d": opt_d, "g": opt_g}, x, args)
        assert torch.isfinite(losses).all() and sorted(grads) == sorted(owned), (module, k, grads)
        d_state = {n: v for n, v in D.state_dict().items() if not n.startswith("q_head")}
        after.append((d_state, opt_d.state_dict(), [*G.parameters()]))
    same(after[1][:2], after[2][:2])  # unrolled_infogan.py at K = 0 and K = 3
    assert not all(torch.equal(a, b) for a, b in zip(after[1][2], after[2][2]))
    # benchmark.py --count-ops: each exact unrolled step adds the same calls (forward, backward,
    # double backward, Adam); the first-order unroll dispatches fewer than the exact one
    import benchmark
    n0, n1, n2, n3 = (benchmark.count_ops(k, False, "cpu", width=0.125)[0] for k in (0, 1, 2, 3))
    assert n0 < n1 < n2 < n3 and (n3 - n2) == (n2 - n1)
    assert benchmark.count_ops(2, True, "cpu", width=0.125)[0] < n2


def test_a_k_sweep_writes_its_comparison_and_a_ring_comparison_draws_fig3(roots, tmp_path):
    last = run(ui, tmp_path, *case_argv(ui, "mnist", roots), "--k", "0", "1", "--steps", "2")
    (sweep,) = tmp_path.iterdir()
    assert re.fullmatch(r"unrolled_infogan__mnist__sweep__s1__\d{8}-\d{6}", sweep.name)
    runs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name.split("__")[2] for d in runs] == ["k0", "k1"] and last == str(runs[1])
    table = (sweep / "comparison.md").read_text()
    assert "values at step 2," in table and "Spearman" in table
    assert "| 0 | — | — | 1 |" in table and "| 1 | exact | 2.5e-05 | 1 |" in table
    assert (sweep / "fig12_q_loss.png").stat().st_size > 0
    folder = run(ui, tmp_path / "ring", *case_argv(ui, "ring", {}), "--steps", "2")
    lines = evaluation.compare_runs([folder, folder], str(tmp_path / "cmp"), "test")
    assert any(line.startswith("| 2 | exact | 0.0001 | 2 |") for line in lines), lines  # 2 runs
    assert (tmp_path / "cmp" / "fig03_scatter.png").stat().st_size > 0


# ---- beta_vae.py (and the fixed images every VAE script measures on) ----------------------------
def test_reconstruction_loss_and_total_correlation_known_answers():
    for b in (1, 2, 5):  # logits 0: BCE log 2 per pixel, 4 pixels: 4 log 2 per image, whatever B
        x = (torch.rand(b, 1, 2, 2) > 0.5).float()
        loss = beta_vae.reconstruction_loss(torch.zeros(b, 1, 2, 2), x, "bernoulli")
        assert torch.isclose(loss, torch.tensor(4 * math.log(2)))
    # twice the pixels -> twice the loss (a per-pixel mean would keep it constant)
    ones = torch.ones(3, 1, 2, 4)
    assert torch.isclose(beta_vae.reconstruction_loss(ones * 0, ones, "bernoulli"),
                         torch.tensor(8 * math.log(2)))
    # Gaussian (colour): sigmoid(0) = 0.5 vs x = 1 -> 0.25 per value; 3 x 2 x 2 values -> 3.0
    loss = beta_vae.reconstruction_loss(torch.zeros(7, 3, 2, 2), torch.ones(7, 3, 2, 2), "gaussian")
    assert torch.isclose(loss, torch.tensor(3.0))
    collapsed = torch.zeros(64, 3)  # every posterior the prior: nothing to correlate
    assert abs(float(beta_vae.total_correlation(torch.randn(64, 3), collapsed, collapsed))) < 1e-5
    # narrow posteriors on an 8 x 8 grid: latents independent over the batch, TC ≈ 0
    grid = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0))
    narrow = torch.full((64, 2), -10.0)
    assert abs(float(beta_vae.total_correlation(grid, grid, narrow))) < 1e-3
    # the same 64 points on the diagonal: z_1 = z_2, TC = log 64 (the batch's resolution)
    diag = torch.arange(64.0)[:, None].expand(64, 2)
    tc = beta_vae.total_correlation(diag, diag, narrow)
    assert float(tc) == pytest.approx(math.log(64), rel=1e-4)


def test_resume_by_epochs_needs_no_flags_again_and_refuses_a_changed_one(tmp_path, capsys):
    """2 epochs, then --resume RUN --epochs 4 (nothing else), give a straight 4-epoch run's weights,
    optimizer and RNG states and metrics.csv (timing aside) bit for bit; --beta 8 is refused."""
    flags = [*case_argv(beta_vae, "squares", {}), "--beta", "1", "--epoch-steps", "2"]
    straight = run(beta_vae, tmp_path / "a", *flags, "--epochs", "4")
    folder = run(beta_vae, tmp_path / "b", *flags, "--epochs", "2")
    assert run(beta_vae, tmp_path / "b", "--resume", folder, "--epochs", "4") == folder
    assert f"run folder {folder} (resumed at step 4)\n" in capsys.readouterr().out
    a, b = checkpoint(straight), checkpoint(folder)
    assert a["step"] == b["step"] == 8
    same([a["models"], a["optims"], a["rng"]], [b["models"], b["optims"], b["rng"]])
    assert [r["step"] for r in metrics(folder)] == [2, 4, 6, 8]
    assert without_timing(metrics(straight)) == without_timing(metrics(folder))
    msg = error_of(beta_vae, "--resume", folder, "--beta", "8", "--device", "cpu")
    assert msg == "error: --resume keeps the run's beta = 1.0; leave it out"
    assert len(metrics(folder)) == 4


def test_a_beta_sweep_writes_its_comparison_of_runs_measured_alike(tmp_path):
    last = run(beta_vae, tmp_path, *case_argv(beta_vae, "squares", {}), "--beta", "1", "2",
               "--steps", "2")
    (sweep,) = tmp_path.iterdir()
    assert re.fullmatch(r"beta_vae__squares__sweep__s1__\d{8}-\d{6}", sweep.name)
    runs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name.split("__")[2] for d in runs] == ["beta1", "beta2"] and last == str(runs[1])
    table = (sweep / "comparison.md").read_text()
    assert "| VAE (β = 1) | 1 |" in table and "| β-VAE β = 2 | 1 |" in table
    assert "pos_x on" in table and "MIG (sampled z)" in table
    assert (sweep / "fig_vae_sweep.png").stat().st_size > 0
    # beside a GAN-VAE: its D's BCEs and the gate's shares over the 2nd half; none for a VAE
    gan = run(vi, tmp_path / "gan", *case_argv(vi, "squares", {}), "--steps", "2")
    rows = evaluation.compare_runs([sweep, gan], str(tmp_path / "cmp"), "test")[-3:]
    assert rows[0].split(" | ")[10:14] == ["—"] * 4 and rows[1].split(" | ")[10:14] == ["—"] * 4
    assert all(0 <= float(cell) <= 1e3 for cell in rows[2].split(" | ")[10:14]), rows[2]
    # a sweep's short runs begin within a second of each other: each gets a folder of its own
    args = parsed(beta_vae, "--dataset", "squares", "--out", tmp_path / "same_second")
    first, second = beta_vae.make_run_folder(args), beta_vae.make_run_folder(args)
    assert first != second and os.path.isfile(os.path.join(second, "config.json"))
    # every VAE script measures on the same fixed squares
    ctx = [module.setup(parsed(module, "--dataset", "squares", "--mig-samples", "20"))[1]
           for module in VAES]
    assert ctx[0]["x"].shape == (20, 1, 64, 64) and ctx[0]["x"].dtype == torch.int8
    # [0, 1] for the sigmoid decoders, [-1, 1] for vae_gan's tanh one
    assert torch.equal(ctx[0]["x"], ctx[2]["x"]) and torch.equal(ctx[0]["x"] * 2 - 1, ctx[1]["x"])
    assert all(torch.equal(ctx[0]["factors"], c["factors"]) for c in ctx)


# ---- vae_gan.py (the equilibrium gate: vae_infogan.py's too) -----------------------------------
@pytest.mark.parametrize("module", [vae_gan, vi])
def test_the_equilibrium_gate_pauses_the_side_that_wins(module):
    def gate(real, fake, margin=0.35):
        return module.equilibrium_gate(real, fake, 0.68, margin)

    assert gate(0.7, 0.6) == (True, True)  # both BCEs near equilibrium: both learn
    assert gate(0.2, 0.3) == (False, True)  # D wins on real and fake images: D pauses
    assert gate(0.1, 0.9) == (False, True)  # D wins on either (aegan.py): it pauses
    assert gate(0.7, 0.2) == (False, True)
    assert gate(1.2, 0.7) == (True, False)  # D loses badly: the decoder pauses
    assert gate(0.2, 1.2) == (True, True)  # both would pause: both learn (aegan.py)
    assert gate(0.01, 5.0, margin=math.inf) == (True, True)  # no gate


def test_vae_gan_feature_likelihood_one_batch_paused_d_and_decoding_with_posterior_statistics():
    features = SimpleNamespace(features=nn.Identity())  # Dis_l(x) = x
    for b in (1, 5):  # ½ Σ over 12 features of (1 - 0)², whatever the batch
        nll = vae_gan.feature_nll(features, torch.ones(b, 12), torch.zeros(b, 12))
        assert torch.isclose(nll, torch.tensor(6.0))
    # every BCE far below 50 - 0.35: D pauses
    args = parsed(vae_gan, "--latents", "4", "--width", "0.125", "--equilibrium", "50")
    torch.manual_seed(0)
    nets, opts = vae_gan.build(args, (1, 64, 64))
    before = copy.deepcopy(nets["dis"].state_dict())
    losses = vae_gan.train_step(nets, opts, torch.rand(8, 1, 64, 64) * 2 - 1, args)
    assert losses[-2:].tolist() == [0.0, 1.0]  # d_on, g_on
    assert not opts["dis_opt"].state and opts["dec_opt"].state  # a paused optimizer: no step
    assert all(torch.equal(v, nets["dis"].state_dict()[k]) for k, v in before.items()
               if "running" not in k and "num_batches" not in k)
    # Dis_l of x̃ and x in ONE batch (aegan.py): the earlier layers' BatchNorm then keeps a global
    # shift of x̃ (the background from black to grey) that two batches would normalise away
    x = common.Sprites("cpu", signed=True, squares=True).eval_set(64)[0]
    grey = x.clamp(min=0.0)  # the background from -1 to 0
    for seed in range(3):
        torch.manual_seed(seed)
        dis = vae_gan.LarsenDiscriminator(1, 0.125)
        with torch.no_grad():
            joint = vae_gan.feature_nll(dis, grey, x)
            apart = 0.5 * (dis.features(grey) - dis.features(x)).pow(2).sum() / len(x)
        assert joint > 1.3 * apart, (seed, joint, apart)
    # reconstructions: a step decodes x̃ and x_p as ONE batch, so the running statistics that
    # eval mode (decode) uses are those of the batches the decoder trains on
    args = parsed(vae_gan, "--latents", "4", "--width", "0.125")
    nets, opts = vae_gan.build(args, (1, 64, 64))
    rows = []
    nets["dec"].register_forward_hook(lambda module, inputs, out: rows.append(len(inputs[0])))
    for _ in range(3):
        vae_gan.train_step(nets, opts, x[:16], args)
    assert rows == [32, 32, 32]  # one call a step: 16 posterior and 16 prior codes
    with torch.no_grad():
        nets["dec"].eval()
        expected = (nets["dec"](x.new_ones(5, 4)) + 1) / 2
    nets["dec"].train()
    assert torch.equal(vae_gan.decode(nets["dec"], x.new_ones(5, 4)), expected)
    assert nets["dec"].training


# ---- vae_infogan.py (its unroll: unrolled_infogan.py's text, tested there) ---------------------
def small_vae_infogan(*flags):
    """args, nets, optimizers: 64x64, 4 latents (2 information latents), 4 channels first."""
    args = parsed(vi, *SMALL[vi], *flags)
    torch.manual_seed(0)
    return (args, *vi.build(args, (1, 64, 64)))


def test_vae_infogan_li_body_moves_q_body_on_l_i_alone():
    """D paused by the gate (BCEs under 9 - 1), the decoder on: D's body, Q's too, moves only
    with --li-body, and only by λ·L_I (λ = 0: not at all, so recon and f_K do not reach it)."""
    x = torch.rand(8, 1, 64, 64)
    for flags, moves in [((), False), (("--li-body", "--lambda-info", "0"), False),
                         (("--li-body",), True)]:
        args, nets, opts = small_vae_infogan("--k", "2", "--equilibrium", "9", "--margin", "1",
                                             *flags)
        before = [p.detach().clone() for p in nets["D"].body.parameters()]
        losses = vi.train_step(nets, opts, x, args)
        assert losses[-2:].tolist() == [0.0, 1.0]  # d_on, g_on
        after = list(nets["D"].body.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(after, before)) == moves, flags


def test_vae_infogan_optimizers_d_and_the_encoders_gradients_and_its_kl_split():
    args, nets, opts = small_vae_infogan("--k", "3")
    owner = {id(p): k for k, o in opts.items() for group in o.param_groups for p in group["params"]}
    # no parameter twice, and none left out; Q's head trains with the decoder, D's body with D
    assert sum(len(g["params"]) for o in opts.values() for g in o.param_groups) == len(owner)
    assert set(owner) == {id(p) for m in nets.values() for p in m.parameters()}
    D = nets["D"]
    assert D.body[0].out_channels == 4  # --width 0.125: × 32 channels
    assert {owner[id(p)] for p in [*D.body.parameters(), *D.d_head.parameters()]} == {"d"}
    assert {owner[id(p)] for p in D.q_head.parameters()} == {"dec"}
    x = torch.rand(8, 1, 64, 64)
    vi.train_step(nets, opts, x, args)  # Adam moments and a step count in every optimizer
    after_d_step, d_step = [], opts["d"].step

    def d_state():
        d_only = {k: v for k, v in nets["D"].state_dict().items() if not k.startswith("q_head.")}
        return copy.deepcopy((d_only, opts["d"].state_dict()))

    def step_and_copy():
        d_step()
        after_d_step.append(d_state())

    opts["d"].step = step_and_copy
    q0, dec0 = copy.deepcopy(nets["D"].q_head.state_dict()), copy.deepcopy(nets["dec"].state_dict())
    vi.train_step(nets, opts, x, args)
    assert len(after_d_step) == 1
    same(after_d_step[0], d_state())  # the unroll, L_I and Dis_l ran on copies
    assert not torch.equal(q0["2.weight"], nets["D"].q_head.state_dict()["2.weight"])
    assert not torch.equal(dec0["0.weight"], nets["dec"].state_dict()["0.weight"])
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5])
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25), 0.0])
    with torch.no_grad():  # every image encodes to (μ, log σ²)
        nets["enc"][-1].weight.zero_()
        nets["enc"][-1].bias.copy_(torch.cat([mu, logvar]))
    row = vi.evaluate(nets, {"x": torch.rand(5, 1, 64, 64), "factors": None, "sizes": None}, args)
    closed = [0.5 * (m ** 2 + math.exp(lv) - lv - 1) for m, lv in zip(mu.tolist(), logvar.tolist())]
    assert [row[f"kl_z{j}"] for j in range(4)] == pytest.approx(closed, abs=1e-6)
    assert row["kl_info"] == pytest.approx((0.5 + 0.5 * (3 - math.log(4))) / 2, abs=1e-6)
    kl_rest = (0.5 * (4 + 0.25 + math.log(4) - 1) + 0.125) / 2  # z2 and z3, by hand
    assert row["kl_rest"] == pytest.approx(kl_rest, abs=1e-6)
    after = []  # from the same state and noise, K = 0 and K = 2 change f_K: the decoder only
    for k in ("0", "2"):
        args, nets, opts = small_vae_infogan("--k", k)
        torch.manual_seed(3)
        vi.train_step(nets, opts, torch.rand(8, 1, 64, 64, generator=torch.Generator()), args)
        after.append({name: copy.deepcopy(nets[name].state_dict()) for name in ("enc", "dec")})
    same(after[0]["enc"], after[1]["enc"])
    assert not torch.equal(after[0]["dec"]["0.weight"], after[1]["dec"]["0.weight"])
    # β = 0: the encoder learns through the decoded images alone (reconstruction and λ·L_I); with
    # that path cut (the decoder's output detached) nothing is left: L_I's target c is detached
    for cut in (False, True):
        args, nets, opts = small_vae_infogan("--k", "0", "--beta", "0", "--lambda-info", "1")
        if cut:
            nets["dec"].register_forward_hook(lambda module, inputs, out: out.detach())
        vi.train_step(nets, opts, torch.rand(8, 1, 64, 64), args)
        grads = [p.grad for p in nets["enc"].parameters()]
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads) == (not cut)


# ---- Line budgets (last: under -x the rest runs first) -----------------------------------------
# vae_infogan.py's aim was 480, and a script's mean line 55 characters: the shared flags and
# plumbing (about 140 lines at 60 characters) and the unroll keep them at 500 and 60
BUDGETS = {"infogan.py": 370, "beta_vae.py": 360, "vae_gan.py": 420, "vae_infogan.py": 500,
           "unrolled_infogan.py": 520, "common.py": 480, "evaluation.py": 700,
           "test_smoke.py": 1115}
MEAN = 60  # characters per non-blank line of a script


def test_line_budgets():
    """Lines per file (blank lines and docstrings too), 100 characters a line at most, a plumbing
    block of 110 lines at most, MEAN characters per non-blank line of a script on average."""
    over = []
    for name in sorted(f for f in os.listdir(HERE) if f.endswith(".py")):
        lines = pathlib.Path(HERE, name).read_text(encoding="utf-8").splitlines()
        if len(lines) > BUDGETS.get(name, math.inf):
            over.append(f"{name}: {len(lines)} lines > {BUDGETS[name]}")
        long = [number for number, line in enumerate(lines, 1) if len(line) > 100]
        if long:
            over.append(f"{name}: lines {long} over 100 characters")
        if name in SCRIPTS:
            plumbing = len(block("\n".join(lines), "PLUMBING", "end of the plumbing"))
            if plumbing > 110:
                over.append(f"{name}: plumbing block {plumbing} lines > 110")
            non_blank = [line for line in lines if line.strip()]
            mean = sum(map(len, non_blank)) / len(non_blank)
            if mean > MEAN:
                over.append(f"{name}: {mean:.1f} characters per non-blank line > {MEAN}")
    assert not over, "\n".join(over)
