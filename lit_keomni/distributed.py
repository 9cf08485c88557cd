"""FSDP2 sharding for every stage, written once (torchtitan ``distributed/fsdp.py``; NeMo speechlm2).

A stage's ``configure_model`` builds its network on every rank, then, when Lightning's ``ModelParallelStrategy`` has
set ``self.device_mesh``, shards it with two lines::

    if self.device_mesh is not None:
        apply_fsdp(self.model, self.device_mesh["data_parallel"], blocks=self.model.blocks,
                   param_dtype=fsdp_param_dtype(self.trainer.precision))

- ``fully_shard`` on each block (the unit of all-gather, resharding and activation checkpointing), then on the root,
  whose group keeps what is left (embeddings, norms, heads, stems); buffers are not sharded, they stay replicated
  (the VQ's EMA codebook, which all-reduces its own statistics);
- mixed precision as FSDP2 does it: parameters all-gathered and computed in ``param_dtype`` (bf16), gradients
  reduced in float32, the sharded master weights and the optimiser state stay float32;
- in eval mode (validation, generation) the whole model is gathered once and kept whole until training resumes, so
  loops whose length differs between ranks (greedy decoding, sampling until an end token) issue no collectives and
  cannot deadlock;
- ``full_state_dict`` gathers the whole model on rank 0 (every rank must call it) for the export folder.

``apply_compile`` compiles each block in place with ``torch.compile`` (torchtitan ``apply_compile``): the repeated
blocks share one compiled graph, so compilation costs one block, and embeddings, heads and Python-heavy code around
the blocks (masks, KV-cache bookkeeping, generation loops) stay eager. ``apply_fsdp(compile=True)`` does it in
torchtitan's order: activation-checkpoint wrapping, then compile, then ``fully_shard``. A stage turns it on with its
``compile`` hyper-parameter (recipes: ``model.compile: true``)::

    if self.device_mesh is not None:
        apply_fsdp(..., compile=self.hparams.compile)
    elif self.hparams.compile:
        apply_compile(self.model.blocks)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def fsdp_param_dtype(precision: str | None) -> torch.dtype | None:
    """FSDP's compute dtype for a Lightning ``precision`` setting: bf16 for "bf16-mixed"/"bf16-true", None otherwise
    (parameters computed in their own float32)."""
    return torch.bfloat16 if precision is not None and str(precision).startswith("bf16") else None


def apply_fsdp(
    module: nn.Module,
    mesh: "torch.distributed.device_mesh.DeviceMesh",
    *,
    blocks: Iterable[nn.Module],
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    compile: bool = False,
) -> nn.Module:
    """Shard ``module`` with FSDP2: each of ``blocks`` (submodules of ``module``) its own group, then the root.

    Args:
        module: The network to shard (the stage's ``self.model``); call it, not its submodules, so the root's
            hooks run (its methods may use submodules after a forward, as the root stays gathered until backward).
        mesh: The data-parallel mesh (``self.device_mesh["data_parallel"]``).
        blocks: The repeated layers, each sharded (and optionally checkpointed) as one unit.
        param_dtype: dtype parameters are gathered and computed in; None = keep their own (float32).
        reduce_dtype: dtype of the gradient reduce-scatter.
        activation_checkpointing: Recompute each block's activations in backward instead of keeping them.
        reshard_after_forward: Free each block's gathered parameters after its forward (ZeRO-3); False keeps them
            until backward (ZeRO-2: more memory, fewer all-gathers).
        compile: ``apply_compile`` the blocks (after checkpoint wrapping, before sharding).
    Returns:
        ``module``, sharded in place (its class becomes an ``FSDPModule``).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    blocks = list(blocks)
    if not blocks:
        raise ValueError("apply_fsdp: blocks is empty; pass the repeated layers of the model (e.g. model.blocks)")
    if activation_checkpointing:
        blocks = _checkpoint_blocks(module, blocks)
    if compile:
        apply_compile(blocks)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root keeps FSDP's default (no reshard after forward): backward needs it at once, and the module's methods
    # may use its parameters after a forward (e.g. a CTC head on the encoder output).
    fully_shard(module, mesh=mesh, mp_policy=mp)
    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    module.register_forward_pre_hook(_EvalGather(module, groups, reshard_after_forward), prepend=True)
    return module


def shard_or_compile(stage: Any, module: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """What every stage's ``configure_model`` does with its network ``module`` (``blocks``: its repeated layers).

    Under ``ModelParallelStrategy`` (``stage.device_mesh`` set): FSDP2 with one group per block (``apply_fsdp``) in the
    trainer's precision, with the stage's ``activation_checkpointing`` and ``compile`` hyper-parameters. On a single
    device: ``apply_compile`` the blocks when ``compile`` is set, else nothing.
    """
    h = stage.hparams
    blocks = list(blocks)
    if stage.device_mesh is not None:
        apply_fsdp(module, stage.device_mesh["data_parallel"], blocks=blocks,
                   param_dtype=fsdp_param_dtype(stage.trainer.precision),
                   activation_checkpointing=h.activation_checkpointing, compile=h.compile)
    elif h.compile:
        apply_compile(blocks)


def apply_compile(blocks: Iterable[nn.Module]) -> None:
    """``torch.compile`` each of ``blocks`` in place (``nn.Module.compile``): the module objects, their names and the
    state-dict keys stay the same (no ``_orig_mod.`` prefix), so checkpoints and exports are interchangeable between
    compiled and eager runs. Compilation happens at the first forward of each input signature; sequence lengths that
    vary between batches become dynamic after the first recompilation (torch's automatic dynamic shapes); graph
    breaks (e.g. FSDP's hooks) fall back to eager between graphs.

    Args:
        blocks: The repeated layers (e.g. ``model.blocks``), or their activation-checkpoint wrappers.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("apply_compile: blocks is empty; pass the repeated layers of the model (e.g. model.blocks)")
    for block in blocks:
        block.compile()


def _checkpoint_blocks(module: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Wrap each block in ``checkpoint_wrapper`` where it sits in ``module`` (state-dict keys stay unchanged: the
    wrapper strips its ``_checkpoint_wrapped_module.`` prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    where = {id(m): name for name, m in module.named_modules()}
    wrapped = []
    for block in blocks:
        name = where.get(id(block))
        if not name:
            raise ValueError(f"apply_fsdp: block {type(block).__name__} is not a submodule of {type(module).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        new = checkpoint_wrapper(block)  # keeps the RNG state, so recomputed dropout masks match the forward's
        parent.register_module(child, new)
        wrapped.append(new)
    return wrapped


class _EvalGather:
    """Forward pre-hook of the root: entering eval mode gathers every FSDP group and keeps it gathered (no
    collectives during generation, whose number of forwards differs between ranks); the first training forward
    afterwards restores ``reshard_after_forward`` and reshards. Runs before FSDP's own root pre-forward."""

    def __init__(self, root: nn.Module, groups: list[nn.Module], reshard_after_forward: bool) -> None:
        self.groups = groups
        self.blocks = [m for m in groups if m is not root]
        self.reshard_after_forward = reshard_after_forward
        self.gathered = False

    def __call__(self, root: nn.Module, args: tuple) -> None:
        if root.training:
            if self.gathered:
                for m in self.blocks:
                    m.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
                for m in self.groups:
                    m.reshard()
                self.gathered = False
            return
        if not self.gathered:
            for m in self.blocks:
                m.set_reshard_after_forward(False, recurse=False)
            self.gathered = True
        for m in self.groups:  # a no-op (no collective) for groups still gathered
            m.unshard()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or one of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of ``module`` on CPU. Sharded: a collective that every rank must call; rank 0 gets the
    gathered tensors, the other ranks an empty dict. Not sharded: ``module.state_dict()``."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
