# SPDX-License-Identifier: GPL-3.0-or-later
"""The add-on's own error type: every message says what is wrong *and* what the artist should do next.

Operators catch :class:`OAVMBlenderError` (and the client's ``OAVMServiceError``) and turn it into
``self.report({'ERROR'}, message)`` + ``{'CANCELLED'}``, so an artist never sees a traceback.
"""


class OAVMBlenderError(Exception):
    """A problem with the artist's input (clip, mask, frame range, output folder) or with the job."""


class FrameRangeError(OAVMBlenderError):
    """A frame range that is empty, reversed, or reaches frames the source does not have."""


class SourceError(OAVMBlenderError):
    """A clip or image sequence that is missing, unreadable or of an unsupported kind."""


class MaskError(OAVMBlenderError):
    """A first-frame mask that is empty, of the wrong resolution or otherwise unusable."""
