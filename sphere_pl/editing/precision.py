"""Which precision the value search multiplies in, chosen by measuring the device, not assumed.

bfloat16 matrix products are fast where the hardware has them (GPUs of compute capability 8+, CPUs
with AVX512_BF16 or AMX) and slow where they are emulated: on an Intel Xeon with AVX-512 but without
AVX512_BF16, SmolLM2's shapes ran at 23 GFLOP/s in bfloat16 against 120 in float32 (issue 31).
So at set-up the value search's product shape (tokens x hidden @ hidden x intermediate) is timed in
both precisions on the device the search runs on, well under a second:

* `compute_dtype: float32` (the default): float32, nothing measured;
* `compute_dtype: bfloat16`: bfloat16 where it measures at least as fast as float32; where it is
  slower, float32, said with the measured rates, unless `force_compute_dtype: true`;
* `compute_dtype: auto`: bfloat16 where it is at least `AUTO_MARGIN` faster, else float32.

A model dispatched over several devices (`device_map`) is measured on each device its upper blocks
compute on: bfloat16 only where every one of them takes it, since the slowest device sets the pace.
A model loaded in half precision runs in its own dtype whatever this says. The choice and the rates
are recorded (the run's summary), and a resumed run keeps the precision its run started with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch

from ..errors import SettingsError

#: bfloat16 must beat float32 by this factor for `auto` to choose it (measurements wobble by a few %)
AUTO_MARGIN = 1.1
TOKENS = 128  # rows of the timed product: the order of a pass of requests' suffix tokens


@dataclass
class PrecisionChoice:
    asked: str
    used: str
    rates: dict[str, float]  # GFLOP/s per dtype, measured on `device` (empty: nothing measured)
    device: str
    reason: str

    def describe(self) -> str:
        return self.used if self.asked == self.used and not self.rates else f"{self.used} ({self.reason})"

    def as_dict(self) -> dict:
        return asdict(self)


def matmul_rates(device: torch.device, rows: int, inner: int, cols: int, min_seconds: float = 0.05) -> dict[str, float]:
    """GFLOP/s of a (rows x inner) @ (inner x cols) product in float32 and in bfloat16 on `device`: a warm-up,
    then products until `min_seconds` have passed and at least one ran (3 where they are fast)."""
    rates = {}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(rows, inner, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(inner, cols, generator=generator).to(device=device, dtype=dtype)
        torch.matmul(a, b)  # warm-up: kernels chosen, caches filled
        _sync(device)
        count, start = 0, time.perf_counter()
        while count < 1 or time.perf_counter() - start < min_seconds or (count < 3 and time.perf_counter() - start < 2 * min_seconds):
            torch.matmul(a, b)
            count += 1
            _sync(device)
        seconds = time.perf_counter() - start
        rates[str(dtype).removeprefix("torch.")] = 2 * rows * inner * cols * count / seconds / 1e9
    return rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose_compute_dtype(asked: str, force: bool, device: torch.device | Sequence[torch.device], hidden: int, intermediate: int,
                         model_dtype: torch.dtype = torch.float32) -> PrecisionChoice:
    """The precision the value search runs in on `device`, or on every one of several devices (see the
    module docstring)."""
    devices = [device] if isinstance(device, torch.device) else list(dict.fromkeys(device))
    return over_devices([_choose_on(asked, force, d, hidden, intermediate, model_dtype) for d in devices])


def over_devices(choices: list[PrecisionChoice]) -> PrecisionChoice:
    """One precision for a search whose blocks compute on several devices: the first device that keeps
    float32 decides for all (bfloat16 there would be slower), else the first device's choice."""
    if len(choices) == 1:
        return choices[0]
    deciding = next((c for c in choices if c.used == "float32"), choices[0])
    others = "; ".join(f"{c.device}: {c.used}" + (f" ({c.rates['bfloat16']:.0f} / {c.rates['float32']:.0f} GFLOP/s)" if c.rates else "")
                       for c in choices if c is not deciding)
    return replace(deciding, reason=f"{deciding.reason}; the other devices of the dispatch: {others}")


def _choose_on(asked: str, force: bool, device: torch.device, hidden: int, intermediate: int, model_dtype: torch.dtype) -> PrecisionChoice:
    where = str(device)
    if model_dtype in (torch.bfloat16, torch.float16):
        used = str(model_dtype).removeprefix("torch.")
        return PrecisionChoice(asked, used, {}, where, f"the model is loaded in {used}")
    if asked == "float32":
        return PrecisionChoice(asked, "float32", {}, where, "as set")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        if force:
            raise SettingsError(f"values.compute_dtype = 'bfloat16' with force_compute_dtype: {torch.cuda.get_device_name(device)} "
                                "has no bfloat16 arithmetic (compute capability below 8.0): use float32")
        return PrecisionChoice(asked, "float32", {}, where, f"{torch.cuda.get_device_name(device)} has no bfloat16 arithmetic")
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"values.compute_dtype = {asked!r} is measured on CPU and CUDA devices, not on {device.type}: use float32")
    return decide(asked, force, matmul_rates(device, TOKENS, hidden, intermediate), where)


def decide(asked: str, force: bool, rates: dict[str, float], where: str) -> PrecisionChoice:
    """The choice for measured `rates` (GFLOP/s of float32 and bfloat16) under the rule of the module docstring."""
    ratio = rates["float32"] / rates["bfloat16"]
    measured = f"measured on {where}: bfloat16 {rates['bfloat16']:.0f} GFLOP/s, float32 {rates['float32']:.0f}"
    if asked == "auto":
        used = "bfloat16" if rates["bfloat16"] >= AUTO_MARGIN * rates["float32"] else "float32"
        return PrecisionChoice(asked, used, rates, where, f"auto, {measured}")
    if ratio <= 1.0:
        return PrecisionChoice(asked, "bfloat16", rates, where, measured)
    if force:
        return PrecisionChoice(asked, "bfloat16", rates, where, f"forced; bfloat16 is {ratio:.1f}x slower, {measured}")
    return PrecisionChoice(asked, "float32", rates, where, f"bfloat16 asked, but it is {ratio:.1f}x slower than float32, {measured}; "
                                                           "values.force_compute_dtype: true runs it anyway")
