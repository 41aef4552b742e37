"""StopSignals: a second signal exits at once even while the main thread waits on a long XLA computation.

Python runs signal handlers only when the main thread is back in the interpreter, and it coalesces repeats of one
signal that arrive meanwhile into one call: without the wakeup-pipe watcher, two SIGTERMs sent during a long
``block_until_ready`` were seen as one, after the computation, and the process went on.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import pathlib, sys
    import jax, jax.numpy as jnp
    from gptjax.train.signals import StopSignals
    marker = pathlib.Path(sys.argv[1])
    stop = StopSignals(on_force_exit=lambda: marker.write_text("released"))
    stop.install()
    # minutes of work in one XLA call: the main thread stays in C++ the whole time
    inner = lambda i, v: v * 1.0000001 + 1e-9
    loop = jax.jit(lambda x: jax.lax.fori_loop(0, 10, lambda j, v: jax.lax.fori_loop(0, 2_000_000_000, inner, v), x))
    compiled = loop.lower(jnp.float32(1.0)).compile()
    print("ready", flush=True)
    compiled(jnp.float32(1.0)).block_until_ready()
    print("finished", flush=True)
""")


def test_second_sigterm_exits_during_a_long_computation(tmp_path):
    marker = tmp_path / "released"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(0.5)  # inside the computation
        p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        sent = time.time()
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=30)
    finally:
        p.kill()
    assert code == 128 + signal.SIGTERM
    assert time.time() - sent < 30 and p.stdout.read() == ""  # the computation never finished
    assert marker.read_text() == "released"  # on_force_exit ran (the workdir lock is released there)
    assert "SIGTERM again: exiting now" in p.stderr.read()


def test_install_and_restore_leave_the_handlers_and_wakeup_fd_as_they_were():
    from gptjax.train.signals import StopSignals
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopSignals()
    stop.install()
    assert signal.getsignal(signal.SIGTERM) == stop._handle
    stop.restore()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # nothing left installed
