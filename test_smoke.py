"""Tests: smoke runs of every script on tiny data in the real on-disk formats, and checks of the math.

Run with:  python -m pytest -q test_smoke.py
The data is made here (a tiny MNIST in the IDX format torchvision reads, a folder of tiny JPEGs in the
CelebA layout); nothing is downloaded and ../shared is never read.
"""
import copy
import itertools
import math
import os
import struct
import subprocess
import sys
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
import torch.nn as nn
import torchvision
from torch.func import functional_call

import beta_vae
import common
import infogan
import unrolled_infogan as ui
import vae_gan
import vae_infogan as vi

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------
# Tiny data in the real formats
# ------------------------------------------------------------------------------------------------
def write_idx(path, array, magic):
    """Write a uint8 tensor in the IDX format (big-endian header: magic, then one int per dimension)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic))
        for d in array.shape:
            f.write(struct.pack(">i", d))
        f.write(array.contiguous().numpy().tobytes())


def make_mnist(root, n_train=256, n_test=128, seed=0):
    """A tiny MNIST under root/MNIST/raw: blurry class-dependent blobs, labels 0-9."""
    g = torch.Generator().manual_seed(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
        cx = 6 + 1.6 * labels.float()[:, None, None]
        img = torch.exp(-((xx - cx) ** 2 + (yy - 14) ** 2) / 18) + 0.1 * torch.rand(n, 28, 28, generator=g)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), (img.clamp(0, 1) * 255).to(torch.uint8), 2051)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels.to(torch.uint8), 2049)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """Path of a data root holding a tiny MNIST (256 train, 128 test) in the IDX format."""
    return make_mnist(str(tmp_path_factory.mktemp("mnist")))


@pytest.fixture(scope="session")
def tiny_celeba(tmp_path_factory):
    """Path of a data root holding 12 small JPEGs in the CelebA layout (ROOT/img_align_celeba/)."""
    root = tmp_path_factory.mktemp("celeba")
    folder = root / "img_align_celeba"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        img = (torch.rand(40, 32, 3, generator=g) * 255).to(torch.uint8)
        PIL.Image.fromarray(img.numpy()).save(folder / f"{i + 1:06d}.jpg")
    return str(root)


def run_script(script, *args, cwd, expect_rc=0, timeout=600):
    """Run a script of this project in a subprocess on the CPU; return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def one_line_error(proc):
    """Assert a run failed with exactly one line on stderr that starts with 'error:' (no traceback)."""
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def assert_same(a, b):
    """Assert two (nested dicts / lists of) tensors and values are equal bit for bit, dtypes included."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b

def parse_error(module, args):
    """Assert module.parse_args(args) stops with a one-line 'error:' (SystemExit); return the line."""
    with pytest.raises(SystemExit) as e:
        module.parse_args([*args, "--device", "cpu"])
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# common.py
# ------------------------------------------------------------------------------------------------
def test_mnist_loads_from_idx(tiny_mnist):
    train = common.load_mnist(tiny_mnist, "cpu", train=True)
    test = common.load_mnist(tiny_mnist, "cpu", train=False)
    assert len(train) == 256 and len(test) == 128 and train.shape == (1, 28, 28)
    x, y = next(train.epoch(32, torch.Generator().manual_seed(0)))
    assert x.shape == (32, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    # an epoch visits each image once (drop-last), in a different order per seed
    seen = torch.cat([y for _, y in train.epoch(32, torch.Generator().manual_seed(0))])
    assert len(seen) == 256 and torch.equal(torch.bincount(seen, minlength=10), torch.bincount(train.labels))


def test_mnist_missing_and_corrupt_give_one_line(tmp_path, tiny_mnist):
    with pytest.raises(SystemExit) as e:
        common.load_mnist(str(tmp_path / "nowhere"), "cpu")
    msg = str(e.value)
    assert msg.startswith("error:") and "nowhere/MNIST/raw" in msg and "--data-root" in msg and "\n" not in msg
    bad = tmp_path / "bad"
    make_mnist(str(bad), n_train=20, n_test=20)
    path = bad / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit) as e:
        common.load_mnist(str(bad), "cpu")
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


def test_image_folder_layout_and_errors(tiny_celeba, tmp_path):
    data = common.load_image_folder(tiny_celeba, "cpu", size=64)
    assert len(data) == 12 and data.shape == (3, 64, 64)
    with pytest.raises(SystemExit) as e:
        common.load_image_folder(str(tmp_path), "cpu")  # empty folder
    assert "img_align_celeba" in str(e.value) and "--data-root" in str(e.value)


def test_sprites_renders_the_factors_asked_for():
    s = common.Sprites("cpu")
    assert len(s) == 3 * 6 * 40 * 32 * 32
    idx = torch.tensor([0, 12345, len(s) - 1])
    f = s.factors(idx)
    radix = torch.tensor([6 * 40 * 32 * 32, 40 * 32 * 32, 32 * 32, 32, 1])
    assert torch.equal((f * radix).sum(1), idx)  # mixed-radix round trip
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
            assert img[0].sum() == img[-1].sum() == img[:, 0].sum() == img[:, -1].sum() == 0  # inside frame
    # a square is symmetric under a quarter turn, an ellipse is not; 10 orientation steps = 90 degrees
    sq = s.render(torch.tensor([[0, 5, 0, 16, 16], [0, 5, 10, 16, 16]]))
    el = s.render(torch.tensor([[1, 5, 0, 16, 16], [1, 5, 10, 16, 16]]))
    assert (sq[0] != sq[1]).float().sum() <= 8
    assert (el[0] != el[1]).float().sum() > 50
    assert torch.equal(el[1, 0], el[0, 0].T) or (el[1, 0] != el[0, 0].T).float().sum() <= 8


def test_toy_ring_has_8_distinct_modes():
    ring = common.ToyData("ring", "cpu")
    assert ring.modes.shape == (8, 2) and torch.cdist(ring.modes, ring.modes).add(10 * torch.eye(8)).min() > 1.5
    assert torch.allclose(ring.modes.norm(dim=1), torch.full((8,), 2.0))
    x, k = ring.sample(4000, torch.Generator().manual_seed(0))
    assert (x - ring.modes[k]).norm(dim=1).max() < 0.02 * 6
    assert common.ToyData("grid", "cpu").modes.shape == (25, 2)


def test_traversal_grid_layout(tmp_path):
    import matplotlib.image
    rows, cols = 3, 4
    imgs = torch.zeros(rows, cols, 1, 8, 8)
    imgs[1, 2] = 1.0  # one white cell at row 1, column 2
    path = tmp_path / "t.png"
    common.save_traversal(imgs, str(path), values=torch.linspace(-2, 2, cols), row_labels=list("abc"))
    assert path.exists() and path.stat().st_size > 0
    grid = torchvision.utils.make_grid(imgs.reshape(-1, 1, 8, 8), nrow=cols, padding=2, pad_value=1.0)
    # the white cell lands in grid row 1, column 2 of the layout save_grid uses
    cell = grid[0, 2 + 1 * 10:2 + 1 * 10 + 8, 2 + 2 * 10:2 + 2 * 10 + 8]
    assert cell.min() == 1.0 and grid[0, 2:10, 2:10].max() == 0.0
    assert matplotlib.image.imread(str(path)).ndim == 3


def test_metrics_csv_round_trip_and_plot(tmp_path):
    path = str(tmp_path / "metrics.csv")
    for e in range(3):
        common.append_metrics(path, {"epoch": e + 1, "step": 10 * (e + 1), "loss_d": 0.5 / (e + 1)})
    rows = common.read_metrics(path)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and abs(rows[2]["loss_d"] - 0.5 / 3) < 1e-5
    common.plot_metrics({"a": path, "b": path}, ["loss_d"], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# infogan.py
# ------------------------------------------------------------------------------------------------
COLUMNS = ["epoch", "step", "seconds", "steps_per_s", "loss_d", "loss_g", "li_cat", "li_cont", "test_acc"]
FIGURES = ["fig04_traversal_c1.png", "fig05_traversal_c2.png", "samples.png", "losses.png"]


def infogan_only_run(out):
    (run,) = [os.path.join(out, d) for d in os.listdir(out)]
    return run


def infogan_train(data_root, out, *extra, cwd):
    return run_script("infogan.py", "--dataset", "mnist", "--data-root", data_root, "--batch-size", "16",
                      "--device", "cpu", "--out", out, "--log-every", "2", *extra, cwd=cwd)


def test_infogan_smoke_run_writes_folder_figures_finite_metrics(tiny_mnist, tmp_path):
    proc = infogan_train(tiny_mnist, tmp_path / "runs", "--steps", "3", cwd=tmp_path)
    run = infogan_only_run(tmp_path / "runs")
    assert os.path.basename(run).startswith("infogan__mnist__s1__")
    for name in ["config.json", "metrics.csv", "checkpoint.pt", *FIGURES]:
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    rows = infogan.common.read_metrics(os.path.join(run, "metrics.csv"))
    assert len(rows) == 1 and list(rows[0]) == COLUMNS and rows[0]["step"] == 3
    assert all(math.isfinite(v) for v in rows[0].values()) and 0 < rows[0]["test_acc"] <= 1
    assert "steps/s" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("done: 3 steps")


def brute_force_accuracy(pred, labels, n):
    return max(sum(int(perm[p]) == int(l) for p, l in zip(pred, labels)) for perm in itertools.permutations(range(n))) / len(labels)


def test_hungarian_accuracy_known_answers():
    labels = torch.arange(1000) % 10
    perm = torch.tensor([3, 7, 0, 9, 1, 4, 8, 2, 6, 5])
    assert infogan.hungarian_accuracy(perm[labels], labels, 10) == 1.0  # perfect clustering, categories permuted
    # two digits share one category: the best one-to-one map gets only one of them right
    pred = perm[labels].clone()
    pred[labels == 9] = perm[4]
    assert infogan.hungarian_accuracy(pred, labels, 10) == 0.9
    # a constant prediction matches one digit only
    assert infogan.hungarian_accuracy(torch.zeros(1000, dtype=torch.long), labels, 10) == 0.1
    # random confusions: the DP equals brute force over all permutations (5 classes), and n_cat < n_classes
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels5 = torch.randint(5, (60,), generator=g)
        pred5 = torch.where(torch.rand(60, generator=g) < 0.5, (labels5 + 2) % 5, torch.randint(5, (60,), generator=g))
        assert abs(infogan.hungarian_accuracy(pred5, labels5, 5, n_classes=5) - brute_force_accuracy(pred5, labels5, 5)) < 1e-12
    assert infogan.hungarian_accuracy(labels % 4, labels, 4) == 0.4  # 4 categories: digits 0-3 (+4-9 folded in)


def test_information_losses_are_the_nll_terms():
    g = torch.Generator().manual_seed(0)
    q, c_cat, c_cont = torch.randn(8, 12, generator=g), torch.randint(10, (8,), generator=g), torch.rand(8, 2, generator=g)
    li_cat, li_cont = infogan.information_losses(q, c_cat, c_cont, 10)
    assert torch.allclose(li_cat, -torch.log_softmax(q[:, :10], 1)[torch.arange(8), c_cat].mean())
    nll = -torch.distributions.Normal(q[:, 10:], 1.0).log_prob(c_cont).mean()  # Gaussian NLL, σ = 1
    assert torch.allclose(li_cont, nll - 0.5 * math.log(2 * math.pi))


def test_traversal_latents_layout():
    n_noise, n_cat, values = 62, 10, torch.linspace(-2, 2, 10)
    z, c_cont = torch.randn(n_noise), torch.tensor([0.3, -0.7])
    for code in (0, 1):
        latent, c_cat, cc = infogan.traversal_latents(z, c_cont, code, values, n_cat)
        assert latent.shape == (100, n_noise + n_cat + 2)
        grid = latent.view(n_cat, len(values), -1)  # (rows, columns, latent)
        rows, cols = torch.meshgrid(torch.arange(n_cat), torch.arange(len(values)), indexing="ij")
        assert torch.equal(grid[..., n_noise:n_noise + n_cat].argmax(-1), rows)  # c_cat = row index
        assert torch.equal(grid[..., n_noise:n_noise + n_cat].sum(-1), torch.ones(n_cat, len(values)))  # one-hot
        assert torch.equal(grid[..., n_noise + n_cat + code], values[cols])  # the varied code = column value
        assert torch.equal(grid[..., n_noise + n_cat + 1 - code], torch.full((n_cat, 10), float(c_cont[1 - code])))
        assert torch.equal(grid[..., :n_noise], z.expand(n_cat, len(values), -1))  # noise fixed
        assert torch.equal(c_cat, rows.flatten()) and torch.equal(cc.view(n_cat, 10, 2)[..., code], values[cols])


def test_networks_shapes_and_pixel_range():
    G, D = infogan.Generator(74).eval(), infogan.Discriminator(10, 2).eval()
    latent, c_cat, c_cont = infogan.sample_latents(5, 62, 10, 2, "cpu")
    assert c_cont.min() >= -1 and c_cont.max() <= 1 and c_cat.max() < 10
    x = G(latent)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    d, q = D(x)
    assert d.shape == (5,) and q.shape == (5, 12)


def test_infogan_resume_continues_from_saved_step_bit_for_bit(tiny_mnist, tmp_path):
    infogan_train(tiny_mnist, tmp_path / "a", "--steps", "4", cwd=tmp_path)
    run = infogan_only_run(tmp_path / "a")
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["step"] == 4
    proc = infogan_train(tiny_mnist, tmp_path / "a", "--steps", "8", "--resume", run, cwd=tmp_path)
    assert "resumed at step 4" in proc.stdout and os.listdir(tmp_path / "a") == [os.path.basename(run)]
    rows = infogan.common.read_metrics(os.path.join(run, "metrics.csv"))
    assert [r["step"] for r in rows] == [4, 8] and rows[1]["seconds"] >= rows[0]["seconds"]
    resumed = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)
    assert resumed["step"] == 8
    # the same 8 steps without interruption give the same weights, bit for bit (CPU)
    infogan_train(tiny_mnist, tmp_path / "b", "--steps", "8", cwd=tmp_path)
    straight = torch.load(os.path.join(infogan_only_run(tmp_path / "b"), "checkpoint.pt"), weights_only=False)
    for net in ("G", "D"):
        for k, v in straight["models"][net].items():
            assert torch.equal(v, resumed["models"][net][k]), (net, k)


def test_infogan_bad_input_gives_one_line_errors(tiny_mnist, tmp_path):
    # one real subprocess: the message reaches stderr as one line, exit status 1
    proc = run_script("infogan.py", "--epochs", "0", cwd=tmp_path, expect_rc=None)
    assert "--epochs must be >= 1 (got 0)" in one_line_error(proc)

    def fails(*args):  # the rest in-process (fast): main() must raise SystemExit("error: <one line>")
        with pytest.raises(SystemExit) as e:
            infogan.main([*args, "--out", str(tmp_path / "runs")])
        msg = str(e.value)
        assert msg.startswith("error:") and "\n" not in msg, msg
        return msg

    assert "--batch-size must be >= 1 (got -1)" in fails("--batch-size", "-1")
    if not torch.cuda.is_available():
        assert fails("--device", "cuda") == "error: --device cuda but no CUDA GPU is available here; use --device cpu"
    assert "MNIST/raw" in fails("--device", "cpu", "--data-root", str(tmp_path / "nowhere"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert "is not a checkpoint" in fails("--device", "cpu", "--resume", str(junk))
    other = tmp_path / "other.pt"
    torch.save({"script": "beta_vae.py", "args": {}}, other)
    assert "checkpoint of beta_vae.py, not of infogan.py" in fails("--device", "cpu", "--resume", str(other))
    assert "is not a checkpoint" in fails("--device", "cpu", "--resume", str(tmp_path / "missing.pt"))
    # a diverging run stops at once, naming the loss and the step
    msg = fails("--device", "cpu", "--data-root", tiny_mnist, "--batch-size", "16", "--steps", "6", "--log-every", "3",
                "--lr-d", "1e30", "--lr-g", "1e30")
    assert "became nan at step" in msg or "became inf at step" in msg


# ------------------------------------------------------------------------------------------------
# unrolled_infogan.py
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# Tiny float64 networks with smooth activations (finite differences disagree across ReLU kinks) and
# BatchNorm in D (its buffers must survive the unroll untouched)
# ------------------------------------------------------------------------------------------------
class TinyG(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, latent):  # latent: 2 noise dims, a one-hot of 3 categories, 1 continuous code
        return self.net(latent)


class TinyD(nn.Module):
    """InfoGAN layout in miniature: a body with BatchNorm shared by D's head and Q's head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.SiLU(), nn.Linear(6, 5), nn.Softplus())
        self.d_head = nn.Linear(5, 1)
        self.q_head = nn.Linear(5, 3 + 1)

    def forward(self, x):
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


