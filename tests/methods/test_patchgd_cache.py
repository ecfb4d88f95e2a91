"""PatchGD's cached latent grid (``method.z_cache``): exact at age 0, oldest cells first, spilled
to memory-mapped files beyond its budget, kept across a resume."""

import copy
from pathlib import Path

import pytest
import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import train
from gigapatch.methods.base import create_method
from gigapatch.methods.frozen_cache import ZCache, image_keys
from gigapatch.methods.patchgd import PatchGD
from gigapatch.methods.z_staleness import BucketMaps, apply_affine, fit_affine, relative_change
from gigapatch.memory.tracker import measure_step_peaks
from gigapatch.step import StepContext


def _cfg(**method) -> Config:
    cfg = Config(seed=0)
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.latent_dim, cfg.model.head_width = 8, 8
    cfg.method.name, cfg.method.patch_size, cfg.method.fill_chunk = "patchgd", 16, 5
    cfg.method.sample_fraction, cfg.method.inner_steps = 0.25, 2
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def _steps(method, images, targets, n):
    """``n`` SGD steps on the same batch; the parameters after each."""
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.05))
    out = []
    for _ in range(n):
        method.train_step(images, targets, ctx)
        out.append({k: v.detach().clone() for k, v in method.named_parameters()})
    return out


def _assert_same_weights(exact, cached, images, targets, n: int = 3) -> None:
    """``n`` SGD steps of each method from the same RNG state end in bit-identical weights
    after every step."""
    torch.manual_seed(1)
    want = _steps(exact, images, targets, n)
    torch.manual_seed(1)
    got = _steps(cached, images, targets, n)
    for a, b in zip(want, got):
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def _count_fills(monkeypatch) -> list[int | None]:
    """The cells each :meth:`PatchGD.fill` encodes, in call order (``None``: every cell)."""
    encoded: list[int | None] = []
    real = PatchGD.fill
    monkeypatch.setattr(PatchGD, "fill", lambda self, im, grid, take=None, mask=None:
                        encoded.append(None if mask is None else int(mask.sum()))
                        or real(self, im, grid, take, mask))
    return encoded


def test_with_max_age_zero_the_cached_path_is_the_exact_algorithm():
    torch.manual_seed(0)
    exact = create_method(_cfg())
    cached = copy.deepcopy(exact)
    cached.cfg = _cfg(z_cache="refresh", z_max_age=0)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)  # 16 cells each
    _assert_same_weights(exact, cached, images, torch.tensor([0, 2]))
    assert cached.z_cache.hits == 4 and len(cached.z_cache.items) == 2  # steps 2 and 3 hit
    assert cached.z_clock == 3


def test_z_correct_re_encoding_every_cell_is_the_exact_algorithm():
    """Its random picks do not touch the global generator: with every cell re-encoded
    (``z_refresh: 1``) the cached run samples the exact run's inner-step cells, step for
    step, and ends in its weights."""
    torch.manual_seed(0)
    exact = create_method(_cfg())
    cached = copy.deepcopy(exact)
    cached.cfg = _cfg(z_cache="refresh", z_refresh=1.0, z_correct=True)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    _assert_same_weights(exact, cached, images, torch.tensor([0, 2]), n=4)
    assert cached.z_cache.hits == 6  # steps 2-4 went through the cached path


def test_refresh_re_encodes_exactly_the_oldest_share_and_epoch_none():
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25))
    ages = torch.tensor([5, 1, 1, 7, 0, 3, 2, 9])
    candidates = torch.tensor([True] * 7 + [False])
    stale = method._stale(ages, candidates)
    assert stale.nonzero().flatten().tolist() == [1, 4]  # ⌈0.25·7⌉ = 2 oldest; ties by index
    method.cfg = _cfg(z_cache="refresh", z_max_age=2)
    method.z_clock = 6
    assert method._stale(ages, candidates).nonzero().flatten().tolist() == [1, 2, 4, 5, 6]
    method.cfg = _cfg(z_cache="epoch")
    assert not method._stale(ages, candidates).any()


