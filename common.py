"""Shared by the five scripts: data loading and image-grid / plot utilities, nothing else.

Models, losses, loops and checkpoints live in each script (CleanRL-style, see README.md). Data
live on the device, batched by index; images are floats in [0, 1], or 2x - 1 when signed (tanh)."""
import contextlib
import csv
import io
import math
import os

import matplotlib
import PIL.Image

matplotlib.use("Agg")
import matplotlib.animation  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

DATASETS = ("mnist", "sprites", "squares", "celeba", "ring", "grid")


def die(message):
    """Stop the program with a one-line error (no traceback) and exit status 1."""
    raise SystemExit(f"error: {message}")


def need(ok, message):
    """die(message) unless ok."""
    if not ok:
        die(message)


# ---- Tensor datasets: the whole dataset on the device, batches by index -------------------------
class Indexed:
    """A dataset batched by indices on the device; the subclass gives `batch(idx)`, `__len__`."""

    def steps_per_epoch(self, batch_size):
        return len(self) // batch_size

    def epoch(self, batch_size, generator):
        """One pass in random order (drawn on the CPU, copied once), no partial last batch."""
        perm = torch.randperm(len(self), generator=generator).to(self.device)
        for i in range(len(self) // batch_size):
            yield self.batch(perm[i * batch_size:(i + 1) * batch_size])


class TensorData(Indexed):
    """uint8 images (N, C, H, W) and optional labels (N,) on the device; batches are floats."""

    def __init__(self, images, labels=None, name="", signed=False):
        self.images = images
        self.labels = labels
        self.name = name
        self.signed = signed
        self.device = images.device

    def __len__(self):
        return self.images.shape[0]

    @property
    def shape(self):  # (C, H, W)
        return tuple(self.images.shape[1:])

    def batch(self, idx):
        """Float images (B, C, H, W) and their labels (or None) for an index tensor."""
        x = self.images[idx].float().div_(255)
        x = x.mul_(2).sub_(1) if self.signed else x
        return x, (None if self.labels is None else self.labels[idx])


def load_mnist(root, device, train=True, signed=False):
    """MNIST through torchvision (download=True); one-line errors when it is missing or corrupt."""
    root = os.path.abspath(os.path.expanduser(root))
    split = "train" if train else "test"
    try:
        try:
            ds = torchvision.datasets.MNIST(root, train=train, download=False)
        except RuntimeError:  # not on disk: try to download it, quietly
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # no network, truncated download, ...
        die(f"MNIST ({split}) not found in {root}/MNIST/raw and the download failed "
            f"({type(e).__name__}). Put train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte in ROOT/MNIST/raw/ and pass "
            f"--data-root ROOT")
    n, h, w = ds.data.shape
    found = f"images {tuple(ds.data.shape)} {ds.data.dtype}, labels {tuple(ds.targets.shape)}"
    need(ds.data.dtype == torch.uint8 and (h, w) == (28, 28) and ds.targets.shape == (n,) and n > 0,
         f"MNIST ({split}) in {root}/MNIST/raw is corrupt: {found}; "
         f"delete that folder and supply the original files")
    need(0 <= int(ds.targets.min()) and int(ds.targets.max()) <= 9,
         f"MNIST ({split}) in {root}/MNIST/raw is corrupt: labels outside 0-9")
    images = ds.data.unsqueeze(1).to(device)  # (N, 1, 28, 28)
    return TensorData(images, ds.targets.long().to(device), "mnist", signed)


def load_image_folder(root, device, size=64, limit=None, signed=False):
    """Images in ROOT/img_align_celeba (CelebA) or in ROOT, centre-cropped (≤ 148 px), to size²."""
    root = os.path.abspath(os.path.expanduser(root))
    files = []
    for folder in (os.path.join(root, "celeba", "img_align_celeba"),
                   os.path.join(root, "img_align_celeba"), root):
        if os.path.isdir(folder) and not files:  # the first of these with images
            files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                     if f.lower().endswith((".jpg", ".jpeg", ".png"))]
    need(files, f"no images (.jpg/.png) found in {root}/img_align_celeba or {root}. "
         f"CelebA's aligned images (img_align_celeba.zip) are on the dataset's page "
         f"(mmlab.ie.cuhk.edu.hk/projects/CelebA.html) or Kaggle; unzip it under ROOT and pass "
         f"--data-root ROOT (any folder of face images works)")
    files = files[:limit]
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            with PIL.Image.open(path) as im:
                img = torchvision.transforms.functional.pil_to_tensor(im.convert("RGB"))
        except Exception as e:
            die(f"cannot decode image {path} ({type(e).__name__}); remove it or replace it")
        crop = min(img.shape[1], img.shape[2], 148)  # img: (3, H, W) uint8
        img = torchvision.transforms.functional.center_crop(img, [crop, crop])
        out[i] = torchvision.transforms.functional.resize(img, [size, size], antialias=True)
    return TensorData(out.to(device), None, "celeba", signed)


