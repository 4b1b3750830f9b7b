"""Request bodies sent with ``Content-Encoding``: which codings a route takes, and a bounded gzip decoder.

The JSON events and NDJSON routes take ``gzip`` (``x-gzip``); every other ingest route takes bodies as they
are, since a webhook's or callback's signature is over the bytes as sent.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from producer.problems import Problem

#: zlib's window bits for a gzip wrapper (header and CRC-32/size trailer), not zlib's or raw deflate.
GZIP_WBITS = 16 + zlib.MAX_WBITS

#: The most decompressed bytes one step yields: a gzip bomb (about 1000:1) never inflates at once.
PIECE = 256 * 1024

#: Decompressed bytes up to which no ratio guard applies (:class:`Gunzip` ``max_ratio``): small bodies may be
#: very dense (a few thousand identical lines reach 230:1). Reading this much costs what a plain body of this
#: size costs: a fifth of a second as blank lines, two seconds as tiny lines that are each rejected (measured
#: with only the first PASSBRIDGE_NDJSON_REJECTED_DETAILS of them given their errors; compressed or not).
RATIO_FLOOR = 1024 * 1024

_GZIP = (b"gzip", b"x-gzip")


def is_gzip(value: bytes, *, gzip_ok: bool) -> bool:
    """Whether a ``Content-Encoding`` value (several header lines joined by commas) asks for gzip.

    ``identity`` or nothing is no coding (False). gzip or x-gzip, alone, is True where the route takes it
    (``gzip_ok``); anything else, several codings included, is a 415 problem.
    """
    codings = [t for t in (t.strip().lower() for t in value.split(b",")) if t and t != b"identity"]
    if not codings:
        return False
    if gzip_ok and len(codings) == 1 and codings[0] in _GZIP:
        return True
    raise unsupported_coding(value, gzip_ok=gzip_ok)


def unsupported_coding(value: bytes, *, gzip_ok: bool) -> Problem:
    """415 for a ``Content-Encoding`` the route does not take, listing what it does take."""
    sent = value.decode("latin-1")
    if len(sent) > 100:  # the client's own text, echoed: keep the answer small
        sent = sent[:100] + "..."
    if gzip_ok:
        accepted = ["gzip", "x-gzip", "identity"]
        takes = "gzip (or x-gzip) or no coding (identity)"
    else:
        accepted = ["identity"]
        takes = "only unencoded bodies (no Content-Encoding, or identity)"
    detail = f"Content-Encoding {sent!r} is not accepted here; this route takes {takes}"
    return Problem(
        415,
        "unsupported-content-encoding",
        "Unsupported Content-Encoding",
        detail,
        errors=[{"pointer": "", "field": "Content-Encoding", "detail": detail}],
        # RFC 9110 §15.5.16: the codings that would have been accepted go in Accept-Encoding.
        headers={"Accept-Encoding": "gzip" if gzip_ok else "identity"},
        extra={"accepted_encodings": accepted},
    )


class BadGzip(Exception):
    """The gzip data is corrupt or ends early; ``offset`` is where in the compressed body it went wrong."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


def bad_gzip(exc: BadGzip) -> Problem:
    """400 for a request body whose gzip data cannot be decompressed."""
    detail = f"the gzip data is invalid at or after byte {exc.offset} of the body: {exc.reason}"
    return Problem(
        400,
        "malformed-gzip",
        "Body is not valid gzip data",
        detail,
        errors=[{"pointer": "", "field": "(body)", "detail": detail}],
    )


class TooDense(Exception):
    """The gzip data inflated to more than ``max_ratio`` times the compressed bytes decoded so far."""

    def __init__(self, inflated: int, offset: int, max_ratio: int) -> None:
        super().__init__(f"{inflated} bytes from {offset}, over {max_ratio}:1")
        self.inflated = inflated
        self.offset = offset
        self.max_ratio = max_ratio


class Gunzip:
    """Decompresses a gzip body chunk by chunk as it arrives, never holding more than :data:`PIECE`
    decompressed bytes of one step. Members follow one another (concatenated ``.gz`` files decode as
    ``gzip -d`` decodes them); zero bytes padding the end of a member are skipped, as gzip does. Other bytes
    after a member must be another member: where ``gzip -d`` only warns of trailing garbage, it is an error
    here, since it may as well be the mangled start of data that never arrived.

    With ``max_ratio``, once more than :data:`RATIO_FLOOR` bytes are out, a piece that takes the decompressed
    bytes over ``max_ratio`` times the compressed bytes decoded so far raises :class:`TooDense` instead of
    being yielded: the cost of reading what a body inflates to stays within that many times the cost of the
    bytes sent, whatever the body's length.
    """

    def __init__(self, piece: int = PIECE, *, max_ratio: int | None = None) -> None:
        self._piece = piece
        self._max_ratio = max_ratio
        self._d = zlib.decompressobj(GZIP_WBITS)
        self._in_member = False  # the current member has had input and has not ended
        self._members = 0
        #: Compressed bytes decoded so far (where a failure is reported).
        self.offset = 0
        #: Decompressed bytes yielded so far.
        self.inflated = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decompressed bytes of the next chunk of the body, in pieces; :class:`BadGzip` if corrupt."""
        piece = self._piece
        capped = False
        while data or capped:
            if not self._in_member:
                if self._members:
                    stripped = data.lstrip(b"\0")
                    self.offset += len(data) - len(stripped)
                    data = stripped
                    if not data:
                        return
                self._in_member = True
            d = self._d
            try:
                out = d.decompress(data, piece)
            except zlib.error as exc:
                raise BadGzip(_reason(exc), self.offset) from None
            rest = d.unused_data if d.eof else d.unconsumed_tail
            self.offset += len(data) - len(rest)
            data = rest
            # A full piece may leave output inside zlib with no input left: ask again until a short one.
            capped = len(out) == piece
            if d.eof:
                self._members += 1
                self._in_member = False
                self._d = zlib.decompressobj(GZIP_WBITS)
                capped = False
            if out:
                inflated = self.inflated + len(out)
                ratio = self._max_ratio
                # The whole body's ratio so far, not this step's: a dense stretch of ordinary data (a run of
                # similar lines) is averaged with the rest.
                if ratio is not None and inflated > RATIO_FLOOR and inflated > ratio * self.offset:
                    raise TooDense(inflated, self.offset, ratio)
                self.inflated = inflated
                yield out

    def close(self) -> None:
        """At the end of the body: :class:`BadGzip` if a member was cut short."""
        if self._in_member:
            raise BadGzip("the gzip data ends before its end (truncated)", self.offset)
        if not self._members:  # as gzip -d: an empty body is no gzip file
            raise BadGzip("the body is empty, not gzip data", self.offset)


def _reason(exc: zlib.error) -> str:
    # zlib says "Error -3 while decompressing data: incorrect header check": keep what follows the colon.
    text = str(exc)
    return text.partition(": ")[2] or text