ARGS = SimpleNamespace(unroll_lr=None, g_loss="saddle", first_order=False, n_cat=3, lambda_cat=1.0, lambda_cont=1.0)


def tiny_setup(seed=0, real_steps=3):
    """Tiny G and D in float64, D's Adam (owning body and d_head, as in the script) stepped a few times."""
    torch.manual_seed(seed)
    G, D = TinyG().double(), TinyD().double()
    opt_g = torch.optim.Adam([*G.parameters(), *D.q_head.parameters()], lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*D.body.parameters(), *D.d_head.parameters()], lr=0.05, betas=(0.5, 0.999))
    x = torch.randn(16, 4, dtype=torch.float64) + 1.0
    z = ui.make_latent(torch.randn(16, 2, dtype=torch.float64), torch.arange(16) % 3,
                       torch.rand(16, 1, dtype=torch.float64) * 2 - 1, 3)
    for _ in range(real_steps):
        loss = ui.d_loss(D(x)[0], D(G(z[torch.randperm(16)]).detach())[0])
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    return G, D, opt_g, opt_d, x, z


def g_grad(G, D, opt_d, x, z, k, kind, first_order=False):
    G.zero_grad(set_to_none=True)
    loss = ui.unrolled_g_loss(D, opt_d, [x] * (k + 1), G(z), k, kind=kind, first_order=first_order)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in G.parameters()]), loss.detach()


