"""Issue #7's GPU figures G1 and G2 in one command, on a machine with a CUDA GPU.

    .venv/bin/python benchmarks/gpu.py            # → benchmarks/results/gpu.{md,json}
    .venv/bin/python benchmarks/gpu.py --tiny     # CPU smoke run: every path; figures mean nothing

G1: `transformer_lm` at a GPT-2-small-like size (12 layers, 12 heads, d_model 768, blocks of
1024 characters), bf16 autocast and torch.compile, on one GPU. Tokens/s of the orchestrator's
training loop (orchestrator/loop.py, run in one process as `python -m orchestrator.loop` runs
it: one Ray Train worker runs the same loop, and Ray adds no work per step) against
torchrun_baseline.py's hand-written loop for the same model, data and batch, the two sides
alternated (`--repeats` pairs); steady state is the median epoch after the first (which pays for
compiling). Model FLOPs utilisation: tokens/s × FLOPs per token / the card's dense bf16 peak,
FLOPs per token = 6·N + 12·L·T·d (N the parameters but the position table, L layers, T the
block, d the width: PaLM's count, attention included).

G2: the NCCL path on one GPU: torchrun_baseline.py's process group (its backend, printed), and,
where Ray and MLflow are installed, one `orchestrate` run with `trainer.use_gpu=true`, whose
MLflow tags `workers.backend` and `workers.device` say what Ray Train set up.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "torchrun_baseline.py"
# The orchestrator from this checkout, installed or not (a GPU machine may only have torch).
sys.path.insert(0, str(ROOT))

from performance import baseline_result, steady  # noqa: E402  (this folder: run as a script)

# Dense bf16 peak (no sparsity) by the card's name, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,  # SXM (torch names it "NVIDIA H100 80GB HBM3")
    "H200": 989.4e12,
    "A100": 312e12,
}

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "d_model": 768, "block_size": 1024, "batch_size": 16}
TINY = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 32, "batch_size": 8}


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():  # the more specific names come first
        if key in device_name:
            return flops
    return None


def flops_per_token(params: int, n_layer: int, block: int, d_model: int) -> float:
    return 6 * params + 12 * n_layer * block * d_model


def model_params(size: dict, max_chars: int) -> int:
    """Parameters of the job's model at this size, but the position table (PaLM's N)."""
    from orchestrator.cli import compose_config
    from orchestrator.job import job_config, load_job

    cfg = compose_config(["job=transformer_lm", *_job_overrides(size, max_chars)])
    job = load_job("transformer_lm")
    jcfg = job_config(job, cfg["job"])
    model = job.build_model(jcfg, job.build_data(jcfg))
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pos."))


def _job_overrides(size: dict, max_chars: int) -> list[str]:
    return [
        f"job.n_layer={size['n_layer']}",
        f"job.n_head={size['n_head']}",
        f"job.d_model={size['d_model']}",
        f"job.block_size={size['block_size']}",
        f"job.max_chars={max_chars}",
    ]


def ours(size: dict, args: argparse.Namespace, gpu: bool) -> dict:
    """The orchestrator's loop in a process of its own; samples/s of every epoch."""
    overrides = [
        "job=transformer_lm",
        *_job_overrides(size, args.max_chars),
        f"trainer.batch_size={size['batch_size']}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_batches={args.limit_batches}",
        f"trainer.use_gpu={str(gpu).lower()}",
        f"trainer.precision={'bf16' if args.bf16 else 'fp32'}",
        f"trainer.compile={str(args.compile).lower()}",
        "trainer.threads_per_worker=1",
    ]
    out = _run([sys.executable, "-m", "orchestrator.loop", *overrides], cwd=ROOT)
    # What it prints: one dict of metrics per epoch, then the outcome.
    epochs = [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{")]
    return {"samples_per_s": [e["train/samples_per_s"] for e in epochs]}


def theirs(size: dict, args: argparse.Namespace, gpu: bool) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        str(BASELINE),
        "--job", "transformer_lm", "--epochs", str(args.epochs),
        "--limit-batches", str(args.limit_batches), "--max-chars", str(args.max_chars),
        "--device", "cuda" if gpu else "cpu", "--batch-size", str(size["batch_size"]),
        "--block-size", str(size["block_size"]), "--n-layer", str(size["n_layer"]),
        "--n-head", str(size["n_head"]), "--d-model", str(size["d_model"]),
        *(["--bf16"] if args.bf16 else []), *(["--compile"] if args.compile else []),
        "--no-ddp",  # one process trains the model itself, as one orchestrator worker does
    ]  # fmt: skip
    return baseline_result(_run(cmd, cwd=ROOT))


def orchestrated_run(workdir: Path, gpu: bool) -> dict:
    """G2 through Ray Train: a short 1-worker job (on the GPU); what its run's tags say."""
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        return {"measured": False, "why": f"not installed here: {exc.name}"}
    overrides = ["job=cnn_digits", f"trainer.use_gpu={str(gpu).lower()}", "trainer.num_workers=1",
                 "trainer.max_epochs=1", "tracking.log_model=false"]  # fmt: skip
    # `python -m`: a machine given this checkout without installing it has no console script.
    out = _run([sys.executable, "-m", "orchestrator.cli", *overrides], cwd=workdir)
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out).group(1)  # type: ignore[union-attr]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").get_run(run_id)
    tags = run.data.tags
    return {"measured": True, "status": run.info.status,
            "backend": tags.get("workers.backend"), "device": tags.get("workers.device")}  # fmt: skip


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return out


