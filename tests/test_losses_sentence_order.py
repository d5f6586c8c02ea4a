"""Sentence-order labels against hand-computed values."""

from __future__ import annotations

import itertools

from ftray.methods.losses import sentence_order_label


def test_sentence_order_label_hand_computed():
    assert sentence_order_label((0, 1, 2)) == 0
    assert sentence_order_label((0, 2, 1)) == 1
    assert sentence_order_label((1, 0, 2)) == 2
    assert sentence_order_label((2, 1, 0)) == 5
    assert sentence_order_label((1, 0)) == 1


def test_sentence_order_label_is_a_bijection():
    assert [sentence_order_label(p) for p in itertools.permutations(range(4))] == list(range(24))