@pytest.mark.parametrize("kind", ["saddle", "ns"])
def test_exact_unrolled_gradient_matches_finite_differences(kind):
    G, D, _, opt_d, x, z = tiny_setup()
    k, h = 3, 1e-6  # Adam's normalisation is strongly curved: the O(h²) error is ~1e-6 at h = 1e-5
    exact, _ = g_grad(G, D, opt_d, x, z, k, kind)
    first_order, _ = g_grad(G, D, opt_d, x, z, k, kind, first_order=True)
    theta = torch.nn.utils.parameters_to_vector(G.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        u = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        f = []
        for sign in (1, -1):
            torch.nn.utils.vector_to_parameters(theta + sign * h * u, G.parameters())
            with torch.enable_grad():
                f.append(ui.unrolled_g_loss(D, opt_d, [x] * (k + 1), G(z), k, kind=kind).item())
        torch.nn.utils.vector_to_parameters(theta, G.parameters())
        fd, ad = (f[0] - f[1]) / (2 * h), float(exact @ u)
        assert abs(fd - ad) <= 1e-5 * abs(fd), (kind, fd, ad)
        # the first-order ("popular port") gradient is a different vector: it misses eq. (11)'s 2nd term
        assert abs(float(first_order @ u) - fd) > 1e-3 * abs(fd), (kind, fd, float(first_order @ u))
    assert (exact - first_order).norm() > 1e-2 * exact.norm()


def state_copy(D, opt_d):
    return (copy.deepcopy(D.state_dict()), copy.deepcopy(opt_d.state_dict()))


@pytest.mark.parametrize("first_order", [False, True])
def test_generator_step_leaves_d_bit_for_bit_unchanged(first_order):
    G, D, opt_g, opt_d, x, z = tiny_setup()
    before = state_copy(D, opt_d)
    q_before = copy.deepcopy(D.q_head.state_dict())
    args = SimpleNamespace(**{**vars(ARGS), "first_order": first_order})
    for _ in range(2):
        losses = ui.generator_step(G, D, opt_g, opt_d, G(z), torch.arange(16) % 3, z[:, -1:], [x] * 6, 5, args)
        assert torch.isfinite(losses).all() and losses[1] > 0  # f_K, li_cat, li_cont
    after = state_copy(D, opt_d)
    q_keys = [key for key in after[0] if key.startswith("q_head.")]
    assert_same({key: v for key, v in before[0].items() if key not in q_keys},  # body, d_head, all BN buffers
                {key: v for key, v in after[0].items() if key not in q_keys})
    assert_same(before[1], after[1])  # D's Adam: moments and step count
    assert not torch.equal(q_before["weight"], D.q_head.weight)  # Q's head (owned by opt_g) did train
    assert all(p.grad is None for p in D.d_head.parameters())  # nothing leaked into the real D's head


def test_k0_is_the_plain_gan_generator_gradient():
    for kind in ("saddle", "ns"):
        G, D, _, opt_d, x, z = tiny_setup()
        unrolled, _ = g_grad(G, D, opt_d, x, z, 0, kind)
        G.zero_grad()
        fake = G(z)
        plain = -ui.d_loss(D(x)[0], D(fake)[0]) if kind == "saddle" else ui.g_loss_fn("ns", None, D(fake)[0])
        plain.backward()
        assert torch.equal(unrolled, torch.cat([p.grad.reshape(-1) for p in G.parameters()]))


def test_one_unrolled_step_is_torch_adam():
    """The differentiable Adam does what torch.optim.Adam does (moments, step count, bias correction)."""
    G, D, _, opt_d, x, z = tiny_setup()
    fake = G(z).detach()
    snap = ui.snapshot_d(D, opt_d)
    theta = ui.unroll(D, snap, [x, x], fake, 2, snap["lr"], first_order=True)
    D2 = copy.deepcopy(D)
    opt2 = torch.optim.Adam([*D2.body.parameters(), *D2.d_head.parameters()], lr=0.05, betas=(0.5, 0.999))
    opt2.load_state_dict(opt_d.state_dict())
    for _ in range(2):
        opt2.zero_grad()
        ui.d_loss(D2(x)[0], D2(fake)[0]).backward()
        opt2.step()
    # atol: the bias before BatchNorm has a zero gradient up to rounding (BN cancels it); Adam turns that
    # rounding noise (~1e-17, different in the two code paths) into moves of ~1e-10
    real = torch.nn.utils.parameters_to_vector([*D2.body.parameters(), *D2.d_head.parameters()])
    assert torch.allclose(theta, real, rtol=1e-10, atol=1e-8)
    assert (theta - snap["theta"]).abs().max() > 1e-2  # and the steps did move D
    for name, b in D2.named_buffers():  # the copy's BatchNorm stats moved like a real D's (same bias noise)
        assert torch.allclose(snap["buffers"][name], b, rtol=1e-10, atol=1e-8)
        assert not torch.equal(b, dict(D.named_buffers())[name])


def test_benchmark_counts_more_ops_per_unrolled_step():
    """benchmark.py --count-ops: each exact unrolled step adds calls (forward, backward, double backward, Adam);
    the first-order unroll dispatches fewer than the exact one at the same K."""
    import benchmark
    n0, n1, n2 = (benchmark.count_ops(k, False, "cpu")[0] for k in (0, 1, 2))
    assert n0 < n1 < n2 and abs((n2 - n1) - (n1 - n0)) < 0.2 * (n1 - n0)  # about linear in K
    assert benchmark.count_ops(2, True, "cpu")[0] < n2


def test_mode_metrics_on_known_samples():
    ring = common.ToyData("ring", "cpu")
    m, s = ring.modes.double(), ring.std
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)
    pts = [m[i].expand(100, 2) for i in range(4)]            # 400 exact hits on modes 0-3
    pts.append(m[4] + 2.9 * s * direction.expand(5, 2))        # 5 high quality (2.9σ) on mode 4
    pts.append(m[5] + 3.1 * s * direction.expand(45, 2))       # 45 just outside 3σ of mode 5
    pts.append(torch.zeros(50, 2, dtype=torch.float64))        # 50 at the centre, far from every mode
    r = ui.mode_metrics(torch.cat(pts), m, s)
    assert (r["modes"], r["modes10"]) == (5, 4)
    assert r["hq_pct"] == pytest.approx(100 * 405 / 500)
    q = [100 / 405] * 4 + [5 / 405]
    assert r["reverse_kl"] == pytest.approx(sum(p * math.log(8 * p) for p in q), rel=1e-5)
    uniform = ui.mode_metrics(m.repeat(10, 1), m, s)
    assert (uniform["modes"], uniform["modes10"], uniform["hq_pct"]) == (8, 8, 100.0)
    assert uniform["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    one = ui.mode_metrics(m[:1].repeat(20, 1), m, s)
    assert (one["modes"], one["modes10"]) == (1, 1) and one["reverse_kl"] == pytest.approx(math.log(8), rel=1e-6)
    assert math.isinf(ui.mode_metrics(torch.zeros(7, 2), m, s)["reverse_kl"])


# ------------------------------------------------------------------------------------------------
# Smoke runs and errors
# ------------------------------------------------------------------------------------------------
def test_ring_sweep_smoke_and_resume(tmp_path):
    out = tmp_path / "runs"
    run_script("unrolled_infogan.py", "--dataset", "ring", "--k", "0", "2", "--steps", "3", "--batch-size", "16",
               "--log-every", "2", "--device", "cpu", "--out", out, cwd=tmp_path)
    (sweep,) = [d for d in out.iterdir()]
    assert (sweep / "comparison.md").exists() and (sweep / "fig03_scatter.png").exists()
    runs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [r.name.split("__")[2] for r in runs] == ["k0", "k2"]
    for r in runs:
        for f in ("config.json", "metrics.csv", "checkpoint.pt", "fig03_scatter.png", "losses.png"):
            assert (r / f).exists(), (r, f)
        row = common.read_metrics(str(r / "metrics.csv"))[-1]
        assert row["step"] == 3 and all(math.isfinite(row[c]) for c in ("loss_d", "loss_g", "hq_pct"))
    proc = run_script("unrolled_infogan.py", "--dataset", "ring", "--k", "2", "--steps", "5", "--batch-size", "16",
                      "--device", "cpu", "--resume", runs[1], cwd=tmp_path)
    assert "done: 2 steps" in proc.stdout and "resumed at step 3" in proc.stdout
    assert [r["step"] for r in common.read_metrics(str(runs[1] / "metrics.csv"))] == [3, 5]


def test_mnist_sweep_smoke(tmp_path, tiny_mnist):
    out = tmp_path / "runs"
    run_script("unrolled_infogan.py", "--dataset", "mnist", "--data-root", tiny_mnist, "--k", "0", "2", "--steps", "3",
               "--batch-size", "16", "--log-every", "2", "--device", "cpu", "--out", out, cwd=tmp_path)
    (sweep,) = [d for d in out.iterdir()]
    table = (sweep / "comparison.md").read_text()
    assert "| 0 | 3 |" in table and "| 2 | 3 |" in table and (sweep / "fig12_q_loss.png").exists()
    for r in (d for d in sweep.iterdir() if d.is_dir()):
        for f in ("fig04_traversal_c1.png", "fig05_traversal_c2.png", "samples.png", "checkpoint.pt"):
            assert (r / f).exists(), (r, f)
        row = common.read_metrics(str(r / "metrics.csv"))[-1]
        assert row["step"] == 3 and all(math.isfinite(row[c]) for c in ("loss_d", "loss_g", "li_cat", "li_cont"))
        assert 0 <= row["test_acc"] <= 1


@pytest.mark.parametrize("args", [["--k", "-1"], ["--dataset", "ring", "--n-cat", "10"], ["--k", "5", "0", "5"],
                                  ["--epochs", "0"], ["--dataset", "ring", "--unroll-lr", "0"], ["--n-cat", "1"],
                                  ["--k", "0", "5", "--resume", "x"]])
def test_unrolled_bad_flags_are_one_line(args):
    parse_error(ui, args)


def test_unrolled_bad_input_in_a_subprocess_and_bad_resume(tmp_path):
    line = one_line_error(run_script("unrolled_infogan.py", "--k", "-1", "--device", "cpu", cwd=tmp_path, expect_rc=None))
    assert "--k must be >= 0 (got -1)" in line
    bogus = tmp_path / "checkpoint.pt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        ui.main(["--dataset", "ring", "--resume", str(bogus), "--device", "cpu"])
    assert "is not a checkpoint" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# beta_vae.py and vae_gan.py
# ------------------------------------------------------------------------------------------------
FAST = ("--steps", "3", "--batch-size", "16", "--device", "cpu", "--log-every", "2", "--mig-samples", "300")


# ------------------------------------------------------------------------------------------------
# Math
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [beta_vae, vae_gan])
def test_kl_matches_closed_form_and_torch_distributions(module):
    # hand values: N(1, 1) -> 0.5; N(0, e^2) -> 0.5 (e^2 - 2 - 1); N(0, 1) -> 0; each averaged over the batch
    mu = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    expected = torch.tensor([0.5, 0.5 * (math.e ** 2 - 3), 0.0])
    assert torch.allclose(module.kl_per_latent(mu, logvar), expected, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(64, 10, generator=g, dtype=torch.float64), torch.randn(64, 10, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).mean(0)
    assert torch.allclose(module.kl_per_latent(mu, logvar), ref, atol=1e-12)


def test_reconstruction_is_summed_over_pixels_and_averaged_over_batch():
    # logits 0 -> p = 0.5: BCE = log 2 per pixel; 4 pixels per image -> 4 log 2 per image, whatever B is
    for b in (1, 2, 5):
        x = (torch.rand(b, 1, 2, 2) > 0.5).float()
        assert torch.isclose(beta_vae.reconstruction_loss(torch.zeros(b, 1, 2, 2), x, "bernoulli"),
                             torch.tensor(4 * math.log(2)))
    # twice the pixels -> twice the loss (a per-pixel mean would keep it constant)
    assert torch.isclose(beta_vae.reconstruction_loss(torch.zeros(3, 1, 2, 4), torch.ones(3, 1, 2, 4), "bernoulli"),
                         torch.tensor(8 * math.log(2)))
    # Gaussian (colour): sigmoid(0) = 0.5 vs x = 1 -> 0.25 per value; 3 x 2 x 2 values -> 3.0 per image
    assert torch.isclose(beta_vae.reconstruction_loss(torch.zeros(7, 3, 2, 2), torch.ones(7, 3, 2, 2), "gaussian"),
                         torch.tensor(3.0))
    # VAE-GAN's feature likelihood: ½ Σ over features, mean over the batch
    assert torch.isclose(vae_gan.feature_nll(torch.ones(5, 12), torch.zeros(5, 12)), torch.tensor(6.0))


def synthetic_factors(n=10000, sizes=(3, 6, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(s, (n,), generator=g) for s in sizes], dim=1), g


@pytest.mark.parametrize("module", [beta_vae, vae_gan])
def test_mig_on_codes_with_known_answers(module):
    sizes = (3, 6, 10)
    f, g = synthetic_factors(sizes=sizes)
    noise = torch.randn(len(f), 3, generator=g)
    # every factor copied into its own latent (plus 3 noise latents): each gap ~ 1
    perfect = module.mig(torch.cat([f.float(), noise], 1), f, sizes)
    assert perfect > 0.97, perfect
    # one latent equal to factor 1, the rest noise: gap ~1 for factor 1 and ~0 for the others -> MIG ~ 1/3
    one = module.mig(torch.cat([noise, f[:, 1:2].float() * 0.3 + 2.0], 1), f, sizes)
    assert abs(one - 1 / 3) < 0.02, one
    # the same codes, shuffled against the factors: independent -> ~0
    shuffled = module.mig(torch.cat([f.float(), noise], 1)[torch.randperm(len(f), generator=g)], f, sizes)
    assert 0 <= shuffled < 0.02, shuffled
    # a factor shared by two latents gives no gap, even though both latents are informative
    twice = module.mig(torch.cat([f[:, :1].float(), f[:, :1].float() * 2], 1), f[:, :1], sizes[:1])
    assert abs(twice) < 1e-9


# ------------------------------------------------------------------------------------------------
# Smoke runs
# ------------------------------------------------------------------------------------------------
def run_folder(out):
    (folder,) = [os.path.join(out, d) for d in os.listdir(out)]
    return folder


def vae_check_run(folder, sprites, extra=()):
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "reconstructions.png", "samples.png",
                 "fig14_traversals.png", "fig15_kl_per_latent.png", "losses.png", *extra):
        assert os.path.exists(os.path.join(folder, name)), name
    rows = common.read_metrics(os.path.join(folder, "metrics.csv"))
    assert rows[-1]["step"] == 3
    values = [v for k, v in rows[-1].items() if k != "mig"]
    assert all(math.isfinite(v) for v in values), rows[-1]
    assert math.isfinite(rows[-1]["mig"]) == sprites