def test_a_step_encodes_only_the_stale_cells_and_writes_the_re_encoded_ones_back(monkeypatch):
    torch.manual_seed(2)
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25, inner_steps=1))
    images = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    targets = torch.tensor([1])
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.05))
    encoded = _count_fills(monkeypatch)
    for _ in range(3):
        method.train_step(images, targets, ctx)
    assert encoded == [16, 4, 4]  # a miss fills all 16 cells; then ⌈0.25·16⌉ = 4 per step
    (key, (z, ages)), = method.z_cache.entries()
    assert z.shape == (16, 8) and ages.min() >= 0
    # step 3 (clock 2) refreshed the 4 oldest cells and re-encoded k = 4 sampled ones
    assert 4 <= int((ages == 2).sum()) <= 8


def test_warmup_steps_fill_exactly_then_the_cache_takes_over(monkeypatch):
    torch.manual_seed(3)
    exact = create_method(_cfg())
    cached = copy.deepcopy(exact)
    cached.cfg = _cfg(z_cache="epoch", z_cache_warmup=2)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    _assert_same_weights(exact, cached, images, torch.tensor([0, 2]), n=2)  # the exact fill
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25, inner_steps=1,
                                z_cache_warmup=2))
    encoded = _count_fills(monkeypatch)
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.05))
    for _ in range(4):
        method.train_step(images[:1], torch.tensor([1]), ctx)
    assert encoded == [16, 16, 4, 4]  # the steps at clock 0 and 1 warm up: every cell
    with pytest.raises(ConfigError, match="method.z_cache_warmup"):
        _cfg(z_cache="epoch", z_cache_warmup=-1)


def test_the_staleness_is_the_re_encoded_cells_change_from_their_cached_values():
    torch.manual_seed(0)
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25))
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)  # 16 cells each
    targets = torch.tensor([0, 2])
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.5))
    method.train_step(images, targets, ctx)
    assert method.epoch_stats() == {}  # a first visit has nothing cached to compare with
    old, ages = (torch.stack(t) for t in zip(*(method.z_cache.get(k) for k in image_keys(images))))
    todo = torch.stack([method._stale(a, torch.ones(16, dtype=torch.bool)) for a in ages])
    with torch.no_grad(), method._fill_mode("train"):
        fresh = method.fill(images, method.grid(images))  # every cell, with θ1 as it is now
    want = relative_change(fresh[todo], old[todo])  # the 2 × 4 oldest cells' change
    assert float(want.min()) > 0  # θ1 moved: a figure that could be zero by accident is not
    method.train_step(images, targets, ctx)
    stats = method.epoch_stats()
    assert stats["z_staleness"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert stats["z_refreshed"] == 8 / 32
    assert method.epoch_stats() == {}  # read once: the next epoch counts afresh


def test_z_tolerance_steers_the_share_re_encoded_per_visit(monkeypatch):
    encoded = _count_fills(monkeypatch)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)  # 16 cells each
    for tolerance, lr, want in ((10.0, 0.5, [32, 32, 24, 18, 14]),  # below: ×0.75 per visit
                                (1e-9, 0.5, [32] * 5)):             # above: every cell
        torch.manual_seed(0)
        method = create_method(_cfg(z_cache="refresh", z_refresh=0.25, z_tolerance=tolerance))
        ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=lr))
        encoded.clear()
        for _ in range(5):
            method.train_step(images, torch.tensor([0, 2]), ctx)
        assert encoded == want, (tolerance, lr)
        assert method.epoch_stats()["z_share"] == method.z_share.share
    for _ in range(30):
        method.z_share.update(0.0)
    assert method.z_share.share == 0.25  # floor: method.z_refresh
    steer = create_method(_cfg(z_cache="refresh", z_refresh=0.25, z_tolerance=0.5,
                               z_correct=True))
    steer._observe(torch.tensor([1.0]), 1, residual=torch.zeros(0))  # no check: the change
    assert steer.z_share.share == 1.0
    steer._observe(torch.tensor([1.0]), 1, 1, residual=torch.tensor([0.1]))  # the check's
    assert steer.z_share.share == 0.75  # residual steers: what the mapped cells still carry
    with pytest.raises(ConfigError, match="method.z_tolerance"):
        _cfg(z_cache="refresh", z_max_age=3, z_tolerance=0.05)  # steers a share, not an age
    with pytest.raises(ConfigError, match="method.z_tolerance"):
        _cfg(z_cache="refresh", z_refresh=0.25, z_tolerance=0)


