"""The Z cache's staleness figures and the refresh share steered by them
(:mod:`gigapatch.methods.z_staleness`)."""

import pytest
import torch

from gigapatch.methods.z_staleness import (AdaptiveShare, BucketMaps, Staleness, affine_sums,
                                           apply_affine, fit_affine, relative_change,
                                           solve_affine)


def test_relative_change_is_the_per_cell_norm_of_the_change_over_the_new_norm():
    new = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    old = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    torch.testing.assert_close(relative_change(new, old), torch.tensor([0.8, 0.0, 0.0]))
    blocks = torch.ones(2, 3, 2, 2)  # (P, C, q, q) blocks of dense maps: one change per block
    torch.testing.assert_close(relative_change(blocks, 0.5 * blocks), torch.tensor([0.5, 0.5]))


def test_staleness_averages_an_epoch_of_fills_then_starts_again():
    s = Staleness()
    assert s.epoch_stats() == {}  # nothing cached yet (the first epoch): no figure
    s.add(torch.tensor([0.1, 0.3]), cached=8)
    s.add(torch.tensor([0.2]), cached=4)
    stats = s.epoch_stats()
    assert stats["z_staleness"] == pytest.approx(0.2) and stats["z_refreshed"] == 0.25
    s.add(torch.tensor([]), cached=4)  # cached cells found, none re-encoded
    assert s.epoch_stats() == {"z_staleness": 0.0, "z_refreshed": 0.0}


def test_the_share_doubles_above_the_tolerance_and_shrinks_below_half_of_it():
    share = AdaptiveShare(floor=0.1, tolerance=0.04)
    assert share.share == 1.0  # the run starts filling exactly
    share.update(0.01)
    assert share.share == 0.75
    share.update(0.03)  # between half the tolerance and the tolerance: kept
    assert share.share == 0.75
    for _ in range(20):
        share.update(0.0)
    assert share.share == 0.1  # never below method.z_refresh
    share.update(0.05)
    assert share.share == pytest.approx(0.2)
    for _ in range(5):
        share.update(1.0)
    assert share.share == 1.0  # never above every cell
    moved = AdaptiveShare(0.1, 0.04)
    moved.update(0.0)
    again = AdaptiveShare(0.1, 0.04)
    again.load_state_dict(moved.state_dict())
    assert again.share == moved.share == 0.75


def test_fit_affine_recovers_an_affine_map_and_stays_tame_on_few_pairs():
    torch.manual_seed(0)
    old = torch.randn(200, 8)
    a, b = torch.eye(8) + 0.3 * torch.randn(8, 8), torch.randn(8)
    new = old @ a + b
    w = fit_affine(old, new, ridge=0.0)
    torch.testing.assert_close(apply_affine(old, w), new, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w[:-1], a, atol=1e-4, rtol=1e-4)
    few = fit_affine(old[:3], new[:3])  # 3 pairs for 72 numbers: the ridge keeps it finite
    assert torch.isfinite(few).all()
    same = fit_affine(old[:3], old[:3])  # pairs that did not change: no change
    torch.testing.assert_close(apply_affine(old, same), old, atol=1e-4, rtol=1e-4)
    half = apply_affine(old.to(torch.bfloat16), w)  # in the cache's dtype
    assert half.dtype == torch.bfloat16


def test_bucket_maps_fit_the_decayed_sums_of_every_fills_pairs_and_drop_spent_buckets():
    torch.manual_seed(0)
    maps = BucketMaps(decay=0.5, reach=0)  # own pairs only (borrowing: below)
    x1, x2 = torch.randn(12, 4), torch.randn(6, 4)
    y1, y2 = x1 @ torch.randn(4, 4), x2 @ torch.randn(4, 4)
    maps.step()  # nothing yet: a no-op
    maps.add(7, x1, y1)
    torch.testing.assert_close(maps.map(7, 5), fit_affine(x1, y1))  # one fill: its own fit
    assert maps.map(7, 13) is None and maps.map(3, 1) is None  # too few pairs; no pairs
    maps.step()
    maps.add(7, x2, y2)  # 0.5·12 + 6 = 12 pairs' weight
    g1, c1 = affine_sums(x1, y1)
    g2, c2 = affine_sums(x2, y2)
    torch.testing.assert_close(maps.map(7, 12), solve_affine(0.5 * g1 + g2, 0.5 * c1 + c2))
    assert maps.map(7, 12.5) is None
    state = maps.state_dict()
    again = BucketMaps(decay=0.5, reach=0)
    again.load_state_dict(state)
    torch.testing.assert_close(again.map(7, 1), maps.map(7, 1), rtol=0, atol=0)  # round trip
    for _ in range(3):
        maps.step()  # 12 → 6 → 3 → 1.5 pairs
    assert maps.map(7, 1) is not None
    maps.step()  # 0.75 < 1 pair: dropped
    assert maps.sums == {}


