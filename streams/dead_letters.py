"""Dead letters that always fit, and what happens to one the broker refuses anyway.

A dead letter (``schemas/dead_letter.avsc``) carries the record that could not be decided:
its key and value with card-number-like digit runs masked, cut to a bound
(``FRAUDSTREAM_CODEC_DEAD_LETTER_MAX_BYTES`` for the value, :data:`KEY_MAX_BYTES` for the
key), with the value's original size, the sha256 of its original bytes and ``truncated``
when anything was cut. So a 5 MB record becomes a dead letter of about 64 KiB, far under
any producer's ``message.max.bytes``: no record can stop its partition that way.

The sha256 is left out (null) when the original held a card-number-like run: an unkeyed
hash next to the masked bytes would let anyone recover the card number by trying the
masked digits (a card number has about 10^11 candidates once its last four are known).

If the broker still refuses a dead letter
(:class:`fraudstream.streams.worker.delivery.BatchCommitter`), it
is sent again without its key and value (:meth:`DeadLetters.without_payload`, the reason
says why); if that is refused too, the dead letter is lost: one error line naming the
source topic, partition and offset, and ``fraudstream_dead_letters_lost_total``. The
batch goes on either way, so its partition is never stalled by one dead letter.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fraudstream.schemas.codec import AvroCodec
from fraudstream.schemas.validate import mask_pans, may_hold_pan

#: A Kafka key is a card token or a transaction id; past this it is cut.
KEY_MAX_BYTES = 1024
#: Reasons are one line; a decoder's message could quote much of a record.
REASON_MAX_CHARS = 1000


#: Bytes past the cut that are masked with the kept ones: a card number (19 digits and
#: 18 separators at most, and a glued digit) that straddles the cut is masked whole.
_MARGIN = 64


def _bounded(data: bytes | None, limit: int) -> tuple[bytes | None, bool, bool]:
    """``data`` cut to ``limit`` bytes and masked (with a margin past the cut, so a card
    number that straddles it is masked too); whether it was cut; whether it may hold a
    card number (exact when not cut; past the cut, any 13-digit run counts)."""
    if data is None:
        return None, False, False
    if len(data) <= limit:
        masked = mask_pans(data, glued=True)
        assert masked is not None
        return masked, False, masked != data
    kept = (mask_pans(data[:limit + _MARGIN], glued=True) or b"")[:limit]
    return kept, True, kept != data[:limit] or may_hold_pan(data[limit:])


class DeadLetters:
    """Builds dead letters for one dead-letter codec, within ``max_value_bytes``."""

    def __init__(self, codec: AvroCodec, max_value_bytes: int) -> None:
        self.codec = codec
        self.max_value_bytes = max(0, max_value_bytes)

    def build(self, rec: Any, kind: str, field: str | None, reason: str,
              now_ms: int) -> tuple[bytes | None, bytes]:
        """(key, value) of the dead letter for ``rec`` (a :class:`RawRecord`)."""
        key, key_cut, _ = _bounded(rec.key, KEY_MAX_BYTES)
        original = rec.value
        value, value_cut, masked = _bounded(original, self.max_value_bytes)
        digest = None
        if original is not None and not masked:
            digest = hashlib.sha256(original).hexdigest()
        if value_cut:
            reason = f"{reason} (value cut to its first {len(value or b'')} bytes)"
        encoded = self.codec.encode({
            "source_topic": rec.topic,
            "source_partition": rec.partition,
            "source_offset": rec.offset,
            "key": key,
            "value": value,
            "error_kind": kind,
            "field": field,
            "reason": self._reason(reason),
            "failed_at": now_ms,
            "value_size": None if original is None else len(original),
            "value_sha256": digest,
            "truncated": key_cut or value_cut,
        })
        return key, encoded

    def without_payload(self, value: bytes, why: str) -> bytes:
        """The dead letter ``value`` without the original value (size and sha256 stay),
        its reason saying why."""
        letter = self.codec.decode(value)
        letter["reason"] = self._reason(f"{letter['reason']}; value dropped: {why}")
        letter["truncated"] = letter["truncated"] or letter["value"] is not None
        letter["value"] = None
        return self.codec.encode(letter)

    def describe(self, value: bytes) -> str:
        """``topic[partition]@offset (kind field: reason)`` of a dead letter, for a log line."""
        try:
            d = self.codec.decode(value)
        except Exception as exc:  # our own encoding: should not happen
            return f"(unreadable dead letter: {exc})"
        return (f"{d['source_topic']}[{d['source_partition']}]@{d['source_offset']} "
                f"({d['error_kind']} {d['field'] or '-'}: {d['reason']})")

    @staticmethod
    def _reason(text: str) -> str:
        text = (mask_pans(text.encode()) or b"").decode(errors="replace")
        if len(text) > REASON_MAX_CHARS:
            text = text[:REASON_MAX_CHARS - 1] + "…"
        return text


__all__ = ["KEY_MAX_BYTES", "REASON_MAX_CHARS", "DeadLetters"]
