"""Flask's JSON responses written by orjson.

A click's brush region is Label Studio's RLE: a list of a few hundred
thousand small integers for a full-HD mask (a 1.2 MB response). The standard
library's encoder takes about 25 ms to write it, a third of a cached click on
a 2-core CPU; orjson takes about 1 ms. Requests are still parsed by the
standard library, which accepts what Label Studio and older clients send.
"""

from __future__ import annotations

import orjson
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class FastJSONProvider(DefaultJSONProvider):
    """``DefaultJSONProvider`` whose ``dumps`` (and so ``jsonify``) runs orjson.

    Flask's ``default`` still converts what orjson does not know (``Decimal``,
    objects with ``__html__``); options orjson has no equivalent for fall back
    to the standard library. Output differs from the standard library's only
    in spacing and in writing non-ASCII as UTF-8 rather than ``\\u`` escapes.

    Example:
        >>> app = Flask(__name__)  # doctest: +SKIP
        >>> app.json = FastJSONProvider(app)  # doctest: +SKIP
    """

    def dumps(self, obj, **kwargs) -> str:
        option = _OPTIONS | (orjson.OPT_SORT_KEYS if kwargs.pop("sort_keys", self.sort_keys) else 0)
        if kwargs.pop("indent", None):
            option |= orjson.OPT_INDENT_2
        kwargs.pop("separators", None)  # orjson writes compact JSON
        if kwargs:
            return super().dumps(obj, **kwargs)
        try:
            return orjson.dumps(obj, default=self.default, option=option).decode()
        except TypeError:  # orjson.JSONEncodeError too: e.g. integers beyond 64 bits
            return super().dumps(obj)
