"""Tiered adapter cache (seed Karar 2): device → RAM → disk, LRU within byte budgets.

- device: adapters resident in the Engine (its DoRA stacks), ready for `generate(adapters=...)`.
- RAM: the PEFT tensors read from disk (`dora.AdapterSpec`), so promotion skips disk I/O and checks.
- disk: the adapter directory of the `Adapter` row; `adapter_model.safetensors` must match
  `Adapter.sha256` — a mismatch raises `CorruptAdapter` and the file is never loaded.

`acquire()` pins what a request uses until `release()`; eviction never removes a pinned adapter
from the device (a running sequence reads its stacks), so the device tier may briefly exceed its
budget while many requests hold many adapters. `prefetch()` warms the router's next guesses into
RAM on a background thread. All bookkeeping happens under one lock; loads of the same adapter are
de-duplicated (a second caller waits for the first instead of reading the file twice).
"""

import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r3mes_site import metrics

log = logging.getLogger(__name__)
WEIGHTS_FILE = "adapter_model.safetensors"
TIERS = ("device", "ram", "disk")


class CorruptAdapter(Exception):
    """The adapter file is missing or its SHA-256 differs from the registered one."""

    def __init__(self, name, reason):
        super().__init__(f"adapter {name}: {reason}")
        self.name, self.reason = name, reason


def engine_name(adapter) -> str:
    """The name an adapter version is resident under in the engine (unique per version)."""
    return f"{adapter.expert}-v{adapter.version}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def spec_bytes(spec) -> int:
    return sum(t.numel() * t.element_size() for group in spec.tensors.values() for t in group if t is not None)


@dataclasses.dataclass
class Entry:
    name: str
    path: str
    sha256: str
    spec: object = None  # dora.AdapterSpec while in the RAM tier
    ram_bytes: int = 0
    on_device: bool = False
    device_bytes: int = 0
    pins: int = 0


