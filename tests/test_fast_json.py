"""Responses written by orjson read back as the standard library's would."""

import decimal
import json

import numpy as np
from flask import Flask

from sam_backend.server.fast_json import FastJSONProvider


def app() -> Flask:
    flask_app = Flask("test")
    flask_app.json = FastJSONProvider(flask_app)
    flask_app.json.sort_keys = False
    return flask_app


BODY = {"results": [{"result": [{"value": {"rle": list(range(256)) * 3, "brushlabels": ["Ünïcode ✓"]},
                                 "original_width": 1920, "score": 0.123456789012345}],
                     "score": 1e-12, "model_version": "sam-demo"}],
        "empty": [], "none": None, "flag": True, "big": 2**62}


def test_same_document_as_the_standard_library():
    flask_app = app()
    with flask_app.app_context():
        text = flask_app.json.response(BODY).get_data(as_text=True)
    assert json.loads(text) == BODY
    assert text.index('"results"') < text.index('"empty"')  # insertion order kept (sort_keys off)


def test_requests_and_dumps_stay_the_standard_librarys():
    """Label Studio is a Python client: a NaN it sends must reach the region checks as NaN."""
    flask_app = app()
    with flask_app.app_context():
        assert flask_app.json.dumps({"x": float("nan")}) == '{"x": NaN}'
        assert flask_app.json.loads('{"x": NaN}')["x"] != flask_app.json.loads('{"x": NaN}')["x"]
        assert json.loads(flask_app.json.response(x=float("nan")).get_data()) == {"x": None}


def test_jsonify_writes_numpy_and_falls_back_for_the_rest():
    flask_app = app()
    with flask_app.app_context():
        response = flask_app.json.response(rle=np.arange(5, dtype=np.uint8), score=np.float32(0.5),
                                           price=decimal.Decimal("1.5"))
        beyond_orjson = flask_app.json.response(huge=2**70)  # the standard library writes it
    assert json.loads(response.get_data()) == {"rle": [0, 1, 2, 3, 4], "score": 0.5, "price": "1.5"}
    assert json.loads(beyond_orjson.get_data()) == {"huge": 2**70}


def test_debug_responses_are_indented():
    flask_app = app()
    flask_app.debug = True
    with flask_app.app_context():
        text = flask_app.json.response({"a": [1]}).get_data(as_text=True)
    assert text.startswith('{\n  "a"') and json.loads(text) == {"a": [1]}
