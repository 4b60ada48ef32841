"""Tests: every script run end to end on tiny data in the real on-disk formats, what the shared
plumbing promises (resume bit for bit, one-line errors, checkpoints that cannot run code, no host
traffic inside a training step), and the math: finite-difference checks of the unrolled gradient,
state restored bit for bit, metrics on inputs whose answer is known.

Run with:  python -m pytest -q test_smoke.py
The data is made here (a tiny MNIST in the IDX format torchvision reads, a folder of tiny JPEGs in
the CelebA layout); nothing is downloaded and nothing outside this folder is read.
"""
import ast
import copy
import importlib
import itertools
import json
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
import torch.nn.functional as F
import torchvision
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


# ------------------------------------------------------------------------------------------------
# Tiny data in the real formats, and helpers
# ------------------------------------------------------------------------------------------------
def write_idx(path, array, magic):
    """Write a uint8 tensor in the IDX format (big-endian header: magic, then one int per
    dimension)."""
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
        blob = torch.exp(-((xx - cx) ** 2 + (yy - 14) ** 2) / 18)
        img = blob + 0.1 * torch.rand(n, 28, 28, generator=g)
        pixels = (img.clamp(0, 1) * 255).to(torch.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), pixels, 2051)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels.to(torch.uint8), 2049)
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data root holding a tiny MNIST (256 train, 128 test) in the IDX format, and its digit
    classifier."""
    root = make_mnist(str(tmp_path_factory.mktemp("mnist")))
    # cached beside the data, as a real run would leave it
    evaluation.load_classifier(root, "cpu", steps=4)
    return root


@pytest.fixture(scope="session")
def tiny_celeba(tmp_path_factory):
    """A data root holding 24 small random JPEGs in the CelebA layout
    (ROOT/img_align_celeba/*.jpg)."""
    root = tmp_path_factory.mktemp("celeba")
    (root / "img_align_celeba").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        img = (torch.rand(40, 32, 3, generator=g) * 255).to(torch.uint8)
        PIL.Image.fromarray(img.numpy()).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
    return str(root)


def run(module, out, *argv):
    """Run a script in this process on the CPU with --out out; return its new run folder (None if
    it made none)."""
    before = set(os.listdir(out)) if os.path.isdir(out) else set()
    module.main([str(a) for a in (*argv, "--device", "cpu", "--out", out)])
    new = set(os.listdir(out)) - before
    assert len(new) <= 1
    return os.path.join(out, new.pop()) if new else None


def run_script(script, *args, cwd, expect_rc=0, timeout=600):
    """Run a script of this project in a subprocess on the CPU; return the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, os.path.join(HERE, script), *map(str, args)]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if expect_rc is not None:
        report = f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert proc.returncode == expect_rc, report
    return proc


def one_line_error(proc):
    """Assert a run failed with exactly one line on stderr that starts with 'error:' (no
    traceback)."""
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def error_of(module, *argv):
    """The one-line message module.main stops with (in this process: faster than a subprocess per
    case)."""
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg, msg
    return msg


def assert_same(a, b):
    """Two (nested dicts / lists of) tensors and values equal bit for bit, dtypes included."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
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


# ------------------------------------------------------------------------------------------------
# common.py
# ------------------------------------------------------------------------------------------------
def test_mnist_loads_from_idx(tiny_mnist):
    train = common.load_mnist(tiny_mnist, "cpu", train=True)
    test = common.load_mnist(tiny_mnist, "cpu", train=False)
    assert len(train) == 256 and len(test) == 128 and train.shape == (1, 28, 28)
    x, y = next(train.epoch(32, torch.Generator().manual_seed(0)))
    assert x.shape == (32, 1, 28, 28) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.long
    # for a tanh generator: exactly 2x - 1
    signed = common.load_mnist(tiny_mnist, "cpu", train=True, signed=True)
    assert torch.equal(next(signed.epoch(32, torch.Generator().manual_seed(0)))[0], x * 2 - 1)
    # an epoch visits each image once (drop-last), in a different order per seed
    seen = torch.cat([y for _, y in train.epoch(32, torch.Generator().manual_seed(0))])
    assert len(seen) == 256
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(train.labels))


def test_mnist_missing_and_corrupt_give_one_line(tmp_path, tiny_mnist):
    with pytest.raises(SystemExit) as e:
        common.load_mnist(str(tmp_path / "nowhere"), "cpu")
    msg = str(e.value)
    assert msg.startswith("error:") and "\n" not in msg
    assert "nowhere/MNIST/raw" in msg and "--data-root" in msg
    bad = tmp_path / "bad"
    make_mnist(str(bad), n_train=20, n_test=20)
    path = bad / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit) as e:
        common.load_mnist(str(bad), "cpu")
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


def test_image_folder_layout_and_errors(tiny_celeba, tmp_path):
    data = common.load_image_folder(tiny_celeba, "cpu", size=64)
    assert len(data) == 24 and data.shape == (3, 64, 64)
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
            # inside the frame: the border rows and columns hold no ink
            assert img[0].sum() == img[-1].sum() == img[:, 0].sum() == img[:, -1].sum() == 0
    # a square is symmetric under a quarter turn, an ellipse is not; 10 orientation steps =
    # 90 degrees
    sq = s.render(torch.tensor([[0, 5, 0, 16, 16], [0, 5, 10, 16, 16]]))
    el = s.render(torch.tensor([[1, 5, 0, 16, 16], [1, 5, 10, 16, 16]]))
    assert (sq[0] != sq[1]).float().sum() <= 8
    assert (el[0] != el[1]).float().sum() > 50
    assert torch.equal(el[1, 0], el[0, 0].T) or (el[1, 0] != el[0, 0].T).float().sum() <= 8


def test_toy_ring_has_8_distinct_modes():
    ring = common.ToyData("ring", "cpu")
    assert ring.modes.shape == (8, 2)
    distances = torch.cdist(ring.modes, ring.modes).add(10 * torch.eye(8))  # the diagonal masked
    assert distances.min() > 1.5
    assert torch.allclose(ring.modes.norm(dim=1), torch.full((8,), 2.0))
    x, k = ring.sample(4000, torch.Generator().manual_seed(0))
    assert (x - ring.modes[k]).norm(dim=1).max() < 0.02 * 6
    # an epoch: `steps` batches drawn at its start
    batches = list(ring.epoch(16, torch.Generator().manual_seed(0)))
    assert len(batches) == ring.steps_per_epoch(16) == 500 and batches[0][0].shape == (16, 2)
    assert common.ToyData("grid", "cpu").modes.shape == (25, 2)


def test_traversal_grid_layout(tmp_path):
    import matplotlib.image
    rows, cols = 3, 4
    imgs = torch.zeros(rows, cols, 1, 8, 8)
    imgs[1, 2] = 1.0  # one white cell at row 1, column 2
    path = tmp_path / "t.png"
    values = torch.linspace(-2, 2, cols)
    common.save_traversal(imgs, str(path), values=values, row_labels=list("abc"))
    assert path.exists() and path.stat().st_size > 0
    cells = imgs.reshape(-1, 1, 8, 8)
    grid = torchvision.utils.make_grid(cells, nrow=cols, padding=2, pad_value=1.0)
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
    # b: a mean over runs
    common.plot_metrics({"a": path, "b": [path, path]}, ["loss_d"], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 0
    common.truncate_metrics(path, 20)  # rows written after a checkpoint at step 20 go on resume
    assert [r["step"] for r in common.read_metrics(path)] == [10, 20]


# ------------------------------------------------------------------------------------------------
# Every script: one shape, the same plumbing, and what the plumbing promises
# ------------------------------------------------------------------------------------------------
SCRIPTS = ("infogan.py", "unrolled_infogan.py", "beta_vae.py", "vae_gan.py", "vae_infogan.py")
HOOKS = {"add_flags", "check_flags", "setup", "build", "train_step", "evaluate", "save_figures",
         "main"}
CASES = {  # one small, fast configuration per script and kind of data; r: the tiny MNIST's root
    "infogan": (infogan, lambda r: ["--data-root", r, "--width", "0.125", "--batch-size", "16"]),
    "unrolled_mnist": (ui, lambda r: ["--data-root", r, "--width", "0.125", "--batch-size", "16",
                                      "--k", "2"]),
    "unrolled_ring": (ui, lambda r: ["--dataset", "ring", "--width", "0.25", "--batch-size", "16",
                                     "--k", "2"]),
    "beta_vae": (beta_vae, lambda r: ["--batch-size", "8", "--mig-samples", "100",
                                      "--latents", "4"]),
    "vae_gan": (vae_gan, lambda r: ["--batch-size", "8", "--mig-samples", "100", "--latents", "4",
                                    "--width", "0.125"]),
    "vae_infogan": (vi, lambda r: ["--batch-size", "8", "--latents", "4", "--n-info", "2",
                                   "--width", "4", "--k", "2"]),
}
INFOGAN_FIGURES = ["fig04_traversal_c1.png", "fig05_traversal_c2.png", "samples.png", "losses.png"]
VAE_FIGURES = ["reconstructions.png", "samples.png", "fig14_traversals.png",
               "fig15_kl_per_latent.png", "losses.png"]
RUN_FIGURES = {infogan: INFOGAN_FIGURES,
               ui: INFOGAN_FIGURES + ["fig12_q_loss.png"],
               beta_vae: VAE_FIGURES,
               vae_gan: VAE_FIGURES,
               vi: VAE_FIGURES}


@pytest.fixture(params=list(CASES))
def case(request, tiny_mnist):
    module, argv = CASES[request.param]
    return module, argv(tiny_mnist)


def plumbing_block(source):
    start = source.rindex("\n# ====", 0, source.index("# PLUMBING"))
    return source[start:source.index("(end of the plumbing)")]


def drift(sources):
    """Where copies differ: the plumbing block of every script, and each top-level function or class
    defined in two scripts (other than the hooks every script has its own of). A list of
    'name: script vs script'."""
    blocks = {name: plumbing_block(src) for name, src in sources.items()}
    first = next(iter(blocks))
    found = [f"plumbing: {first} vs {name}" for name in blocks if blocks[name] != blocks[first]]
    defs = {}
    for name, src in sources.items():
        for node in ast.parse(src).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in HOOKS:
                defs.setdefault(node.name, []).append((name, ast.get_source_segment(src, node)))
    for fn, copies in defs.items():
        (first, first_text), others = copies[0], copies[1:]
        found += [f"{fn}: {first} vs {other}" for other, text in others if text != first_text]
    return found


def top_level_names(source):
    """The names of the functions and classes a script defines at its top level."""
    nodes = ast.parse(source).body
    return {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_copies_are_identical_and_an_edited_copy_is_caught():
    sources = {name: open(os.path.join(HERE, name)).read() for name in SCRIPTS}
    assert drift(sources) == []
    unrolled = top_level_names(sources["unrolled_infogan.py"])
    one_unroll = {"DSnapshot", "snapshot_d", "d_forward", "adam_step", "unroll", "unrolled_g_loss",
                  "forward_with_copied_buffers"}
    assert one_unroll <= unrolled & top_level_names(sources["vae_infogan.py"])  # one unroll, twice
    infogan_parts = {"generator", "Discriminator", "information_losses", "save_digit_figures"}
    assert infogan_parts <= unrolled & top_level_names(sources["infogan.py"])
    weights_any = sources["vae_gan.py"].replace("weights_only=True", "weights_only=False")
    edited = dict(sources, **{"vae_gan.py": weights_any})
    assert "plumbing: infogan.py vs vae_gan.py" in drift(edited)
    edited = sources["vae_infogan.py"].replace("b2 * v + (1 - b2)", "b2 * v + (1.0 - b2)")
    assert drift(dict(sources, **{"vae_infogan.py": edited})) == [
        "adam_step: unrolled_infogan.py vs vae_infogan.py"]


BUDGETS = {  # non-blank lines of the algorithm (all above the plumbing) and of the plumbing block
    "infogan.py": (300, 170),
    "beta_vae.py": (300, 170),
    "vae_gan.py": (360, 170),
    "vae_infogan.py": (400, 170),
    "unrolled_infogan.py": (430, 170),
}


def non_blank(text):
    return sum(1 for line in text.splitlines() if line.strip())


@pytest.mark.parametrize("script", SCRIPTS)
def test_line_budget(script):
    source = open(os.path.join(HERE, script)).read()
    start = source.rindex("\n# ====", 0, source.index("# PLUMBING"))
    end = source.index("\n", source.index("(end of the plumbing)"))  # the end marker's line counts
    algorithm_budget, plumbing_budget = BUDGETS[script]
    assert non_blank(source[:start]) <= algorithm_budget
    assert non_blank(source[start:end]) <= plumbing_budget


def test_no_line_is_longer_than_100_characters():
    """Every .py file of the repository (hidden folders and caches aside)."""
    long_lines = []
    for folder, dirs, files in os.walk(HERE):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if len(line.rstrip("\n")) > 100:
                        long_lines.append(f"{os.path.relpath(path, HERE)}:{number}")
    assert long_lines == []


def test_smoke_run_writes_its_folder(case, tmp_path, capsys):
    module, argv = case
    folder = run(module, tmp_path, *argv, "--steps", "3", "--log-every", "2")
    out = capsys.readouterr().out
    assert "step 2/3" in out and "step 3/3" in out and "steps/s" in out
    assert out.strip().splitlines()[-1].startswith("done: 3 steps")
    figures = ["fig03_scatter.png", "losses.png"] if "ring" in argv else RUN_FIGURES[module]
    for name in ["config.json", "metrics.csv", "checkpoint.pt", *figures]:
        assert os.path.getsize(os.path.join(folder, name)) > 0, name
    rows = common.read_metrics(os.path.join(folder, "metrics.csv"))
    assert len(rows) == 1 and rows[0]["step"] == 3
    assert list(rows[0])[:4] == ["epoch", "step", "steps_per_s", "seconds"]
    assert all(math.isfinite(rows[0][name]) for name in module.LOSSES)
    ckpt = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert ckpt["script"] == module.SCRIPT and ckpt["step"] == 3
    assert set(ckpt["rng"]) == {"torch", "cuda", "data"}


def test_resume_continues_bit_for_bit(case, tmp_path):
    """--steps 4 straight, and --steps 2 then --resume to 4 (mid-epoch: epochs of 3 steps), give the
    same weights, optimizer states, RNG states and metrics rows."""
    module, argv = case
    flags = [*argv, "--epoch-steps", "3"]
    straight = run(module, tmp_path / "a", *flags, "--steps", "4")
    half = run(module, tmp_path / "b", *flags, "--steps", "2")
    resumed = run(module, tmp_path / "b", *flags, "--steps", "4", "--resume", half)
    assert resumed is None  # it continues in its folder
    a, b = (torch.load(os.path.join(f, "checkpoint.pt"), weights_only=True)
            for f in (straight, half))
    assert a["step"] == b["step"] == 4
    for key in ("models", "optims", "rng"):
        assert_same(a[key], b[key])
    rows_a, rows_b = (common.read_metrics(os.path.join(f, "metrics.csv")) for f in (straight, half))
    assert [r["step"] for r in rows_a] == [3, 4] and [r["step"] for r in rows_b] == [2, 3, 4]
    timing = {"seconds", "steps_per_s"}
    # repr: an empty cell (read as NaN) equals an empty cell
    last_a = {k: repr(v) for k, v in rows_a[-1].items() if k not in timing}
    last_b = {k: repr(v) for k, v in rows_b[-1].items() if k not in timing}
    assert last_a == last_b


def training_state(nets, opts):
    """Copies of every network's and optimizer's state dict."""
    models = {name: net.state_dict() for name, net in nets.items()}
    optims = {name: opt.state_dict() for name, opt in opts.items()}
    return copy.deepcopy((models, optims))


def single_run(args):
    """args as one run of a sweep gets them: the first value of a list-valued --k or --beta."""
    for flag in ("k", "beta"):
        if isinstance(getattr(args, flag, None), list):
            setattr(args, flag, getattr(args, flag)[0])
    return args


def test_runs_begun_in_the_same_second_get_folders_of_their_own(tmp_path):
    """A sweep's short runs start within a second of each other: each gets its own folder."""
    args = single_run(beta_vae.parse_args(["--dataset", "squares", "--device", "cpu",
                                           "--out", str(tmp_path)]))
    first, second = beta_vae.make_run_folder(args), beta_vae.make_run_folder(args)
    assert first != second
    assert all(os.path.isfile(os.path.join(f, "config.json")) for f in (first, second))


def test_evaluation_and_figures_leave_the_training_state_alone(case, tmp_path):
    """evaluate and save_figures run between steps: no draw from the global RNG, no change to
    weights, BatchNorm statistics or optimizer states, and every network back in training mode."""
    module, argv = case
    args = single_run(module.parse_args([*argv, "--device", "cpu"]))
    data, ctx = module.setup(args)
    nets, opts = module.build(args, data.shape)
    x, _ = next(data.epoch(args.batch_size, torch.Generator().manual_seed(0)))
    module.train_step(nets, opts, x, args)
    before, rng = training_state(nets, opts), torch.get_rng_state()
    metrics = module.evaluate(nets, ctx, args)
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    row = {"epoch": 1.0, "step": 1, **dict.fromkeys(module.LOSSES, 1.0), **metrics}
    common.append_metrics(os.path.join(tmp_path, "metrics.csv"), row)
    module.save_figures(nets, ctx, args, str(tmp_path), row)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same(before, training_state(nets, opts))
    assert all(m.training for net in nets.values() for m in net.modules())


class HostTraffic(TorchDispatchMode):
    """Records every op that mixes a host tensor (other than a 0-d scalar) with a device tensor,
    and every host-to-device copy. The 'device' is PyTorch's meta device, so this runs without a
    GPU."""

    def __init__(self):
        super().__init__()
        self.found, self.ops = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.ops += 1
        host = [t for t in tensors if t.device.type == "cpu"]
        device = [t for t in tensors + outs if t.device.type == "meta"]
        if host and "copy" in str(func) and any(t.device.type == "meta" for t in outs):
            self.found.append(f"{func} copies a host tensor to the device")
        elif device and any(t.dim() > 0 for t in host):
            shapes = [tuple(t.shape) for t in host]
            self.found.append(f"{func} mixes host tensors {shapes} with device tensors")
        return out


def test_the_host_traffic_check_catches_copies_and_mixing():
    """The check below fails on what it is meant to catch: a copy to the device (as a bias
    correction made on the CPU would be), a host tensor in a device op (as a batch index drawn on
    the host would be)."""
    with HostTraffic() as mode:
        x = torch.ones(3, device="meta")
        x * 2.0 + torch.ones((), dtype=torch.float32)  # a number and a 0-d host scalar: allowed
    assert mode.found == []
    with HostTraffic() as mode:
        torch.ones(3).to("meta")
    assert len(mode.found) == 1 and "copies a host tensor" in mode.found[0]
    with HostTraffic() as mode:
        # device data indexed by a host index: a hidden copy
        torch.ones(5, device="meta")[torch.tensor([0, 2])]
    assert mode.found and "mixes host tensors [(2,)]" in mode.found[0]


def test_a_training_step_moves_nothing_between_host_and_device(case):
    """One batch and one training step of every script on the meta device: no op may mix host and
    device tensors, nothing may be copied from the host (the loaders copy an epoch's order once, at
    its start)."""
    module, argv = case
    args = single_run(module.parse_args([*argv, "--device", "cpu"]))
    args.device = "meta"
    data = common.load_data(args.dataset, args.data_root, "meta")
    nets, opts = module.build(args, data.shape)
    batches = data.epoch(args.batch_size, torch.Generator().manual_seed(0))
    x, _ = next(batches)
    module.train_step(nets, opts, x, args)  # the first step creates the optimizers' states
    with HostTraffic() as mode:
        x, _ = next(batches)
        losses = module.train_step(nets, opts, x, args)
    assert mode.found == [] and mode.ops > 100
    assert losses.device.type == "meta" and losses.shape == (len(module.LOSSES),)


class RunsCode:
    """Unpickling this calls os.system: what a shared checkpoint could do to a lab machine."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def test_bad_input_gives_one_line_errors(case, tmp_path):
    module, argv = case
    out = ["--out", tmp_path / "runs", "--device", "cpu"]
    assert "--device foo is not a device" in error_of(module, *argv, "--device", "foo")
    if not torch.cuda.is_available():
        assert "no such CUDA GPU" in error_of(module, *argv, "--device", "cuda")
    assert "--batch-size must be between 2" in error_of(module, *argv, *out, "--batch-size", "1")
    assert "--log-every must be between 1" in error_of(module, *argv, *out, "--log-every", 10 ** 12)
    lr_flag = "--lr-d" if module.SCRIPT in ("infogan.py", "unrolled_infogan.py") else "--lr"
    assert "finite" in error_of(module, *argv, *out, lr_flag, "nan")
    (tmp_path / "file").write_text("")
    assert "is a file" in error_of(module, *argv, "--out", tmp_path / "file", "--device", "cpu")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert "is not a checkpoint" in error_of(module, *argv, *out, "--resume", tmp_path / "junk.pt")
    assert "no such file" in error_of(module, *argv, *out, "--resume", tmp_path / "missing.pt")
    torch.save({"script": "other.py", "args": {}}, tmp_path / "other.pt")
    msg = error_of(module, *argv, *out, "--resume", tmp_path / "other.pt")
    assert f"not a checkpoint of {module.SCRIPT}" in msg
    torch.save({"script": module.SCRIPT, "args": {}, "step": 1}, tmp_path / "partial.pt")
    msg = error_of(module, *argv, *out, "--resume", tmp_path / "partial.pt")
    assert "is not a complete checkpoint" in msg
    torch.save({"script": module.SCRIPT, "trap": RunsCode(tmp_path / "ran")}, tmp_path / "evil.pt")
    assert "can load safely" in error_of(module, *argv, *out, "--resume", tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()  # the command in the pickle never ran
    assert not (tmp_path / "runs").exists()  # and no run folder was made for any of these


def test_resume_refuses_a_changed_experiment(case, tmp_path):
    module, argv = case
    folder = run(module, tmp_path, *argv, "--steps", "1")
    changed = ["--seed", "2"]
    if module in (ui, vi):
        changed = ["--k", "0"]
    if module is infogan:
        changed = ["--lr-g", "0.002"]
    msg = error_of(module, *argv, *changed, "--resume", folder, "--device", "cpu")
    assert msg.endswith("resume with the same value") and changed[0] in msg
    assert [r["step"] for r in common.read_metrics(os.path.join(folder, "metrics.csv"))] == [1]


def test_command_line_errors_are_one_line_with_exit_status_1(tmp_path):
    proc = run_script("infogan.py", "--epochs", "0", cwd=tmp_path, expect_rc=None)
    assert "--epochs must be between 1" in one_line_error(proc)
    proc = run_script("unrolled_infogan.py", "--k", 10 ** 12, cwd=tmp_path, expect_rc=None)
    assert "--k takes" in one_line_error(proc)
    proc = run_script("vae_infogan.py", "--device", "foo", cwd=tmp_path, expect_rc=None)
    assert "--device" in one_line_error(proc)
    assert not os.listdir(tmp_path)


def test_a_non_finite_loss_stops_the_run_naming_step_and_loss(tiny_mnist, tmp_path, monkeypatch):
    real = infogan.train_step
    calls = []

    def diverging(nets, opts, x, args):  # the fourth step's li_cont is NaN
        losses = real(nets, opts, x, args)
        calls.append(1)
        if len(calls) == 4:
            return torch.where(torch.arange(4) == 3, float("nan"), losses)
        return losses

    monkeypatch.setattr(infogan, "train_step", diverging)
    argv = CASES["infogan"][1](tiny_mnist)
    msg = error_of(infogan, *argv, "--steps", "6", "--log-every", "5", "--out", tmp_path,
                   "--device", "cpu")
    assert msg == ("error: li_cont became NaN or infinite at step 4; "
                   "lower the learning rate or check the data")


# ------------------------------------------------------------------------------------------------
# InfoGAN pieces (infogan.py, copied verbatim in unrolled_infogan.py)
# ------------------------------------------------------------------------------------------------
def test_information_losses_are_the_nll_terms():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 12, generator=g)
    c_cat = torch.randint(10, (8,), generator=g)
    c_cont = torch.rand(8, 2, generator=g)
    li_cat, li_cont = infogan.information_losses(q, c_cat, c_cont, 10)
    assert torch.allclose(li_cat, -torch.log_softmax(q[:, :10], 1)[torch.arange(8), c_cat].mean())
    nll = -torch.distributions.Normal(q[:, 10:], 1.0).log_prob(c_cont).mean()  # Gaussian NLL, σ = 1
    assert torch.allclose(li_cont, nll - 0.5 * math.log(2 * math.pi))


def test_traversal_latents_layout():
    n_noise, n_cat, values = 62, 10, torch.linspace(-2, 2, 10)
    z, c_cont = torch.randn(n_noise), torch.tensor([0.3, -0.7])
    for code in (0, 1):
        latent, c_cat, cc = infogan.traversal_latents(z, c_cont, code, values, n_cat)
        grid = latent.view(n_cat, len(values), -1)  # (rows, columns, latent)
        rows, cols = torch.meshgrid(torch.arange(n_cat), torch.arange(len(values)), indexing="ij")
        one_hot = grid[..., n_noise:n_noise + n_cat]
        varied = grid[..., n_noise + n_cat + code]
        other = grid[..., n_noise + n_cat + 1 - code]
        assert torch.equal(one_hot.argmax(-1), rows)  # c_cat = row index
        assert torch.equal(one_hot.sum(-1), torch.ones(n_cat, len(values)))  # one-hot
        assert torch.equal(varied, values[cols])  # the varied code = column value
        assert torch.equal(other, torch.full((n_cat, 10), float(c_cont[1 - code])))  # held
        assert torch.equal(grid[..., :n_noise], z.expand(n_cat, len(values), -1))  # noise fixed
        assert torch.equal(c_cat, rows.flatten())
        assert torch.equal(cc.view(n_cat, 10, 2)[..., code], values[cols])


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_networks_shapes_and_width(width):
    G, D = infogan.generator(74, width).eval(), infogan.Discriminator(10, 2, width).eval()
    latent, c_cat, c_cont = infogan.sample_latents(5, 62, 10, 2, "cpu")
    assert c_cont.min() >= -1 and c_cont.max() <= 1 and c_cat.max() < 10
    x = G(latent)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    d, q = D(x)
    assert d.shape == (5,) and q.shape == (5, 12)
    assert D.body[0].out_channels == round(64 * width) and G[0].out_features == round(1024 * width)


# ------------------------------------------------------------------------------------------------
# The unrolled look-ahead: tiny float64 networks with smooth activations (finite differences
# disagree across ReLU kinks) and BatchNorm in D (its buffers must come out of the unroll
# untouched)
# ------------------------------------------------------------------------------------------------
class TinyD(nn.Module):
    """InfoGAN's layout in miniature: a body with BatchNorm shared by D's head and Q's head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.SiLU(),
            nn.Linear(6, 5),
            nn.Softplus(),
        )
        self.d_head = nn.Linear(5, 1)
        self.q_head = nn.Linear(5, 3 + 1)

    def forward(self, x):
        h = self.body(x)
        return self.d_head(h).squeeze(1), self.q_head(h)


def tiny_setup(seed=0, real_steps=3):
    """Tiny G and D in float64, D's Adam (owning body and d_head, as in the script) stepped a few
    times."""
    torch.manual_seed(seed)
    G, D = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double(), TinyD().double()
    d_params = [*D.body.parameters(), *D.d_head.parameters()]
    opt_d = torch.optim.Adam(d_params, lr=0.05, betas=(0.5, 0.999))
    x = torch.randn(16, 4, dtype=torch.float64) + 1.0
    z = ui.make_latent(torch.randn(16, 2, dtype=torch.float64), torch.arange(16) % 3,
                       torch.rand(16, 1, dtype=torch.float64) * 2 - 1, 3)
    for _ in range(real_steps):
        loss = ui.d_loss(D(x)[0], D(G(z[torch.randperm(16)]).detach())[0])
        opt_d.zero_grad()
        loss.backward()
        opt_d.step()
    opt_d.zero_grad(set_to_none=True)
    return G, D, opt_d, x, z


def g_grad(G, D, opt_d, x, z, k, kind, first_order=False):
    G.zero_grad(set_to_none=True)
    ui.unrolled_g_loss(D, opt_d, x, G(z), k, 0.05, kind=kind, first_order=first_order).backward()
    return torch.cat([p.grad.reshape(-1) for p in G.parameters()])


@pytest.mark.parametrize("kind", ["saddle", "ns"])
def test_exact_unrolled_gradient_matches_finite_differences(kind):
    G, D, opt_d, x, z = tiny_setup()
    k, h = 3, 1e-6  # Adam's normalisation is strongly curved: the O(h²) error is ~1e-6 at h = 1e-5
    exact = g_grad(G, D, opt_d, x, z, k, kind)
    first_order = g_grad(G, D, opt_d, x, z, k, kind, first_order=True)
    theta = torch.nn.utils.parameters_to_vector(G.parameters()).detach()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        u = torch.randn(theta.shape, generator=gen, dtype=torch.float64)
        f = []
        for sign in (1, -1):
            torch.nn.utils.vector_to_parameters(theta + sign * h * u, G.parameters())
            f.append(ui.unrolled_g_loss(D, opt_d, x, G(z), k, 0.05, kind=kind).item())
        torch.nn.utils.vector_to_parameters(theta, G.parameters())
        fd, ad = (f[0] - f[1]) / (2 * h), float(exact @ u)
        assert abs(fd - ad) <= 1e-5 * abs(fd), (kind, fd, ad)
        # the first-order ("popular port") gradient is a different vector: it misses eq. (11)'s
        # 2nd term
        assert abs(float(first_order @ u) - fd) > 1e-3 * abs(fd), (kind, fd, float(first_order @ u))


def test_the_look_ahead_leaves_d_bit_for_bit():
    G, D, opt_d, x, z = tiny_setup()
    before = copy.deepcopy((D.state_dict(), opt_d.state_dict()))
    for first_order in (False, True):
        g_grad(G, D, opt_d, x, z, 5, "ns", first_order)
    # parameters, BatchNorm buffers, Adam's moments and step
    assert_same(before, (D.state_dict(), opt_d.state_dict()))
    assert all(p.grad is None for p in D.parameters())  # nothing leaked into the real D


def test_the_information_pass_leaves_ds_buffers_alone():
    """forward_with_copied_buffers: D's outputs and gradients for D's parameters, but D's BatchNorm
    statistics stay as they were."""
    _, D, _, x, _ = tiny_setup()
    buffers = copy.deepcopy(dict(D.named_buffers()))
    logit, q = ui.forward_with_copied_buffers(D, x)
    assert_same(buffers, dict(D.named_buffers()))
    q.sum().backward()
    assert D.q_head.weight.grad is not None and D.body[0].weight.grad is not None
    expected_logit, expected_q = D(x)
    assert torch.equal(logit, expected_logit) and torch.equal(q, expected_q)


@pytest.fixture
def float64_default():
    """train_step draws its latents in the default dtype: float64 for tiny_setup's nets, restored
    afterwards."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def tiny_training(k):
    """tiny_setup's nets with both optimizers (G's Adam also owns Q's head, as in the scripts), a
    real batch and the flags train_step reads, for K = k."""
    G, D, opt_d, x, _ = tiny_setup()
    opt_g = torch.optim.Adam([*G.parameters(), *D.q_head.parameters()], lr=1e-3, betas=(0.5, 0.999))
    args = SimpleNamespace(n_cat=3, n_cont=1, n_noise=2, k=k, unroll_lr=0.05, g_loss="ns",
                           first_order=False, lambda_cat=1.0, lambda_cont=1.0)
    return {"G": G, "D": D}, {"d": opt_d, "g": opt_g}, x, args


def test_train_step_moves_d_by_its_own_step_only(float64_default):
    """D after a training step is the same whatever K (the look-ahead works on a copy); G is not."""
    results = []
    for k in (0, 3):
        nets, opts, x, args = tiny_training(k)
        torch.manual_seed(5)
        losses = ui.train_step(nets, opts, x, args)
        assert torch.isfinite(losses).all()
        d_state = {n: v for n, v in nets["D"].state_dict().items() if not n.startswith("q_head")}
        g_params = [p.detach().clone() for p in nets["G"].parameters()]
        results.append((d_state, opts["d"].state_dict(), g_params))
    assert_same(results[0][:2], results[1][:2])
    assert not all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


@pytest.mark.parametrize("module, k", [("infogan", 0), ("unrolled_infogan", 0),
                                       ("unrolled_infogan", 3)])
def test_the_generator_step_computes_no_gradient_for_d(module, k, float64_default):
    """After D's real step, backward(inputs=...) computes gradients for G and Q's head only, none
    for D."""
    nets, opts, x, args = tiny_training(k)
    stepped, late, step = [], [], opts["d"].step

    def step_and_note(*a, **kw):
        """D's real step, noted in `stepped`."""
        result = step(*a, **kw)
        stepped.append(True)
        return result

    opts["d"].step = step_and_note
    for name, p in nets["D"].named_parameters():
        if not name.startswith("q_head"):
            p.register_hook(lambda grad, name=name: late.append(name) if stepped else None)
    importlib.import_module(module).train_step(nets, opts, x, args)
    assert stepped and late == []


def test_k0_is_the_plain_gan_generator_gradient():
    for kind in ("saddle", "ns"):
        G, D, opt_d, x, z = tiny_setup()
        unrolled = g_grad(G, D, opt_d, x, z, 0, kind)
        G.zero_grad()
        fake = G(z)
        logit = D(fake)[0]
        if kind == "saddle":
            plain = -ui.d_loss(D(x)[0], logit)
        else:
            plain = F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))
        plain.backward()
        assert torch.equal(unrolled, torch.cat([p.grad.reshape(-1) for p in G.parameters()]))


def test_unrolled_steps_are_torch_adam():
    """The differentiable Adam does what torch.optim.Adam does (moments, step count, bias
    correction)."""
    G, D, opt_d, x, z = tiny_setup()
    fake = G(z).detach()
    snap = ui.snapshot_d(D, opt_d)
    assert isinstance(snap, ui.DSnapshot) and snap.step == 3  # tiny_setup's 3 steps of opt_d
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
    real = torch.nn.utils.parameters_to_vector([*D2.body.parameters(), *D2.d_head.parameters()])
    assert torch.allclose(theta, real, rtol=1e-10, atol=1e-8)
    assert (theta - snap.theta).abs().max() > 1e-2  # and the steps did move D
    for name, b in D2.named_buffers():  # the copy's BatchNorm stats moved like a real D's
        assert torch.allclose(snap.buffers[name], b, rtol=1e-10, atol=1e-8)
        assert not torch.equal(b, dict(D.named_buffers())[name])


def test_benchmark_counts_more_ops_per_unrolled_step():
    """benchmark.py --count-ops: each exact unrolled step adds calls (forward, backward, double
    backward, Adam); the first-order unroll dispatches fewer than the exact one at the same K."""
    import benchmark
    n0, n1, n2, n3 = (benchmark.count_ops(k, False, "cpu", width=0.125)[0] for k in (0, 1, 2, 3))
    assert n0 < n1 < n2 < n3 and (n3 - n2) == (n2 - n1)  # each unrolled step adds the same calls
    assert benchmark.count_ops(2, True, "cpu", width=0.125)[0] < n2


# ------------------------------------------------------------------------------------------------
# The K sweep and the ring
# ------------------------------------------------------------------------------------------------
def test_mnist_sweep_writes_a_comparison(tiny_mnist, tmp_path):
    ui.main(["--data-root", tiny_mnist, "--k", "0", "1", "--steps", "2", "--width", "0.125",
             "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path)])
    (sweep,) = tmp_path.iterdir()
    assert sweep.name.startswith("unrolled_infogan__mnist__sweep-k0-1__s1__")
    table = (sweep / "comparison.md").read_text()
    assert "values at step 2," in table and "Spearman" in table
    assert "| 0 | — | — | 1 |" in table and "| 1 | exact | 2.5e-05 | 1 |" in table
    assert (sweep / "fig12_q_loss.png").exists()
    assert sorted(d.name.split("__")[2] for d in sweep.iterdir() if d.is_dir()) == ["k0", "k1"]


def test_ring_sweep_draws_fig3(tmp_path):
    ui.main(["--dataset", "ring", "--k", "0", "2", "--steps", "3", "--batch-size", "16",
             "--device", "cpu", "--out", str(tmp_path)])
    (sweep,) = tmp_path.iterdir()
    assert (sweep / "fig03_scatter.png").exists()
    assert "| 2 | exact | 0.0001 | 1 |" in (sweep / "comparison.md").read_text()
    # a run given twice: 2 runs
    lines = evaluation.compare([str(sweep), str(sweep)], str(tmp_path / "again"), "test")
    assert any(line.startswith("| 0 | — | — | 2 |") for line in lines)


# ------------------------------------------------------------------------------------------------
# evaluation.py: known answers on strokes drawn here
# ------------------------------------------------------------------------------------------------
SHEARS = (-0.4, -0.2, 0.0, 0.2, 0.4)
THICKNESSES = (1.5, 2.0, 3.0, 4.0, 5.0)


# ------------------------------------------------------------------------------------------------
# Drawing: shapes given by an inside test, rendered with sub-pixel supersampling
# ------------------------------------------------------------------------------------------------
def render(inside, n=1, size=28, ss=16):
    """Images (n, 1, size, size) in [-1, 1]: ink = fraction of ss x ss sample points per pixel where
    inside(x, y) (tensors (n, size*ss, size*ss)) holds; pixel (i, j) has its centre at x = j,
    y = i."""
    c = (torch.arange(size * ss, dtype=torch.float64) + 0.5) / ss - 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    ink = inside(x.expand(n, -1, -1), y.expand(n, -1, -1)).double()
    ink = ink.view(n, size, ss, size, ss).mean((2, 4))
    return (ink * 2 - 1).float().unsqueeze(1)


def col(values):
    """Per-image parameters as an (n, 1, 1) tensor, to broadcast against the sample grids."""
    return torch.as_tensor(values, dtype=torch.float64).view(-1, 1, 1)


def unshear(x, y, s, cy):
    """x of the point before a shear by s about row cy: x' = x + s (cy - y), so the top leans right
    for s > 0."""
    return x - s * (cy - y)


def bar(s=0.0, t=3.0, h=18.0, cx=13.75, cy=13.6):
    """A vertical bar of thickness t (horizontal) and height h, sheared by s."""
    s, t = col(s), col(t)
    return lambda x, y: ((unshear(x, y, s, cy) - cx).abs() <= t / 2) & ((y - cy).abs() <= h / 2)


def ring(s=0.0, t=3.0, r=8.5, cx=13.75, cy=13.6):
    """A ring of mean radius r and thickness t, sheared by s."""
    s, t = col(s), col(t)
    return lambda x, y: ((unshear(x, y, s, cy) - cx).hypot(y - cy) - r).abs() <= t / 2


def two_bars(d, s=0.0, t=2.0, h=18.0, cx=13.75, cy=13.6):
    """Two vertical bars at x = cx ± d, thickness t, height h, sheared by s."""
    left, right = bar(s, t, h, cx - d, cy), bar(s, t, h, cx + d, cy)
    return lambda x, y: left(x, y) | right(x, y)


def props(shape, n):
    return evaluation.properties(render(shape, n)).double()


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [bar, ring, lambda s: two_bars(4.0, s)],
                         ids=["bar", "ring", "two_bars"])
def test_slant_is_the_shear(shape):
    p = props(shape(list(SHEARS)), len(SHEARS))
    assert torch.allclose(p[:, 0], torch.tensor(SHEARS, dtype=torch.float64), atol=0.03), p[:, 0]


def test_slant_sign_top_leaning_right_is_positive():
    img = -torch.ones(1, 1, 28, 28)
    for i in range(4, 24):  # one pixel per row, further right towards the top
        img[0, 0, i, 20 - (i - 4) // 2] = 1
    assert evaluation.properties(img)[0, 0] > 0.3


@pytest.mark.parametrize("cx", [13.5, 13.75, 14.0])
@pytest.mark.parametrize("shape", [bar, ring], ids=["bar", "ring"])
def test_thickness_is_the_stroke_thickness(shape, cx):
    # a 1.5 px stroke centred on a pixel boundary is two half-inked pixels: it reads as 2 px, so it
    # is left out
    ts = [t for t in THICKNESSES if t >= 2 or cx != 13.5]
    p = props(shape(0.0, ts, cx=cx), len(ts))
    t = torch.tensor(ts, dtype=torch.float64)
    assert ((p[:, 1] - t).abs() <= 0.1 * t).all(), p[:, 1]


@pytest.mark.parametrize("t", THICKNESSES)
def test_thickness_under_shear_and_slant_under_thickening(t):
    s = torch.tensor(SHEARS, dtype=torch.float64)
    p = props(bar(list(SHEARS), t), len(SHEARS))[:, 1]
    perpendicular = t / (1 + s ** 2).sqrt()  # a shear thins a bar: 7% at s = 0.4
    assert ((p - perpendicular).abs() <= 0.1 * perpendicular).all(), p
    p = props(ring(list(SHEARS), t), len(SHEARS))[:, 1]
    assert ((p - p[2]).abs() <= 0.1 * p[2]).all(), p
    for shape in (bar, ring):
        for shear in (-0.3, 0.0, 0.3):
            p = props(shape(shear, list(THICKNESSES)), len(THICKNESSES))
            assert (p[:, 0] - shear).abs().max() <= 0.03, p[:, 0]


@pytest.mark.parametrize("d", [2.5, 4.0, 6.0])
def test_width_of_two_bars_and_invariant_under_shear(d):
    t = 2.0
    p = props(two_bars(d, list(SHEARS), t), len(SHEARS))
    want = math.sqrt(d ** 2 + t ** 2 / 12)
    assert ((p[:, 2] - want).abs() <= 0.05 * want).all(), (p[:, 2], want)


def test_empty_and_full_images_give_finite_properties():
    p = evaluation.properties(torch.stack([-torch.ones(1, 28, 28), torch.ones(1, 28, 28)]))
    assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------------------------
# Mode coverage
# ------------------------------------------------------------------------------------------------
def test_class_coverage_known_histograms():
    one_class = torch.tensor([0, 0, 0, 500, 0, 0, 0, 0, 0, 0])
    assert evaluation.class_coverage(one_class, 500) == (1, pytest.approx(math.log(10)))
    uniform = torch.full((10,), 100)
    assert evaluation.class_coverage(uniform, 1000) == (10, pytest.approx(0.0, abs=1e-12))
    # N = 10,000: a uniform share is 1,000, 10% of it 100
    counts = torch.tensor([1300] * 7 + [701, 100, 99])
    classes, kl = evaluation.class_coverage(counts, 10000)
    p = counts / counts.sum()
    assert classes == 9 and kl == pytest.approx(float((p * (10 * p).log()).sum()))
    # the same confident histogram among 4 times as many samples: 10% of a share is 400, which 8
    # classes reach
    assert evaluation.class_coverage(counts, 40000)[0] == 8
    # nothing confident: no mode
    classes, kl = evaluation.class_coverage(torch.zeros(10), 10000)
    assert classes == 0 and math.isnan(kl)  # no confident sample: no histogram, no KL


# ------------------------------------------------------------------------------------------------
# Evaluator on fake generators and a hand-made classifier
# ------------------------------------------------------------------------------------------------
N_NOISE, N_CAT, N_CONT = 4, 10, 2
STDS = (0.25, 0.75, 1.15)  # about the real MNIST test digits' standard deviations


class CentreInk(nn.Module):
    """Digit 1 when the 4 x 2 pixels at the centre hold ink (a bar), digit 0 when they do not (a
    ring)."""

    def forward(self, x):
        m = (x[:, 0, 12:16, 13:15].mean((1, 2)) + 1) / 2  # ink in [0, 1] at the centre
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 1], logits[:, 0] = 20 * (m - 0.5), -20 * (m - 0.5)
        return logits


class FakeG(nn.Module):
    """Draws one stroke from the continuous codes (c1, c2) at the end of the latent; kind:
    'shear_thick': a bar sheared by 0.1 c1 with thickness 2.5 + 0.5 c2 (codes rounded to 0.1, so
    that the 10,000 coverage samples need few distinct drawings);  'switch': a bar for c1 < 0, a
    ring otherwise."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.dummy = nn.Linear(1, 1)  # so that train()/eval() have something to act on
        self.bar, self.ring = render(bar(), 1), render(ring(), 1)

    def forward(self, latent):
        if self.kind == "switch":
            return torch.where(latent[:, -2, None, None, None] < 0, self.bar, self.ring)
        rounded = (latent[:, -2:].double() * 10).round() / 10
        codes, inverse = torch.unique(rounded, dim=0, return_inverse=True)
        return render(bar(0.1 * codes[:, 0], 2.5 + 0.5 * codes[:, 1]), len(codes), ss=4)[inverse]


@pytest.fixture(scope="module")
def evaluator():
    return evaluation.Evaluator("unused", "cpu", N_NOISE, N_CAT, N_CONT, classifier=CentreInk(),
                                stds=STDS)


def test_latent_layout_and_rng(evaluator):
    d = N_NOISE + N_CAT + N_CONT
    assert evaluator.latents.shape == (evaluation.N_COVERAGE, d)
    cat = evaluator.latents[:, N_NOISE:N_NOISE + N_CAT]
    assert torch.equal(cat.sum(1), torch.ones(len(cat))) and cat.argmax(1).bincount().min() > 900
    assert evaluator.latents[:, -N_CONT:].abs().max() <= 1
    t = evaluator.traversals[1].view(evaluation.N_TRAVERSAL, len(evaluation.VALUES), d)
    # code 2 moves
    assert torch.equal(t[:, :, -1], evaluation.VALUES.expand(evaluation.N_TRAVERSAL, -1))
    assert torch.equal(t[:, :, :-1], t[:, :1, :-1].expand_as(t[:, :, :-1]))  # the rest stays
    assert torch.equal(t[:, 0, N_NOISE:N_NOISE + N_CAT].argmax(1).bincount(), torch.full((10,), 10))
    state = torch.get_rng_state()
    again = evaluation.Evaluator("unused", "cpu", N_NOISE, N_CAT, N_CONT, classifier=CentreInk(),
                                 stds=STDS)
    assert torch.equal(again.latents, evaluator.latents)
    assert torch.equal(state, torch.get_rng_state())


def test_shear_code_and_thickness_code(evaluator):
    G = FakeG("shear_thick").train()
    row = evaluator(G)
    assert G.training  # mode restored
    # always a bar: digit 1
    assert row["classes"] == 1 and row["kl_uniform"] == pytest.approx(math.log(10))
    assert row["c1_slant"] == pytest.approx(0.4 / STDS[0], rel=0.1)  # slant -0.2 .. 0.2
    assert row["c1_purity"] > 0.8 and row["c1_switch"] == 0
    assert evaluation.top_property(row, 1) == "slant"
    assert evaluation.top_property(row, 2) == "thickness"
    assert row["c2_thickness"] == pytest.approx(2.0 / STDS[1], rel=0.1)  # thickness 1.5 .. 3.5
    assert row["c2_purity"] > 0.7
    assert all(isinstance(v, float) for v in row.values())


def test_a_code_that_changes_the_digit_is_not_pure(evaluator):
    row = evaluator(FakeG("switch"))
    assert row["classes"] == 2 and row["kl_uniform"] == pytest.approx(math.log(5), abs=0.02)
    assert row["c1_switch"] == 1 and row["c1_purity"] == 0
    assert row["c2_switch"] == 0 and row["c2_purity"] == 0  # c2 does nothing: no effect at all


def test_classifier_is_cached_reloaded_and_retrained(tmp_path, capsys):
    root = make_mnist(str(tmp_path))
    path = tmp_path / "MNIST" / "digit_classifier.pt"
    state = torch.get_rng_state()
    first = evaluation.load_classifier(root, "cpu", steps=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    assert "training the digit classifier" in capsys.readouterr().out and path.exists()
    assert not first.training and 0 <= first.accuracy <= 1 and (first.stds > 0).all()

    again = evaluation.load_classifier(root, "cpu", steps=3)
    assert capsys.readouterr().out == ""  # loaded, not retrained
    pairs = zip(first.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    assert again.accuracy == first.accuracy and not again.training

    make_mnist(root, seed=1)  # other training pixels: another fingerprint
    evaluation.load_classifier(root, "cpu", steps=3)
    assert "training the digit classifier" in capsys.readouterr().out

    path.write_bytes(b"not a checkpoint")
    evaluation.load_classifier(root, "cpu", steps=3)
    assert "training the digit classifier" in capsys.readouterr().out


def test_not_digits_are_images_in_range():
    x = evaluation.not_digits(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 1, 28, 28) and x.min() >= -1 and x.max() <= 1


def test_classifier_still_returned_when_the_cache_cannot_be_written(tmp_path, capsys, monkeypatch):
    root = make_mnist(str(tmp_path))

    def fail(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(evaluation.torch, "save", fail)
    model = evaluation.load_classifier(root, "cpu", steps=2)
    out = capsys.readouterr().out
    assert "warning: cannot write" in out and "not cached" in out
    assert isinstance(model, evaluation.Classifier)


def brute_force_accuracy(pred, labels, n):
    """The accuracy of pred's categories mapped to labels by the best of all n! permutations."""
    hits = (sum(int(perm[p]) == int(l) for p, l in zip(pred, labels))
            for perm in itertools.permutations(range(n)))
    return max(hits) / len(labels)


def test_hungarian_accuracy_known_answers():
    labels = torch.arange(1000) % 10
    perm = torch.tensor([3, 7, 0, 9, 1, 4, 8, 2, 6, 5])
    # perfect clustering, categories permuted
    assert evaluation.hungarian_accuracy(perm[labels], labels, 10) == 1.0
    # two digits share one category: the best one-to-one map gets only one of them right
    pred = perm[labels].clone()
    pred[labels == 9] = perm[4]
    assert evaluation.hungarian_accuracy(pred, labels, 10) == 0.9
    # a constant prediction matches one digit only
    assert evaluation.hungarian_accuracy(torch.zeros(1000, dtype=torch.long), labels, 10) == 0.1
    # random confusions: the DP equals brute force over all permutations (5 classes), and
    # n_cat < n_classes
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        labels5 = torch.randint(5, (60,), generator=g)
        confused = torch.rand(60, generator=g) < 0.5
        shifted = (labels5 + 2) % 5
        anything = torch.randint(5, (60,), generator=g)
        pred5 = torch.where(confused, shifted, anything)
        dp = evaluation.hungarian_accuracy(pred5, labels5, 5, n_classes=5)
        assert abs(dp - brute_force_accuracy(pred5, labels5, 5)) < 1e-12
    # 4 categories: digits 0-3 (+4-9 folded in)
    assert evaluation.hungarian_accuracy(labels % 4, labels, 4) == 0.4


def test_mode_metrics_on_known_samples():
    ring = common.ToyData("ring", "cpu")
    m, s = ring.modes.double(), ring.std
    direction = torch.tensor([0.6, 0.8], dtype=torch.float64)
    pts = [m[i].expand(100, 2) for i in range(4)]          # 400 exact hits on modes 0-3
    pts.append(m[4] + 2.9 * s * direction.expand(5, 2))    # 5 high quality (2.9σ) on mode 4
    pts.append(m[5] + 3.1 * s * direction.expand(45, 2))   # 45 just outside 3σ of mode 5
    pts.append(torch.zeros(50, 2, dtype=torch.float64))    # 50 at the centre, far from every mode
    r = evaluation.mode_metrics(torch.cat(pts), m, s)
    assert (r["modes"], r["modes10"]) == (5, 4)
    assert r["hq_pct"] == pytest.approx(100 * 405 / 500)
    q = [100 / 405] * 4 + [5 / 405]
    assert r["reverse_kl"] == pytest.approx(sum(p * math.log(8 * p) for p in q), rel=1e-5)
    uniform = evaluation.mode_metrics(m.repeat(10, 1), m, s)
    assert (uniform["modes"], uniform["modes10"], uniform["hq_pct"]) == (8, 8, 100.0)
    assert uniform["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    one = evaluation.mode_metrics(m[:1].repeat(20, 1), m, s)
    assert (one["modes"], one["modes10"]) == (1, 1)
    assert one["reverse_kl"] == pytest.approx(math.log(8), rel=1e-6)
    assert math.isnan(evaluation.mode_metrics(torch.zeros(7, 2), m, s)["reverse_kl"])


# ------------------------------------------------------------------------------------------------
# beta_vae.py and vae_gan.py
# ------------------------------------------------------------------------------------------------
MODULES = [beta_vae, vae_gan]
# vae_gan at the paper's width is too slow for a test
SMALL = {beta_vae: [], vae_gan: ["--width", "0.125"]}


@pytest.mark.parametrize("module", MODULES)
def test_kl_matches_closed_form_and_torch_distributions(module):
    # hand values: N(1, 1) -> 0.5; N(0, e^2) -> 0.5 (e^2 - 2 - 1); N(0, 1) -> 0; each a mean over
    # the batch
    mu = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    by_hand = torch.tensor([0.5, 0.5 * (math.e ** 2 - 3), 0.0])
    assert torch.allclose(module.kl_per_latent(mu, logvar), by_hand, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 10, generator=g, dtype=torch.float64)
    logvar = torch.randn(64, 10, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).mean(0)
    assert torch.allclose(module.kl_per_latent(mu, logvar), expected, atol=1e-12)


def test_reconstruction_is_summed_over_pixels_and_averaged_over_batch():
    # logits 0 -> p = 0.5: BCE = log 2 per pixel; 4 pixels per image -> 4 log 2 per image,
    # whatever B is
    for b in (1, 2, 5):
        x = (torch.rand(b, 1, 2, 2) > 0.5).float()
        loss = beta_vae.reconstruction_loss(torch.zeros(b, 1, 2, 2), x, "bernoulli")
        assert torch.isclose(loss, torch.tensor(4 * math.log(2)))
    # twice the pixels -> twice the loss (a per-pixel mean would keep it constant)
    wide = torch.ones(3, 1, 2, 4)
    loss = beta_vae.reconstruction_loss(torch.zeros(3, 1, 2, 4), wide, "bernoulli")
    assert torch.isclose(loss, torch.tensor(8 * math.log(2)))
    # Gaussian (colour): sigmoid(0) = 0.5 vs x = 1 -> 0.25 per value; 3 x 2 x 2 values -> 3.0 per
    # image
    colour = torch.ones(7, 3, 2, 2)
    loss = beta_vae.reconstruction_loss(torch.zeros(7, 3, 2, 2), colour, "gaussian")
    assert torch.isclose(loss, torch.tensor(3.0))
    # VAE-GAN's feature likelihood: ½ Σ over the features, mean over the batch
    nll = vae_gan.feature_nll(torch.ones(5, 12), torch.zeros(5, 12))
    assert torch.isclose(nll, torch.tensor(6.0))
    nll = vae_gan.feature_nll(torch.ones(1, 12), torch.zeros(1, 12))
    assert torch.isclose(nll, torch.tensor(6.0))


@pytest.mark.parametrize("module", MODULES)
def test_mig_on_codes_with_known_answers(module):
    sizes = (3, 6, 10)
    g = torch.Generator().manual_seed(0)
    f = torch.stack([torch.randint(s, (10000,), generator=g) for s in sizes], dim=1)
    noise = torch.randn(len(f), 3, generator=g)
    # every factor copied into its own latent (plus 3 noise latents): each gap ~ 1
    assert module.mig(torch.cat([f.float(), noise], 1), f, sizes) > 0.97
    # one latent equal to factor 1, the rest noise: gap ~1 for factor 1 and ~0 for the others ->
    # MIG ~ 1/3
    one_copy = torch.cat([noise, f[:, 1:2].float() * 0.3 + 2.0], 1)
    assert abs(module.mig(one_copy, f, sizes) - 1 / 3) < 0.02
    # the same codes, shuffled against the factors: independent -> ~0
    shuffled = torch.cat([f.float(), noise], 1)[torch.randperm(len(f), generator=g)]
    assert 0 <= module.mig(shuffled, f, sizes) < 0.02
    # a factor shared by two latents gives no gap, even though both latents are informative
    shared = torch.cat([f[:, :1].float(), f[:, :1].float() * 2], 1)
    assert abs(module.mig(shared, f[:, :1], sizes[:1])) < 1e-9
    # a constant factor is left out of the mean (its entropy is 0)
    const = torch.cat([torch.zeros(len(f), 1, dtype=torch.long), f[:, :1]], 1)
    assert module.mig(f[:, :1].float(), const, (2, 3)) == pytest.approx(1.0)


def test_recon_quality_known_answers():
    x = torch.zeros(2, 1, 4, 4)
    assert beta_vae.recon_quality(x, x) == (0.0, 0.0)
    assert beta_vae.recon_quality(x, torch.full_like(x, 0.5)) == (0.25, 100.0)  # all grey
    rec = x.clone()
    rec[:, :, :2] = 1.0  # half the pixels white: MSE 0.5, no grey pixel
    assert beta_vae.recon_quality(x, rec) == (0.5, 0.0)


def test_both_scripts_draw_the_same_fixed_sprites():
    ctx = []
    for m in MODULES:
        args = m.parse_args(["--device", "cpu", "--mig-samples", "20", *SMALL[m]])
        ctx.append(m.setup(args)[1])
    assert ctx[0]["x"].shape == (20, 1, 64, 64) and ctx[0]["x"].dtype == torch.int8
    # [0, 1] for the sigmoid decoder, [-1, 1] for the tanh one
    assert torch.equal(ctx[0]["x"] * 2 - 1, ctx[1]["x"])
    assert torch.equal(ctx[0]["factors"], ctx[1]["factors"])


# ------------------------------------------------------------------------------------------------
# Smoke runs
# ------------------------------------------------------------------------------------------------
FIGURES = ("reconstructions.png", "samples.png", "fig14_traversals.png", "fig15_kl_per_latent.png",
           "losses.png")


def check_run(module, folder, sprites, latents, last_step=3):
    for name in ("config.json", "metrics.csv", "checkpoint.pt", *FIGURES):
        assert os.path.exists(os.path.join(folder, name)), name
    assert os.path.exists(os.path.join(folder, "mi_matrix.png")) == sprites
    header = open(os.path.join(folder, "metrics.csv")).readline().strip().split(",")
    kls = [f"kl_z{j}" for j in range(latents)]
    head = ["epoch", "step", "steps_per_s", "seconds", *module.LOSSES, *kls]
    assert header[:len(head)] == head and "mse" in header and "grey_pct" in header
    row = common.read_metrics(os.path.join(folder, "metrics.csv"))[-1]
    assert row["step"] == last_step
    assert all(math.isfinite(v) for v in row.values()), row
    assert ("mig" in row) == ("mig_sampled" in row) == sprites
    assert not sprites or 0 <= row["mig"] <= 1 and 0 <= row["mig_sampled"] <= 1
    ckpt = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=True)
    assert ckpt["script"] == module.SCRIPT and ckpt["step"] == last_step


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dataset", ["mnist", "celeba"])
def test_smoke_mnist_and_image_folder(module, dataset, tiny_mnist, tiny_celeba, tmp_path):
    root = tiny_mnist if dataset == "mnist" else tiny_celeba
    folder = run(module, tmp_path, "--dataset", dataset, "--data-root", root, "--steps", "3",
                 "--batch-size", "8", "--latents", "6", *SMALL[module])
    # one epoch: 3 steps of 8 of the 24 JPEGs, or of 256 digits
    check_run(module, folder, sprites=False, latents=6)


@pytest.mark.parametrize("module", MODULES)
def test_bad_flags_give_one_line_errors(module, tmp_path):
    cases = ((["--latents", "0"], "--latents"),
             (["--mig-samples", "4"], "--mig-samples"),
             (["--lr", "nan"], "--lr"),
             (["--beta", "-1"], "--beta"))
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            module.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
        msg = str(e.value)
        assert msg.startswith("error:") and words in msg and "\n" not in msg
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# vae_infogan.py
# ------------------------------------------------------------------------------------------------
def small_vae_infogan(*flags, seed=0):
    """args, nets and optimizers of a small 64x64 model (4 latents, 2 of them information
    latents)."""
    args = vi.parse_args(["--width", "4", "--latents", "4", "--n-info", "2", "--device", "cpu",
                          *flags])
    torch.manual_seed(seed)
    return (args, *vi.build(args, (1, 64, 64)))


def tiny_unroll(seed=0):
    """float64: G, noise (6, 3) -> 64x64 images; this script's D at width 2 with SiLU in its body
    (smooth, for finite differences); D's Adam after two real steps (moments and a step count to
    start the unroll from)."""
    torch.manual_seed(seed)
    G = nn.Sequential(nn.Linear(3, 4096), nn.Sigmoid(), nn.Unflatten(1, (1, 64, 64))).double()
    D = vi.DCGANDiscriminator(1, 2, 2).double()
    for i, m in enumerate(D.body):
        if isinstance(m, nn.LeakyReLU):
            D.body[i] = nn.SiLU()
    d_params = [*D.body.parameters(), *D.d_head.parameters()]
    opt_d = torch.optim.Adam(d_params, lr=0.05, betas=(0.5, 0.999))
    x, noise = torch.rand(6, 1, 64, 64, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for _ in range(2):
        opt_d.zero_grad()
        vi.d_loss(D(x)[0], D(G(noise).detach())[0]).backward()
        opt_d.step()
    return G, D, opt_d, x, noise


def test_vae_infogan_unrolled_gradient_matches_central_finite_differences():
    G, D, opt_d, x, noise = tiny_unroll()
    params = dict(G.named_parameters())

    def f(p, first_order=False):  # f_K of G's parameters p, K = 3
        fake = functional_call(G, p, (noise,))
        return vi.unrolled_g_loss(D, opt_d, x, fake, 3, 0.05, first_order=first_order)

    exact = torch.autograd.grad(f(params), list(params.values()))
    first = torch.autograd.grad(f(params, True), list(params.values()))
    g, eps = torch.Generator().manual_seed(1), 1e-6
    for _ in range(3):  # directional derivatives along random directions d
        d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
        ahead = {n: p + eps * d[n] for n, p in params.items()}
        behind = {n: p - eps * d[n] for n, p in params.items()}
        fd = (f(ahead) - f(behind)).detach() / (2 * eps)
        along = [float(sum((gr * d[n]).sum() for gr, n in zip(grads, params)))
                 for grads in (exact, first)]
        assert abs(float(fd) - along[0]) < 1e-6 * abs(along[0]), (float(fd), along)
        # the second term of eq. (11) matters here
        assert abs(along[1] - along[0]) > 1e-3 * abs(along[0])


def test_vae_infogan_one_optimizer_per_parameter_and_q_shares_ds_body():
    _, nets, opts = small_vae_infogan()
    owner = {id(p): k for k, o in opts.items() for group in o.param_groups for p in group["params"]}
    # no parameter twice
    assert sum(len(g["params"]) for o in opts.values() for g in o.param_groups) == len(owner)
    assert set(owner) == {id(p) for m in nets.values() for p in m.parameters()}  # and none left out
    D = nets["D"]
    assert {owner[id(p)] for p in [*D.body.parameters(), *D.d_head.parameters()]} == {"d"}
    assert {owner[id(p)] for p in D.q_head.parameters()} == {"dec"}


def test_vae_infogan_after_ds_step_d_its_buffers_and_its_adam_stay_bit_for_bit():
    args, nets, opts = small_vae_infogan("--k", "3")
    x = torch.rand(8, 1, 64, 64)
    vi.train_step(nets, opts, x, args)  # Adam moments and a step count in every optimizer
    after_d_step, d_step = [], opts["d"].step

    def d_state():
        """Copies of D's state (Q's head aside) and of D's optimizer's state."""
        d_only = {k: v for k, v in nets["D"].state_dict().items() if not k.startswith("q_head.")}
        return copy.deepcopy((d_only, opts["d"].state_dict()))

    def step_and_copy():
        d_step()
        after_d_step.append(d_state())

    opts["d"].step = step_and_copy
    q0, dec0 = copy.deepcopy(nets["D"].q_head.state_dict()), copy.deepcopy(nets["dec"].state_dict())
    vi.train_step(nets, opts, x, args)
    assert len(after_d_step) == 1
    assert_same(after_d_step[0], d_state())  # the unroll, L_I and Dis_l ran on copies
    # Q's head did train
    assert not torch.equal(q0["2.weight"], nets["D"].q_head.state_dict()["2.weight"])
    assert not torch.equal(dec0["0.weight"], nets["dec"].state_dict()["0.weight"])


def test_vae_infogan_gan_loss_reaches_the_decoder_only():
    """From the same state and noise, K = 0 and K = 2 change f_K: the decoder ends up different,
    the encoder the same."""
    after = []
    for k in ("0", "2"):
        args, nets, opts = small_vae_infogan("--k", k)
        torch.manual_seed(3)
        x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(4))
        vi.train_step(nets, opts, x, args)
        after.append({name: copy.deepcopy(nets[name].state_dict()) for name in ("enc", "dec")})
    assert_same(after[0]["enc"], after[1]["enc"])
    assert not torch.equal(after[0]["dec"]["0.weight"], after[1]["dec"]["0.weight"])


@pytest.mark.parametrize("cut", [False, True])
def test_vae_infogan_encoder_gets_l_i_only_through_the_decoded_image(cut):
    """β = 0: the encoder's gradient comes through the decoded images alone (reconstruction and
    λ·L_I). With that path cut (the decoder's output detached) nothing may be left: L_I's target
    c = z[:, :n_info] is detached."""
    args, nets, opts = small_vae_infogan("--k", "0", "--beta", "0", "--lambda-info", "1")
    if cut:
        nets["dec"].register_forward_hook(lambda module, inputs, out: out.detach())
    vi.train_step(nets, opts, torch.rand(8, 1, 64, 64), args)
    grads = [p.grad for p in nets["enc"].parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads) == (not cut)


def test_vae_infogan_evaluate_splits_the_kl_with_a_hand_set_encoder():
    args, nets, _ = small_vae_infogan()
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5])
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25), 0.0])
    with torch.no_grad():  # every image encodes to (μ, log σ²)
        nets["enc"][-1].weight.zero_()
        nets["enc"][-1].bias.copy_(torch.cat([mu, logvar]))
    row = vi.evaluate(nets, {"x": torch.rand(5, 1, 64, 64)}, args)
    closed = [0.5 * (m ** 2 + math.exp(lv) - lv - 1) for m, lv in zip(mu.tolist(), logvar.tolist())]
    assert [row[f"kl_z{j}"] for j in range(4)] == pytest.approx(closed, abs=1e-6)
    assert row["kl_info"] == pytest.approx((0.5 + 0.5 * (3 - math.log(4))) / 2, abs=1e-6)
    kl_rest = (0.5 * (4 + 0.25 + math.log(4) - 1) + 0.125) / 2  # z2 and z3, by hand
    assert row["kl_rest"] == pytest.approx(kl_rest, abs=1e-6)


def test_vae_infogan_on_a_folder_of_photos(tiny_celeba, tmp_path):
    folder = run(vi, tmp_path, "--dataset", "celeba", "--data-root", tiny_celeba, "--steps", "2",
                 "--batch-size", "8", "--latents", "6", "--n-info", "2", "--width", "4", "--k", "1")
    row = common.read_metrics(os.path.join(folder, "metrics.csv"))[-1]
    assert row["step"] == 2 and all(math.isfinite(v) for v in row.values())


# ------------------------------------------------------------------------------------------------
# The VAE family's disentanglement metrics, β-TCVAE's total correlation and the equilibrium gate
# ------------------------------------------------------------------------------------------------
SQUARES = (1, 6, 1, 32, 32)  # the squares' factor layout: shape and orientation constant


def squares_factors(n=20000, seed=0):
    """n random factor rows (n, 5) in the squares' layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(s, (n,), generator=g) for s in SQUARES], dim=1)


def unit(f, k):
    """Factor k of rows f as a code in [-1, 1]."""
    return 2 * f[:, k].float() / (SQUARES[k] - 1) - 1


def test_mig_of_an_axis_aligned_code_and_of_the_same_code_rotated_45_degrees():
    f = squares_factors()
    g = torch.Generator().manual_seed(1)
    noise = 0.01 * torch.randn(len(f), 3, generator=g)
    x, y, scale = unit(f, 3), unit(f, 4), unit(f, 1)
    aligned = torch.stack([scale, x, y], 1) + noise
    rotated = torch.stack([scale, (x + y) / 2 ** 0.5, (x - y) / 2 ** 0.5], 1) + noise
    # 20 bins of 32 positions: each factor's gap can reach about log 20 / log 32 = 0.86
    assert beta_vae.mig(aligned, f, SQUARES) > 0.8
    gaps = beta_vae.factor_gaps(beta_vae.mi_matrix(rotated, f, SQUARES))
    assert gaps[3] < 0.1 and gaps[4] < 0.1  # x and y each spread over two latents: no gap
    assert beta_vae.mig(rotated, f, SQUARES) < 0.45
    assert torch.isnan(gaps[0]) and torch.isnan(gaps[2])  # constant factors are left out


def test_a_switched_off_latent_that_wobbles_fools_the_means_but_not_the_sampled_mig():
    f = squares_factors()
    mu = torch.stack([unit(f, 1), unit(f, 3), 0.01 * unit(f, 4)], 1)  # latent 2 wobbles with y
    logvar = torch.stack([torch.full((len(f),), -12.0), torch.full((len(f),), -12.0),
                          torch.zeros(len(f))], 1)  # σ = 1 for latent 2: it is switched off
    row = beta_vae.disentanglement(mu, logvar, f, SQUARES)
    assert row["mig"] > 0.8  # on the means, y is read perfectly from the wobble
    assert row["gap_pos_y"] < 0.05 and row["mig_sampled"] < 0.65  # sampled: y carries nothing
    assert row["gap_scale"] > 0.8 and row["gap_pos_x"] > 0.8
    assert row["active"] == 2
    assert common.carried(row, 1) == f"pos_x {row['mi_z1_pos_x']:.2f}"


def test_total_correlation_known_answers():
    b = 64
    collapsed = torch.zeros(b, 3)
    tc = beta_vae.total_correlation(torch.randn(b, 3), collapsed, collapsed)
    assert abs(float(tc)) < 1e-5  # every posterior the prior: nothing to correlate
    # narrow posteriors on an 8 x 8 grid: latents independent over the batch, TC ≈ 0
    grid = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0))
    small = torch.full((b, 2), -10.0)
    assert abs(float(beta_vae.total_correlation(grid, grid, small))) < 1e-3
    # the same 64 points on the diagonal: z_1 = z_2, TC = log 64 (the batch's resolution)
    diag = torch.arange(64.0)[:, None].expand(b, 2)
    assert float(beta_vae.total_correlation(diag, diag, small)) == pytest.approx(math.log(b), 1e-4)


@pytest.mark.parametrize("module", [vae_gan, vi])
def test_the_equilibrium_gate_pauses_the_side_that_wins(module):
    def gate(real, fake, margin=0.35):
        d_on, g_on = module.equilibrium_gate(torch.tensor(real), torch.tensor(fake), 0.68, margin)
        return float(d_on), float(g_on)

    assert gate(0.7, 0.6) == (1.0, 1.0)  # both BCEs near equilibrium: both learn
    assert gate(0.2, 0.3) == (0.0, 1.0)  # D wins on real and fake images: D pauses
    assert gate(0.1, 0.9) == (1.0, 1.0)  # D calls everything real: it must keep learning
    assert gate(0.7, 0.2) == (1.0, 1.0)
    assert gate(1.2, 0.7) == (1.0, 0.0)  # D loses badly: the decoder's GAN term pauses
    assert gate(0.2, 1.2) == (1.0, 0.0)
    assert gate(0.01, 5.0, margin=math.inf) == (1.0, 1.0)  # no gate


def test_a_paused_discriminator_does_not_move_in_vae_gan():
    args = vae_gan.parse_args(["--device", "cpu", "--latents", "4", "--width", "0.125",
                               "--equilibrium", "50"])  # every BCE far below 50 - 0.35
    torch.manual_seed(0)
    nets, opts = vae_gan.build(args, (1, 64, 64))
    before = copy.deepcopy(nets["dis"].state_dict())
    losses = vae_gan.train_step(nets, opts, torch.rand(8, 1, 64, 64) * 2 - 1, args)
    d_on, g_on = losses[-2:].tolist()
    assert (d_on, g_on) == (0.0, 1.0)
    after = nets["dis"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)


def test_squares_are_one_square_shape_without_rotation():
    data = common.load_data("squares", ".", "cpu")
    assert data.SIZES == SQUARES and len(data) == 5 * 6144 and data.steps_per_epoch(64) == 480
    x, f = data.batch(torch.tensor([0, 6144, 6143]))
    assert torch.equal(x[0], x[1]) and torch.equal(f[0], f[1])  # index 6144 is square 0 again
    assert f[:, 0].eq(0).all() and f[:, 2].eq(0).all()
    assert torch.equal(f[2], torch.tensor([0, 5, 0, 31, 31]))
    ink = x[0, 0].nonzero()
    rows, cols = ink[:, 0], ink[:, 1]
    # an axis-aligned square: its ink fills its bounding box
    assert len(ink) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    sprites = common.load_data("sprites", ".", "cpu")
    assert sprites.SIZES == (3, 6, 40, 32, 32) and len(sprites) == 737280


def test_a_beta_sweep_writes_its_comparison(tmp_path):
    beta_vae.main(["--device", "cpu", "--dataset", "squares", "--beta", "1", "4", "--steps", "2",
                   "--batch-size", "8", "--mig-samples", "200", "--latents", "3",
                   "--out", str(tmp_path)])
    (sweep,) = os.listdir(tmp_path)
    folder = os.path.join(tmp_path, sweep)
    assert sweep.startswith("beta_vae__squares__sweep-beta1-4__s1__")
    runs = sorted(d for d in os.listdir(folder) if d.startswith("beta_vae__"))
    assert len(runs) == 2
    table = open(os.path.join(folder, "comparison.md")).read()
    assert "| VAE (β = 1) | 1 |" in table and "| β-VAE β = 4 | 1 |" in table
    assert "pos_x on" in table and "MIG (sampled z)" in table
    assert os.path.getsize(os.path.join(folder, "fig_vae_sweep.png")) > 0
    configs = [json.load(open(os.path.join(folder, d, "config.json"))) for d in runs]
    assert sorted(c["beta"] for c in configs) == [1.0, 4.0]
