"""The pure parts of the flame graphs (bench/flame.py): py-spy's raw stacks folded and
merged over workers, samples charged to layers, and the SVG drawn to scale."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter

from bench.flamegraph import render
from bench.stacks import OTHER, TEMPLATES, Stack, by_layer, charged_layer, fold, layer_of, merge, self_time

SVG = "{http://www.w3.org/2000/svg}"
WSGI = "Flask.wsgi_app (flask/app.py:1560)"
EXECUTE = "Session.execute (sqlalchemy/orm/session.py:2300)"
CURSOR = "Cursor.execute (psycopg/cursor.py:720)"
SEND = "socket.send (socket.py:500)"
RENDER = "top-level template code (/srv/myapp/templates/posts/show.html:1)"
WORKER_1 = [
    f"{WSGI};{EXECUTE};{CURSOR};{SEND} 6\n",
    f"{WSGI};{EXECUTE} 3\n",
    "\n",
    "not a stack line\n",
]
WORKER_2 = [f"{WSGI};{EXECUTE};{CURSOR};{SEND} 4\n", f"{WSGI};{RENDER} 5\n"]


def test_raw_stacks_of_every_worker_fold_into_one_profile() -> None:
    first, second = fold(WORKER_1), fold(WORKER_2)
    assert first == Counter({(WSGI, EXECUTE, CURSOR, SEND): 6, (WSGI, EXECUTE): 3})
    merged = merge([first, second])
    assert merged == Counter({(WSGI, EXECUTE, CURSOR, SEND): 10, (WSGI, EXECUTE): 3, (WSGI, RENDER): 5})
    assert sum(merged.values()) == 18


def test_frames_are_grouped_by_package_and_stdlib_is_charged_to_its_caller() -> None:
    assert layer_of(CURSOR) == "psycopg"
    assert layer_of(EXECUTE) == "sqlalchemy.orm"
    assert layer_of("Connection._execute (sqlalchemy/engine/base.py:1800)") == "sqlalchemy.engine/sql/pool"
    assert layer_of("Pool.connect (/venv/lib/python3.11/site-packages/sqlalchemy/pool/base.py:9)") == (
        "sqlalchemy.engine/sql/pool")
    assert layer_of(RENDER) == TEMPLATES  # a template under myapp/ is still a template
    assert layer_of("AppSession.get (myapp/db/session.py:40)") == "myapp.db"
    assert layer_of("show (myapp/posts.py:80)") == "myapp other (peer code)"
    assert layer_of("CSRFProtect.protect (flask_wtf/csrf.py:10)") == "flask_wtf/wtforms"
    assert layer_of("Request.__init__ (werkzeug/wrappers/request.py:3)") == "werkzeug"
    assert layer_of(SEND) == OTHER
    # socket.send under psycopg is psycopg's cost; a stack with no named frame stays "other"
    assert charged_layer((WSGI, EXECUTE, CURSOR, SEND)) == "psycopg"
    assert charged_layer(("Thread.run (threading.py:971)", SEND)) == OTHER
    layers = by_layer(merge([fold(WORKER_1), fold(WORKER_2)]))
    assert layers == Counter({"psycopg": 10, TEMPLATES: 5, "sqlalchemy.orm": 3})


def test_self_time_is_counted_per_function_whatever_the_line() -> None:
    stacks: Counter[Stack] = Counter({(WSGI, "f (a.py:3)"): 2, (WSGI, "f (a.py:9)"): 1, ("f (a.py:3)", WSGI): 4})
    assert self_time(stacks) == Counter({"f (a.py)": 3, "Flask.wsgi_app (flask/app.py)": 4})


def test_the_svg_is_well_formed_and_drawn_to_scale() -> None:
    stacks = merge([fold(WORKER_1), fold(WORKER_2)])
    stacks[("<module> (wsgi.py:1)", "a & b (x.py:1)")] = 2  # names that need escaping
    root = ET.fromstring(render(stacks, "test <profile> & more"))
    assert root.tag == f"{SVG}svg"
    # each box is <g><title>function (file:line) (N samples, P%)</title><rect .../>...</g>
    boxes = {group.findtext(f"{SVG}title", "").split(" (")[0]: group.find(f"{SVG}rect") for group in root.iter(f"{SVG}g")}
    assert None not in boxes.values()
    widths = {name: float(rect.attrib["width"]) for name, rect in boxes.items() if rect is not None}
    counts = {"all": 20, "Flask.wsgi_app": 18, "Session.execute": 13, "Cursor.execute": 10,
              "top-level template code": 5, "socket.send": 10, "<module>": 2, "a & b": 2}
    assert set(widths) == set(counts)
    per_sample = widths["all"] / counts["all"]
    for name, count in counts.items():
        assert abs(widths[name] - count * per_sample) < 0.01, name
    assert {name: int(rect.attrib["data-samples"]) for name, rect in boxes.items() if rect is not None} == counts
    # a callee sits one row above its caller, inside its caller's span
    wsgi, execute = root.find(f".//{SVG}rect[@data-samples='18']"), root.find(f".//{SVG}rect[@data-samples='13']")
    assert wsgi is not None and execute is not None
    assert float(execute.attrib["y"]) < float(wsgi.attrib["y"])
    assert float(wsgi.attrib["x"]) <= float(execute.attrib["x"])
    right_end = float(wsgi.attrib["x"]) + widths["Flask.wsgi_app"]
    assert float(execute.attrib["x"]) + widths["Session.execute"] <= right_end + 0.01


def test_inclusive_samples_count_each_stack_once_through_any_frame_naming_the_text() -> None:
    from bench.stacks import inclusive

    stacks = merge([fold(WORKER_1), fold(WORKER_2)])  # 10 through the cursor, 3 in execute alone, 5 rendering
    assert inclusive(stacks, "Session.execute") == 13  # with its callees
    assert inclusive(stacks, "psycopg/cursor.py") == 10  # by file
    assert inclusive(stacks, "flask/app.py") == 18  # every stack, each once
    assert inclusive(stacks, "myapp/observability.py") == 0
