"""Launched by torchrun in tests: train ``CONFIG`` into ``OUT``; rank ``RANK`` kills itself
(SIGKILL, no cleanup) after step ``STEP``, as a crashed machine would."""

import os
import signal
import sys

from eigensam.lab.engine.config import load_config
from eigensam.lab.engine.train import Trainer


def main(config: str, out: str, rank: int, step: int) -> None:
    trainer = Trainer(load_config(config, {"out_dir": out}))

    def die(t: Trainer) -> None:
        if t.ranks.rank == rank and t.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.run(on_step=die)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
