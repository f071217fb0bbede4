"""The ClientApp's cheap paths: a QUERY without the training stack, the message types a site accepts,
and a declared profile's compute bytes known without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from client_app.client_app import _profile, accepted_messages, query
from fedpipe_core.device import compute_dtype, resolve_device
from fedpipe_core.profile import device_compute_bytes
from fedpipe_flower.messages import profile_query, read_profile, read_query_timing


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_the_clientapp_module_and_a_declared_query_load_no_training_stack():
    code = (
        "import sys; from flwr.app import Context, RecordDict; import client_app.client_app as c;"
        "p = c._profile(Context(1, 1, {'memory-gb': 2.0, 'tflops': 9.0, 'device': 'cpu'}, RecordDict(), {}));"
        "print(p.compute_bytes, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["4", "[]"]


def test_a_query_reply_carries_the_profile_its_place_and_what_it_cost():
    reply = query(profile_query(7), _context({"memory-gb": 2.0, "tflops": 9.0}))
    profile, place = read_profile(reply)
    assert profile.source == "declared" and profile.memory_bytes == 2.0 * 2**30 and profile.flops == 9e12
    assert place is None  # a site that sets no partition-id has no place: the server orders it by node id
    assert 0 <= read_query_timing(reply) < 600
    _, place = read_profile(query(profile_query(7), _context({"memory-gb": 2.0, "tflops": 9.0, "partition-id": 3})))
    assert place == 3


def test_a_site_answers_only_the_message_types_it_lists():
    answered = []

    def handler(msg: Message, context: Context) -> Message:
        answered.append(msg.metadata.message_type)
        return Message(RecordDict(), reply_to=msg)

    train = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    refused = accepted_messages(profile_query(7), _context({"messages": "train"}), handler)
    assert refused.has_error() and "does not answer 'query' messages" in refused.error.reason
    assert not accepted_messages(train, _context({"messages": "train"}), handler).has_error()
    assert not accepted_messages(train, _context({}), handler).has_error()  # default: query, train and evaluate
    final = Message(RecordDict(), dst_node_id=7, message_type=MessageType.EVALUATE)
    assert not accepted_messages(final, _context({}), handler).has_error()
    no_scoring = accepted_messages(final, _context({"messages": "query,train"}), handler)  # a site refusing final scoring
    assert no_scoring.has_error() and "does not answer 'evaluate' messages" in no_scoring.error.reason
    typo = accepted_messages(train, _context({"messages": "train,evalute"}), handler)
    assert typo.has_error() and "['evalute'] not among" in typo.error.reason
    assert answered == [MessageType.TRAIN, MessageType.TRAIN, MessageType.EVALUATE]


def test_compute_bytes_without_torch_agree_with_the_training_device():
    for device in ("auto", "cpu"):
        assert device_compute_bytes(device) == compute_dtype(resolve_device(device)).itemsize
    assert device_compute_bytes("cuda") == device_compute_bytes("cuda:1") == 2
    with pytest.raises(ValueError, match="'tpu' is not auto, cpu, cuda or cuda:N"):
        device_compute_bytes("tpu")
    assert _profile(_context({"memory-gb": 1.0, "tflops": 1.0, "device": "cuda"})).compute_bytes == 2
