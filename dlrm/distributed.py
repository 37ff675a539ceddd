"""Sharded training: TorchRec's planner and DistributedModelParallel on N CPU processes (gloo).

Rank 0 leads. It is the process that called ``fit_sharded`` (``valuerank train --nproc N``
spawns N - 1 followers on 127.0.0.1) or rank 0 of ``torchrun`` (whose other ranks run
``follow``). The leader broadcasts one job (configs and training rows) and every rank trains
the same global batches in the same order as ``dlrm.train.fit`` for the seed: rank ``r`` takes
the ``r``-th slice of each batch. The MLPs are data parallel (DDP averages their gradients); the
embedding tables are model parallel, sharded table-wise or row-wise by TorchRec's planner.

The tables' optimiser is, by default, fit's own: torch's Adagrad with weight decay on every
row, over the dense gradient of each rank's shards (TorchRec's ``dense`` kernel), so N ranks
train the same model as ``fit``. The alternative, FBGEMM's row-wise Adagrad fused into the
backward (TorchRec's ``fused`` kernel), never materialises a table-sized gradient, but its CPU
kernels ignore weight decay (measured): without it the rare ids memorise their rows and the
default world loses about 0.012 test AUC, so it is opt-in and needs a weight decay of 0.

The result does not depend on the number of ranks, up to float rounding: each rank's loss is
scaled so that averaging over ranks gives the global batch's mean loss, and a short slice is
padded with zero-weight copies of a row the batch already holds (gloo's row-wise collectives
need equal slices; a copy adds no gradient and no extra row to update). After each epoch the
full, unsharded state_dict is gathered to rank 0, which scores validation, keeps the best
epoch, and hands a plain DLRM to the caller, so the exported artifact is the same whatever the
number of shards.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import collective_utils
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from tqdm import tqdm

from dlrm.data import Rows, dense_input, single_hot_kjt
from dlrm.model import ModelConfig, build_dlrm
from dlrm.schema import FeatureSchema
from dlrm.train_config import TrainConfig

log = logging.getLogger(__name__)

Sharding = Literal["table_wise", "row_wise", "auto"]
SHARDINGS: tuple[Sharding, ...] = get_args(Sharding)
EmbeddingOptimizer = Literal["adagrad", "fused_rowwise_adagrad"]
EMBEDDING_OPTIMIZERS: tuple[EmbeddingOptimizer, ...] = get_args(EmbeddingOptimizer)
_SHARDING_TYPES: dict[Sharding, list[str]] = {
    "table_wise": [ShardingType.TABLE_WISE.value],
    "row_wise": [ShardingType.ROW_WISE.value],
    "auto": [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value],
}
EMBEDDINGS_FQN = "sparse_arch.embedding_bag_collection"
"""Where the DLRM keeps its EmbeddingBagCollection: the key of the planned module."""
HOST = "127.0.0.1"
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
"""A rank waits this long in a collective (rank 0 scores validation while the others wait)."""
ADAGRAD_EPS = 1e-10
"""torch.optim.Adagrad's eps (FBGEMM defaults to 1e-8), as in the single-process trainer."""


