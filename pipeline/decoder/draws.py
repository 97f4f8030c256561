"""Random draws of one decoder stream (flow noise, NSF phases and noise): the official recipe, a seeded
generator, or injected arrays (parity tests)."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

OFFICIAL_SEED = 42  # ConditionalCFM.forward calls torch.manual_seed(42) at every decoder call


class Draws(Protocol):
    """Random numbers of one stream. `begin_block()` is called once per decoder block, before the others."""

    def begin_block(self) -> None: ...

    def flow_noise(self, frames: int) -> torch.Tensor: ...  # (1, 80, frames) N(0, 1), prompt frames included

    def source_phase(
        self, sines: int
    ) -> torch.Tensor: ...  # (1, sines, 1) U(-pi, pi) (row 0 is zeroed later)

    def source_noise(self, sines: int, samples: int) -> torch.Tensor: ...  # (1, sines, samples) N(0, 1)

    def snapshot(self) -> object: ...  # where the draws stand now, for `restore`

    def restore(self, snapshot: object) -> None: ...  # draw again from there (a batch that failed)


class OfficialDraws:
    """The official recipe on private generators: reseeded to 42 at every block; flow noise and source
    noise from the device generator, phases from the CPU one (on CPU both are one generator, as in the
    official code, which reproduces its draws exactly)."""

    def __init__(self, device: torch.device, mel_bins: int = 80, sines: int | None = None):
        self.device, self.mel_bins, self.sines = torch.device(device), mel_bins, sines
        self.cpu = torch.Generator("cpu")
        self.dev = self.cpu if self.device.type == "cpu" else torch.Generator(self.device)
        self._phase: torch.Tensor | None = None

    def begin_block(self) -> None:
        self.cpu.manual_seed(OFFICIAL_SEED)
        self.dev.manual_seed(OFFICIAL_SEED)
        self._phase = None
        if self.device.type != "cpu" and self.sines is not None:
            # The phases are the CPU generator's first draw; copying them now, before the block's GPU
            # work is queued, keeps the host from waiting on the flow mid-block.
            self._phase = self._draw_phase(self.sines).pin_memory().to(self.device, non_blocking=True)

    def flow_noise(self, frames: int) -> torch.Tensor:
        return torch.randn((1, self.mel_bins, frames), generator=self.dev, device=self.device)

    def _draw_phase(self, sines: int) -> torch.Tensor:
        low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
        return low + torch.rand((1, sines, 1), generator=self.cpu) * (high - low)  # Uniform(-pi, pi).sample

    def source_phase(self, sines: int) -> torch.Tensor:
        if self._phase is not None and self._phase.shape[1] == sines:
            return self._phase
        return self._draw_phase(sines).to(self.device)

    def source_noise(self, sines: int, samples: int) -> torch.Tensor:
        return torch.randn((1, sines, samples), generator=self.dev, device=self.device)

    def snapshot(self) -> object:
        return self.cpu.get_state(), self.dev.get_state(), self._phase

    def restore(self, snapshot: object) -> None:
        cpu, dev, self._phase = snapshot  # type: ignore[misc]
        self.cpu.set_state(cpu)
        self.dev.set_state(dev)


class SeededDraws(OfficialDraws):
    """One generator seeded once per stream: fresh noise at every block (no reseeding)."""

    def __init__(self, device: torch.device, seed: int, mel_bins: int = 80):
        super().__init__(device, mel_bins, None)
        self.dev = torch.Generator(self.device).manual_seed(seed)
        self.cpu = self.dev if self.device.type == "cpu" else torch.Generator("cpu").manual_seed(seed)

    def begin_block(self) -> None:
        pass


class QueuedDraws:
    """Injected draws, one dict per block with any of `z`, `phase`, `sine_randn` (arrays of the official
    shapes); missing ones fall back to `fallback` (default: the official recipe)."""

    def __init__(
        self,
        blocks: list[dict[str, np.ndarray]],
        device: str | torch.device = "cpu",
        fallback: Draws | None = None,
    ):
        self.blocks, self.index, self.device = list(blocks), -1, torch.device(device)
        self.fallback = fallback if fallback is not None else OfficialDraws(self.device)

    def begin_block(self) -> None:
        self.index += 1
        if self.index >= len(self.blocks):
            raise ValueError(
                f"QueuedDraws: block {self.index} has no injected draws ({len(self.blocks)} given)"
            )
        self.fallback.begin_block()

    def _take(self, name: str, shape: tuple[int, ...], make: torch.Tensor) -> torch.Tensor:
        value = self.blocks[self.index].get(name)
        if value is None:
            return make
        tensor = torch.as_tensor(np.asarray(value, dtype=np.float32), device=self.device)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"QueuedDraws: block {self.index} {name} has shape {tuple(tensor.shape)}, need {shape}"
            )
        return tensor

    def snapshot(self) -> object:
        return self.index, self.fallback.snapshot()

    def restore(self, snapshot: object) -> None:
        self.index, fallback = snapshot  # type: ignore[misc]
        self.fallback.restore(fallback)

    def flow_noise(self, frames: int) -> torch.Tensor:
        return self._take("z", (1, self.fallback.mel_bins, frames), self.fallback.flow_noise(frames))

    def source_phase(self, sines: int) -> torch.Tensor:
        return self._take("phase", (1, sines, 1), self.fallback.source_phase(sines))

    def source_noise(self, sines: int, samples: int) -> torch.Tensor:
        return self._take("sine_randn", (1, sines, samples), self.fallback.source_noise(sines, samples))