class AdapterCache:
    def __init__(self, engine, device_budget_bytes: int, ram_budget_bytes: int, prefetch_workers: int = 1):
        self.engine = engine
        self.device_budget, self.ram_budget = device_budget_bytes, ram_budget_bytes
        self.entries: dict[str, Entry] = {}
        self.device_lru: OrderedDict[str, None] = OrderedDict()  # oldest first
        self.ram_lru: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.RLock()
        self.loading: dict[str, threading.Event] = {}
        self.hits = {tier: 0 for tier in TIERS}
        self.misses = {tier: 0 for tier in TIERS}
        self.load_seconds = {tier: [] for tier in TIERS}  # per tier the request was served from
        self.evictions = {"device": 0, "ram": 0}
        self.corrupt: dict[str, str] = {}
        self.prefetcher = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="adapter-prefetch")

    @classmethod
    def from_settings(cls, engine):
        from django.conf import settings

        return cls(engine, settings.R3MES_ADAPTER_DEVICE_BUDGET_MB * 2**20, settings.R3MES_ADAPTER_RAM_BUDGET_MB * 2**20)

    # -- public API ----------------------------------------------------------------------------
    def acquire(self, adapters) -> dict:
        """Make every `Adapter` row resident on the device and pin it. Returns {name: tier served from}.
        Raises CorruptAdapter (after releasing whatever this call pinned) when a file fails its check."""
        served, pinned = {}, []
        try:
            for adapter in adapters:
                name = engine_name(adapter)
                served[name] = self._ensure_on_device(name, self._local_dir(name, adapter), adapter.sha256)
                pinned.append(name)
        except Exception:
            self.release(pinned)
            raise
        return served

    def release(self, names) -> None:
        with self.lock:
            for name in names:
                entry = self.entries.get(name)
                if entry is not None and entry.pins > 0:
                    entry.pins -= 1
            self._evict_device()

    def prefetch(self, adapters) -> list:
        """Warm adapters into RAM in the background (the router's next guesses); returns the futures."""
        futures = []
        for adapter in adapters:
            name = engine_name(adapter)
            with self.lock:
                entry = self.entries.get(name)
                if entry is not None and (entry.on_device or entry.spec is not None) or name in self.corrupt:
                    continue
            try:
                path = self._local_dir(name, adapter)
            except CorruptAdapter:
                continue  # recorded; the request that needs it will report it
            futures.append(self.prefetcher.submit(self._prefetch_one, name, path, adapter.sha256))
        return futures

    def tier_of(self, name: str) -> str:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                return "disk"
            return "device" if entry.on_device else ("ram" if entry.spec is not None else "disk")

    def stats(self) -> dict:
        with self.lock:
            lookups = sum(self.hits.values())
            warm = self.hits["device"] + self.hits["ram"]
            return {
                "hits": dict(self.hits),
                "misses": dict(self.misses),
                "hit_rate": warm / lookups if lookups else None,
                "evictions": dict(self.evictions),
                "load_ms_p50": {t: _median_ms(v) for t, v in self.load_seconds.items()},
                "device": {"adapters": list(self.device_lru), "bytes": self._device_bytes(), "budget": self.device_budget},
                "ram": {"adapters": list(self.ram_lru), "bytes": self._ram_bytes(), "budget": self.ram_budget},
                "pinned": {n: e.pins for n, e in self.entries.items() if e.pins},
                "corrupt": dict(self.corrupt),
            }

    def close(self):
        self.prefetcher.shutdown(wait=True)

    def _local_dir(self, name, adapter) -> str:
        """The adapter's directory; a blob that cannot be read or unpacked counts as corrupt."""
        if not hasattr(adapter, "local_dir"):
            return adapter.path
        try:
            return adapter.local_dir()
        except Exception as exc:  # missing, corrupt or malformed blob: never loaded, reported
            self._corrupt(name, f"cannot materialise from blob {getattr(adapter, 'blob_cid', '')}: {exc}")

    # -- tiers ---------------------------------------------------------------------------------
    def _ensure_on_device(self, name: str, path: str, sha256: str) -> str:
        started = time.perf_counter()
        while True:
            with self.lock:
                entry = self.entries.setdefault(name, Entry(name, path, sha256))
                if entry.on_device:
                    entry.pins += 1
                    self.device_lru.move_to_end(name)
                    return self._count("device", started)
                waiting = self.loading.get(name)
                if waiting is None:
                    self.loading[name] = threading.Event()
                    entry.pins += 1  # pinned before the install so a concurrent eviction cannot drop it
                    break
            waiting.wait()  # another thread is loading this adapter; then look again
        try:
            from inference.engine.generate import quick_gil_while_compiling  # torch: only where it loads

            tier = "ram" if entry.spec is not None else "disk"
            with quick_gil_while_compiling(self.engine.model):  # seconds faster beside a compile
                spec = entry.spec if tier == "ram" else self._read_disk(entry)
                self._install(name, spec)
            with self.lock:
                entry.on_device = True
                entry.device_bytes = spec_bytes(spec)
                self.device_lru[name] = None
                self._keep_in_ram(entry, spec)
                self._evict_device()
            return self._count(tier, started)
        except Exception:
            with self.lock:
                entry.pins -= 1
            raise
        finally:
            with self.lock:
                self.loading.pop(name).set()

    def _prefetch_one(self, name: str, path: str, sha256: str) -> None:
        with self.lock:
            entry = self.entries.setdefault(name, Entry(name, path, sha256))
            if entry.on_device or entry.spec is not None or name in self.loading:
                return
            self.loading[name] = threading.Event()
        try:
            spec = self._read_disk(entry)
            with self.lock:
                self._keep_in_ram(entry, spec)
        except CorruptAdapter:
            pass  # recorded in self.corrupt; the request that needs it will report it
        finally:
            with self.lock:
                self.loading.pop(name).set()

    def _read_disk(self, entry: Entry):
        from inference.engine import dora

        weights = Path(entry.path) / WEIGHTS_FILE
        if not weights.is_file():
            self._corrupt(entry.name, f"{weights} does not exist")
        actual = file_sha256(weights)
        if actual != entry.sha256:
            self._corrupt(entry.name, f"sha256 of {weights} is {actual}, registered {entry.sha256}")
        spec = dora.read_peft_adapter(entry.path)
        dora.validate_spec(self.engine.model, spec, entry.path)
        return spec

    def _install(self, name: str, spec) -> None:
        """Install a RAM-tier spec into the engine. Mirrors Engine.load_adapter minus the disk read
        (the spec was read and validated once); a copy of the tensor dict is handed over because the
        engine replaces its entries with device tensors."""
        engine = self.engine
        with engine.lock:
            if name in engine.adapters:
                engine.unload_adapter(name)
            engine._install(name, dataclasses.replace(spec, tensors=dict(spec.tensors)))
            engine.adapter_paths[name] = self.entries[name].path

    def _keep_in_ram(self, entry: Entry, spec) -> None:
        if entry.spec is None:
            entry.spec, entry.ram_bytes = spec, spec_bytes(spec)
        self.ram_lru[entry.name] = None
        self.ram_lru.move_to_end(entry.name)
        while self._ram_bytes() > self.ram_budget and len(self.ram_lru) > 1:
            victim = next(iter(self.ram_lru))
            if victim == entry.name:
                break
            self.ram_lru.pop(victim)
            old = self.entries[victim]
            old.spec, old.ram_bytes = None, 0
            self.evictions["ram"] += 1

    def _evict_device(self) -> None:
        """Unload least recently used, unpinned adapters until the device tier fits its budget."""
        for name in list(self.device_lru):
            if self._device_bytes() <= self.device_budget:
                return
            entry = self.entries[name]
            if entry.pins > 0 or name in self.loading:
                continue
            self.engine.unload_adapter(name)
            entry.on_device, entry.device_bytes = False, 0
            self.device_lru.pop(name)
            self.evictions["device"] += 1  # its spec, if still in RAM, makes the next use a RAM hit

    # -- bookkeeping ---------------------------------------------------------------------------
    def _corrupt(self, name: str, reason: str):
        with self.lock:
            self.corrupt[name] = reason
        log.error("adapter %s not loaded: %s", name, reason)
        raise CorruptAdapter(name, reason)

    def _count(self, tier: str, started: float) -> str:
        seconds = time.perf_counter() - started
        with self.lock:
            # The tier that served is a hit; every faster tier above it missed.
            self.hits[tier] += 1
            metrics.adapter_cache_hits.labels(tier=tier).inc()
            for missed in TIERS[: TIERS.index(tier)]:
                self.misses[missed] += 1
                metrics.adapter_cache_misses.labels(tier=missed).inc()
            self.load_seconds[tier].append(seconds)
            del self.load_seconds[tier][:-1000]
        return tier

    def _device_bytes(self) -> int:
        return sum(self.entries[n].device_bytes for n in self.device_lru)

    def _ram_bytes(self) -> int:
        return sum(self.entries[n].ram_bytes for n in self.ram_lru)


def _median_ms(values):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2] * 1000, 3)
