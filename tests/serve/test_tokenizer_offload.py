"""In a gevent worker the tokenizer loads in a native thread, so the worker keeps accepting and answering while
it loads (a load on the hub held every connection back; a SIGTERM in that window reset the ones still waiting)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.live import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import sys, gevent
    from serve import state

    ticks = 0
    def ticker():
        global ticks
        while True:
            gevent.sleep(0.005)
            ticks += 1
    gevent.spawn(ticker)
    gevent.sleep(0.05)
    before = ticks
    tokenizer = state._load_tokenizer(sys.argv[1])
    print("ticks during the load:", ticks - before, "vocab", tokenizer.vocab_size)
    """
)


def test_the_hub_keeps_running_while_the_tokenizer_loads(tiny_model_dir):
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ticks = int(run.stdout.split("ticks during the load:")[1].split()[0])
    # A load on the hub lets no greenlet run until it returns: 0 ticks. In a thread the ticker runs throughout.
    assert ticks >= 3, run.stdout