def test_z_correct_re_encodes_half_the_oldest_and_half_a_random_sample_of_every_age():
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.5, z_correct=True))
    ages = torch.tensor([0] * 6 + [5] * 10)  # ⌈0.5·16⌉ = 8: 4 oldest, 4 of the other 12
    picks, young = set(), 0
    rng = torch.get_rng_state()
    for _ in range(8):
        stale = method._stale(ages, torch.ones(16, dtype=torch.bool))
        assert int(stale.sum()) == 8 and int(stale[:6].sum()) >= 4  # as many; the oldest half
        picks.add(tuple(stale[:6].nonzero().flatten().tolist()))
        young += int(stale[6:].sum())
    assert torch.equal(torch.get_rng_state(), rng)  # drawn from the method's own generator
    assert len(picks) > 1  # ties among the oldest at random: a fair sample to fit on
    assert young > 0  # younger buckets get pairs too (none without z_correct: below)
    plain = create_method(_cfg(z_cache="refresh", z_refresh=0.5))
    assert plain._stale(ages, torch.ones(16, dtype=torch.bool)).tolist() == [True] * 6 + [
        True, True] + [False] * 8  # oldest first, ties by index


def test_z_correct_maps_each_bucket_by_its_pairs_from_the_recent_fills():
    """A bucket's kept cells are mapped by its pairs of the fills before when this fill
    re-encodes none of its cells, and the residual is that earlier map on this fill's pairs."""
    torch.manual_seed(0)
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25, z_correct=True))
    method.z_bucket_steps, method.z_maps.reach = 10, 0  # own pairs only (borrowing: below)
    c = 8
    true = [torch.eye(c + 1, c) + 0.2 * torch.randn(c + 1, c) for _ in range(2)]

    def fill(bucket_ages, seen):
        old = torch.randn(2, 16, c)
        ages = torch.as_tensor(bucket_ages).expand(2, 16).clone()
        new = torch.where((ages < 10)[..., None], apply_affine(old, true[0]),
                          apply_affine(old, true[1]))
        z = torch.where(seen[..., None], new, old)
        done, residual = method._correct(z, old, ages, seen, ~seen)
        return old, new, z, done, residual

    first = torch.zeros(2, 16, dtype=torch.bool)
    first[:, :12] = True  # 24 pairs of bucket 0 (ages 3), 8 kept cells
    old1, new1, z, done, residual = fill([3] * 16, first)
    assert torch.equal(done, ~first) and residual.numel() == 0  # no earlier map to check
    fit1 = fit_affine(old1[first], new1[first])
    torch.testing.assert_close(z[~first], apply_affine(old1[~first], fit1))
    # fill 2: pairs only from bucket 1 (ages 15), kept cells of bucket 0 and bucket 1
    second = torch.zeros(2, 16, dtype=torch.bool)
    second[:, 8:] = True
    old2, new2, z, done, residual = fill([3] * 8 + [15] * 8, second)
    assert torch.equal(done, ~second) and residual.numel() == 0  # bucket 1: new
    torch.testing.assert_close(z[~second], apply_affine(old2[~second], fit1))  # carried map
    assert relative_change(new2[~second], z[~second]).max() < 0.05  # (the old map was right)
    # fill 3: bucket 1's pairs again: the residual is fill 2's bucket-1 map on them
    old3, new3, z, done, residual = fill([15] * 16, first)
    fit2 = fit_affine(old2[second], new2[second])
    torch.testing.assert_close(residual, relative_change(new3[first],
                                                         apply_affine(old3[first], fit2)))
    assert 0 < residual.mean() < 0.05
    assert set(method.z_maps.sums) == {0, 1}


