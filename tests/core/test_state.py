"""Checkpoints: a resumed run is bit for bit the run that never stopped; nothing is unpickled."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core import Trainer, build_model, fit
from core.checkpoint import from_npz_bytes, to_npz_bytes
from core.spec import parse_job_spec
from tests.factories import STATEFUL_CNN, digits_job, digits_subset, tiny_cnn_spec


@pytest.fixture(scope="module")
def dataset() -> Any:
    return digits_subset(240, n_test=60)


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return digits_job(STATEFUL_CNN, optimizer={"type": "adam", "lr": 0.01}, epochs=2, batch_size=32)


def _assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert np.array_equal(a[name], b[name]), name


def _without_timings(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in ("samples_per_s", "epoch_time_s")}


def test_resumed_training_equals_uninterrupted_training(dataset: Any, job: dict[str, Any]) -> None:
    straight = fit(job, dataset)
    first = fit(job, dataset, until_epoch=1)
    assert first.trainer.epoch == 1 and len(first.history) == 1
    assert first.test == {}  # the test split is scored only at the end of training
    checkpoint = first.trainer.save()
    resumed = fit(job, dataset, resume=checkpoint)

    assert resumed.trainer.epoch == 2 and resumed.trainer.step == straight.trainer.step
    state = straight.trainer.state_dict()
    for prefix in ("model/", "optim/", "trainer/", "rng/"):
        assert any(name.startswith(prefix) for name in state), prefix
    assert {"model/1.running_mean", "model/1.running_var", "optim/0.W.exp_avg_sq"} <= set(state)
    _assert_same_state(state, resumed.trainer.state_dict())
    assert len(resumed.history) == 1
    assert _without_timings(resumed.history[0]) == _without_timings(straight.history[1])
    assert _without_timings(first.history[0]) == _without_timings(straight.history[0])
    assert resumed.test == straight.test and "test_accuracy" in straight.test


def test_resume_depends_on_the_saved_optimizer_state(dataset: Any, job: dict[str, Any]) -> None:
    """The round trip above is meaningful: resuming with fresh Adam moments ends elsewhere."""
    straight = fit(job, dataset)
    state = from_npz_bytes(fit(job, dataset, until_epoch=1).trainer.save())
    for name in state:
        if name.startswith("optim/") and name.endswith(("exp_avg", "exp_avg_sq")):
            state[name] = np.zeros_like(state[name])
    resumed = fit(job, dataset, resume=to_npz_bytes(state))
    a, b = straight.trainer.state_dict(), resumed.trainer.state_dict()
    assert not np.array_equal(a["model/6.W"], b["model/6.W"])


def test_checkpoint_holds_only_plain_arrays(dataset: Any, job: dict[str, Any]) -> None:
    checkpoint = fit(job, dataset, until_epoch=1).trainer.save()
    with np.load(io.BytesIO(checkpoint), allow_pickle=False) as archive:
        for name in archive.files:
            assert archive[name].dtype.kind in "biuf", name


def test_on_checkpoint_receives_loadable_states(dataset: Any) -> None:
    job = digits_job(epochs=3, checkpoint_every_epochs=2)
    saved: list[tuple[int, bytes]] = []
    result = fit(job, dataset, on_checkpoint=lambda epoch, data: saved.append((epoch, data)))
    assert [epoch for epoch, _ in saved] == [2, 3]  # every 2 epochs, and the last one
    trainer = Trainer.for_job(parse_job_spec(job), dataset)
    trainer.load(saved[-1][1])
    assert trainer.epoch == 3
    _assert_same_state(trainer.state_dict(), result.trainer.state_dict())


class _Marker:
    """Unpickling this object would create ``path``: proof that something unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _npz_with_object_array(marker: Path, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    payload = np.empty(1, dtype=object)
    payload[0] = _Marker(marker)
    np.savez(buffer, payload=payload, **arrays)
    return buffer.getvalue()


def test_object_arrays_in_a_checkpoint_are_refused_unopened(
    tmp_path: Path, dataset: Any, job: dict[str, Any]
) -> None:
    marker = tmp_path / "unpickled"
    # the payload really would run on a pickle load
    pickle.loads(pickle.dumps(_Marker(marker)))
    assert marker.exists()
    marker.unlink()

    data = _npz_with_object_array(marker, weights=np.zeros(3))
    with pytest.raises(ValueError, match="allow_pickle"):
        from_npz_bytes(data)
    trainer = Trainer.for_job(parse_job_spec(job), dataset)
    with pytest.raises(ValueError, match="allow_pickle"):
        trainer.load(data)
    with pytest.raises(ValueError, match="allow_pickle"):
        fit(job, dataset, resume=data)
    assert not marker.exists()


def test_model_state_dict_round_trip_and_mismatches(rng: np.random.Generator) -> None:
    spec = tiny_cnn_spec()
    model = build_model(spec, (1, 8, 8), seed=1)
    other = build_model(spec, (1, 8, 8), seed=2)
    state = model.state_dict()
    assert sorted(state) == ["0.W", "0.b", "4.W", "4.b"]
    assert not np.array_equal(state["0.W"], other.state_dict()["0.W"])
    other.load_state_dict(from_npz_bytes(to_npz_bytes(state)))
    _assert_same_state(other.state_dict(), state)
    x = rng.random((2, 1, 8, 8))
    np.testing.assert_array_equal(other.forward(x), model.forward(x))

    state["0.W"][...] = 7.0
    assert not np.any(model.layers[0].params["W"] == 7.0), "state_dict hands out copies"
    with pytest.raises(ValueError, match=r"missing \['4.b'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "4.b"})
    with pytest.raises(ValueError, match="0.b: shape"):
        other.load_state_dict({**state, "0.b": np.zeros(5)})
