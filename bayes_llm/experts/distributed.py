"""Data-parallel training of z across CPU processes, through accelerate (torch.distributed, gloo).

Every process draws the same global batch (the draw is seeded by the step) and works on its own
contiguous share of the rows. Each share's loss is scaled so that the processes' losses, and so their
gradients, sum to the one-process loss on the whole batch; one all-reduce per step sums the gradients
of z. Every process then takes the same optimizer step, so N processes train the same z as one
process with the same global batch, up to the order of float sums (sampled RL rollouts are seeded
per process, so those draw other samples than one process would).

With `distributed.shares` S the batch is instead cut into S fixed shares whatever the number of
processes, one process included: each process computes the gradients of its run of them, one share
at a time, and every process adds all S in share order. A share is the same rows, padding and kernels
whichever process computes it, so any number of processes up to S trains the same z, bit for bit
(`benchmarks.ddp` checks the bits: a kernel whose sums followed the thread count would show there),
and sampled rollouts (seeded per share) are the same too. Val splits into the same shares. The price:
one process runs S smaller passes a step (and loss truncation a ranking pass first).

`accelerate launch` (torch.distributed.run underneath) starts the processes; a stage asked for more
than one process relaunches itself through it (`relaunch`), so `dvc.yaml` runs the same command for
any number of processes.
"""

from __future__ import annotations

import ctypes
import functools
import operator
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")
# prctl, looked up before any fork: a preexec_fn must not load libraries.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def world_size() -> int:
    """The number of processes a launcher (torch.distributed.run) started this one among; 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Shards:
    """This process's place among `world` processes (rank 0 is the one that writes files)."""

    rank: int = 0
    world: int = 1
    shares: int | None = None  # distributed.shares: fixed shares of every batch, added in order

    @classmethod
    def from_launcher(cls, shares: int | None = None) -> Shards:
        """The processes `accelerate launch` started (one process when it did not start this one)."""
        if world_size() <= 1:
            return cls(shares=shares)
        from accelerate import PartialState

        die_with_parent()  # torch.distributed.run starts each process in its own session
        state = PartialState(cpu=True, backend="gloo")  # the trainer runs on the CPU
        return cls(state.process_index, state.num_processes, shares)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, end) of this process's contiguous share of n items (the first n % world get one more)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return start, start + size + (self.rank < extra)

    def share(self, items: Sequence[T]) -> list[T]:
        start, end = self.bounds(len(items))
        return list(items[start:end])

    def parts(self) -> list[Shards]:
        """The parts of each global batch this process computes, as places to slice the batch by (their
        `world` is the number of parts the batch is cut into; they do not communicate): its own share,
        or its run of the fixed `shares`."""
        if self.shares is None:
            return [Shards(self.rank, self.world)]
        return [Shards(i, self.shares) for i in range(*self.bounds(self.shares))]

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        from accelerate.utils import reduce

        return float(reduce(torch.tensor([value], dtype=torch.float64), reduction="sum"))

    def gather(self, values: list[T]) -> list[T]:
        """Every process's list, concatenated in rank order (the one-process order of the items)."""
        if self.world == 1:
            return values
        from accelerate.utils import gather_object

        return gather_object(values)

    def backward(self, parts: Iterable[tuple[torch.Tensor, dict[str, float]]],
                 parameters: Sequence[torch.nn.Parameter]) -> dict[str, float]:  # fmt: skip
        """Set the gradients of z to the global batch's, from this process's `parts()`' losses, each
        computed and back-propagated before the next (one part's graph at a time); return the step's
        record, the parts' records added up. Without `shares`: the one part's gradient and record,
        summed over the processes by an all-reduce (in whatever order gloo adds). With `shares`: each
        part's gradient and record on its own, gathered from every process and added in share order."""
        if self.shares is None:
            ((loss, record),) = parts
            loss.backward()
            if self.world > 1:
                from accelerate.utils import reduce

                _set_flat_gradient(parameters, reduce(_flat_gradient(parameters), reduction="sum"))
            return {key: self.sum(value) for key, value in record.items()}
        grads, records = [], []
        for loss, record in parts:
            for p in parameters:
                p.grad = None
            loss.backward()
            grads.append(_flat_gradient(parameters))
            records.append(record)
        mine = torch.stack(grads)
        if self.world > 1:  # padded to the longest run of shares, gathered in rank order
            from accelerate.utils import gather

            most = -(-self.shares // self.world)
            everyone = gather(torch.cat([mine, mine.new_zeros(most - len(mine), mine.shape[1])]))
            runs = [Shards(rank, self.world).bounds(self.shares) for rank in range(self.world)]
            mine = torch.cat([everyone[rank * most : rank * most + end - start]
                              for rank, (start, end) in enumerate(runs)])  # fmt: skip
            records = self.gather(records)
        total = mine[0].clone()
        for grad in mine[1:]:  # one at a time, in share order: the same float sums in any split
            total += grad
        _set_flat_gradient(parameters, total)
        return {key: functools.reduce(operator.add, [record[key] for record in records]) for key in records[0]}


def _flat_gradient(parameters: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])