@pytest.fixture(scope="module")
def beta_vae_sprites_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bvae")
    run_script("beta_vae.py", "--dataset", "sprites", *FAST, "--out", out, cwd=out)
    return run_folder(str(out))


def test_beta_vae_sprites_smoke_and_resume(beta_vae_sprites_run):
    vae_check_run(beta_vae_sprites_run, sprites=True, extra=("fig14_traversals_b.png",))
    header = open(os.path.join(beta_vae_sprites_run, "metrics.csv")).readline().strip().split(",")
    assert header == ["epoch", "step", "seconds", "steps_per_s", "recon", "kl",
                      *[f"kl_z{j}" for j in range(10)], "mig"]
    # resume continues the same run folder from step 3 to step 5
    proc = run_script("beta_vae.py", "--dataset", "sprites", *FAST[:-2], "--mig-samples", "300", "--steps", "5",
                      "--resume", beta_vae_sprites_run, cwd=beta_vae_sprites_run)
    assert "step 5/5" in proc.stdout
    steps = [r["step"] for r in common.read_metrics(os.path.join(beta_vae_sprites_run, "metrics.csv"))]
    assert steps == [3, 5]


@pytest.mark.parametrize("dataset", ["mnist", "celeba"])
def test_beta_vae_smoke_mnist_and_folder(dataset, tiny_mnist, tiny_celeba, tmp_path):
    root = tiny_mnist if dataset == "mnist" else tiny_celeba
    run_script("beta_vae.py", "--dataset", dataset, "--data-root", root, *FAST[:2], "--batch-size", "4",
               "--device", "cpu", "--capacity", "5", "--out", tmp_path, cwd=tmp_path)
    vae_check_run(run_folder(str(tmp_path)), sprites=False)


