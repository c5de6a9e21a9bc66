"""The GPU hot-set: adapters resident in slot-stacked buffers at fixed addresses.

Every target module gets `lora_a_stacked[S, R, D_in]` and `lora_b_stacked[S, D_out, R]`, with
per-slot rank and scale, allocated once (modules that read the same input share one lora_a
tensor, so one matmul shrinks for all of them). Loading an adapter is an in-place copy into a free or
evicted slot and never a new allocation, so pointers held by a captured CUDA graph stay valid
(the MoLoRA paper's hot-set, arXiv 2603.15965). Slots are pinned by reference counts of running
requests; only unpinned slots are evicted (LRU), and evicted adapters stay in a host-memory tier.

Legend: S slots, R max rank, D_in / D_out features.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from molora_core.adapter import LoRAAdapter
from molora_core.errors import AdapterInvalid, AdapterNotFound, CapacityExceeded


class SlotBuffers:
    """One target module's slot-stacked LoRA weights.

    Standalone, every tensor is its own allocation. Modules that read the same input (q/k/v,
    gate/up) share a `BufferGroup`: their lora_a, ranks and scales are rows of the group's
    tensors, so a backend can run one shrink matmul for all of them.

    b_layout "slot_major" stores lora_b as [S, D_out, R] (what the Triton kernels read);
    "rank_major" stores it as [S, R, D_out] and exposes the same [S, D_out, R] shape as a view, so
    the CPU paths expand with plain (untransposed) matmuls, every slot at once over [S * R, D_out]
    on the dense path (26% faster than over [D_out, S * R] at D_out=3072 with cold caches).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device,
        group: "BufferGroup | None" = None,
        index: int = 0,
        b_layout: str = "slot_major",
    ):
        self.d_in, self.d_out = d_in, d_out
        if group is None:
            group = BufferGroup(1, d_in, num_slots, max_rank, dtype, device)
        self.group, self.index = group, index
        self.lora_a_stacked = group.lora_a[index]  # [S, R, D_in], contiguous
        if b_layout == "slot_major":
            self.lora_b_stacked = torch.zeros(num_slots, d_out, max_rank, dtype=dtype, device=device)  # [S, D_out, R]
        elif b_layout == "rank_major":
            storage = torch.zeros(num_slots, max_rank, d_out, dtype=dtype, device=device)  # [S, R, D_out]
            self.lora_b_stacked = storage.transpose(1, 2)  # [S, D_out, R] view
        else:
            raise ValueError(f"b_layout must be 'slot_major' or 'rank_major'; got {b_layout!r}")
        self.slot_ranks = group.ranks[index]  # int32[S], 0 = empty
        self.slot_scales = group.scales[index]  # float32[S]
        self.rank_scales = group.rank_scales[index]  # float32[S, R]: scale below the slot's rank, 0 past it

    def write(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, scale: float) -> None:
        """Copy one module's weights into `slot` in place; None clears it. Zeroes the rank padding."""
        if lora_a is None:
            self.lora_a_stacked[slot].zero_()
            self.lora_b_stacked[slot].zero_()
            self.slot_ranks[slot] = 0
            self.slot_scales[slot] = 0.0
            self.rank_scales[slot] = 0.0
            return
        rank = lora_a.shape[0]
        self.lora_a_stacked[slot, :rank].copy_(lora_a)
        self.lora_a_stacked[slot, rank:].zero_()
        self.lora_b_stacked[slot, :, :rank].copy_(lora_b)
        self.lora_b_stacked[slot, :, rank:].zero_()
        self.slot_ranks[slot] = rank
        self.slot_scales[slot] = scale
        self.rank_scales[slot, :rank] = scale
        self.rank_scales[slot, rank:] = 0.0

    def data_ptrs(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (self.lora_a_stacked, self.lora_b_stacked, self.slot_ranks, self.slot_scales))