@dataclass(frozen=True)
class ShardConfig:
    nproc: int = 1
    """Training processes, one rank each (gloo on 127.0.0.1); under torchrun, its world size."""
    sharding: Sharding = "auto"
    """How each embedding table is sharded across the ranks: table_wise (whole tables on one
    rank), row_wise (every table's rows split over all ranks) or auto (TorchRec's planner picks
    one of the two per table)."""
    embedding_optimizer: EmbeddingOptimizer = "adagrad"
    """adagrad: torch's Adagrad on the shards' dense gradients, as the single-process trainer
    (weight decay on every row); fused_rowwise_adagrad: FBGEMM's, inside the backward, with no
    table-sized gradient, but FBGEMM's CPU kernels ignore weight decay (it must be 0)."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"{self.nproc=} must be >= 1")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"{self.sharding=} must be one of {SHARDINGS}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"{self.embedding_optimizer=} must be one of {EMBEDDING_OPTIMIZERS}")


def shard_config(
    nproc: int | None, sharding: str | None, embedding_optimizer: str | None = None
) -> ShardConfig | None:
    """The sharding asked for by the flags or by torchrun; None trains unsharded.

    One process without ``--sharding`` (or ``--embedding-optimizer``) is the plain
    single-process trainer; ``--nproc 1 --sharding X`` runs the sharded trainer on one rank.
    """
    env = torchrun_env()
    if env is not None:
        if nproc is not None and nproc != env[1]:
            raise ValueError(f"--nproc {nproc} differs from torchrun's WORLD_SIZE={env[1]}")
        nproc = env[1]
    nproc = 1 if nproc is None else nproc
    if env is None and nproc == 1 and sharding is None and embedding_optimizer is None:
        return None
    return ShardConfig(nproc, sharding or "auto", embedding_optimizer or "adagrad")  # type: ignore[arg-type]


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (or any launcher setting its variables)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


# -- planning -----------------------------------------------------------------------------


def make_plan(
    schema: FeatureSchema,
    world_size: int,
    sharding: Sharding,
    *,
    model_config: ModelConfig | None = None,
    batch_size: int = 2048,
    embedding_optimizer: EmbeddingOptimizer = "adagrad",
) -> ShardingPlan:
    """TorchRec's plan for the DLRM of ``schema`` on ``world_size`` CPU ranks.

    ``sharding`` constrains the sharding types the planner may choose for every table. The
    planner plans fused kernels; for ``adagrad`` their kernel is then switched to ``dense``
    (same shards and placement), which TorchRec's planner accepts only for data-parallel tables.
    """
    if world_size < 1:
        raise ValueError(f"{world_size=} must be >= 1")
    if sharding not in SHARDINGS:
        raise ValueError(f"{sharding=} must be one of {SHARDINGS}")
    config = model_config or ModelConfig(bottom_mlp=(schema.embedding_dim,), top_mlp=(1, 1))
    with torch.random.fork_rng(devices=[]):  # build_dlrm seeds torch's global RNG
        model = build_dlrm(schema, config, device="meta")
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=world_size),
        kernel_config=KernelConfig(compute_device="cpu"),
    )
    constraints = {
        f.table_name: ParameterConstraints(
            sharding_types=list(_SHARDING_TYPES[sharding]), pooling_factors=[float(f.ids_per_row)]
        )
        for f in schema.sparse
    }
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=max(1, batch_size // world_size),
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )
    plan = planner.plan(model, [_sharder(None)])
    if embedding_optimizer == "adagrad":
        for sharding_of_table in plan.plan[EMBEDDINGS_FQN].values():
            sharding_of_table.compute_kernel = EmbeddingComputeKernel.DENSE.value
    return plan


def plan_tables(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """Per table: its sharding type and the ranks holding its shards."""
    module_plan = plan.plan[EMBEDDINGS_FQN]
    return {
        table: {"sharding": ps.sharding_type, "kernel": ps.compute_kernel, "ranks": list(ps.ranks or [])}
        for table, ps in sorted(module_plan.items())
    }


class _CpuSharder(EmbeddingBagCollectionSharder):
    """TorchRec's sharder, with row-wise shards and dense kernels allowed on CPU.

    TorchRec offers row-wise only for CUDA. Over gloo it works when every rank's local batch
    has the same size (the backward all_gather needs equal tensors), which the trainer ensures.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types if ShardingType.ROW_WISE.value in types else [*types, ShardingType.ROW_WISE.value]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        dense = EmbeddingComputeKernel.DENSE.value
        return kernels if dense in kernels else [*kernels, dense]


def _sharder(config: TrainConfig | None) -> _CpuSharder:
    if config is None:  # planning, or dense kernels: no fused optimiser
        return _CpuSharder()
    return _CpuSharder(
        fused_params={
            "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "learning_rate": config.embedding_lr,
            "eps": ADAGRAD_EPS,
        }
    )


# -- the leader ---------------------------------------------------------------------------


Evaluate = Callable[[torch.nn.Module, FeatureSchema, Rows], dict[str, float]]