def test_vae_gan_sprites_smoke_with_comparison(beta_vae_sprites_run, tmp_path):
    proc = run_script("vae_gan.py", "--dataset", "sprites", *FAST, "--latents", "6", "--width", "0.125",
                      "--compare-with", beta_vae_sprites_run, "--out", tmp_path, cwd=tmp_path)
    assert "comparison" in proc.stdout
    vae_check_run(run_folder(str(tmp_path)), sprites=True, extra=("vae_gan_vs_beta_vae.png",))


@pytest.mark.parametrize("dataset", ["mnist", "celeba"])
def test_vae_gan_smoke_mnist_and_folder(dataset, tiny_mnist, tiny_celeba, tmp_path):
    root = tiny_mnist if dataset == "mnist" else tiny_celeba
    run_script("vae_gan.py", "--dataset", dataset, "--data-root", root, *FAST[:2], "--batch-size", "4",
               "--device", "cpu", "--latents", "8", "--width", "0.125", "--out", tmp_path, cwd=tmp_path)
    vae_check_run(run_folder(str(tmp_path)), sprites=False)


# ------------------------------------------------------------------------------------------------
# Bad input: one line each
# ------------------------------------------------------------------------------------------------
def test_bad_beta_gives_one_line_error_on_the_command_line(tmp_path):
    assert "--beta" in one_line_error(run_script("beta_vae.py", "--beta", "-1", cwd=tmp_path, expect_rc=None))


