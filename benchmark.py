"""Speed benchmark: steps/s, images/s and peak memory of each script's training step.

Each case runs the real script in a subprocess for two epochs of N steps (--epoch-steps N
--steps 2N); the warm speed is the steps_per_s of the last row of the run's metrics.csv, which
covers the second epoch's training steps alone, so start-up, data loading, the first steps
(allocator, cuDNN autotune), the evaluation and the figures at each epoch's end are not in the
figure. Peak memory: on the CPU the child's peak resident set (os.wait4's rusage); on a GPU "-" (the
scripts no longer print their CUDA peak; one they print is shown).

    python benchmark.py --device cpu  --data-root /tmp/mnist --steps 20
    python benchmark.py --device cuda --data-root /tmp/mnist --steps 200 --only unrolled_infogan
    python benchmark.py --count-ops      # aten calls per unrolled_infogan.py step, K = 0, 5, 10
    python benchmark.py --time-steps --device cuda   # s per unrolled_infogan.py step, K = 0-10
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, script, batch size, extra flags): each script at its defaults (the papers' widths), and
# the lab scale
CASES = [
    ("infogan", "infogan.py", 64, []),
    ("unrolled_infogan k0", "unrolled_infogan.py", 64, ["--k", "0"]),
    ("unrolled_infogan k5", "unrolled_infogan.py", 64, ["--k", "5"]),
    ("unrolled_infogan k10", "unrolled_infogan.py", 64, ["--k", "10"]),
    ("unrolled_infogan k10 first-order", "unrolled_infogan.py", 64, ["--k", "10", "--first-order"]),
    ("lab infogan", "infogan.py", 64, ["--width", "0.25"]),
    ("lab unrolled_infogan k0", "unrolled_infogan.py", 64, ["--k", "0", "--width", "0.25"]),
    ("lab unrolled_infogan k5", "unrolled_infogan.py", 64, ["--k", "5", "--width", "0.25"]),
    ("lab unrolled_infogan k7", "unrolled_infogan.py", 64, ["--k", "7", "--width", "0.25"]),
    ("lab unrolled_infogan k10", "unrolled_infogan.py", 64, ["--k", "10", "--width", "0.25"]),
    ("lab unrolled_infogan k10 first-order", "unrolled_infogan.py", 64,
     ["--k", "10", "--first-order", "--width", "0.25"]),
    ("unrolled_infogan ring k0", "unrolled_infogan.py", 512, ["--dataset", "ring", "--k", "0"]),
    ("unrolled_infogan ring k10", "unrolled_infogan.py", 512, ["--dataset", "ring", "--k", "10"]),
    ("beta_vae sprites", "beta_vae.py", 64, ["--dataset", "sprites"]),
    ("vae_gan sprites (width 0.125)", "vae_gan.py", 32,
     ["--dataset", "sprites", "--width", "0.125"]),
    ("vae_infogan sprites k3 (width 0.5)", "vae_infogan.py", 32,
     ["--dataset", "sprites", "--k", "3", "--width", "0.5"]),
    ("lab beta_vae squares", "beta_vae.py", 64, ["--dataset", "squares", "--beta", "1"]),
    ("lab vae_gan squares", "vae_gan.py", 64, ["--dataset", "squares"]),
    ("lab vae_infogan squares k0", "vae_infogan.py", 64, ["--dataset", "squares", "--k", "0"]),
    ("lab vae_infogan squares k3", "vae_infogan.py", 64, ["--dataset", "squares", "--k", "3"]),
]


def run_case(script, batch, flags, args, out_dir):
    """(warm steps/s or None, 'peak memory; wall') of one script run, or (None, why it failed).
    The warm speed: the steps_per_s of the second (last) epoch's metrics.csv row."""
    cmd = [sys.executable, os.path.join(HERE, script), *flags,
           "--device", args.device,
           "--data-root", args.data_root,
           "--batch-size", str(batch),
           "--epoch-steps", str(args.steps),
           "--steps", str(2 * args.steps),
           "--log-every", str(args.steps),
           "--out", out_dir,
           "--seed", "1"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=out_dir)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else ""
        return None, f"failed (rc {proc.returncode}): {last}"
    # the script's first line: "run folder <folder> (new run at step 0)"
    folder = re.search(r"^run folder (.+) \((?:new run|resumed) at step \d+\)$", output, re.M)
    if not folder:
        return None, "no 'run folder' line in the output"
    path = os.path.join(out_dir, folder.group(1), "metrics.csv")  # relative to the child's cwd
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        rate = float(rows[-1]["steps_per_s"])
    except (OSError, IndexError, KeyError, ValueError) as e:
        return None, f"no steps_per_s in {path} ({type(e).__name__})"
    gpu = re.search(r"peak GPU memory ([\d.]+) MiB", output)
    if args.device == "cpu":
        mem = f"{usage.ru_maxrss / 1024:.0f} MiB (RSS)"
    elif gpu:
        mem = f"{float(gpu.group(1)):.0f} MiB (GPU)"
    else:
        mem = "-"  # the scripts no longer print their peak GPU memory
    return rate, f"{mem}; {time.time() - t0:.0f} s wall"


