"""One gloo rank runs TrainingRun (DeepSpeed ZeRO-2 on CPU, real synthetic shards) without Ray, for
tests/test_init_from_launch.py: a 32 px source run, a 64 px run warm-started from its checkpoints dir
(the engine starts from the source's EMA weights, at step 0), then a restart of that run that resumes
from its own step-4 and ignores init_from. Prints the log lines that say so; exits non-zero on a failed
check. Usage: python tests/init_from_rank.py WORK_DIR PORT"""
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class KeepMessages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(work: Path) -> None:
    import data
    from tests.test_trainer_support import tiny_config
    from trainer.loop.run import TrainingRun, WorkerContext, configure_logging

    configure_logging()
    kept = KeepMessages()
    logging.getLogger("dip").addHandler(kept)

    def start(name: str, overrides: list[str]) -> TrainingRun:
        cfg = tiny_config(work, name, ["cluster.num_workers=1", *overrides])
        cfg = cfg.replace(data=data.prepare_dataset(cfg.data, str(work / "data")))
        ctx = WorkerContext(checkpoint_uri=str(work / name / "checkpoints"), run_dir=str(work / name),
                            tracking_uri="", mlflow_run_id="")
        run = TrainingRun(cfg, ctx, 0, 1)
        run.setup()
        return run

    source_dir = work / "low32" / "checkpoints"
    assert start("low32", ["data.resolution=32", "train.max_steps=4"]).run()["step"] == 4
    ema = torch.load(source_dir / "step-4" / "ema.pt", weights_only=True)["state_dict"]
    warm_args = ["data.resolution=64", f"train.init_from={source_dir}"]
    warm = start("warm64", [*warm_args, "train.max_steps=4"])
    loaded = warm.engine.module.denoiser.state_dict()
    assert all(torch.equal(loaded[k].float(), ema[k].float()) for k in ema), "the engine does not hold the source EMA"
    assert warm.progress.step == 0 and warm.init_source is not None
    assert warm.run()["step"] == 4
    again = start("warm64", [*warm_args, "train.max_steps=8"])  # a restart: its own step-4, not the init
    assert again.init_source is None and again.progress.step == 4, again.progress.step
    assert again.run()["step"] == 8
    print("\n".join(m for m in kept.messages if "init_from" in m or "initialised from" in m or "resumed from" in m))


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    main(Path(sys.argv[1]))
    dist.destroy_process_group()