def error_of(module, *argv):
    """The one-line message main() stops with (in-process: faster than a subprocess per case)."""
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("module", [beta_vae, vae_gan])
def test_vae_bad_input_gives_one_line_errors(module, tmp_path):
    assert "--beta must be > 0 (got -1.0)" in error_of(module, "--beta", "-1")
    assert "--steps" in error_of(module, "--steps", "0")
    msg = error_of(module, "--dataset", "celeba", "--data-root", tmp_path / "nowhere", "--device", "cpu")
    assert "img_align_celeba" in msg and "--data-root" in msg
    empty = tmp_path / "empty"
    (empty / "img_align_celeba").mkdir(parents=True)
    (empty / "img_align_celeba" / "readme.txt").write_text("no images here")
    assert "no images" in error_of(module, "--dataset", "celeba", "--data-root", empty, "--device", "cpu")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "not a checkpoint" in error_of(module, "--resume", tmp_path / "junk.pt", "--device", "cpu",
                                          "--mig-samples", "10", "--out", tmp_path)
    assert not os.path.exists(tmp_path / "runs")


# ------------------------------------------------------------------------------------------------
# vae_infogan.py
# ------------------------------------------------------------------------------------------------
def tiny_gan(seed=0):
    """float64 nets with smooth activations: G noise (6, 3) -> 8x8 images, D with BatchNorm in its body."""
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(3, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8))).double()
    D = vi.Discriminator(1, 8, 2, (3, 4), act=nn.SiLU).double()
    d_opt = torch.optim.Adam([p for n, p in D.named_parameters() if not n.startswith("q.")], lr=0.05, betas=(0.5, 0.999))
    x_real, noise = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for _ in range(2):  # real Adam moments and step count to start the unroll from
        d_opt.zero_grad()
        vi.d_loss(D(x_real)[0], D(G(noise).detach())[0]).backward()
        d_opt.step()
    return G, D, d_opt, x_real, noise


