"""Tiered adapter cache on the real engine: promotion, LRU eviction in byte budgets, pins, corrupt
files, prefetch and concurrent use from many threads."""

import random
import threading
from types import SimpleNamespace

import pytest

from inference.adapter_cache import AdapterCache, CorruptAdapter, engine_name, file_sha256, spec_bytes
from tests.inference.helpers import save_identity_adapter, serving_engine  # noqa: F401


@pytest.fixture(scope="module")
def adapter_dirs(serving_engine, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("cache_adapters")
    return [save_identity_adapter(serving_engine, f"tmp{i}", root / f"a{i}", seed=i) for i in range(4)]


@pytest.fixture(scope="module")
def one_size(serving_engine, adapter_dirs):  # noqa: F811
    from inference.engine import dora

    return spec_bytes(dora.read_peft_adapter(adapter_dirs[0]))


def row(i, directory, expert="cachetest"):
    return SimpleNamespace(expert=f"{expert}{i}", version=1, path=str(directory),
                           sha256=file_sha256(directory / "adapter_model.safetensors"))


@pytest.fixture
def make_cache(serving_engine):  # noqa: F811
    caches = []

    def make(device_adapters, ram_adapters, size):
        cache = AdapterCache(serving_engine, int(device_adapters * size), int(ram_adapters * size))
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()
        for name in list(cache.device_lru):
            serving_engine.unload_adapter(name)


def test_first_use_reads_disk_then_hits_the_device(make_cache, adapter_dirs, one_size, serving_engine):  # noqa: F811
    cache = make_cache(2, 4, one_size)
    a = row(0, adapter_dirs[0])
    assert cache.acquire([a]) == {"cachetest0-v1": "disk"}
    assert engine_name(a) in serving_engine.adapters
    cache.release(["cachetest0-v1"])
    assert cache.acquire([a]) == {"cachetest0-v1": "device"}
    cache.release(["cachetest0-v1"])
    stats = cache.stats()
    assert stats["hits"] == {"device": 1, "ram": 0, "disk": 1}
    assert stats["misses"] == {"device": 1, "ram": 1, "disk": 0}
    assert stats["hit_rate"] == 0.5


def test_device_budget_evicts_least_recently_used_into_ram(make_cache, adapter_dirs, one_size, serving_engine):  # noqa: F811
    cache = make_cache(2.5, 4, one_size)
    rows = [row(i, d) for i, d in enumerate(adapter_dirs[:3])]
    for r in rows:
        cache.acquire([r])
        cache.release([engine_name(r)])
    # three adapters, room for two: the oldest left the device but stays warm in RAM
    assert list(cache.device_lru) == ["cachetest1-v1", "cachetest2-v1"]
    assert "cachetest0-v1" not in serving_engine.adapters
    assert cache.tier_of("cachetest0-v1") == "ram"
    assert cache.acquire([rows[0]]) == {"cachetest0-v1": "ram"}  # promotion on use
    cache.release(["cachetest0-v1"])
    assert list(cache.device_lru) == ["cachetest2-v1", "cachetest0-v1"]
    assert cache.stats()["evictions"]["device"] == 2


def test_ram_budget_drops_least_recently_used_specs(make_cache, adapter_dirs, one_size):
    cache = make_cache(1, 2, one_size)
    rows = [row(i, d) for i, d in enumerate(adapter_dirs[:3])]
    for r in rows:
        cache.acquire([r])
        cache.release([engine_name(r)])
    assert list(cache.ram_lru) == ["cachetest1-v1", "cachetest2-v1"]
    assert cache.tier_of("cachetest0-v1") == "disk"
    assert cache.acquire([rows[0]]) == {"cachetest0-v1": "disk"}
    cache.release(["cachetest0-v1"])


def test_pinned_adapters_are_never_evicted(make_cache, adapter_dirs, one_size, serving_engine):  # noqa: F811
    cache = make_cache(1, 4, one_size)
    rows = [row(i, d) for i, d in enumerate(adapter_dirs[:3])]
    cache.acquire(rows)  # one request mixing three adapters on a device budget of one
    assert all(engine_name(r) in serving_engine.adapters for r in rows)
    assert cache.stats()["pinned"] == {engine_name(r): 1 for r in rows}
    cache.release([engine_name(r) for r in rows])
    assert len(cache.device_lru) == 1  # back within budget once released


def test_checksum_mismatch_is_reported_and_never_loaded(make_cache, adapter_dirs, one_size, serving_engine):  # noqa: F811
    cache = make_cache(2, 4, one_size)
    bad = SimpleNamespace(expert="corrupt", version=1, path=str(adapter_dirs[0]), sha256="f" * 64)
    good = row(1, adapter_dirs[1])
    with pytest.raises(CorruptAdapter, match="sha256"):
        cache.acquire([good, bad])
    assert "corrupt-v1" not in serving_engine.adapters
    assert cache.stats()["pinned"] == {}  # the good one acquired in the same call was released
    assert "corrupt-v1" in cache.stats()["corrupt"]


def test_missing_adapter_file_is_reported(make_cache, tmp_path, one_size):
    cache = make_cache(2, 4, one_size)
    with pytest.raises(CorruptAdapter, match="does not exist"):
        cache.acquire([SimpleNamespace(expert="gone", version=1, path=str(tmp_path), sha256="0" * 64)])


def test_prefetch_warms_the_ram_tier_in_the_background(make_cache, adapter_dirs, one_size):
    cache = make_cache(2, 4, one_size)
    r = row(3, adapter_dirs[3])
    for future in cache.prefetch([r]):
        future.result(timeout=60)
    assert cache.tier_of(engine_name(r)) == "ram"
    assert cache.acquire([r]) == {engine_name(r): "ram"}
    cache.release([engine_name(r)])


def test_concurrent_requests_keep_their_adapters_resident(make_cache, adapter_dirs, one_size, serving_engine):  # noqa: F811
    cache = make_cache(2, 3, one_size)
    rows = [row(i, d) for i, d in enumerate(adapter_dirs)]
    errors, lost, acquired = [], [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(5):
            chosen = rng.sample(rows, rng.randint(1, 2))
            try:
                names = list(cache.acquire(chosen))
                acquired.extend(names)
                # while pinned, every adapter this "sequence" uses must stay resident in the engine
                for _ in range(3):
                    missing = [n for n in names if n not in serving_engine.adapters]
                    if missing:
                        lost.append(missing)
                cache.release(names)
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not lost
    stats = cache.stats()
    assert stats["pinned"] == {}
    assert len(cache.device_lru) <= 2
    assert sum(stats["hits"].values()) == len(acquired)  # every use counted once, in the tier that served it
    assert set(cache.device_lru) <= set(serving_engine.adapters)
