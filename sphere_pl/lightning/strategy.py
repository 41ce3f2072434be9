"""`EditingStrategy`: Lightning's single-device strategy without the copy back to the CPU when `fit` ends.

Lightning's teardown moves the whole module to the CPU at the end of every `fit`, for the sake of
training runs whose weights are saved afterwards. An editing run has already written its
checkpoints and patches by then, and the copy is all cost: on LLaMA3-8B in bfloat16, 15 GB of
weights and 7.7 GB of method buffers through host memory (BENCHMARKS.md, "GPU (CUDA) figures").
The CLI uses this strategy for every single-device run; `to_cpu_at_end: true` asks for the copy.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from ..errors import SettingsError
from ..placement import is_dispatched


class EditingStrategy(SingleDeviceStrategy):
    """Args:
    to_cpu_at_end: move the module back to the CPU when `fit` ends, as Lightning does (default: leave it).
    device: the device to run on; None lets the Trainer choose it (its `accelerator` and `devices`).
    """

    strategy_name = "single_device_editing"

    def __init__(self, to_cpu_at_end: bool = False, device: str | torch.device | None = None):
        super().__init__(device=device if device is not None else "cpu")
        self.to_cpu_at_end = to_cpu_at_end
        self._chosen_by_trainer = device is None
        self._devices: list[torch.device] = [] if device is None else [self.root_device]

    # The Trainer hands a strategy with `parallel_devices` the devices it chose from its
    # `accelerator` and `devices` flags: that is how this strategy follows `accelerator: auto`.
    @property
    def parallel_devices(self) -> list[torch.device]:
        return self._devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device]) -> None:
        if len(devices) != 1:
            raise SettingsError(
                f"EditingStrategy runs on one device, the trainer chose {len(devices)}: give --trainer.strategy ddp to "
                "evaluate on several (validate/test)"
            )
        self._devices = list(devices)
        if self._chosen_by_trainer:
            self._root_device = devices[0]

    def model_to_device(self) -> None:
        # a model dispatched by accelerate (model.model.device_map) is where accelerate put it, block by
        # block; moving it would undo the map (and fails on offloaded blocks, which hold no data)
        module = self.lightning_module
        if module is not None and is_dispatched(getattr(module, "model", module)):
            return
        super().model_to_device()

    def teardown(self) -> None:
        if self.to_cpu_at_end:
            return super().teardown()
        module, self._lightning_module = self._lightning_module, None  # Lightning's teardown moves the module it holds
        try:
            super().teardown()
        finally:
            self._lightning_module = module