def test_solve_affine_batched_gives_each_pair_of_sums_its_own_map_and_ridge():
    torch.manual_seed(0)
    sums = [affine_sums(torch.randn(n, 4), torch.randn(n, 4)) for n in (3, 20, 50)]
    sums[0] = (100 * sums[0][0], 100 * sums[0][1])  # another scale: its own ridge
    batched = solve_affine(torch.stack([g for g, _ in sums]), torch.stack([x for _, x in sums]))
    assert batched.shape == (3, 5, 4)
    for w, (g, x) in zip(batched, sums):
        torch.testing.assert_close(w, solve_affine(g, x), rtol=1e-5, atol=1e-6)


def test_bucket_maps_keep_a_solved_map_through_the_decay_until_new_pairs_come(monkeypatch):
    torch.manual_seed(0)
    maps = BucketMaps(decay=0.5, reach=0)
    maps.add(1, torch.randn(12, 4), torch.randn(12, 4))
    maps.add(2, torch.randn(12, 4), torch.randn(12, 4))
    first = maps.maps([1, 2, 3], 5)  # bucket 3 has no pairs
    assert first.keys() == {1, 2}
    solves = []
    real = solve_affine

    def counted(gram, cross, *args):
        solves.append(len(gram))
        return real(gram, cross, *args)

    monkeypatch.setattr("gigapatch.methods.z_staleness.solve_affine", counted)
    maps.step()  # the decay scales sums and ridge alike: the kept maps are the solution still
    for b in (1, 2):
        g, x = maps.sums[b][:2]
        torch.testing.assert_close(first[b], real(g, x), rtol=1e-5, atol=1e-6)
    again = maps.maps([1, 2], 5)
    assert solves == [] and all(again[b] is first[b] for b in (1, 2))  # none solved again
    maps.add(2, torch.randn(6, 4), torch.randn(6, 4))
    third = maps.maps([1, 2], 5)
    assert solves == [1] and third[1] is first[1]  # only bucket 2, which got pairs
    g, x = maps.sums[2][:2]
    torch.testing.assert_close(third[2], real(g, x), rtol=0, atol=0)
    old = {b: e[:3] for b, e in maps.state_dict().items()}  # an earlier version's state
    fresh = BucketMaps(decay=0.5, reach=0)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.map(2, 5), third[2], rtol=0, atol=0)  # solved on ask


def test_a_thin_bucket_borrows_its_nearest_neighbours_pairs_widening_up_to_the_reach():
    torch.manual_seed(0)
    maps = BucketMaps(reach=2)
    pairs = {b: (torch.randn(n, 4), torch.randn(n, 4)) for b, n in
             ((10, 3), (11, 4), (13, 6), (20, 9))}
    for b, (x, y) in pairs.items():
        maps.add(b, x, y)

    def fit(*buckets):
        sums = [affine_sums(*pairs[b]) for b in buckets]
        return solve_affine(sum(g for g, _ in sums), sum(x for _, x in sums))

    got = maps.maps([10, 11, 12, 13, 17, 20, 30], 9)
    assert got.keys() == {11, 12, 13, 20}
    torch.testing.assert_close(got[20], fit(20))  # its own pairs weigh enough
    torch.testing.assert_close(got[11], fit(10, 11, 13))  # ±1: 3 + 4 < 9; ±2: + 6 = 13
    torch.testing.assert_close(got[12], fit(11, 13))  # ±1: 4 + 6 = 10 pairs
    torch.testing.assert_close(got[13], fit(11, 13))  # own 6; ±1: 6; ±2: 11 … 15: 10
    # 10: ±2 (8 … 12) still only 3 + 4; 17 and 30: no pairs within 2 buckets
    assert maps.map(17, 9) is None and maps.map(30, 1) is None
    assert maps.map(15, 6) is not None  # ±2 reaches 13's 6 pairs
