"""JSON responses serialised by orjson (numpy arrays and scalars included)."""
from __future__ import annotations

import orjson
from fastapi.responses import JSONResponse


class ORJSONResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
