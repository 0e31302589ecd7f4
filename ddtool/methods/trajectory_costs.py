"""What a trajectory-matching run costs on this machine, measured before any expert exists: the
memory of bptt's graph (so that `backend=auto` picks bptt where it fits, else exact) and the
seconds of one outer iteration (for the plan and a budget's sizing).

Both measure a stand-in: a fresh student network (seeded apart from the run's own draws) and
random images of the set's size, on the run's device.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ddtool import distributed
from ddtool.augment import DSA, DSAConfig
from ddtool.matching import InnerStep, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.methods.base import DistillContext
from ddtool.methods.trajectory_config import AUTO_BACKEND, TrajectoryConfig
from ddtool.networks import ParamLayout, create_network
from ddtool.seeding import derive_seed, generator, seeded

TIMED_SEGMENTS = 3  # timings of an outer iteration's stand-in segment, of which the median counts

# (set's shape, generator, DSA or None) -> the inner steps of one segment (TrajectoryMatching._inner_steps)
InnerSteps = Callable[[torch.Size, torch.Generator, DSA | None], list[InnerStep]]


@dataclass(frozen=True)
class BackendChoice:
    name: str  # a key of ddtool.matching.engine.BACKENDS
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def device_memory(device: torch.device) -> int:
    """Bytes of memory installed on `device` (a GPU's own; a CPU's, the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_backend(config: TrajectoryConfig, ctx: DistillContext) -> BackendChoice:
    """The gradient backend a run uses: the configured one, or for "auto" bptt when N steps of
    its graph (one step's saved tensors, measured, times N) fit in a quarter of the device's
    memory, else exact. The same choice on the same machine every time (it reads the memory
    installed, not what is free), so a resumed run continues alike."""
    c = config
    if c.backend != AUTO_BACKEND:
        return BackendChoice(c.backend, "as configured")
    need = c.syn_steps * bptt_step_bytes(c, ctx)
    memory = device_memory(ctx.device)
    if need <= memory / 4:
        return BackendChoice("bptt", f"auto: N={c.syn_steps} steps' graph, about {need / 2**30:.2f} GiB, fits "
                                     f"in a quarter of the {memory / 2**30:.0f} GiB here")
    return BackendChoice("exact", f"auto: bptt's graph of N={c.syn_steps} steps, about {need / 2**30:.1f} GiB, "
                                  f"would pass a quarter of the {memory / 2**30:.0f} GiB here; exact keeps one step's")


def stand_in_network(config: TrajectoryConfig, ctx: DistillContext) -> tuple[torch.nn.Module, ParamLayout]:
    """A fresh student network on the run's device, for measuring before any expert exists."""
    spec = ctx.data.spec
    with seeded(derive_seed(ctx.seed, "timing")):
        net = create_network(config.arch, channels=spec.channels, num_classes=spec.num_classes,
                             image_size=spec.image_size, **config.arch_options()).to(ctx.device)
    return net, ParamLayout.from_module(net)


def bptt_step_bytes(config: TrajectoryConfig, ctx: DistillContext) -> int:
    """Bytes of the tensors one inner step's double-backward graph keeps alive (bptt keeps N of
    them), counted over one stand-in step with autograd's saved-tensor hooks."""
    c, spec, device = config, ctx.data.spec, ctx.device
    net, layout = stand_in_network(c, ctx)
    rng = generator(ctx.seed, "timing")
    count = c.batch_syn or ctx.ipc * spec.num_classes
    images = torch.randn(count, spec.channels, spec.image_size, spec.image_size, generator=rng).to(device)
    images.requires_grad_(True)
    hard = torch.arange(count, device=device) % spec.num_classes
    theta = layout.flatten(net).to(device).requires_grad_(True)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = images
        if dsa is not None:
            x = dsa.apply(x, dsa.sample(count, spec.image_size, spec.image_size, rng).to(device))
        loss = F.cross_entropy(layout.functional_forward(net, theta, x), hard)
        torch.autograd.grad(loss, theta, create_graph=True)
    return sum(storages.values())


def time_outer_iteration(config: TrajectoryConfig, ctx: DistillContext, backend: str, inner_steps: InnerSteps,
                         steps: int = 3) -> float:
    """Seconds an outer iteration should take on this device: `steps` inner steps of a stand-in
    segment (a fresh network's weights for the expert's, random images of the set's size) on
    `backend`, timed after a warm-up and scaled to syn_steps and this process's segments. The
    experts are not needed, so a plan can say it before they are trained.

    The median of TIMED_SEGMENTS timings: a budget sizes the run by it (and chooses its unroll),
    and a single short timing is at the mercy of whatever else runs during it (another process
    ending can make it read several times slower than the run will go)."""
    c, spec, device = config, ctx.data.spec, ctx.device
    net, layout = stand_in_network(c, ctx)
    start = layout.flatten(net).to(device)
    rng = generator(ctx.seed, "timing")
    shape = torch.Size((ctx.ipc * spec.num_classes, spec.channels, spec.image_size, spec.image_size))
    images = torch.randn(shape, generator=rng).to(device).requires_grad_(True)
    hard = torch.arange(spec.num_classes, device=device).repeat_interleave(ctx.ipc)
    dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
    steps = min(steps, c.syn_steps)
    run_backend = get_backend(backend)

    def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layout.functional_forward(net, flat, x)

    def one_segment() -> float:
        began = time.perf_counter()
        unroll = Unroll(forward=forward, start=start, steps=inner_steps(shape, rng, dsa)[:steps],
                        targets=[MatchTarget(step=steps, params=start.detach() + 0.01, normaliser=start.new_tensor(1.0))],
                        augmenter=dsa, momentum=c.ast_inner_momentum)
        lr = torch.tensor(c.lr_init, device=device, requires_grad=True)
        result = run_backend(unroll, SyntheticBatch(images=images, lr=lr, fixed_targets=hard,
                                                    label_temperature=c.soft_label_temperature))
        float(result.loss)  # waits for the device
        return time.perf_counter() - began

    one_segment()  # warm-up: first calls allocate and pick kernels
    segments = len(distributed.indices_of_this_rank(c.segments_per_iteration))
    timed = statistics.median(one_segment() for _ in range(TIMED_SEGMENTS))
    return timed / steps * c.syn_steps * segments
