"""The torchrun baseline's own training code, run by a plain Ray Train TorchTrainer: how much of
B1's gap is Ray Train itself rather than the orchestrator (benchmarks/performance.py).

    .venv/bin/python benchmarks/raytrain_baseline.py --workers 2 [--address HOST:PORT] \
        -- --job cnn_digits --epochs 4 --launch-ts "$(date +%s.%N)"

No orchestrator imports, on purpose: this is what a user who already has the hand-written
script would write to run it on Ray — `train()` of benchmarks/torchrun_baseline.py, unchanged,
in each worker of a TorchTrainer (gloo; Ray Train sets the process group up), one CPU and
OMP_NUM_THREADS=1 per worker, no checkpoints, no tracking. Without --address an embedded Ray is
started. Prints the same `BASELINE_RESULT {json}` line as the torchrun baseline (rank 0's).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_loop_per_worker(config: dict) -> None:
    import sys

    sys.path.insert(0, config["benchmarks_dir"])  # workers start elsewhere (a head's cwd)
    import torchrun_baseline

    result = torchrun_baseline.train(torchrun_baseline.parse_args(config["argv"]))
    if result is not None:  # rank 0; the driver runs on this machine and reads the file
        Path(config["result_file"]).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--address", default=None, help="a running Ray cluster; default: embedded")
    p.add_argument("baseline_args", nargs="*", help="after --: torchrun_baseline.py's arguments")
    args = p.parse_args()
    # The benchmark's heads bind to 127.0.0.1 only; a driver must know that before `import ray`
    # to find their raylet (as orchestrator/launch.py does).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="raytrain-baseline-") as storage:
        result_file = Path(storage, "result.json")
        TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "benchmarks_dir": str(HERE),
                "argv": args.baseline_args,
                "result_file": str(result_file),
            },
            scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, name="raytrain-baseline"),
        ).fit()
        print("BASELINE_RESULT " + result_file.read_text(), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
