import json, time
from tests.live import start_engine
from serve.engine_client import SocketEngineClient
from serve.app import create_app
from serve.settings import Settings
from tests.serve.tool_fixtures import TOOLS, MESSAGES

h = start_engine()
try:
    c = SocketEngineClient(h.address)
    c.wait_ready(30)
    app = create_app(Settings.from_env({}), c).test_client()
    for par in [False]:
        t = time.time()
        r = app.post(
            "/v1/chat/completions",
            json={
                "messages": MESSAGES,
                "tools": TOOLS,
                "tool_choice": "required",
                "parallel_tool_calls": par,
                "max_tokens": 160,
                "temperature": 0,
            },
        )
        print(time.time() - t, json.dumps(r.get_json()["choices"][0]), r.get_json()["usage"])
    r = app.post(
        "/v1/chat/completions",
        json={
            "messages": MESSAGES,
            "response_format": {"type": "regex", "value": "(yes|no), [a-z]{1,8}\\."},
            "chat_template_kwargs": {"enable_thinking": False},
            "max_tokens": 160,
            "temperature": 0,
        },
    )
    print(r.get_json())
finally:
    h.stop()
