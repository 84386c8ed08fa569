"""The mask set: one bool mask (True = kept) per parameter name, shared by every method on a module.

The set is attached to the module it was made for; each masked ``nn.Parameter`` also points back at it, so
:func:`masks_of` answers for that module and for any of its submodules, under the names their own
``named_parameters()`` use. The references are plain ones (no weakrefs), so a module with masks can be pickled,
deep-copied (an EMA copy gets its own mask set) and sent to spawned processes. Parameters are looked up by name at
every use, never cached, so wrappers that replace parameter objects (or move them between devices) see the current
ones. A mask is moved to its parameter's device the first time it is applied there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

_SET_ATTR = "_sparse_lightning_mask_set"
_REF_ATTR = "_sparse_lightning_mask_ref"


class MaskSet:
    """Bool masks by parameter name (relative to the module the set is attached to)."""

    def __init__(self) -> None:
        self._masks: dict[str, Tensor] = {}
        self.version = 0
        """Counts mask updates and installed non-trivial masks (loggers log per-layer details once per change)."""

    @staticmethod
    def of(module: nn.Module) -> MaskSet:
        """The set attached to ``module``, attaching an empty one the first time."""
        mask_set = module.__dict__.get(_SET_ATTR)
        if mask_set is None:
            mask_set = MaskSet()
            object.__setattr__(module, _SET_ATTR, mask_set)
        return mask_set

    def __contains__(self, name: str) -> bool:
        return name in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def names(self) -> list[str]:
        return list(self._masks)

    def add(self, name: str, param: Tensor, mask: Tensor | None = None) -> Tensor:
        """Install a mask for ``name`` (all kept when ``mask`` is None); an existing mask is kept as it is."""
        if name not in self._masks:
            if mask is None:
                mask = torch.ones_like(param, dtype=torch.bool)
            else:
                self.version += 1
            self._check(name, param, mask)
            self._masks[name] = mask.to(device=param.device, dtype=torch.bool).clone()
        param.__dict__[_REF_ATTR] = (self, name)
        return self._masks[name]

    def update(self, name: str, mask: Tensor) -> Tensor:
        """Replace the mask of ``name`` in place; returns the entries that this update prunes (bool)."""
        current = self._masks[name]
        mask = mask.to(device=current.device, dtype=torch.bool)
        if mask.shape != current.shape:
            raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, expected {tuple(current.shape)}.")
        newly_pruned = current & ~mask
        current.copy_(mask)
        self.version += 1
        return newly_pruned

    def replace(self, name: str, param: Tensor, mask: Tensor) -> None:
        """Install ``mask`` for ``name`` whatever its old shape (``param`` was replaced by a resized one)."""
        self._check(name, param, mask)
        self._masks[name] = mask.to(device=param.device, dtype=torch.bool).clone()
        param.__dict__[_REF_ATTR] = (self, name)
        self.version += 1

    def mask_for(self, name: str, param: Tensor) -> Tensor:
        mask = self._masks[name]
        if mask.device != param.device:
            mask = self._masks[name] = mask.to(param.device)
        return mask

    def _multiplier(self, name: str, param: Tensor) -> Tensor:
        """The mask as a uint8 view (no copy)."""
        return self.mask_for(name, param).view(torch.uint8)

    @torch.no_grad()
    def apply_to_weights(self, params: Mapping[str, Tensor], names: Iterable[str] | None = None) -> None:
        for name in self._masks if names is None else names:
            param = params[name]
            param.mul_(self._multiplier(name, param))

    @torch.no_grad()
    def apply_to_grads(self, params: Mapping[str, Tensor], names: Iterable[str] | None = None) -> None:
        for name in self._masks if names is None else names:
            param = params[name]
            if param.grad is not None:
                param.grad.mul_(self._multiplier(name, param))

    @torch.no_grad()
    def apply_to_optimizer_state(
        self, optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], names: Iterable[str] | None = None
    ) -> None:
        """Zero the optimizer state (momentum, Adam moments, ...) of masked-out entries."""
        for name in self._masks if names is None else names:
            param = params[name]
            state = optimizer.state.get(param)
            if not state:
                continue
            mask = self._multiplier(name, param)
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.mul_(mask)

    def sparsity(self, names: Iterable[str] | None = None) -> float:
        """Fraction of masked-out entries over ``names`` (all masks when None)."""
        names = list(self._masks if names is None else names)
        total = sum(self._masks[n].numel() for n in names)
        kept = sum(int(self._masks[n].sum()) for n in names)
        return 1.0 - kept / total if total else 0.0

    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        return {n: self._masks[n].detach().cpu().clone() for n in (self._masks if names is None else names)}

    def load_state_dict(self, state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        for name, mask in state.items():
            if name not in params:
                raise KeyError(f"Checkpoint holds a mask for {name!r}, which the model has no parameter for.")
            if name in self._masks:
                self.update(name, mask)
                self.add(name, params[name])
            else:
                self.add(name, params[name], mask)

    def _check(self, name: str, param: Tensor, mask: Tensor) -> None:
        if mask.shape != param.shape:
            raise ValueError(f"Mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}.")

    def fingerprints(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """:func:`fingerprint` of each mask."""
        return {n: fingerprint(self._masks[n]) for n in (self._masks if names is None else names)}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(t: Tensor) -> Tensor:
    """Two int64 numbers (a sum and an index-weighted checksum of the raw bits) that differ when tensors differ.

    Bits, not values: equal fingerprints mean bitwise-equal tensors (up to a checksum collision), whatever the dtype.
    """
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).long()
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.long) % 1_000_003
    return torch.stack([bits.sum(), (bits * weights).sum()])


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_ranks_agree(fingerprints: Mapping[str, Tensor], what: str, owner: str) -> None:
    """Raise ``RuntimeError`` naming ``owner``, the entries and the ranks when any rank's ``fingerprints`` differ.

    Every rank gathers every rank's fingerprints, so all of them raise together (none is left waiting).
    """
    if not is_distributed() or not fingerprints:
        return
    names = list(fingerprints)
    mine = torch.stack([fingerprints[n] for n in names])
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    problems = []
    for rank, theirs in enumerate(gathered[1:], 1):
        differing = [n for n, a, b in zip(names, theirs, gathered[0], strict=True) if not torch.equal(a, b)]
        if differing:
            problems.append(f"rank 0 and rank {rank} differ in {', '.join(differing)}")
    if problems:
        raise RuntimeError(
            f"{owner}: the ranks computed different {what} ({'; '.join(problems)}). Under DDP every rank must see "
            "the same weights and averaged gradients; something made them diverge (a rank-dependent random number, "
            "a callback or hook that runs on one rank only, unsynchronized buffers)."
        )


def strip_masks(module: nn.Module) -> None:
    """Detach ``module`` (a copy that should stand alone) from every mask set: it keeps its weights, zeros included."""
    for sub in module.modules():
        sub.__dict__.pop(_SET_ATTR, None)
    for param in module.parameters():
        param.__dict__.pop(_REF_ATTR, None)


def masks_of(module: nn.Module) -> dict[str, Tensor]:
    """``{parameter name: bool mask}`` (True = kept) for every masked parameter of ``module``.

    Names are those of ``module.named_parameters()``; the tensors are the live masks (do not modify them). A
    ``copy.deepcopy`` of a masked module (for example an EMA copy) carries its own copy of the mask set.
    """
    own = module.__dict__.get(_SET_ATTR)
    result = {}
    for name, param in module.named_parameters():
        if own is not None and name in own:
            result[name] = own.mask_for(name, param)
        elif (ref := param.__dict__.get(_REF_ATTR)) is not None and ref[1] in ref[0]:
            result[name] = ref[0].mask_for(ref[1], param)
    return result
