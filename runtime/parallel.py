"""Data parallelism across `torchrun` processes, with PyTorch's own engines: FSDP2 (`fully_shard`) or DDP.

    torchrun --nproc-per-node 4 train.py ...     # 4 ranks; NCCL on GPUs, gloo on the CPU

Every rank holds a share of each batch (whole GRPO groups, so group advantages need no communication) and the
losses are normalised by counts reduced over all ranks, so that the gradients, summed over ranks, are those of one
process on the combined batch. The pieces:

- `Dist`: rank, world size, and the few collectives the loops need (sum, max, gather of Python objects). With one
  process every collective is the identity, so the loops have no distributed branches.
- `Sharded`: a causal LM made ready for the ranks. All computation with it goes through `model(fn, *args)`, which
  runs `fn(model, *args)` inside the wrapper's forward: FSDP2 then gathers the sharded weights (the LM head
  included, which the fused kernels take as one full (V, D) tensor) and routes the gradients back to the shards
  through autograd; DDP syncs gradients in backward. `gathered()` keeps the full weights on every rank for a while
  (sampling, evaluation), so that ranks may generate different numbers of tokens without communicating.
- Gradients are summed over ranks, not averaged: `backward(loss)` scales by the world size, because DDP and FSDP
  average, and each rank's loss is already its share of the global loss.
- Checkpoints: `full_state_dict()` gathers the full weights on rank 0 (Hugging Face format, loadable by a single
  process); `optimizer_state` / `load_optimizer_state` do the same for the optimizer, so that a run resumes exactly
  under the same world size.

FSDP2 shards each decoder layer (the classes a Hugging Face model lists in `_no_split_modules`) and the rest
(embeddings, tied head, final norm) as one root group; frozen models (the KL reference, the distillation teacher)
are sharded too. DDP replicates them instead (a frozen model needs no gradient sync).
"""

import inspect
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.hf import head_weight
from runtime.config import ConfigError

try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    except ImportError:
        FSDPModule = fully_shard = None

STRATEGIES = ("auto", "fsdp", "ddp")


