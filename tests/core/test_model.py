"""A model and a trainer given a batch of no samples."""

from __future__ import annotations

import numpy as np
import pytest

from tests.core.backends import CASES, _batches, trainer


@pytest.mark.parametrize("name", sorted(CASES))  # every layer type is in one of them
def test_a_batch_of_no_samples_has_no_outputs_and_changes_nothing(name: str) -> None:
    case = CASES[name]
    subject, fresh = trainer(case), trainer(case)
    model = subject.model
    x, y = _batches(case, seed=0)[0]
    subject.compute_gradients(x, y)  # gradients that are not zero
    before = model.state_dict()

    for training in (False, True):
        outputs = model.forward(x[:0], training=training)
        assert outputs.shape == (0, *model.output_shape) and outputs.dtype == np.float32
    assert subject.predict(x[:0]).shape == (0, *model.output_shape)

    # Its backward leaves the gradients it was to overwrite at zero, and the next
    # batch's backward adds to them: the gradients of that batch alone.
    model.zero_grad()
    model.forward(x[:0], training=True)
    model.backward(np.zeros((0, *model.output_shape), dtype=np.float32))
    for layer in model.layers:
        for key, grad in layer.grads.items():
            assert not grad.any(), f"{layer.type} {key}"
    _same_state(model.state_dict(), before)  # batchnorm's statistics too
    subject.compute_gradients(x, y)
    fresh.model.zero_grad()
    fresh.compute_gradients(x, y)
    for pairs, fresh_pairs in zip(
        subject._layer_params.values(), fresh._layer_params.values(), strict=True
    ):
        for (_, grad), (_, want) in zip(pairs, fresh_pairs, strict=True):
            np.testing.assert_array_equal(grad, want)

    # No training step on it: a clear error, and the weights and statistics as they were.
    before = model.state_dict()
    with pytest.raises(ValueError, match="at least one sample"):
        subject.train_step(x[:0], y[:0], steps_per_epoch=1, total_steps=1)
    _same_state(model.state_dict(), before)
    assert subject.step == 0


def _same_state(state: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> None:
    assert state.keys() == before.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_a_batch_of_no_samples_of_the_wrong_shape_is_refused() -> None:
    model = trainer(CASES["mlp"]).model
    with pytest.raises(ValueError, match=r"inputs must be \(batch, 6\), got \(0, 5\)"):
        model.forward(np.zeros((0, 5), dtype=np.float32))