# ---- Sprites: a dSprites-like dataset rendered on the fly from its factors ----------------------
class Sprites(Indexed):
    """dSprites' factors (shape 3, scale 6, orientation 40, x 32, y 32) as 64x64 binary images, our
    own rendering; an index is a combination (mixed radix, last fastest): an epoch visits each once.
    ``squares``: the lab's one shape, one orientation (6,144 images), 5 passes an epoch."""

    FACTORS = ("shape", "scale", "orientation", "pos_x", "pos_y")  # shape: square, ellipse, heart
    SIZE = 64

    def __init__(self, device, signed=False, squares=False):
        self.device = torch.device(device)
        self.signed = signed
        self.name = "squares" if squares else "sprites"
        self.SIZES = (1, 6, 1, 32, 32) if squares else (3, 6, 40, 32, 32)
        self.combinations = math.prod(self.SIZES)
        self.repeats = 5 if squares else 1
        self.labels = None
        c = (torch.arange(self.SIZE, dtype=torch.float32, device=self.device) + 0.5) / self.SIZE
        self.py, self.px = torch.meshgrid(c, c, indexing="ij")  # pixel centres in [0, 1], y down

    def __len__(self):
        return self.combinations * self.repeats

    @property
    def shape(self):
        return (1, self.SIZE, self.SIZE)

    def factors(self, idx):
        """Factor indices (B, 5) of combination indices (B,) (taken modulo the combinations)."""
        digits = torch.unravel_index(idx % self.combinations, self.SIZES)  # mixed radix
        return torch.stack(digits, dim=1)

    def render(self, factors):
        """Binary images (B, 1, 64, 64) in {0, 1} for factor indices (B, 5)."""
        f = factors.to(self.device)[:, :, None, None]  # (B, 5, 1, 1), against pixels (64, 64)
        r = 0.16 * (0.5 + 0.1 * f[:, 1].float())  # the radius at scale 0.5, 0.6, ..., 1.0
        theta = 2 * math.pi * f[:, 2].float() / self.SIZES[2]
        cx = 0.2 + 0.6 * f[:, 3].float() / (self.SIZES[3] - 1)  # the shape stays in the frame
        cy = 0.2 + 0.6 * f[:, 4].float() / (self.SIZES[4] - 1)
        dx = self.px - cx
        dy = self.py - cy
        cos = torch.cos(theta)
        sin = torch.sin(theta)
        u = (cos * dx + sin * dy) / r  # the frame rotated by theta
        v = (-sin * dx + cos * dy) / r
        square = torch.maximum(u.abs(), v.abs()) <= 0.8
        ellipse = u ** 2 + (v / 0.5) ** 2 <= 1
        a = 1.1 * u
        b = 0.15 - 1.1 * v
        heart = (a ** 2 + b ** 2 - 1) ** 3 - a ** 2 * b ** 3 <= 0  # point down the image
        s = f[:, 0]
        img = torch.where(s == 0, square, torch.where(s == 1, ellipse, heart)).float().unsqueeze(1)
        return img.mul_(2).sub_(1) if self.signed else img

    def batch(self, idx):
        """Images (B, 1, 64, 64) in {0, 1} (or {-1, 1}) and factor indices (B, 5) of indices."""
        f = self.factors(idx)
        return self.render(f), f

    def eval_set(self, n, seed=0):
        """A fixed evaluation set of n random combinations (the same for every run)."""
        g = torch.Generator().manual_seed(seed)
        return self.batch(torch.randperm(self.combinations, generator=g)[:n].to(self.device))