def test_z_correct_over_many_buckets_equals_a_map_per_bucket_mask():
    """The sorted, batched :meth:`PatchGD._correct` gives what fitting and applying each
    bucket's map through its own mask gives, over fills that meet a dozen buckets."""
    torch.manual_seed(0)
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.25, z_correct=True))
    method.z_bucket_steps, c = 3, 8
    reference = BucketMaps()
    for _ in range(4):
        old = torch.randn(4, 64, c)
        ages = torch.randint(-1, 40, (4, 64))  # 14 buckets and never-encoded cells
        seen = (torch.rand(4, 64) < 0.5) & (ages >= 0)
        rest = ~seen & (ages >= 0)
        new = apply_affine(old, torch.eye(c + 1, c) + 0.1 * torch.randn(c + 1, c))
        z = torch.where(seen[..., None], new, old)
        want, bucket = z.clone(), ages // 3
        reference.step()
        residual = []
        earlier = {b: reference.map(b, c + 1) for b in bucket[seen].unique().tolist()}
        for b in bucket[seen].unique().tolist():
            pairs = seen & (bucket == b)
            before = earlier[b]  # (held out: from the fills before this one)
            if before is not None:
                residual.append(relative_change(new[pairs], apply_affine(old[pairs], before)))
            reference.add(b, old[pairs], new[pairs])
        mapped = torch.zeros_like(rest)
        for b in bucket[rest].unique().tolist():
            w = reference.map(b, c + 1)
            if w is not None:
                cells = rest & (bucket == b)
                want[cells], mapped = apply_affine(old[cells], w), mapped | cells
        done, got_residual = method._correct(z, old, ages, seen, rest)
        assert torch.equal(done, mapped) and mapped.any()
        torch.testing.assert_close(z, want, rtol=1e-4, atol=1e-5)
        want_residual = torch.cat(residual) if residual else torch.zeros(0)
        torch.testing.assert_close(got_residual, want_residual, rtol=1e-4, atol=1e-5)
    assert residual  # the later fills checked earlier maps


def test_z_correct_maps_the_kept_cells_by_the_fit_on_the_re_encoded_ones(monkeypatch):
    torch.manual_seed(0)
    method = create_method(_cfg(z_cache="refresh", z_refresh=0.75, z_correct=True))
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)  # 16 cells each
    targets = torch.tensor([0, 2])
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.2))
    method.train_step(images, targets, ctx)
    keys = image_keys(images)
    old, ages = (torch.stack(t) for t in zip(*(method.z_cache.get(k) for k in keys)))
    with torch.no_grad(), method._fill_mode("train"):
        fresh = method.fill(images, method.grid(images))  # every cell, with θ1 as it is now
    used = {}
    real = PatchGD._cached_fill

    def spy(self, *args):
        out = real(self, *args)
        used["out"] = [t.clone() for t in out]  # (the step goes on to change them)
        return out

    monkeypatch.setattr(PatchGD, "_cached_fill", spy)
    method.train_step(images, targets, ctx)
    z, new_ages, corrected, found = used["out"]
    todo = new_ages == 1  # re-encoded at step 1: 12 of 16 cells per image, all age 0
    assert todo.sum(1).tolist() == [12, 12] and torch.equal(found, old)
    kept = ~todo  # both images were encoded at step 0: one bucket, 24 pairs > C = 8
    want = apply_affine(old[kept], fit_affine(old[todo], fresh[todo]))
    torch.testing.assert_close(z[kept], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z[todo], fresh[todo], rtol=1e-4, atol=1e-5)
    # the map brings the kept cells closer to what θ1 gives now
    assert relative_change(fresh[kept], want).mean() < 0.5 * relative_change(fresh[kept],
                                                                             old[kept]).mean()
    # the cache keeps θ1's own old values for the mapped cells not re-encoded since
    after, stamp = (torch.stack(t) for t in zip(*(method.z_cache.get(k) for k in keys)))
    still = corrected & (stamp == 0)  # mapped and not re-encoded by the inner steps since
    assert still.any() and torch.equal(corrected, kept)
    torch.testing.assert_close(after[still], old[still], rtol=0, atol=0)
    stats = method.epoch_stats()
    assert stats["z_corrected"] == 8 / 32
    assert "z_residual" not in stats  # no earlier map of the bucket to check (test above)
    with pytest.raises(ConfigError, match="method.z_correct"):
        _cfg(z_cache="epoch", z_correct=True)
    with pytest.raises(ConfigError, match="method.z_correct"):  # dense maps: not yet
        create_method(_dense_cfg("segment", z_cache="refresh", z_refresh=0.25, z_correct=True))