@dataclass
class _Job:
    """What every rank needs to train: sent once by rank 0."""

    schema: FeatureSchema
    model_config: ModelConfig
    config: TrainConfig
    shard: ShardConfig
    rows: Rows
    """The rows that are trained on (validation rows stay on rank 0)."""


def fit_sharded(
    schema: FeatureSchema,
    model_config: ModelConfig,
    config: TrainConfig,
    train: Rows,
    shard: ShardConfig,
    *,
    evaluate: Evaluate,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``dlrm.train.fit`` on ``shard.nproc`` ranks; returns the best (unsharded) model and record.

    ``evaluate`` scores validation rows on rank 0 (``dlrm.train.evaluate``, passed in because
    ``dlrm.train`` imports this module). Opens a group for the call unless one is led already.
    """
    if shard.embedding_optimizer == "fused_rowwise_adagrad" and config.embedding_weight_decay > 0:
        raise ValueError(
            f"embedding_weight_decay={config.embedding_weight_decay} would be ignored: FBGEMM's CPU "
            "kernels do not apply weight decay; set it to 0 or use the adagrad embedding optimiser"
        )
    fit_rows, val_rows = (
        train.split(config.validation, config.seed) if config.validation > 0 else (train, None)
    )
    with leading(shard.nproc):
        job = _Job(schema, model_config, config, shard, fit_rows)
        dist.broadcast_object_list([job], src=0)
        result = _train_rank(job, _Rank0(val_rows, evaluate, progress))
    if result is None:  # unreachable: rank 0 always returns the gathered state
        raise RuntimeError("rank 0 returned no state")
    state, record = result
    model = build_dlrm(schema, model_config, seed=config.seed)
    model.load_state_dict(state)
    model.eval()
    return model, record


@contextmanager
def leading(nproc: int) -> Iterator[None]:
    """Be rank 0 of an ``nproc``-rank gloo group for the block.

    Nested inside another ``leading`` block, it reuses that group. Under torchrun it joins
    torchrun's group (the other ranks run ``follow``); otherwise it spawns ``nproc - 1``
    followers. On exit the followers are released (they return) and the group is closed.
    """
    if dist.is_initialized():
        if dist.get_rank() != 0 or dist.get_world_size() != nproc:
            raise ValueError(
                f"a group of {dist.get_world_size()} ranks is open here (rank {dist.get_rank()}); "
                f"cannot lead {nproc}"
            )
        yield
        return
    followers: mp.ProcessContext | None = None
    with _quiet_torch():
        if torchrun_env() is not None:
            _init_from_env(expect_rank=0)
        else:
            store = dist.TCPStore(HOST, 0, nproc, is_master=True, wait_for_workers=False)
            if nproc > 1:
                followers = mp.start_processes(
                    _follower_main,
                    args=(store.port, nproc),
                    nprocs=nproc - 1,
                    join=False,
                    start_method="spawn",
                )
            dist.init_process_group("gloo", store=store, rank=0, world_size=nproc, timeout=COLLECTIVE_TIMEOUT)
        try:
            yield
            dist.broadcast_object_list([None], src=0)  # releases the followers
            dist.barrier()  # closing while a peer still reads the release can abort it
        except BaseException:
            dist.destroy_process_group()
            if followers is not None:
                _stop(followers)
            raise
        dist.destroy_process_group()
        if followers is not None:
            while not followers.join(timeout=COLLECTIVE_TIMEOUT.total_seconds()):
                pass  # raises ProcessRaisedException if a follower failed


def _stop(followers: mp.ProcessContext) -> None:
    """After the leader failed: log why a follower failed, if one did, and end the others."""
    try:
        followers.join(timeout=5.0)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
        log.error("a follower failed too: %s", exc)
    for proc in followers.processes:
        if proc.is_alive():
            proc.terminate()
            proc.join()


# -- the followers ------------------------------------------------------------------------


def follow() -> int:
    """A torchrun rank > 0: train each job that rank 0 broadcasts until it releases us."""
    with _quiet_torch():
        _init_from_env(expect_rank=None)
        try:
            _serve()
        finally:
            dist.destroy_process_group()
    return 0


def _follower_main(index: int, port: int, world_size: int) -> None:
    rank = index + 1
    try:
        with _quiet_torch():
            store = dist.TCPStore(HOST, port, world_size, is_master=False)
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
            )
            try:
                _serve()
            finally:
                dist.destroy_process_group()
    except Exception:
        # Now, not at join: the leader may be waiting in a collective that will never finish.
        log.exception("rank %d of %d failed", rank, world_size)
        raise


def _serve() -> None:
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            dist.barrier()  # the leader's, before anyone closes the group
            return
        _train_rank(box[0], None)


def _init_from_env(expect_rank: int | None) -> None:
    env = torchrun_env()
    if env is None:
        raise ValueError("not started by torchrun: RANK, WORLD_SIZE and MASTER_PORT are unset")
    if expect_rank is not None and env[0] != expect_rank:
        raise ValueError(f"rank {env[0]} cannot lead; rank {expect_rank} does")
    dist.init_process_group("gloo", rank=env[0], world_size=env[1], timeout=COLLECTIVE_TIMEOUT)


@contextmanager
def _quiet_torch() -> Iterator[None]:
    # torch and torchrec deprecate APIs that TorchRec itself calls (ShardedTensor, DDP's
    # broadcast_buffers, reduce_scatter_tensor) and log a line per table for dense kernels:
    # noise on every rank, nothing for us to fix.
    noise = _DropLogs("caching params will be ignored")
    logger = logging.getLogger("torchrec.distributed.utils")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(rec)?\.")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(rec)?\.")
        logger.addFilter(noise)
        try:
            yield
        finally:
            logger.removeFilter(noise)


class _DropLogs(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# -- one rank's training ------------------------------------------------------------------


@dataclass
class _Rank0:
    """What only rank 0 has: validation rows, the scorer, the progress output."""

    val_rows: Rows | None
    evaluate: Evaluate
    progress: bool


def _train_rank(job: _Job, lead: _Rank0 | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Train ``job`` on this rank; rank 0 returns the best full state_dict and the record."""
    before = torch.get_num_threads()
    torch.set_num_threads(job.config.threads)  # process-wide: restored for the caller
    try:
        return _train(job, lead)
    finally:
        torch.set_num_threads(before)


def _train(job: _Job, lead: _Rank0 | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    schema, config = job.schema, job.config
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_dlrm(schema, job.model_config, seed=config.seed)
    if config.embedding_init_std > 0:
        with torch.no_grad():  # the same draws as dlrm.train.fit: torch's RNG was just seeded
            for p in model.sparse_arch.parameters():
                p.normal_(0.0, config.embedding_init_std)
    initial = copy.deepcopy(model.state_dict())
    fused = job.shard.embedding_optimizer == "fused_rowwise_adagrad"
    box = [
        make_plan(
            schema,
            world,
            job.shard.sharding,
            model_config=job.model_config,
            batch_size=config.batch_size,
            embedding_optimizer=job.shard.embedding_optimizer,
        )
        if rank == 0
        else None
    ]
    dist.broadcast_object_list(box, src=0)  # one plan for all ranks: rank 0's
    plan: ShardingPlan = box[0]
    # TorchRec broadcasts a validation flag in the first DMP of a process and caches it in a
    # global; a leader that trained before would skip the broadcast that a fresh follower
    # waits for. Forgetting it on every rank keeps the ranks' collectives in step.
    collective_utils._INITIALIZED = False
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        plan=plan,
        sharders=[_sharder(config if fused else None)],
        device=torch.device("cpu"),
    )
    _load_full_state(dmp, initial)
    tables = {k for k in initial if k.startswith(EMBEDDINGS_FQN + ".")}
    table_params = [p for name, p in dmp.named_parameters() if name in tables]
    mlp_params = [p for name, p in dmp.named_parameters() if name not in tables]
    # As in fit: Adagrad for the tables (unless FBGEMM's runs inside the backward), Adam for the MLPs.
    optimisers: list[torch.optim.Optimizer] = [
        torch.optim.Adam(mlp_params, lr=config.lr, weight_decay=config.weight_decay)
    ]
    if not fused:
        decay = config.embedding_weight_decay
        optimisers.append(torch.optim.Adagrad(table_params, lr=config.embedding_lr, weight_decay=decay))
    rows = job.rows
    rng = np.random.default_rng(config.seed)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = []
    for epoch in range(config.epochs):
        dmp.train()
        order = rng.permutation(len(rows))
        starts = range(0, len(order), config.batch_size)
        bar = tqdm(
            starts,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=lead is None or not lead.progress,
            file=sys.stderr,
            leave=False,
        )
        local_loss = torch.zeros(1, dtype=torch.float64)
        for start in bar:
            batch = order[start : start + config.batch_size]
            idx, weight = _rank_slice(batch, rank, world)
            dense = dense_input(torch.from_numpy(rows.dense[idx]))
            logits = dmp(dense, single_hot_kjt(schema.sparse_names, torch.from_numpy(rows.sparse[idx])))
            losses = torch.nn.functional.binary_cross_entropy_with_logits(
                logits.squeeze(1), torch.from_numpy(rows.labels[idx]), reduction="none"
            )
            weighted = (losses * weight).sum()
            # DDP and TorchRec's all-to-all both average gradients over ranks: scaling each
            # rank's sum by world / |batch| makes that average the batch's mean-loss gradient.
            loss = weighted * (world / len(batch))
            for opt in optimisers:
                opt.zero_grad()
            loss.backward()
            for opt in optimisers:
                opt.step()
            local_loss += weighted.detach().double()
        dist.all_reduce(local_loss)
        state = _gather_full_state(dmp)
        if lead is None:
            continue
        record: dict[str, Any] = {"epoch": epoch + 1, "train_logloss": float(local_loss) / len(order)}
        score = -float(epoch)
        if lead.val_rows is not None:
            shadow = build_dlrm(schema, job.model_config, seed=config.seed)
            shadow.load_state_dict(state)
            val = lead.evaluate(shadow, schema, lead.val_rows)
            record.update(val_auc=val["auc"], val_logloss=val["logloss"])
            score = val["logloss"]
        history.append(record)
        if lead.progress:
            print(f"train: {json.dumps(record)}", file=sys.stderr)
        if best is None or score < best[0]:
            best = (score, epoch + 1, state)
    if lead is None:
        return None
    if best is None:  # unreachable: epochs >= 1 is validated
        raise ValueError("no epoch was trained")
    shards = {
        "world_size": world,
        "sharding": job.shard.sharding,
        "embedding_optimizer": job.shard.embedding_optimizer,
        "tables": plan_tables(plan),
    }
    return best[2], {"best_epoch": best[1], "history": history, "shards": shards}


def _rank_slice(batch: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's rows of a global batch, padded to ceil(|batch| / world) with zero weight."""
    per_rank = math.ceil(len(batch) / world)
    mine = batch[rank * per_rank : (rank + 1) * per_rank]
    pad = per_rank - len(mine)
    # Padding repeats the batch's first row: its ids are updated in this step anyway, so a
    # zero-gradient copy changes no table row (a fresh id would be touched by weight decay).
    idx = np.concatenate([mine, np.repeat(batch[:1], pad)])
    weight = torch.cat([torch.ones(len(mine)), torch.zeros(pad)])
    return idx, weight


def _load_full_state(dmp: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded state_dict into this rank's shards (and its replica of the MLPs)."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    window = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
                    shard.tensor.copy_(full[key][window])
            else:
                value.copy_(full[key])


def _gather_full_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The unsharded state_dict, complete on rank 0 (other ranks get their MLP replica only)."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            # metadata(), not size(): torch ops on a ShardedTensor warn that it is deprecated.
            full = torch.empty(value.metadata().size, dtype=torch.float32) if rank == 0 else None
            value.gather(dst=0, out=full)
            if full is not None:
                out[key] = full
        elif rank == 0:
            out[key] = value.detach().clone()
    return out