# ---- Toy 2-D mixtures of the Unrolled GAN paper (report Fig. 3) ---------------------------------
class ToyData:
    """``ring``: 8 Gaussians at angles 2πk/8 on a circle of radius 2; ``grid``: 5x5 Gaussians at
    {-4, -2, 0, 2, 4}²; std 0.02 each, equal weights. An 'epoch' is ``steps`` fresh batches."""

    def __init__(self, name, device, std=0.02, steps=500):
        if name == "ring":
            angles = 2 * math.pi * torch.arange(8, dtype=torch.float32) / 8  # not linspace
            modes = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        elif name == "grid":
            g = torch.arange(-4.0, 5.0, 2.0)
            modes = torch.cartesian_prod(g, g)
        else:
            raise ValueError(name)
        self.name = name
        self.std = std
        self.steps = steps
        self.modes = modes.to(device)
        self.labels = None

    @property
    def shape(self):
        return (2,)

    def sample(self, n, generator):
        """n points (n, 2) and each one's mode index (n,), drawn on the CPU, copied once."""
        k = torch.randint(len(self.modes), (n,), generator=generator).to(self.modes.device)
        noise = torch.randn(n, 2, generator=generator).to(self.modes.device)
        return self.modes[k] + self.std * noise, k

    def steps_per_epoch(self, batch_size):
        return self.steps

    def epoch(self, batch_size, generator):
        """An epoch's batches, all drawn at its start (one copy to the device, none per batch)."""
        points, k = self.sample(self.steps * batch_size, generator)
        yield from zip(points.split(batch_size), k.split(batch_size))


def fixed_images(data, n, seed):
    """Fixed evaluation images as stored and their factors on the CPU: sprites or squares, n of them
    (binary: int8) from a fixed order; other data, 1,000 training images (by seed), no factors."""
    if isinstance(data, Sprites):
        x, factors = data.eval_set(n, seed=0)
        return x.to(torch.int8), factors.cpu()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:1000]
    return data.batch(idx.to(data.device))[0], None


