"""Stack assembly: rank concatenation is exactly the weighted sum of the adapters' deltas."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.make_adapter import random_canonical
from inference.lora.stack import assemble, stack_key
from inference.models import SMOLLM2_135M_INSTRUCT

SPEC = SMOLLM2_135M_INSTRUCT


def layer(seed: int, rank: int, modules: tuple[str, ...] = ("q_proj", "v_proj"), blocks: tuple[int, ...] = (0, 1)):
    return random_canonical(SPEC, rank, modules, blocks, seed)


def test_concatenated_stack_equals_the_weighted_sum_of_each_adapter() -> None:
    layers = [("a", 0.5, layer(1, 4), 2.0), ("b", 1.0, layer(2, 8), 0.5), ("c", 0.25, layer(3, 2), 4.0)]
    stack = assemble(layers)
    x = np.random.default_rng(0).standard_normal((5, SPEC.hidden_size)).astype(np.float64)
    for module, (a_cat, b_cat) in stack.modules.items():
        assert a_cat.shape == (14, SPEC.hidden_size) and b_cat.shape[1] == 14
        expected = sum(w * s * (x @ c[module][0].T.astype(np.float64)) @ c[module][1].T for _, w, c, s in layers)
        got = (x @ a_cat.T.astype(np.float64)) @ b_cat.T.astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)


def test_modules_of_only_some_layers_get_only_those_layers_blocks() -> None:
    stack = assemble([("q", 1.0, layer(1, 4, ("q_proj",)), 1.0), ("qv", 1.0, layer(2, 2), 1.0)])
    assert stack.modules["layers.0.q_proj"][0].shape[0] == 6
    assert stack.modules["layers.0.v_proj"][0].shape[0] == 2


def test_the_order_is_kept_as_precedence_and_changes_the_key_not_the_sum() -> None:
    first, second = ("a", 0.5, layer(1, 4), 2.0), ("b", 1.0, layer(2, 4), 1.0)
    ab, ba = assemble([first, second]), assemble([second, first])
    assert ab.layers == (("a", 0.5), ("b", 1.0)) and ba.layers == (("b", 1.0), ("a", 0.5))
    assert ab.key != ba.key
    a1, b1 = ab.modules["layers.1.v_proj"]
    a2, b2 = ba.modules["layers.1.v_proj"]
    np.testing.assert_allclose(b1 @ a1, b2 @ a2, rtol=1e-5, atol=1e-7)


def test_the_key_hashes_ids_and_exact_weights() -> None:
    assert stack_key([("a", 0.1)]) == stack_key([("a", 0.1)])
    assert stack_key([("a", 0.1)]) != stack_key([("a", 0.1000000001)])
    assert assemble([("a", 0.5, layer(1, 2), 1.0)]).key == stack_key([("a", 0.5)])


def test_zero_weight_layers_add_no_rank_and_the_stack_is_read_only() -> None:
    stack = assemble([("a", 0.0, layer(1, 4), 2.0), ("b", 1.0, layer(2, 2), 1.0)])
    a_cat, b_cat = stack.modules["layers.0.q_proj"]
    assert a_cat.shape[0] == 2 and a_cat.dtype == b_cat.dtype == np.float32
    with pytest.raises(ValueError, match="read-only"):
        a_cat[0, 0] = 1.0


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([("a", 1.0, {}, 1.0), ("a", 0.5, {}, 1.0)], "expected each layer once, got 'a' twice"),
        ([("a", float("nan"), {}, 1.0)], "layer 'a': expected a finite weight, got nan"),
        ([("a", 1.0, {}, float("inf"))], "layer 'a': expected a finite scale, got inf"),
        (
            [("a", 1.0, {"layers.0.q_proj": (np.zeros((2, 8), np.float32), np.zeros((4, 3), np.float32))}, 1.0)],
            r"layer 'a', layers.0.q_proj: expected A \(r, in\) and B \(out, r\), got \(2, 8\) and \(4, 3\)",
        ),
        (
            [
                ("a", 1.0, {"layers.0.q_proj": (np.zeros((2, 8), np.float32), np.zeros((4, 2), np.float32))}, 1.0),
                ("b", 1.0, {"layers.0.q_proj": (np.zeros((2, 9), np.float32), np.zeros((4, 2), np.float32))}, 1.0),
            ],
            r"layer 'b', layers.0.q_proj: expected \(in, out\) = \(8, 4\) like the layers before it, got \(9, 4\)",
        ),
    ],
)
def test_bad_stacks_are_refused_with_what_is_wrong(layers: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assemble(layers)