def test_vae_infogan_unrolled_gradient_matches_finite_differences():
    G, D, d_opt, x_real, noise = tiny_gan()
    params = dict(G.named_parameters())

    def f(p, first_order=False):
        return vi.unrolled_g_loss(D, d_opt, x_real, functional_call(G, p, (noise,)), 3, first_order)

    grads = torch.autograd.grad(f(params), list(params.values()))
    grads_fo = torch.autograd.grad(f(params, True), list(params.values()))
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for _ in range(3):
        d = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
        # (not under no_grad: the unroll itself differentiates D's loss)
        fd = (f({n: p + eps * d[n] for n, p in params.items()}) - f({n: p - eps * d[n] for n, p in params.items()})).detach() / (2 * eps)
        exact = sum((g * d[n]).sum() for g, n in zip(grads, params))
        first = sum((g * d[n]).sum() for g, n in zip(grads_fo, params))
        assert abs(fd - exact) / abs(exact) < 1e-5, (float(fd), float(exact))
        assert abs(first - exact) / abs(exact) > 1e-3, (float(first), float(exact))


def test_vae_infogan_k0_is_the_plain_generator_loss():
    G, D, d_opt, x_real, noise = tiny_gan()
    fake = G(noise)
    assert torch.equal(vi.unrolled_g_loss(D, d_opt, x_real, fake, 0), vi.g_loss(vi.d_call(D, fake)[0]))


def snapshot(D, d_opt):
    return ({n: t.clone() for n, t in D.state_dict().items()},
            copy.deepcopy({k: {s: (v.clone() if torch.is_tensor(v) else v) for s, v in st.items()}
                           for k, st in d_opt.state_dict()["state"].items()}))


def test_vae_infogan_generator_step_leaves_d_bit_for_bit():
    args = vi.parse_args(["--dataset", "mnist", "--width", "4", "--latents", "4", "--n-info", "2", "--k", "3", "--device", "cpu"])
    torch.manual_seed(0)
    nets = vi.build(args, (1, 28, 28))
    D = nets["disc"]
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.5, 0.999))
    opts = {"enc": adam(nets["enc"].parameters()), "dec": adam(nets["dec"].parameters()),
            "disc": adam([p for n, p in D.named_parameters() if not n.startswith("q.")]),
            "q": adam([p for n, p in D.named_parameters() if not n.startswith("adv.")])}
    x = torch.rand(8, 1, 28, 28)
    for _ in range(2):
        vi.train_step(nets, opts, x, args)
    before, dec_before = snapshot(D, opts["disc"]), copy.deepcopy(nets["dec"].state_dict())
    mu, logvar, z, z_p, fakes = vi.forward(nets["enc"], nets["dec"], x)
    vi.generator_step(nets, opts, x, mu, logvar, z, z_p, fakes, args)
    assert_same(before, snapshot(D, opts["disc"]))
    assert not torch.equal(dec_before["fc.0.weight"], nets["dec"].state_dict()["fc.0.weight"])  # it did train