def test_settings_an_epoch_makes_moot_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="gigapatch"):
        create_method(_cfg(z_cache="refresh", z_max_age=9)).set_epoch_length(10)
        create_method(_cfg(z_cache="refresh", z_max_age=10)).set_epoch_length(10)
        create_method(_cfg(z_cache="epoch", z_max_age=3)).set_epoch_length(10)  # (no ages)
    assert caplog.text.count("z_max_age = ") == 1
    assert "below the 10 steps of an epoch" in caplog.text and "above 10" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gigapatch"):  # J optimizer steps per batch
        create_method(_cfg(z_cache="refresh", z_max_age=9, accumulate=False)
                      ).set_epoch_length(5)
    assert "below the 10 steps of an epoch" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gigapatch"):  # the default run: 10 epochs
        create_method(_cfg(z_cache="epoch", z_cache_warmup=99)).set_epoch_length(10)
        create_method(_cfg(z_cache="none", z_max_age=0, z_cache_warmup=500)
                      ).set_epoch_length(10)
    assert caplog.text.count("z_cache_warmup = ") == 0
    with caplog.at_level("WARNING", logger="gigapatch"):
        create_method(_cfg(z_cache="epoch", z_cache_warmup=100)).set_epoch_length(10)
    assert "covers all 100 optimizer steps of the run (10 epochs of 10)" in caplog.text


def test_under_torchrun_only_the_first_process_warns(caplog, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank, warnings in ((1, 0), (0, 1)):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger="gigapatch"):
            create_method(_cfg(z_cache="refresh", z_max_age=9)).set_epoch_length(10)
        assert caplog.text.count("z_max_age = ") == warnings, rank


def test_the_training_loop_tells_the_method_its_epoch_length(tiny_config, caplog):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.z_cache, cfg.method.z_max_age, cfg.train.epochs = "refresh", 0, 1
    with caplog.at_level("WARNING", logger="gigapatch"):
        train(cfg)
    assert "method.z_max_age = 0 optimizer steps is below the" in caplog.text


def test_the_on_disk_cache_round_trips(tmp_path):
    cache = ZCache(budget=3 * 64 * 4 + 64 * 8, spill_dir=tmp_path / "z")
    entries = {f"img{i}": (torch.randn(64, 3), torch.arange(64)) for i in range(4)}
    for key, (z, ages) in entries.items():
        cache.put(key, z.clone(), ages.clone())
    assert list(cache.items) == ["img3"] and set(cache.on_disk) == {"img0", "img1", "img2"}
    assert len(list((tmp_path / "z").glob("*.bin"))) == 6
    for key, (z, ages) in entries.items():
        got = cache.get(key)
        assert torch.equal(got[0], z) and torch.equal(got[1], ages)
    cache.clear()
    assert not (tmp_path / "z").exists() and cache.get("img0") is None


def test_refresh_needs_exactly_one_of_max_age_and_share():
    with pytest.raises(ConfigError, match="set exactly one of the two"):
        _cfg(z_cache="refresh")
    with pytest.raises(ConfigError, match="set exactly one of the two"):
        _cfg(z_cache="refresh", z_max_age=1, z_refresh=0.5)
    with pytest.raises(ConfigError, match="method.z_cache"):
        _cfg(z_cache="sometimes")
    cfg = _cfg(z_cache="epoch")
    cfg.method.name = "ips"
    with pytest.raises(ConfigError, match="method 'ips' has none"):
        cfg.validate()


def _dense_cfg(kind: str, **method) -> Config:
    cfg = Config(seed=0)
    cfg.task.kind = kind
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.method.name, cfg.method.inner_steps, cfg.method.sample_fraction = "patchgd", 2, 0.25
    if kind == "segment":
        cfg.model.encoder, cfg.model.latent_dim = "tiny_unet", 4
        cfg.model.head_width, cfg.model.head_layers = 6, 2
        cfg.method.patch_size, cfg.method.z_stride, cfg.method.fill_chunk = 16, 4, 5
    else:
        cfg.model.encoder = "fcos_tiny"
        cfg.method.patch_size, cfg.method.fill_chunk = 32, 5
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def _dense_targets(method, images: torch.Tensor):
    if method.task.dense:
        return method.task.random_targets(images.shape[0], tuple(images.shape[-2:]))
    return [{"boxes": torch.tensor([[3.0, 5.0, 40.0, 30.0], [20.0, 28.0, 60.0, 60.0]]),
             "labels": torch.tensor([1, 2])} for _ in range(images.shape[0])]


