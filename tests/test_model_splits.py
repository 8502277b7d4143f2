"""Hash splits: deterministic, disjoint, order-free, with the stated fractions."""

import hashlib

import numpy as np
import pyarrow as pa

from speclabel.model.splits import SplitRule, hash_uniform

IDS = [f"GES-{i:06d}" for i in range(4000)]


def test_hash_is_sha256_of_salt_and_id():
    digest = hashlib.sha256(b"salt\x00abc").digest()
    assert hash_uniform(["abc"], "salt")[0] == int.from_bytes(digest[:8], "big") / 2.0**64


def test_splits_are_deterministic_disjoint_and_order_free():
    rule = SplitRule(test_fraction=0.1, val_fraction=0.2)
    test = rule.is_test(IDS)
    assert abs(test.mean() - 0.1) < 0.02
    for seed in (0, 1):
        train, val = rule.member_masks(IDS, seed)
        assert not (train & val).any() and not (train & test).any() and not (val & test).any()
        assert (train | val | test).all()
        assert abs(val.sum() / (~test).sum() - 0.2) < 0.03
        # The same id gets the same split whatever else is in the batch and in whatever order.
        order = np.random.default_rng(seed).permutation(len(IDS))
        train_shuffled, val_shuffled = rule.member_masks([IDS[i] for i in order], seed)
        assert np.array_equal(train_shuffled, train[order]) and np.array_equal(val_shuffled, val[order])
    # Members share the test split but draw different validation rows.
    _, val0 = rule.member_masks(IDS, 0)
    _, val1 = rule.member_masks(IDS, 1)
    assert not np.array_equal(val0, val1)
    assert list(rule.split_of(IDS[:50], 0)) == [
        "test" if t else ("val" if v else "train") for t, v in zip(test[:50], val0[:50], strict=True)
    ]


def test_arrow_ids_and_rule_round_trip():
    rule = SplitRule(test_fraction=0.15)
    assert np.array_equal(rule.is_test(pa.chunked_array([IDS[:10], IDS[10:100]])), rule.is_test(IDS[:100]))
    assert SplitRule.from_dict(rule.to_dict()) == rule
    assert "sha256" in rule.to_dict()["rule"]