def test_vae_infogan_gan_loss_reaches_the_decoder_only():
    """The routing table: with β, both reconstruction weights and λ at 0, the encoder's loss is 0, so one step of a
    fresh Adam leaves it bit for bit; the decoder still trains on f_K. With the feature term back, the encoder moves."""
    for weight in (0.0, 1.0):
        args = vi.parse_args(["--dataset", "mnist", "--width", "4", "--latents", "4", "--n-info", "2", "--k", "2",
                              "--beta", "0", "--pixel-weight", "0", "--lambda-info", "0", "--feature-weight", str(weight)])
        torch.manual_seed(0)
        nets = vi.build(args, (1, 28, 28))
        opts = {k: torch.optim.Adam(m.parameters(), lr=1e-2) for k, m in nets.items()}
        enc0 = {n: p.detach().clone() for n, p in nets["enc"].named_parameters()}  # (BatchNorm stats do move)
        dec0 = copy.deepcopy(nets["dec"].state_dict())
        x = torch.rand(8, 1, 28, 28)
        vi.generator_step(nets, opts, x, *vi.forward(nets["enc"], nets["dec"], x), args)
        enc_same = all(torch.equal(enc0[n], p) for n, p in nets["enc"].named_parameters())
        assert enc_same == (weight == 0.0)
        assert not torch.equal(dec0["fc.0.weight"], nets["dec"].state_dict()["fc.0.weight"])


def test_vae_infogan_kl_split_with_hand_set_encoder_output():
    enc = vi.Encoder(1, 28, 4, (2, 2))
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5])
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25), 0.0])
    last = enc.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.cat([mu, logvar]))  # every image encodes to (mu, logvar)
    with torch.no_grad():
        kl_lat = vi.kl_per_latent(*enc(torch.rand(5, 1, 28, 28)))
    kl_info, kl_rest = vi.kl_split(kl_lat, 2)
    closed = [0.5 * (m ** 2 + math.exp(lv) - lv - 1) for m, lv in zip(mu.tolist(), logvar.tolist())]
    assert torch.allclose(kl_lat, torch.tensor(closed), atol=1e-6)
    assert abs(float(kl_info) - (0.5 + 0.5 * (3 - math.log(4))) / 2) < 1e-6
    assert abs(float(kl_rest) - (0.5 * (4 + 0.25 + math.log(4) - 1) + 0.125) / 2) < 1e-6


def test_vae_infogan_mig_known_answers():
    f = torch.cartesian_prod(torch.arange(3), torch.arange(6)).repeat(10, 1)  # independent factors, all combinations
    assert abs(vi.mig(f.float() * 0.7 - 1, f)[0] - 1.0) < 1e-9  # one latent per factor: perfect
    codes = torch.stack([f[:, 0], f[:, 0], f[:, 1]], 1).float()  # factor 0 in two latents: gap 0 for it
    assert abs(vi.mig(codes, f)[0] - 0.5) < 1e-9
    assert abs(float(vi.mutual_info(f[:, 0], f[:, 0])) - math.log(3)) < 1e-9


def vi_check_run(out, n_latents):
    (run,) = [os.path.join(out, d) for d in os.listdir(out)]
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "fig14_traversals.png", "fig15_kl_per_latent.png",
                 "reconstructions.png", "samples.png", "losses.png"):
        assert os.path.exists(os.path.join(run, name)), name
    row = common.read_metrics(os.path.join(run, "metrics.csv"))[-1]
    assert row["step"] == 3 and all(math.isfinite(v) for v in row.values())
    assert f"kl_z{n_latents - 1}" in row and "kl_info" in row and "kl_rest" in row
    return run, row


def test_vae_infogan_smoke_sprites(tmp_path):
    run_script("vae_infogan.py", "--steps", "3", "--batch-size", "16", "--device", "cpu", "--out", tmp_path,
               "--width", "4", "--k", "2", "--mig-samples", "300", cwd=tmp_path)
    run, row = vi_check_run(str(tmp_path), 10)
    assert 0 <= row["mig_info"] <= 1 and 0 <= row["mig_all"] <= 1
    assert "shape" in open(os.path.join(run, "factors.txt")).read()


def test_vae_infogan_smoke_mnist_and_resume(tmp_path, tiny_mnist):
    args = ["--dataset", "mnist", "--data-root", tiny_mnist, "--batch-size", "16", "--device", "cpu", "--out", tmp_path,
            "--width", "4", "--k", "2"]
    run_script("vae_infogan.py", *args, "--steps", "3", cwd=tmp_path)
    run, _ = vi_check_run(str(tmp_path), 10)
    proc = run_script("vae_infogan.py", *args, "--steps", "5", "--resume", run, cwd=tmp_path)
    assert "done: 5 steps" in proc.stdout and common.read_metrics(os.path.join(run, "metrics.csv"))[-1]["step"] == 5
    with pytest.raises(SystemExit, match="^error: .*--latents 10, not 12$"):  # a checkpoint of other shapes
        vi.load_checkpoint(run, vi.parse_args([*map(str, args), "--latents", "12"]))


def test_vae_infogan_smoke_celeba_folder(tmp_path, tiny_celeba):
    run_script("vae_infogan.py", "--dataset", "celeba", "--data-root", tiny_celeba, "--steps", "3", "--batch-size", "4",
               "--device", "cpu", "--out", tmp_path, "--width", "4", "--k", "1", "--latents", "8", cwd=tmp_path)
    vi_check_run(str(tmp_path), 8)


@pytest.mark.parametrize("flags", [["--n-info", "11"], ["--n-info", "0"], ["--k", "-1"]])
def test_vae_infogan_bad_flags_are_one_line(flags):
    assert parse_error(vi, flags).startswith("error: --")


def test_vae_infogan_bad_input_in_a_subprocess(tmp_path):
    line = one_line_error(run_script("vae_infogan.py", "--n-info", "11", "--device", "cpu", cwd=tmp_path, expect_rc=None))
    assert "--n-info" in line and "--latents" in line