@pytest.mark.parametrize("kind", ["segment", "detect"])
def test_dense_and_detection_maps_cached_at_max_age_zero_are_the_exact_algorithm(kind):
    torch.manual_seed(0)
    exact = create_method(_dense_cfg(kind))
    cached = copy.deepcopy(exact)
    cached.cfg = _dense_cfg(kind, z_cache="refresh", z_max_age=0)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    _assert_same_weights(exact, cached, images, _dense_targets(exact, images))
    assert cached.z_cache.hits == 4 and len(cached.z_cache.items) == 2


@pytest.mark.parametrize("kind", ["segment", "detect"])
def test_dense_and_detection_steps_encode_only_the_stale_cells(kind, monkeypatch):
    torch.manual_seed(2)
    method = create_method(_dense_cfg(kind, z_cache="refresh", z_refresh=0.25, inner_steps=1))
    images = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    n = (64 // method.cfg.method.patch_size) ** 2
    targets = _dense_targets(method, images)
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.05))
    encoded = []
    real = PatchGD._fill_maps

    def counting(self, im, geos, encode, take=None, todo=None, into=None, **measure):
        encoded.append(n if todo is None else int(todo.sum()))
        return real(self, im, geos, encode, take, todo, into, **measure)

    monkeypatch.setattr(PatchGD, "_fill_maps", counting)
    for _ in range(3):
        method.train_step(images, targets, ctx)
    refresh = -(-n // 4)  # ⌈0.25·N⌉
    assert encoded == [n, refresh, refresh]
    (key, (z, ages)), = method.z_cache.entries()
    maps = method.level_geometry(images) if kind == "detect" else [method.geometry(images)]
    assert z.shape == (sum(method.latent_dim * g.size[0] * g.size[1] for g in maps),)
    assert ages.shape == (n,) and ages.min() >= 0 and int((ages == 2).sum()) >= refresh
    # the cached maps are the ones the next step starts from: its stale cells re-encoded
    method.cfg = _dense_cfg(kind, z_cache="epoch", inner_steps=1)
    with torch.no_grad():
        zs, _, _ = method._step_maps(images, maps, method.encode_levels if kind == "detect"
                                     else lambda x: [method.encode_map(x)],
                                     maps[0].grid.taker(images))
    assert torch.equal(torch.cat([m[0].flatten() for m in zs]), z)


@pytest.mark.parametrize("kind", ["segment", "detect"])
def test_dense_and_detection_maps_measure_their_staleness(kind):
    images = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)
    for lr in (0.0, 0.5):
        torch.manual_seed(2)
        method = create_method(_dense_cfg(kind, z_cache="refresh", z_refresh=0.25,
                                          inner_steps=1))
        n = (64 // method.cfg.method.patch_size) ** 2
        ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=lr))
        for _ in range(2):
            method.train_step(images, _dense_targets(method, images), ctx)
        stats = method.epoch_stats()
        assert stats["z_refreshed"] == -(-n // 4) / n  # the ⌈N/4⌉ oldest cells of N cached
        if lr == 0:  # θ1 unchanged: a re-encoded block is its cached value
            assert stats["z_staleness"] < 1e-5
        else:
            assert stats["z_staleness"] > 5e-4


@pytest.mark.parametrize("tolerance, correct", [(None, False), (10.0, False), (None, True)])
def test_a_resumed_run_with_a_cache_gives_the_uninterrupted_weights(tiny_config, monkeypatch,
                                                                     tolerance, correct):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.z_cache, cfg.method.z_refresh, cfg.method.z_cache_budget = "refresh", 0.25, "1KiB"
    cfg.method.z_tolerance, cfg.method.z_correct, cfg.train.epochs = tolerance, correct, 3
    if correct:  # few channels: the few pairs of these small images fit their maps
        cfg.model.latent_dim = 4
    whole = copy.deepcopy(cfg)
    whole.name = "whole"
    train(whole)
    want = load_checkpoint(Path(cfg.train.out_dir) / "whole" / "last.pt")
    assert len(want["method_state"]["z_cache"]) > 0  # the cache is saved with last.pt …
    assert list((Path(cfg.train.out_dir) / "whole" / "z_cache").glob("*.bin"))  # … and spilled
    assert "z_staleness" not in want["history"][0]  # epoch 1 found nothing cached
    assert want["history"][1]["z_refreshed"] > 0 and want["history"][1]["z_staleness"] > 0
    if tolerance is not None:  # the steered share, saved and restored with the cache
        assert want["method_state"]["z_share"]["share"] < 1
    if correct:  # the buckets' maps, saved and restored with the cache
        assert want["method_state"]["z_maps"] and want["history"][1]["z_corrected"] > 0
        assert "z_residual" in want["history"][2]

    calls = []
    real = PatchGD.train_step

    def crash_in_epoch_3(self, images, targets, ctx):
        calls.append(1)
        if len(calls) == 2 * steps_per_epoch + 1:
            raise KeyboardInterrupt
        return real(self, images, targets, ctx)

    rows = len(Path(cfg.data.train_csv).read_text().splitlines()) - 1
    steps_per_epoch = -(-rows // cfg.train.batch_size)
    monkeypatch.setattr(PatchGD, "train_step", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(cfg))
    monkeypatch.setattr(PatchGD, "train_step", real)
    train(copy.deepcopy(cfg), resume=True)
    got = load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "last.pt")
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, rtol=0, atol=0, msg=name)
    maps, want_maps = (c["method_state"].get("z_maps", {}) for c in (got, want))
    assert maps.keys() == want_maps.keys()  # the maps carried over the resume, too
    for bucket, (gram, cross, weight, solved) in want_maps.items():
        torch.testing.assert_close(maps[bucket][0], gram, rtol=0, atol=0)
        torch.testing.assert_close(maps[bucket][1], cross, rtol=0, atol=0)
        assert maps[bucket][2] == weight
        if solved is None:  # (not asked for since its last pairs)
            assert maps[bucket][3] is None
        else:  # the kept maps carried over too: the resumed run solves none again
            torch.testing.assert_close(maps[bucket][3], solved, rtol=0, atol=0)
    assert "method_state" not in load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "best.pt")


