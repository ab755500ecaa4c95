"""One process of the DDP tests, started by `torchrun` from tests/test_ddp.py (not collected by pytest).

    torchrun --nproc_per_node=2 tests/ddp_worker.py train OUT RUN_DIR OVERRIDE...
    torchrun --nproc_per_node=2 tests/ddp_worker.py grads OUT RUN_DIR OVERRIDE...
    torchrun --nproc_per_node=2 tests/ddp_worker.py resume OUT RUN_DIR OVERRIDE...

`train`: a normal distributed run; each rank reports its result, the checkpoints it wrote and its images.
`grads`: every rank gets the same batches and the same random stream (so the same references), and the
gradients of the first optimizer step are saved: DDP's average of identical gradients must equal the
gradients of one process on that batch.
`resume`: 4 steps in one go (RUN_DIR/full), and 2 steps then 2 more resumed (RUN_DIR/part), in one process
group that the script makes itself (train() leaves a group it did not create in place).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import neco.config  # noqa: F401  (schema and resolvers)
import neco.engine.setup as setup_module  # neco.train imports build_loader from here when a run starts
import neco.train as train_module
from neco.engine import dist
from neco.engine import trainer as trainer_module

CONF = Path(__file__).resolve().parents[1] / "conf"


def capture_first_step_grads(store: dict) -> None:
    """Record the gradients the optimizer is about to use at the first step (after DDP's all-reduce)."""
    original = trainer_module.Trainer._optimizer_step

    def capture(self):
        if not store:
            for name, p in self.student.named_parameters():
                if p.grad is not None:
                    store[name] = p.grad.detach().clone()
        return original(self)

    trainer_module.Trainer._optimizer_step = capture


def main() -> None:
    mode, out, run_dir, *overrides = sys.argv[1:]
    out = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    def config(*extra):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=[*overrides, *extra])

    cfg = config()
    report: dict = {"rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1"))}

    if mode == "train":
        saves: list[int] = []
        save = trainer_module.save_checkpoint

        def counting_save(state, folder, step, keep):
            saves.append(step)
            return save(state, folder, step, keep)

        trainer_module.save_checkpoint = counting_save
        samplers = []
        build = setup_module.build_loader

        def keep_sampler(*args, **kwargs):
            dataset, sampler, loader = build(*args, **kwargs)
            samplers.append(sampler)
            return dataset, sampler, loader

        setup_module.build_loader = keep_sampler
        weights: dict = {}
        fit = trainer_module.Trainer.fit

        def fit_and_sum(self):  # the models each rank ends with, as one number per model
            out = fit(self)
            for name in ("student", "teacher"):
                weights[name] = sum(float(p.double().sum()) for p in getattr(self, name).parameters())
            return out

        trainer_module.Trainer.fit = fit_and_sum
        result = train_module.train(cfg, Path(run_dir))
        samplers[0].set_epoch(0)
        report.update(result=result, saves=saves, images=sorted(samplers[0]), weights=weights)
    elif mode == "grads":
        build = setup_module.build_loader
        # Same data on every rank: each process reads the whole dataset as a single process would.
        setup_module.build_loader = lambda data_cfg, paths, seed, **_: build(data_cfg, paths, seed)
        dist.seed_ranks = lambda seed: None  # same random stream on every rank: same crops, same references
        grads: dict = {}
        capture_first_step_grads(grads)
        report["result"] = train_module.train(cfg, Path(run_dir))
        torch.save(grads, out / f"grads_rank{rank}.pt")
    elif mode == "resume":
        torch.distributed.init_process_group("gloo")
        train = train_module.train
        report["full"] = train(config("max_steps=4"), Path(run_dir) / "full")
        report["part"] = train(config("max_steps=2"), Path(run_dir) / "part")
        report["resumed"] = train(config("max_steps=4"), Path(run_dir) / "part")
        torch.distributed.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode}")
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
