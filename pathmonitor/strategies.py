"""`CPUDeepSpeedStrategy`: Lightning's DeepSpeed strategy on CPU processes (gloo), for debugging ZeRO
configurations without a GPU.

This is the one module of the core package that imports Lightning; `import pathmonitor` does not load
it. Lightning's `DeepSpeedStrategy` refuses every accelerator but CUDA and passes the CUDA device index
to `deepspeed.initialize`; on CPU processes the check is skipped and the local rank is passed instead.
It overrides private methods of pytorch_lightning 2.6 (the version the tests run on).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Iterator

from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read by DeepSpeed on its first accelerator query


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` for `Trainer(accelerator="cpu", devices=N)`; takes the same arguments."""

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(f"CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator, but DeepSpeed chose "
                               f"{get_accelerator().device_name()!r}: set DS_ACCELERATOR=cpu before importing "
                               f"deepspeed")
        DDPStrategy.setup_environment(self)  # the DDP parent's set-up, without DeepSpeed's CUDA-only check

    def setup_distributed(self) -> None:
        # DeepSpeed's version first validates CUDA device indices, which CPU devices do not have
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        with self._local_device_rank():
            return super()._setup_model_and_optimizer(*args, **kwargs)

    def _initialize_deepspeed_inference(self, *args: Any, **kwargs: Any) -> Any:
        with self._local_device_rank():
            return super()._initialize_deepspeed_inference(*args, **kwargs)

    @contextlib.contextmanager
    def _local_device_rank(self) -> Iterator[None]:
        """Lightning passes `device_rank=root_device.index`, None on CPU; DeepSpeed wants the local rank."""
        import deepspeed

        original = deepspeed.initialize

        @functools.wraps(original)
        def initialize(*args: Any, **kwargs: Any) -> Any:
            if getattr(kwargs.get("args"), "device_rank", 0) is None:
                kwargs["args"].device_rank = self.local_rank
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original