@pytest.mark.parametrize("kind", ["segment", "detect"])
def test_the_cache_is_host_memory_not_device_memory(kind):
    """The cached maps live on the host (on CUDA too): the CPU tracker books them with the
    host maps, so a cached step's device peak is no larger than the exact step's."""
    torch.manual_seed(0)
    big = {"segment": {"z_stride": 1, "sample_fraction": 1 / 256}, "detect": {
        "sample_fraction": 1 / 64}}[kind]  # maps large next to one patch's activations
    exact = create_method(_dense_cfg(kind, inner_steps=1, **big))
    cached = copy.deepcopy(exact)
    cached.cfg = _dense_cfg(kind, z_cache="refresh", z_refresh=0.25, inner_steps=1, **big)
    images = torch.randint(0, 256, (2, 1, 256, 256), dtype=torch.uint8)
    targets = _dense_targets(exact, images)
    peaks = {}
    for name, method in [("exact", exact), ("cached", cached)]:
        opt = torch.optim.SGD(method.parameters(), lr=0.01)
        ctx = StepContext(method, opt)
        method.train_step(images, targets, ctx)  # fills the cache
        peaks[name] = measure_step_peaks(lambda: method.train_step(images, targets, ctx),
                                         model=method, optimizer=opt)
    z_bytes = sum(z.nelement() * z.element_size() for _, (z, _) in cached.z_cache.entries())
    assert peaks["cached"].host_maps >= z_bytes > 2**20  # (the cells' ages: a few KiB)
    assert peaks["cached"].device <= peaks["exact"].device + 2**14, peaks


def test_a_cache_larger_than_z_cache_checkpoint_stays_out_of_last_pt(tiny_config, caplog):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.z_cache, cfg.method.z_refresh = "refresh", 0.25
    cfg.method.z_cache_checkpoint = "0"
    with caplog.at_level("INFO", logger="gigapatch"):
        train(copy.deepcopy(cfg))
    state = load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "last.pt")["method_state"]
    assert "z_cache" not in state and state["z_clock"] > 0
    assert "larger than method.z_cache_checkpoint" in caplog.text
    resumed = copy.deepcopy(cfg)
    resumed.train.epochs += 1  # a resume without the cache re-encodes each image, and trains
    train(resumed, resume=True)
    assert load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "last.pt")["epoch"] == \
        resumed.train.epochs - 1


def test_z_cache_checkpoint_must_be_a_size(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.z_cache_checkpoint = "lots"
    with pytest.raises(ConfigError, match="method.z_cache_checkpoint"):
        cfg.validate()