class BufferGroup:
    """lora_a, ranks and scales of G modules that read the same input, one tensor each."""

    def __init__(self, size: int, d_in: int, num_slots: int, max_rank: int, dtype: torch.dtype, device):
        self.lora_a = torch.zeros(size, num_slots, max_rank, d_in, dtype=dtype, device=device)  # [G, S, R, D_in]
        self.ranks = torch.zeros(size, num_slots, dtype=torch.int32, device=device)  # int32[G, S]
        self.scales = torch.zeros(size, num_slots, dtype=torch.float32, device=device)  # float32[G, S]
        self.rank_scales = torch.zeros(size, num_slots, max_rank, dtype=torch.float32, device=device)  # [G, S, R]
        self.members: list[SlotBuffers] = []


@dataclass
class HotSetStats:
    hits: int = 0  # acquire found the adapter resident
    host_hits: int = 0  # loaded from the host-memory tier
    cold_loads: int = 0  # loaded through the caller's loader
    evictions: int = 0
    load_seconds: float = 0.0  # total time spent copying into slots and loading cold adapters
    loads_by_adapter: dict[str, int] = field(default_factory=dict)


@dataclass
class _Slot:
    key: str
    adapter: LoRAAdapter
    serial: int  # which load this is: a slot loaded again (any adapter) gets a new one
    pins: int = 0
    retired: bool = False  # removed while pinned: freed at the last release, never handed out again