def _set_flat_gradient(parameters: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    pieces = flat.split([p.numel() for p in parameters])
    for p, piece in zip(parameters, pieces, strict=True):
        p.grad = piece.view_as(p).clone()


def kept_sequences(model, batch: dict[str, torch.Tensor], drop_hardest: float, parts: Sequence[Shards],
                   shards: Shards) -> list[int]:  # fmt: skip
    """Loss truncation's choice over the whole global batch (`objectives.sft_loss`'s), ranked on every
    process's parts' sequence means from a no-gradient pass (the parts are back-propagated one by one)."""
    from bayes_llm.experts.objectives import token_nll

    n = len(batch["input_ids"])
    means = []
    with torch.no_grad():
        for start, end in (part.bounds(n) for part in parts):
            means += _sequence_means(*token_nll(model, {k: v[start:end] for k, v in batch.items()}))
    return _lowest(shards.gather(means), drop_hardest)


def sft_part_loss(model, batch: dict[str, torch.Tensor], part: Shards, keep: list[int] | None) -> torch.Tensor:
    """A part's share of `objectives.sft_loss` on the global batch: its rows' token loss over the global
    count of target tokens (those of the `keep` rows under loss truncation), as `sft_loss` computes it."""
    from bayes_llm.experts.objectives import token_nll

    start, end = part.bounds(len(batch["input_ids"]))
    local = {k: v[start:end] for k, v in batch.items()}
    if keep is None:  # transformers' own loss (its mean over our tokens), as one process takes it
        targets = (batch["labels"][:, 1:] != -100).float()
        return model(**local).loss * (targets[start:end].sum() / targets.sum())
    return _kept_loss(token_nll(model, local)[0], batch, keep, start, end)


def sft_share_loss(model, batch: dict[str, torch.Tensor], drop_hardest: float, shards: Shards) -> torch.Tensor:
    """This process's share of `objectives.sft_loss` when its gradient is all-reduced (no fixed shares):
    one pass, whose sequence means, gathered from every process, rank the batch for loss truncation."""
    from bayes_llm.experts.objectives import token_nll

    if drop_hardest == 0:
        return sft_part_loss(model, batch, shards, None)
    start, end = shards.bounds(len(batch["input_ids"]))
    nll, mask = token_nll(model, {k: v[start:end] for k, v in batch.items()})
    keep = _lowest(shards.gather(_sequence_means(nll.detach(), mask)), drop_hardest)
    return _kept_loss(nll, batch, keep, start, end)


def _sequence_means(nll: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return (nll.sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).tolist()


def _lowest(means: list[float], drop_hardest: float) -> list[int]:
    """The rows loss truncation keeps: all but the `drop_hardest` share with the highest mean loss."""
    return torch.tensor(means).argsort()[: max(1, round(len(means) * (1 - drop_hardest)))].tolist()


def _kept_loss(nll: torch.Tensor, batch: dict[str, torch.Tensor], keep: list[int], start: int,
               end: int) -> torch.Tensor:  # fmt: skip
    """Rows [start, end)'s loss on their kept sequences, over all kept target tokens of the global batch."""
    targets = (batch["labels"][:, 1:] != -100).float()
    return nll[[i - start for i in keep if start <= i < end]].sum() / targets[keep].sum().clamp_min(1.0)


def die_with_parent() -> None:
    """Have Linux kill this process when its parent dies (a killed launcher leaves no process training
    on, and no orphan to finish and clear a checkpoint a rerun would resume from)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched() -> bool:
    """Whether a launcher started this process among others (then it trains, not relaunches)."""
    return world_size() > 1


def threads_per_process(processes: int) -> int:
    """The cores this process may use (its affinity, e.g. a container's limit), split evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def relaunch(processes: int, module_args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run `python -m <module_args>` as `processes` processes under `accelerate launch`; its exit
    status (non-zero when any process failed)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", *module_args]  # fmt: skip
    # One thread per process unless the user says otherwise: the processes share the machine's cores.
    env = {"OMP_NUM_THREADS": str(threads_per_process(processes)), **(env or os.environ)}
    return subprocess.run(command, env=env, preexec_fn=die_with_parent).returncode
