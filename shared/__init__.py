# SPDX-License-Identifier: GPL-3.0-or-later
"""What the OAVM plug-ins share with the service: the wire protocol, the client, what a frame on the wire is
(``colour``: display-referred, the sRGB curve for linear plates), writing results behind the network
(``write_behind``) and putting files in place (``files``: hidden temporaries renamed when complete).

Imports only numpy, pyzmq, msgpack and the standard library, because it runs inside Blender's and Nuke's Python;
``build.py dist`` vendors this package into each plug-in, so it imports itself relatively.
"""
from .protocol import (DEFAULT_ENDPOINT, PROTOCOL_VERSION, ErrorCode, OAVMServiceError, OAVMServiceUnavailable,
                       ProtocolError)
from .client import MatteResult, OAVMClient
from . import colour, files, write_behind

__all__ = ["DEFAULT_ENDPOINT", "PROTOCOL_VERSION", "ErrorCode", "MatteResult", "OAVMClient", "OAVMServiceError",
           "OAVMServiceUnavailable", "ProtocolError", "colour", "files", "write_behind"]