@dataclass(frozen=True)
class Dist:
    """This process's place among the ranks; the identity collectives when there is one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        x = x.clone()
        dist.all_reduce(x)
        return x

    def max_int(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled; for small host-side results)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, values: dict[str, float], maxima: tuple[str, ...] = ()) -> dict[str, float]:
        """Per-rank scalars averaged over ranks (the `maxima` keys: the maximum)."""
        if self.world == 1:
            return values
        parts = self.gather(values)
        return {k: max(p[k] for p in parts) if k in maxima else sum(p[k] for p in parts) / self.world for k in values}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, items):
        """This rank's contiguous share of a list (or a tensor's rows) whose length the world size divides."""
        n = len(items) // self.world
        return items[self.rank * n : (self.rank + 1) * n]


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that `torchrun` describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK); a plain
    `python` run is rank 0 of 1. NCCL when this rank uses a GPU (`device` auto or cuda), gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local}, but this node has {torch.cuda.device_count()} GPU(s): start at "
                "most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a script's process with exit status `code`. Under torchrun the interpreter's own teardown is skipped
    (`os._exit`, after flushing stdout and stderr): by then main() has destroyed the process group and closed its
    files, and tearing down the interpreter can still abort a rank that finished cleanly. CI saw it once: rank 1 of a
    2-rank gloo distill.py run died with SIGABRT ("terminate called without an active exception") after its report
    was written, and torchrun then failed the whole job. c10d's worker threads racing interpreter finalisation is a
    known hazard (pytorch/pytorch PR 179291 describes a gloo case)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os._exit(code)
    sys.exit(code)


@contextmanager
def process_group(device: str = "auto"):
    """`init_distributed` for the length of a block (a script's main), then leave the process group."""
    try:
        yield init_distributed(device)
    finally:
        shutdown()


def resolve_strategy(strategy: str, world: int) -> str:
    """The engine in use: none for one process; fsdp (FSDP2) where this torch has it, else ddp, for `auto`."""
    if world == 1:
        return "none"
    if strategy == "fsdp" and fully_shard is None:
        raise ConfigError(f"--parallel fsdp needs FSDP2 (torch >= 2.4); this is torch {torch.__version__}")
    return ("fsdp" if fully_shard is not None else "ddp") if strategy == "auto" else strategy


class _Root(torch.nn.Module):
    """The module the engines wrap: its forward runs `fn(model, ...)`, so any computation gets their hooks."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        out = fn(self.model, *args, **kwargs)
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out._is_view():
            out = out.clone()  # FSDP hooks its backward on the output; an in-place op on a view would lose the hook
        return out


def _noop(model):
    return None


def _ddp_kwargs() -> dict:
    # rotary-embedding buffers are identical on every rank: never broadcast them at each forward
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class Sharded:
    """A causal LM prepared for the ranks (`strategy` none, fsdp or ddp); see the module docstring.

    `module` is the Hugging Face model itself (under FSDP its parameters are DTensor shards): use it for the
    optimizer and for anything that does not compute with the weights."""

    def __init__(
        self, model: torch.nn.Module, dist_: Dist | None = None, strategy: str = "none", *, trainable: bool = True
    ):
        self.module = model
        self.dist = dist_ or Dist()
        self.strategy = strategy if self.dist.world > 1 else "none"
        self.trainable = trainable
        self._gathered = False
        self._root = _Root(model)
        if self.strategy == "fsdp":
            # a model that names no layer classes is sharded as one group: correct, with a larger gathered peak
            layer_types = set(getattr(model, "_no_split_modules", None) or ())
            self._layers = [m for m in model.modules() if type(m).__name__ in layer_types]
            for layer in self._layers:
                fully_shard(layer)
            fully_shard(self._root)
            with torch.no_grad():
                self._root(_noop)  # FSDP's lazy initialisation, on every rank at the same point
            self._root.reshard()  # the root keeps its weights gathered after a forward; the optimizer needs shards
        elif self.strategy == "ddp" and trainable:
            self._root = DistributedDataParallel(self._root, **_ddp_kwargs())
        elif self.strategy not in ("none", "ddp"):
            raise ValueError(f"unknown parallel strategy {strategy!r}")

    def __call__(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs) with the weights the engine provides (and its gradient hooks)."""
        if self.strategy == "none" or (self.strategy == "ddp" and not (self.trainable and torch.is_grad_enabled())):
            return fn(self.module, *args, **kwargs)  # full weights here; nothing to sync
        return self._root(fn, *args, **kwargs)

    def _fsdp_modules(self) -> list:
        return [self._root, *self._layers]

    @contextmanager
    def gathered(self):
        """Full weights on every rank inside the block, so that calls there need no communication (ranks may make
        different numbers of them: sampling, evaluation). Under FSDP entering is collective (one all-gather per
        group); leaving frees the gathered copies."""
        if self.strategy != "fsdp" or self._gathered:
            yield
            return
        for layer in self._layers:
            layer.set_reshard_after_forward(False, recurse=False)
        for m in self._fsdp_modules():
            m.unshard()
        self._gathered = True
        try:
            yield
        finally:
            self._gathered = False
            for m in self._fsdp_modules():
                m.reshard()
            for layer in self._layers:
                layer.set_reshard_after_forward(True, recurse=False)

    @contextmanager
    def full_head(self):
        """The LM-head weight (V, D) in full inside the block, for a computation outside this model's own forward
        (the teacher's head in a student's distillation loss). Under FSDP the root group (embeddings, head, final
        norm) is gathered while the layers stay sharded; entering is collective."""
        if self.strategy != "fsdp" or self._gathered:
            yield head_weight(self.module)
            return
        self._root.unshard()
        try:
            yield head_weight(self.module)
        finally:
            self._root.reshard()

    def sync_grads(self, sync: bool):
        """Context for one micro-batch's backward: `sync=False` accumulates locally, for all but the last one."""
        if sync or self.strategy == "none":
            return nullcontext()
        if self.strategy == "ddp":
            return self._root.no_sync()
        return _fsdp_no_sync(self._root)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the global loss; gradients end up summed over ranks."""
        (loss * self.dist.world if self.strategy != "none" else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def train(self, mode: bool = True) -> "Sharded":
        self.module.train(mode)
        return self

    def eval(self) -> "Sharded":
        return self.train(False)

    # checkpoints -----------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict | None:
        """Under FSDP, the full weights gathered on rank 0's CPU (None on the other ranks; collective). Otherwise
        None: `module` itself holds the full weights."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.dist.main else None

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict | None:
        """The optimizer's full state on rank 0 (None elsewhere); collective under FSDP."""
        if self.strategy != "fsdp":
            return opt.state_dict() if self.dist.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(self.module, opt, options=options)
        return sd if self.dist.main else None

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict) -> None:
        """Load what `optimizer_state` saved (every rank passes the same full state; each keeps its shard)."""
        if self.strategy != "fsdp":
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            self.module, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )


@contextmanager
def _fsdp_no_sync(root):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def as_sharded(model) -> Sharded:
    """A Sharded model as it is, or a plain model wrapped for one process."""
    return model if isinstance(model, Sharded) else Sharded(model)
