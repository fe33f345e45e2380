"""Flask's JSON responses written by orjson.

A click's brush region is Label Studio's RLE: a list of a few hundred
thousand small integers for a full-HD mask (a 1.2 MB response). The standard
library's encoder takes about 25 ms to write it, a third of a cached click on
a 2-core CPU; orjson takes about 1 ms. Only responses change: requests are
parsed, and ``app.json.dumps`` writes, with the standard library as before
(it reads and writes the ``NaN`` that Python clients such as Label Studio
may send, which orjson would turn into ``null``).
"""

from __future__ import annotations

import orjson
from flask.json.provider import DefaultJSONProvider

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class FastJSONProvider(DefaultJSONProvider):
    """``DefaultJSONProvider`` whose ``response`` (and so ``jsonify``) is written by orjson.

    Flask's ``default`` still converts what orjson does not know (``Decimal``,
    objects with ``__html__``), and what orjson refuses (integers beyond 64
    bits) is written by the standard library. Output differs from the
    standard library's only in writing non-ASCII as UTF-8 rather than ``\\u``
    escapes, and a float NaN or infinity as ``null`` (valid JSON) rather
    than ``NaN``.

    Example:
        >>> app = Flask(__name__)  # doctest: +SKIP
        >>> app.json = FastJSONProvider(app)  # doctest: +SKIP
    """

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        option = _OPTIONS | (orjson.OPT_SORT_KEYS if self.sort_keys else 0)
        if (self.compact is None and self._app.debug) or self.compact is False:
            option |= orjson.OPT_INDENT_2  # what Flask does for a debug app
        try:
            body = orjson.dumps(obj, default=self.default, option=option)
        except TypeError:  # orjson.JSONEncodeError too
            return super().response(*args, **kwargs)
        return self._app.response_class(body + b"\n", mimetype=self.mimetype)
