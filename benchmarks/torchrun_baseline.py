"""Hand-written DDP training, launched with torchrun: the baseline the orchestrator is measured
against (benchmarks/performance.py). No orchestrator imports, on purpose: this is what a user
would write by hand for the same model, data, batch size, optimizer and threads.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 \
        benchmarks/torchrun_baseline.py --job cnn_digits --epochs 4 --launch-ts "$(date +%s.%N)"

Models and data are copies of jobs/cnn_digits.py (with its augmentation) and
jobs/transformer_lm.py (stdlib sources, same vocabulary and windows), defaults as in
conf/job/*.yaml. Rank 0 prints one line `BASELINE_RESULT {json}` with: samples/s of every
epoch (all ranks' samples / rank 0's epoch time, as the orchestrator's loop counts them),
seconds from `--launch-ts` (the launcher's start) to the first optimizer step, seconds from
`--launch-ts` to the end of training, and each process' peak RSS (getrusage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

# --- cnn_digits (jobs/cnn_digits.py) --------------------------------------------------------


class RandomAffine(nn.Module):
    def __init__(self, shift_px=1.0, rotate_deg=10.0, scale=0.1, size=8):
        super().__init__()
        self.shift, self.rotate, self.scale = 2 * shift_px / size, math.radians(rotate_deg), scale

    def forward(self, x):
        if not self.training:
            return x
        n = x.shape[0]

        def uniform(a):
            return (torch.rand(n, device=x.device) * 2 - 1) * a

        angle, zoom = uniform(self.rotate), 1 + uniform(self.scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin, uniform(self.shift)], 1),
                torch.stack([sin, cos, uniform(self.shift)], 1),
            ],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def conv_block(c_in, c_out):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def cnn_digits(args):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[:, None]
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )

    def ds(a, b):
        return TensorDataset(torch.as_tensor(a), torch.as_tensor(b))

    c = 32
    model = nn.Sequential(
        RandomAffine(),
        conv_block(1, c),
        conv_block(c, 2 * c),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(2 * c * 4, 128),
        nn.ReLU(),
        nn.Dropout(0.25),
        nn.Linear(128, 10),
    )
    return ds(x_tr, y_tr), ds(x_va, y_va), model, lambda m, x, y: F.cross_entropy(m(x), y)


# --- transformer_lm (jobs/transformer_lm.py) ------------------------------------------------

MODULES = """argparse calendar configparser csv dataclasses difflib fractions functools heapq
inspect typing tarfile zipfile subprocess enum ast pickle pathlib random shutil statistics
string textwrap threading optparse traceback""".split()


class Block(nn.Module):
    def __init__(self, d, heads, p):
        super().__init__()
        self.heads, self.p, self.ln1, self.ln2 = heads, p, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out, self.drop = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        qkv = self.qkv(self.ln1(x)).view(*x.shape[:2], 3, self.heads, -1).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(*qkv, dropout_p=self.p * self.training, is_causal=True)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(x.shape)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    def __init__(self, vocab, block=64, n_layer=3, d=128, heads=4, p=0.1):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        layers = [Block(d, heads, p) for _ in range(n_layer)]
        self.body = nn.Sequential(nn.Dropout(p), *layers, nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for w in (w for w in self.parameters() if w.dim() == 2):
            nn.init.normal_(w, std=0.02)

    def forward(self, x):
        return self.head(self.body(self.tok(x) + self.pos(torch.arange(x.shape[1]).to(x))))


def transformer_lm(args):
    files = [Path(sysconfig.get_paths()["stdlib"], f"{m}.py") for m in MODULES]
    text = "\n".join(f.read_text("utf-8", errors="replace") for f in files)[: args.max_chars]
    cut = int(len(text) * 0.9)
    counts = Counter(text[:cut])
    chars = ["\x00"] + sorted(c for c, n in counts.items() if n >= 3 and c != "\x00")
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index.get(c, 0) for c in text])
    b = args.block_size
    tr, va = ids[:cut].unfold(0, b + 1, b), ids[cut:].unfold(0, b + 1, b)

    def loss(m, x, y):
        return F.cross_entropy(m(x).transpose(1, 2).float(), y, reduction="none").mean()

    return (
        TensorDataset(tr[:, :-1], tr[:, 1:]),
        TensorDataset(va[:, :-1], va[:, 1:]),
        CharTransformer(len(chars), b, args.n_layer, args.d_model, args.n_head),
        loss,
    )


JOBS = {
    "cnn_digits": (cnn_digits, 32, 3e-3, 0.01),
    "transformer_lm": (transformer_lm, 16, 3e-3, 0.1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--job", choices=sorted(JOBS), default="cnn_digits")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-batches", type=int, default=0, help="per epoch and worker; 0 = all")
    p.add_argument("--max-chars", type=int, default=1_500_000, help="transformer_lm only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--launch-ts", type=float, default=None, help="time.time() at launch")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=0, help="per process; 0 = the job's")
    # The GPU figures (benchmarks/gpu.py): a CUDA device (NCCL), bf16 autocast, torch.compile,
    # and transformer_lm's size (defaults: conf/job/transformer_lm.yaml).
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-ddp", action="store_true", help="one process: the model unwrapped")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> dict | None:
    """Train in an initialised process group (gloo on CPUs, NCCL on GPUs); rank 0 returns the
    result (others None)."""
    launch_ts = args.launch_ts or time.time()
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)

    build, batch_size, lr, weight_decay = JOBS[args.job]
    batch_size = args.batch_size or batch_size
    torch.manual_seed(0)
    train, val, model, loss_fn = build(args)
    model = model.to(device)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    pin = device.type == "cuda"  # as a GPU script would: copies overlap the device's work
    loader = DataLoader(train, batch_size=batch_size, sampler=sampler, pin_memory=pin)
    val_shard = Subset(val, range(rank, len(val), world))  # type: ignore[arg-type]
    val_loader = DataLoader(val_shard, batch_size=256, pin_memory=pin)
    n_batches = min(len(loader), args.limit_batches or len(loader))
    if args.no_ddp and world > 1:
        raise SystemExit("--no-ddp is for one process")
    # One process on one GPU, as written by hand (G1): no DDP wrapper, as one orchestrator
    # worker trains. B1 and B3 keep DDP at one process too, as they were measured.
    ddp = model if args.no_ddp else DistributedDataParallel(model)
    step_model = torch.compile(ddp) if args.compile else ddp
    opt = torch.optim.AdamW(ddp.parameters(), lr=lr, weight_decay=weight_decay)
    total = n_batches * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total))))
    )

    first_step_s, epoch_rates, step = None, [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        t0 = time.perf_counter()
        window = torch.zeros(2, dtype=torch.float64, device=device)
        samples = 0
        for i, (x, y) in enumerate(loader):
            if i == n_batches:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = loss_fn(step_model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if first_step_s is None:
                first_step_s = time.time() - launch_ts
            window += torch.stack(
                [loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)]
            )
            samples += len(x)
            if step % args.log_every == 0:  # what a hand-written script logs: a window mean
                dist.all_reduce(window)
                if rank == 0:
                    print(
                        f"epoch {epoch + 1} step {step} loss {(window[0] / window[1]).item():.4f}"
                    )
                window.zero_()
        counted = torch.tensor(float(samples), device=device)
        dist.all_reduce(counted)  # also waits for the epoch's last kernels
        epoch_rates.append(counted.item() / (time.perf_counter() - t0))
        ddp.eval()
        with torch.no_grad():
            for i, (x, y) in enumerate(val_loader):
                if args.limit_batches and i == args.limit_batches:
                    break
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    loss_fn(model, x.to(device), y.to(device))
    end_s = time.time() - launch_ts
    rss = [None] * world
    dist.all_gather_object(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank != 0:
        return None
    return {
        "samples_per_s": epoch_rates,
        "first_step_s": first_step_s,
        "train_end_s": end_s,
        "peak_rss_mb": rss,
        "world_size": world,
        "pid": os.getpid(),
        "backend": str(dist.get_backend()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    result = train(args)
    if result is not None:
        print("BASELINE_RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
