"""Tests: smoke runs of every script on tiny data in the real on-disk formats, and checks of the math.

Run with:  python -m pytest -q test_smoke.py
The data is made here (a tiny MNIST in the IDX format torchvision reads, a folder of tiny JPEGs in the
CelebA layout); nothing is downloaded and ../shared is never read.
"""
import os
import struct
import subprocess
import sys

import PIL.Image
import pytest
import torch
import torchvision

import common

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