class HotSet:
    """Adapters resident in `num_slots` slots of every target module's stacked buffers.

    Keys are the caller's names for adapter versions (e.g. `math@3`). Thread-safe; the caller
    must not load into a slot while a forward pass that reads it is running (the engine loads
    between steps).
    """

    def __init__(
        self,
        module_shapes: dict[str, tuple[int, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        host_cache_bytes: int = 1 << 30,
        groups: list[tuple[str, ...]] = (),
        b_layout: str = "slot_major",
    ):
        """module_shapes: module path -> (D_in, D_out). groups: tuples of module paths that
        read the same input (same D_in), stored as one `BufferGroup` each. b_layout: see
        `SlotBuffers` (the backend's `b_layout`)."""
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1; got {num_slots} and {max_rank}")
        if not module_shapes:
            raise ValueError("module_shapes is empty: the hot-set needs at least one target module")
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.device = torch.device(device)
        self.buffers: dict[str, SlotBuffers] = {}
        self.groups: list[BufferGroup] = []
        grouped = {path: members for members in groups for path in members}
        for path, (d_in, d_out) in module_shapes.items():
            if path in self.buffers:
                continue
            members = grouped.get(path, (path,))
            missing = [m for m in members if m not in module_shapes]
            if missing or len({module_shapes[m][0] for m in members}) != 1:
                raise ValueError(
                    f"buffer group {members} must name target modules with one input size; "
                    f"missing {missing}, sizes {[module_shapes.get(m) for m in members]}"
                )
            group = BufferGroup(len(members), d_in, num_slots, max_rank, dtype, self.device)
            for index, member in enumerate(members):
                buffers = SlotBuffers(
                    d_in, module_shapes[member][1], num_slots, max_rank, dtype, self.device, group, index, b_layout
                )
                group.members.append(buffers)
                self.buffers[member] = buffers
            self.groups.append(group)
        self.host_cache_bytes = host_cache_bytes
        self.stats = HotSetStats()
        self._slots: list[_Slot | None] = [None] * num_slots
        self._index: dict[str, int] = {}  # live (not retired) key -> slot
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned occupied slots, oldest first
        self._host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._loads = itertools.count()
        self._lock = threading.RLock()

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        target_modules,
        num_slots: int,
        max_rank: int,
        shared_inputs: tuple[tuple[str, ...], ...] = (),
        **kwargs,
    ) -> "HotSet":
        """A hot-set over every nn.Linear of `model` whose last name part is in target_modules.

        shared_inputs: name tuples such as ("q_proj", "k_proj", "v_proj"); the members of one
        tuple under one parent module are grouped when all of them are targets.
        """
        targets = set(target_modules)
        shapes = {
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
        }
        groups = []
        parents = sorted({path.rpartition(".")[0] for path in shapes})
        for parent in parents:
            for names in shared_inputs:
                members = tuple(f"{parent}.{n}" if parent else n for n in names)
                if len(members) > 1 and all(m in shapes for m in members):
                    groups.append(members)
        return cls(shapes, num_slots, max_rank, groups=groups, **kwargs)

    # -- queries ---------------------------------------------------------------------------
    def slot_of(self, key: str) -> int | None:
        with self._lock:
            return self._index.get(key)

    def resident(self) -> dict[str, int]:
        """Live key -> slot."""
        with self._lock:
            return dict(self._index)

    def serial(self, slot: int) -> int:
        """The load serial of what `slot` holds (-1: empty). Serials never repeat, so equal serials
        mean the same weights (the engine's prefix cache keys keys and values by them)."""
        entry = self._slots[slot]
        return -1 if entry is None else entry.serial

    def pins(self, key: str) -> int:
        with self._lock:
            slot = self._index.get(key)
            return 0 if slot is None else self._slots[slot].pins

    def holds(self, key: str) -> bool:
        """Resident in a slot or kept in the host-memory tier (no loader needed to pin it)."""
        with self._lock:
            return key in self._index or key in self._host

    def host_keys(self) -> list[str]:
        with self._lock:
            return list(self._host)

    # -- validation ------------------------------------------------------------------------
    def validate(self, adapter: LoRAAdapter) -> None:
        """Raise AdapterInvalid unless every module of `adapter` fits this hot-set."""
        if not adapter.modules:
            raise AdapterInvalid(f"adapter {adapter.name!r} has no modules")
        for path, module in adapter.modules.items():
            buffers = self.buffers.get(path)
            if buffers is None:
                known = sorted({p.rsplit(".", 1)[-1] for p in self.buffers})
                raise AdapterInvalid(
                    f"adapter {adapter.name!r} targets module {path!r}, which this model's hot-set does not "
                    f"hold; expected one of the modules named {known}"
                )
            rank = module.rank
            expected_a, expected_b = (rank, buffers.d_in), (buffers.d_out, rank)
            if tuple(module.lora_a.shape) != expected_a or tuple(module.lora_b.shape) != expected_b:
                raise AdapterInvalid(
                    f"adapter {adapter.name!r} module {path}: lora_a {tuple(module.lora_a.shape)} and lora_b "
                    f"{tuple(module.lora_b.shape)}; expected {expected_a} and {expected_b}"
                )
            if rank < 1 or rank > self.max_rank:
                raise AdapterInvalid(
                    f"adapter {adapter.name!r} module {path}: rank {rank} is over the hot-set's max_rank "
                    f"{self.max_rank}"
                    if rank > self.max_rank
                    else f"adapter {adapter.name!r} module {path}: rank {rank} must be >= 1"
                )
            for which, tensor in (("lora_a", module.lora_a), ("lora_b", module.lora_b)):
                if not torch.isfinite(tensor).all():
                    raise AdapterInvalid(f"adapter {adapter.name!r} module {path}: {which} holds NaN or Inf values")

    # -- pinning ---------------------------------------------------------------------------
    def acquire(self, key: str, loader: Callable[[], LoRAAdapter] | None = None) -> int:
        """Pin `key` and return its slot, loading it (host tier first, then `loader`) on a miss.

        Raises CapacityExceeded when every slot is pinned, AdapterNotFound when the adapter is
        neither resident nor in the host tier and no loader is given, AdapterInvalid when the
        loaded adapter does not fit (the hot-set is left unchanged).
        """
        with self._lock:
            slot = self._index.get(key)
            if slot is not None:
                self.stats.hits += 1
                self._pin(slot)
                return slot
            adapter = self._host.get(key)
            from_host = adapter is not None
        if adapter is None:
            if loader is None:
                raise AdapterNotFound(f"adapter {key!r} is not resident and no loader was given")
            started = time.perf_counter()
            adapter = loader()
            self.stats.load_seconds += time.perf_counter() - started
        with self._lock:
            slot = self._index.get(key)  # another thread may have loaded it meanwhile
            if slot is None:
                slot = self._load_locked(key, adapter)
                if from_host:
                    self.stats.host_hits += 1
                    self._host.pop(key, None)
                else:
                    self.stats.cold_loads += 1
            else:
                self.stats.hits += 1
            self._pin(slot)
            return slot

    def release(self, key: str, slot: int | None = None) -> None:
        """Unpin one reference taken by `acquire` (pass the slot it returned if `key` may be retired)."""
        with self._lock:
            slot = self._index.get(key) if slot is None else slot
            entry = self._slots[slot] if slot is not None else None
            if entry is None or entry.key != key or entry.pins == 0:
                raise AdapterNotFound(f"adapter {key!r} is not pinned in the hot-set")
            entry.pins -= 1
            if entry.pins == 0:
                if entry.retired:
                    self._clear(slot)
                else:
                    self._lru[slot] = None

    def load(self, key: str, adapter: LoRAAdapter) -> int:
        """Make `adapter` resident under `key` without pinning it (prefetch); returns its slot."""
        with self._lock:
            slot = self._index.get(key)
            if slot is not None:
                if slot in self._lru:
                    self._lru.move_to_end(slot)
                return slot
            return self._load_locked(key, adapter)

    def remove(self, key: str) -> None:
        """Drop `key` (deleted or replaced in the registry): freed now, or at its last release."""
        with self._lock:
            self._host.pop(key, None)
            slot = self._index.pop(key, None)
            if slot is None:
                return
            entry = self._slots[slot]
            if entry.pins:
                entry.retired = True
            else:
                self._lru.pop(slot, None)
                self._clear(slot)

    # -- internals -------------------------------------------------------------------------
    def _pin(self, slot: int) -> None:
        self._slots[slot].pins += 1
        self._lru.pop(slot, None)

    def _load_locked(self, key: str, adapter: LoRAAdapter) -> int:
        if not self._lru and all(entry is not None for entry in self._slots):
            self._free_slot()  # raises CapacityExceeded: before validate's scan of every weight
        self.validate(adapter)
        slot = self._free_slot()
        started = time.perf_counter()
        for path, buffers in self.buffers.items():
            module = adapter.modules.get(path)
            if module is None:
                buffers.write(slot, None, None, 0.0)
            else:
                buffers.write(slot, module.lora_a, module.lora_b, module.scale)
        self.stats.load_seconds += time.perf_counter() - started
        self.stats.loads_by_adapter[key] = self.stats.loads_by_adapter.get(key, 0) + 1
        self._slots[slot] = _Slot(key, adapter, next(self._loads))
        self._index[key] = slot
        self._lru[slot] = None
        return slot

    def _free_slot(self) -> int:
        for slot, entry in enumerate(self._slots):
            if entry is None:
                return slot
        if not self._lru:
            raise CapacityExceeded(
                f"all {self.num_slots} hot-set slots are pinned by running requests "
                f"({sorted(e.key for e in self._slots if e)}); retry when one finishes"
            )
        victim, _ = self._lru.popitem(last=False)
        entry = self._slots[victim]
        self._index.pop(entry.key, None)
        self._remember(entry.key, entry.adapter)
        self.stats.evictions += 1
        self._slots[victim] = None
        return victim

    def _clear(self, slot: int) -> None:
        for buffers in self.buffers.values():
            buffers.write(slot, None, None, 0.0)
        self._slots[slot] = None

    def _remember(self, key: str, adapter: LoRAAdapter) -> None:
        """Keep an evicted adapter in host memory, oldest out first, within host_cache_bytes."""
        if adapter.nbytes > self.host_cache_bytes:
            return
        self._host[key] = adapter
        self._host.move_to_end(key)
        while sum(a.nbytes for a in self._host.values()) > self.host_cache_bytes:
            self._host.popitem(last=False)