def script_args(U, k, first_order, device, width):
    """unrolled_infogan.py's parsed flags for one MNIST case, with K as a number (not a list)."""
    flags = ["--k", str(k), "--device", device, "--width", str(width)]
    if first_order:
        flags.append("--first-order")
    args, _ = U.parse_args(flags)  # (flags, checkpoint): no --resume, so no checkpoint
    args.k = k
    return args


def count_ops(k, first_order, device, width=1.0):
    """What bounds eager speed on a GPU: the aten calls one unrolled_infogan.py MNIST step
    dispatches (nested calls included), counted with torch.profiler on random images of batch 64,
    after two warm-up steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    import unrolled_infogan as U
    args = script_args(U, k, first_order, device, width)
    torch.manual_seed(0)
    nets, opts = U.build(args, (1, 28, 28))  # the script's own MNIST models and optimizers
    x = torch.rand(64, 1, 28, 28, device=device) * 2 - 1
    for _ in range(2):
        U.train_step(nets, opts, x, args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        U.train_step(nets, opts, x, args)
    events = prof.key_averages()
    heavy = ("aten::addmm", "aten::mm", "aten::bmm", "aten::convolution",
             "aten::convolution_backward")
    n_aten = sum(e.count for e in events if e.key.startswith("aten::"))
    n_heavy = sum(e.count for e in events if e.key in heavy)
    return n_aten, n_heavy


def time_steps(k, first_order, device, width=1.0, steps=20):
    """Seconds per unrolled_infogan.py MNIST step (batch 64, random images, default flags), in this
    process, after three warm-up steps (allocator, cuDNN autotune)."""
    import torch
    import unrolled_infogan as U

    def sync():
        """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    args = script_args(U, k, first_order, device, width)
    torch.manual_seed(0)
    nets, opts = U.build(args, (1, 28, 28))
    x = torch.rand(64, 1, 28, 28, device=device) * 2 - 1
    for i in range(3 + steps):
        if i == 3:
            sync()
            start = time.time()
        U.train_step(nets, opts, x, args)
    sync()
    return (time.time() - start) / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu",
                   help="device passed to every script (default: %(default)s)")
    p.add_argument("--data-root", default="./data", help="MNIST root (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20,
                   help="steps per epoch of a case, whose second epoch is measured (with "
                        "--time-steps: steps timed) (default: %(default)s)")
    p.add_argument("--only", default="",
                   help="run only cases whose name contains this text (default: all)")
    p.add_argument("--markdown", default=None,
                   help="also write the table to this file (default: none)")
    p.add_argument("--count-ops", action="store_true",
                   help="instead, count the aten calls of one unrolled_infogan.py MNIST step per K "
                        "(what bounds eager speed on a GPU)")
    p.add_argument("--time-steps", action="store_true",
                   help="instead, time unrolled_infogan.py MNIST steps per K in this process, and "
                        "the time a sequential 15-epoch sweep K = 0, 5, 7, 10 would take")
    p.add_argument("--width", type=float, default=1.0,
                   help="network width for --count-ops and --time-steps (default: %(default)s)")
    args = p.parse_args(argv)
    if args.steps < 1:
        sys.exit(f"error: --steps must be >= 1 (got {args.steps})")
    if args.time_steps:
        print("| unrolled_infogan MNIST step | s/step | steps/s |\n|---|---:|---:|")
        sweep = 0.0
        for k, first_order in ((0, False), (5, False), (7, False), (10, False), (10, True)):
            t = time_steps(k, first_order, args.device, args.width, args.steps)
            if not first_order:
                sweep += t * 15 * 937  # 15 epochs of 937 steps
            name = f"K = {k}, first-order" if first_order else f"K = {k}"
            print(f"| {name} | {t:.4f} | {1 / t:.1f} |", flush=True)
        print(f"a 15-epoch sweep --k 0 5 7 10 (4 x 14,055 steps) would train for "
              f"{sweep / 60:.0f} min")
        return
    if args.count_ops:
        print("| unrolled_infogan MNIST step | aten calls | matmul/conv calls |\n|---|---:|---:|")
        for k, first_order in ((0, False), (5, False), (10, False), (10, True)):
            n, heavy = count_ops(k, first_order, args.device, args.width)
            name = f"K = {k}, first-order" if first_order else f"K = {k}"
            print(f"| {name} | {n} | {heavy} |", flush=True)
        return
    args.data_root = os.path.abspath(args.data_root)
    lines = ["| case | steps/s | images/s | peak memory; wall |", "|---|---:|---:|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as out_dir:
        for name, script, batch, flags in CASES:
            if args.only not in name:
                continue
            rate, info = run_case(script, batch, flags, args, out_dir)
            if rate:
                row = f"| {name} | {rate:.2f} | {rate * batch:.0f} | {info} |"
            else:
                row = f"| {name} | - | - | {info} |"
            lines.append(row)
            print(row, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
