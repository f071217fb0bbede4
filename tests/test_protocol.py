"""The message protocol: every key written and read in one place, bad messages named precisely."""

import pytest

from fedpipe_core.node.round import ROUTINES
from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import (
    MODES,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    UpdateError,
    place_from_config,
    place_of,
    profile_from_config,
    profile_to_config,
)
from fedpipe_core.strategies import STRATEGIES


def test_train_instruction_round_trips_and_names_what_is_missing():
    order = TrainInstruction(3, "fedpipe", {"model.layers.0.self_attn.q_proj": 8}, 5, 6, "nf4", state_from=1, state_to=2)
    assert TrainInstruction.from_config(order.to_config()) == order
    config = order.to_config()
    del config["batch-size"]
    with pytest.raises(ProtocolError, match="lacks 'batch-size'"):
        TrainInstruction.from_config(config)
    with pytest.raises(ProtocolError, match="unknown train mode 'sgd'"):
        TrainInstruction.from_config({**order.to_config(), "mode": "sgd"})
    with pytest.raises(ProtocolError, match="malformed"):
        TrainInstruction.from_config({**order.to_config(), "ranks": "{not json"})


def test_train_reply_round_trips_and_rejects_unusable_reports():
    reply = TrainReply(
        12,
        1.5,
        steps=6,
        state_version=2,
        profile=ClientProfile(2e9, 3e13, "reported", compute_bytes=2),
        train_s=4.0,
        setup_s=1.0,
        startup_s=0.5,
        importance={"m": 0.25},
        model_bytes=173_000_000,
        peak_bytes=400_000_000,
    )
    assert TrainReply.from_metrics(reply.to_metrics()) == reply
    assert reply.timing() == {"train-s": 4.0, "setup-s": 1.0, "startup-s": 0.5}
    assert TrainReply(12, 1.5, train_s=0.0, setup_s=1.0, startup_s=0.0).timing() is None  # no training time to set against
    metrics = reply.to_metrics()
    for key, value, fragment in (
        ("num-examples", 0, "positive integer"),
        ("num-examples", True, "positive integer"),
        ("train-loss", float("inf"), "not finite"),
    ):
        with pytest.raises(UpdateError, match=fragment):
            TrainReply.from_metrics({**metrics, key: value})
    with pytest.raises(UpdateError, match="lack 'train-loss'"):
        TrainReply.from_metrics({"num-examples": 3})
    # an unusable profile or importance is dropped; the update itself stays usable
    lenient = TrainReply.from_metrics({**metrics, "profile-flops": -1.0, "importance::m": float("nan"), "peak-memory-bytes": -5})
    assert lenient.profile is None and lenient.importance == {} and lenient.peak_bytes is None


def test_profiles_travel_and_must_be_positive():
    profile = ClientProfile(2e9, 3e13, "declared", compute_bytes=2)
    assert profile_from_config(profile_to_config(profile)) == profile
    with pytest.raises(ValueError, match="must be > 0"):
        profile_from_config({**profile_to_config(profile), "memory-bytes": 0.0})
    with pytest.raises(ValueError, match="compute bytes 3 must be 2"):
        profile_from_config({**profile_to_config(profile), "compute-bytes": 3})
    older = {k: v for k, v in profile_to_config(profile).items() if k != "compute-bytes"}
    assert profile_from_config(older).compute_bytes == 4  # a node that does not say computes in FP32


def test_a_place_is_a_partition_id_and_a_bad_one_is_named():
    assert place_of({"partition-id": 2, "num-partitions": 4}) == 2 and place_of({"data-path": "/site"}) is None
    with pytest.raises(ValueError, match="node config 'partition-id' = 'a' is not an integer >= 0"):
        place_of({"partition-id": "a"})
    assert place_from_config({"place": 0}) == 0 and place_from_config({"flops": 1.0}) is None
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match=f"'place' = {bad!r} is not an integer >= 0"):
            place_from_config({"place": bad})


def test_every_mode_a_strategy_sends_has_a_local_routine():
    assert {cls.mode for cls in STRATEGIES.values()} <= set(MODES) == set(ROUTINES)


def test_arrays_travel_packed_in_a_few_objects_whatever_the_number_of_weights():
    """A message's Flower objects do not grow with the number of adapted weights: one flat Array per dtype."""
    import numpy as np
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedpipe_flower.messages import from_record, to_record

    def objects(n_modules: int) -> int:
        rng = np.random.default_rng(n_modules)
        arrays = {f"m{i}::{p}": rng.standard_normal((4, 8)).astype(np.float32) for i in range(n_modules) for p in "AB"}
        msg = Message(RecordDict({"arrays": to_record(arrays)}), dst_node_id=1, message_type=MessageType.TRAIN)
        return len(get_all_nested_objects(msg))

    assert objects(2) == objects(176)  # TinyLlama's attention weights × (A, B): as few objects as 2 of them
    arrays = {
        "m::A": np.arange(12, dtype=np.float32).reshape(3, 4),
        "m::B": np.ones((5, 3), np.float32, order="F")[:, ::-1],  # not contiguous
        "words": np.arange(6, dtype=np.uint64).reshape(2, 3),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 4), np.float32),
    }
    back = from_record(to_record(arrays))
    assert list(back) == list(arrays)  # order kept
    for key, value in arrays.items():
        assert back[key].dtype == np.asarray(value).dtype and back[key].shape == np.shape(value), key
        np.testing.assert_array_equal(back[key], value)
    assert from_record(to_record({})) == {} and to_record({}).count_bytes() == 0  # round 1 sends nothing down
    with pytest.raises(TypeError, match="'bad'"):
        to_record({"bad": np.array([object()])})
