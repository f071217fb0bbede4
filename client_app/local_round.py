"""A TRAIN or EVALUATE message run in the ClientApp's process: the instruction read, the site's round
(:mod:`fedpipe_core.node.round`) run, its report sent back; a refusal is an error reply.

Imported by the ClientApp only when such a message arrives (torch, transformers and peft load here), so that a
QUERY is answered without them.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from fedpipe_core.node.round import RoundRefused, final_scores, train_round
from fedpipe_flower.messages import final_reply, read_final, read_instruction, train_reply


def train(msg: Message, context: Context, entered: float, startup_s: float) -> Message:
    """One local round in this process (:func:`~fedpipe_core.node.round.train_round`) as a reply to ``msg``."""
    order, payload = read_instruction(msg)
    try:
        arrays, report = train_round(context, order, payload, entered, startup_s)
    except RoundRefused as refusal:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(refusal)), reply_to=msg)
    return train_reply(msg, arrays, report)


def evaluate(msg: Message, context: Context) -> Message:
    """After the last round: this site's scores of the final model (:func:`~fedpipe_core.node.round.final_scores`)."""
    order, payload = read_final(msg)
    return final_reply(msg, final_scores(context, order, payload))