def load_data(name, root, device, train=True, signed=False, image_size=64, limit=None):
    """Any dataset a script accepts (see ``DATASETS``); signed: images in [-1, 1]."""
    if name == "mnist":
        return load_mnist(root, device, train, signed)
    if name in ("sprites", "squares"):
        return Sprites(device, signed, squares=name == "squares")
    if name == "celeba":
        return load_image_folder(root, device, image_size, limit, signed)
    if name in ("ring", "grid"):
        return ToyData(name, device)
    die(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---- Figures ------------------------------------------------------------------------------------
def save_grid(images, path, nrow, row_labels=None, col_labels=None, title=None, xlabel=None):
    """Save images (N, C, H, W) in [0, 1] as a grid of nrow columns, optionally labelled."""
    images = images.detach().float().cpu().clamp(0, 1)
    grid = torchvision.utils.make_grid(images, nrow=nrow, pad_value=1.0)  # RGB, padding 2
    rows = math.ceil(images.shape[0] / nrow)
    h, w = images.shape[2:]
    fig, ax = plt.subplots(figsize=(max(3.0, nrow * 0.55 + 1), max(3.0, rows * 0.55 + 1)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0, vmax=1)
    xs = [2 + j * (w + 2) + w / 2 for j in range(nrow)] if col_labels else []
    ys = [2 + i * (h + 2) + h / 2 for i in range(rows)] if row_labels else []
    ax.set_xticks(xs, col_labels or [], fontsize=7)
    ax.set_yticks(ys, row_labels or [], fontsize=7)
    ax.tick_params(length=0)
    ax.spines[:].set_visible(False)
    ax.set_title(title, fontsize=9)  # None: no title
    ax.set_xlabel(xlabel, fontsize=8)
    _save(fig, path)


def save_traversal(images, path, values, row_labels=None, title=None, xlabel="code value",
                   inputs=None):
    """A traversal grid: images (R, C, ch, H, W), column j at values[j]. With inputs (R, ch, H, W),
    Fig. 14's layout: each row starts with its encoded input; values are offsets from its code."""
    col_labels = [f"{float(v):+.1f}" for v in values]
    if inputs is not None:
        images = torch.cat([inputs[:, None], images], dim=1)  # (R, 1 + C, ch, H, W)
        col_labels = ["input", *col_labels]
        xlabel = "offset from μ_j (first column: the encoded image)"
    r, c = images.shape[:2]
    assert len(col_labels) == c, (len(col_labels), c)
    cells = images.reshape(r * c, *images.shape[2:])  # (R * C, ch, H, W), row by row
    save_grid(cells, path, nrow=c, row_labels=row_labels, col_labels=col_labels, title=title,
              xlabel=xlabel)


def save_traversal_gif(frames, path, values, row_labels, title):
    """An animated traversal, one row per code: frames (V, R, C, ch, H, W) in [0, 1], frame v
    with the codes at values[v], played forth and back (matplotlib's Pillow writer)."""
    _, rows, cols, _, h, _ = frames.shape
    cells = frames.detach().float().cpu().clamp(0, 1).flatten(1, 2)  # (V, R * C, ch, H, W)
    grids = [torchvision.utils.make_grid(f, nrow=cols, pad_value=1.0) for f in cells]
    order = [*range(len(values)), *range(len(values) - 2, 0, -1)]  # forth and back
    fig, ax = plt.subplots(figsize=(max(3.0, cols * 0.6 + 1.5), max(2.0, rows * 0.6 + 0.8)))
    shown = ax.imshow(grids[0].permute(1, 2, 0).numpy(), vmin=0, vmax=1)
    ax.set_yticks([2 + i * (h + 2) + h / 2 for i in range(rows)], row_labels, fontsize=7)
    ax.set_xticks([])

    def draw(i):
        """Show frame order[i]."""
        shown.set_data(grids[order[i]].permute(1, 2, 0).numpy())
        ax.set_title(f"{title}: {float(values[order[i]]):+.1f}", fontsize=8)
        return [shown]

    fig.tight_layout()
    movie = matplotlib.animation.FuncAnimation(fig, draw, frames=len(order))
    movie.save(path, writer=matplotlib.animation.PillowWriter(fps=5))
    plt.close(fig)


def save_scatter_rows(rows, path, modes=None, lim=None, title=None):
    """Fig 3-style scatter plots: rows = {row_label: [(column_title, points (N, 2)), ...]}."""
    n_cols = max(len(panels) for panels in rows.values())
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.1 * len(rows)),
                             squeeze=False)
    for i, (label, panels) in enumerate(rows.items()):
        for j, ax in enumerate(axes[i]):
            ax.set(xticks=[], yticks=[])
            if j >= len(panels):
                ax.axis("off")
                continue
            col_title, pts = panels[j]
            pts = torch.as_tensor(pts).detach().float().cpu()
            if modes is not None:
                m = torch.as_tensor(modes).float().cpu()
                ax.scatter(m[:, 0], m[:, 1], s=12, c="red", marker="x", linewidths=0.8)
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3, c="tab:blue")
            if lim is not None:
                ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
            ax.set_aspect("equal")
            ax.set_title(col_title, fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
    _save(fig, path, title)


def save_scatter_history(folder, label, points, title, modes):
    """Add points (N, 2) under label to folder/ring_samples.pt; draw the last 8 as a row of
    folder/fig03_scatter.png (Fig 3), the mixture's modes marked."""
    path = os.path.join(folder, "ring_samples.pt")
    snapshots = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    snapshots[label] = points.detach().cpu()
    torch.save(snapshots, path)
    figure = os.path.join(folder, "fig03_scatter.png")
    save_scatter_rows({title: list(snapshots.items())[-8:]}, figure, modes=modes.cpu(),
                      lim=1.4 * float(modes.abs().max()))


def append_metrics(path, row):
    """Append one row (a dict) to a metrics CSV, writing the header when the file is new."""
    new = not os.path.exists(path)
    # float cells in 6 significant digits, NaN (no value) as an empty cell
    cells = {k: "" if math.isnan(v) else f"{v:.6g}" for k, v in row.items() if isinstance(v, float)}
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({**row, **cells})


def truncate_metrics(path, step):
    """Drop a metrics CSV's rows after `step` (written by a run stopped before its checkpoint)."""
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        keep = [rows[0]] + [r for r in rows[1:] if float(r[rows[0].index("step")]) <= step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(keep)


def read_metrics(path):
    """Rows of a metrics CSV as dicts of floats (empty cells become nan)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in rows]


def plot_metrics(runs, columns, path, x="epoch", title=None, ylabel=None, logy=False,
                 upto=math.inf):
    """Curves of metrics.csv columns up to step `upto`. runs: a CSV path, {label: csv_path} to
    overlay runs (Fig 12), or {label: [csv_paths]}: the mean over runs with a min-max band."""
    runs = {"": runs} if isinstance(runs, (str, os.PathLike)) else runs
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, csv_paths in runs.items():
        paths = [csv_paths] if isinstance(csv_paths, (str, os.PathLike)) else csv_paths
        tables = [[r for r in read_metrics(p) if r.get("step", 0) <= upto] for p in paths]
        n = min(len(t) for t in tables)
        for col in columns:
            if n and col in tables[0][0]:
                name = (label or col) if len(columns) == 1 else " ".join(filter(None, (label, col)))
                ys = torch.tensor([[t[i][col] for i in range(n)] for t in tables])  # (runs, rows)
                xs = [tables[0][i][x] for i in range(n)]
                line, = ax.plot(xs, ys.mean(0), marker=".", label=name)
                if len(tables) > 1:  # a min-max band
                    ax.fill_between(xs, *ys.aminmax(dim=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or (columns[0] if len(columns) == 1 else "value"))
    ax.set_yscale("log" if logy else "linear")
    ax.set_title(title, fontsize=10)  # None: no title
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def carried(row, j):
    """'factor share': the factor latent j carries most (sampled MI / H) in a VAE row, or ''."""
    shares = {k[len(f"mi_z{j}_"):]: v for k, v in row.items() if k.startswith(f"mi_z{j}_")}
    name = max(shares, key=shares.get, default="")
    return f"{name} {shares[name]:.2f}" if shares else ""


def save_mi_matrix(row, path, title):
    """The sampled latent × factor MI matrix of a metrics row as a heatmap, latents by KL."""
    latents = [int(k[len("kl_z"):]) for k in row if k.startswith("kl_z")]
    order = sorted(latents, key=lambda j: -row[f"kl_z{j}"])
    names = [k[len("mi_z0_"):] for k in row if k.startswith("mi_z0_")]
    matrix = [[row[f"mi_z{j}_{name}"] for name in names] for j in order]
    labels = [f"z{j} (KL {row[f'kl_z{j}']:.2f})" for j in order]
    m = torch.tensor(matrix, dtype=torch.float32)  # (latents, factors), values in [0, 1]
    fig, ax = plt.subplots(figsize=(1.1 * m.shape[1] + 2.2, 0.42 * m.shape[0] + 1.4))
    ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    cells = torch.cartesian_prod(torch.arange(m.shape[0]), torch.arange(m.shape[1])).tolist()
    for (i, j), v in zip(cells, m.flatten().tolist()):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if v > 0.5 else "black")
    ax.set_xticks(range(m.shape[1]), names, fontsize=8)
    ax.set_yticks(range(m.shape[0]), labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def save_vae_figures(folder, row, name, real, rec, samples, moved, latents, values, inputs):
    """A VAE's figures of one epoch, images in [0, 1]: reconstructions.png (real (8, C, H, W)
    over rec), samples.png, Fig. 14 as fig14_traversals.png and traversal.gif (moved (R, V, C, H,
    W): row r moves latent latents[r] over values from image inputs[r]), mi_matrix.png."""
    step = row["step"]
    title = (f"{name} reconstructions (posterior mean), step {step}\n"
             f"pixel MSE {row['mse']:.4f}, grey pixels {row['grey_pct']:.1f}% (evaluation images)")
    save_grid(torch.cat([real, rec]), os.path.join(folder, "reconstructions.png"), nrow=8,
              row_labels=["real", "recon"], title=title)
    save_grid(samples, os.path.join(folder, "samples.png"), nrow=8,
              title=f"{name} prior samples, step {step}")
    labels = [f"z{j} KL {row[f'kl_z{j}']:.2f} {carried(row, j)}" for j in latents]
    title = f"{name}: latents, their KL, the factor each carries, step {step}"
    save_traversal(moved, os.path.join(folder, "fig14_traversals.png"), values, labels, title,
                   inputs=inputs)
    save_traversal_gif(moved.transpose(0, 1)[:, :, None], os.path.join(folder, "traversal.gif"),
                       values, labels, name)  # one row per latent
    if any(key.startswith("mi_z") for key in row):
        title = f"normalised MI of sampled z with each factor, step {step}"
        save_mi_matrix(row, os.path.join(folder, "mi_matrix.png"), title)


def save_panels(panels, path, xlabel, title=None):
    """Side-by-side line plots: panels = {y label: {line label: (xs, means, lows, highs)}}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items()):
        for label, (xs, means, lows, highs) in lines.items():
            line, = ax.plot(xs, means, marker="o", label=label)
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path, title)


def _save(fig, path, suptitle=None):
    """Lay out fig under its suptitle (if any), save it at 110 dpi (making its folder), close it."""
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
