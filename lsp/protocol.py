"""Two protocol-level fixes on top of pygls's `LanguageServerProtocol`.

1. Invalid params get an answer. pygls structures each incoming message while parsing it; when a
   request's params do not fit the method's lsprotocol type it logs the failure and drops the
   message, so the client waits forever. Here the request is answered with -32602 InvalidParams and
   a readable reason, and the server carries on.
2. Position encoding: the issue asks for UTF-8 whenever the client offers it (UTF-16, the LSP
   default, otherwise). pygls picks the client's first supported choice, so UTF-8 is moved to the
   front of the offer before pygls negotiates; the conversion itself stays pygls's `PositionCodec`.
"""

from __future__ import annotations

import logging
from typing import Any

import cattrs
from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

logger = logging.getLogger(__name__)


def _reason(exc: BaseException) -> str:
    """A one-line account of why params did not structure (cattrs keeps the detail in the cause)."""
    cause = exc.__cause__
    if isinstance(cause, cattrs.ClassValidationError):
        return "; ".join(cattrs.transform_error(cause, path="params"))
    return str(cause or exc) or type(exc).__name__


class DgEditProtocol(LanguageServerProtocol):
    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            if isinstance(data, dict) and "id" in data and "method" in data:
                # A request: the client is waiting for this id. Answer it, then let pygls log the failure.
                error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {_reason(exc)}")
                self._send_response(data["id"], error=error.to_response_error())
            raise

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        general = params.capabilities.general
        offered = list(general.position_encodings or []) if general is not None else []
        if types.PositionEncodingKind.Utf8 in offered:
            offered.remove(types.PositionEncodingKind.Utf8)
            general.position_encodings = [types.PositionEncodingKind.Utf8, *offered]
        return (yield from super().lsp_initialize(params))