def table(result: dict) -> str:
    g1, g2 = result["G1"], result["G2"]
    rows = [
        "| id | figure | value | target |",
        "|---|---|---|---|",
        f"| G1 | tokens/s, orchestrator's loop / hand-written (median of {len(g1['ratios'])} "
        f"pairs, min–max) | {g1['ratio']:.3f} ({min(g1['ratios']):.3f}–{max(g1['ratios']):.3f}) "
        "| ≥ 0.99 |",
        f"| G1 | tokens/s, ours / hand-written | {g1['ours_tokens_per_s']:.0f} / "
        f"{g1['theirs_tokens_per_s']:.0f} | |",
        f"| G1 | model FLOPs utilisation, ours / hand-written | {_pct(g1['ours_mfu'])} / "
        f"{_pct(g1['theirs_mfu'])} | ≥ 40 % |",
        f"| G2 | hand-written DDP on one GPU: process-group backend | {g2['baseline_backend']} "
        "| nccl |",
    ]
    run = g2["orchestrated"]
    if run["measured"]:
        rows.append(f"| G2 | `orchestrate` 1-worker run: status, workers.backend, workers.device | "
                    f"{run['status']}, {run['backend']}, {run['device']} | FINISHED, nccl |")  # fmt: skip
    else:
        rows.append(f"| G2 | `orchestrate` 1-worker run | not measured: {run['why']} | |")
    return (
        f"Device: {result['device']}; torch {result['torch']}; model: {result['model']}; "
        f"{result['when']}\n\n" + "\n".join(rows) + "\n"
    )


def _pct(x: float | None) -> str:
    return "n/a (no bf16 peak for this device)" if x is None else f"{100 * x:.1f} %"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run; its figures mean nothing")
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs for G1")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--limit-batches", type=int, default=0, help="0 = every batch")
    p.add_argument("--max-chars", type=int, default=1_500_000)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or --tiny for the smoke run")
    size = TINY if args.tiny else GPT2_SMALL
    if args.tiny:
        args.epochs, args.limit_batches, args.max_chars, args.repeats = 2, 3, 20_000, 1
    args.bf16, args.compile = True, not args.tiny  # compiling on a CPU: minutes, no figure
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    per_token = flops_per_token(
        model_params(size, args.max_chars), size["n_layer"], size["block_size"], size["d_model"]
    )
    pairs = []
    for i in range(args.repeats):
        order = ("theirs", "ours") if i % 2 else ("ours", "theirs")
        pair = {}
        for side in order:
            pair[side] = (ours if side == "ours" else theirs)(size, args, gpu)
            print(f"  G1 {side}: samples/s per epoch {pair[side]['samples_per_s']}", flush=True)
        pairs.append(pair)
    baseline_backend = pairs[0]["theirs"].get("backend")
    tokens = size["block_size"]  # per sample
    ours_tps = [steady(p["ours"]["samples_per_s"]) * tokens for p in pairs]
    theirs_tps = [steady(p["theirs"]["samples_per_s"]) * tokens for p in pairs]
    peak = peak_flops(device)
    ratios = [a / b for a, b in zip(ours_tps, theirs_tps, strict=True)]
    with tempfile.TemporaryDirectory(prefix="gpu-g2-") as tmp:
        orchestrated = orchestrated_run(Path(tmp), gpu)
    result = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "torch": torch.__version__,
        "model": {**size, "flops_per_token": per_token},
        "G1": {
            "pairs": pairs,
            "ratios": ratios,
            "ratio": statistics.median(ratios),
            "ours_tokens_per_s": statistics.median(ours_tps),
            "theirs_tokens_per_s": statistics.median(theirs_tps),
            "ours_mfu": statistics.median(ours_tps) * per_token / peak if peak else None,
            "theirs_mfu": statistics.median(theirs_tps) * per_token / peak if peak else None,
        },
        "G2": {"baseline_backend": baseline_backend, "orchestrated": orchestrated},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
