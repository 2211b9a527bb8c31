"""Process-wide settings belong to the commands: `tune_process` caps oneDNN's kernel caches unless the user sized
them, and importing the library sets nothing."""

import os
import subprocess
import sys

from ftcli.runtime import KERNEL_CACHE

VARS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(extra)
    return env


def _python(code: str, env: dict) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_tune_process_caps_the_kernel_caches_unless_the_user_sized_them():
    show = "import os; print(*(os.environ.get(v, '-') for v in %r))" % (VARS,)
    assert _python(f"from ftcli.runtime import tune_process; tune_process(); {show}", _env()) == [str(KERNEL_CACHE)] * 2
    assert _python(f"from ftcli.runtime import tune_process; tune_process(); {show}",
                   _env(LRU_CACHE_CAPACITY="7")) == ["7", str(KERNEL_CACHE)]
    assert _python(f"import ftcli.train, ftcli.scoring; {show}", _env()) == ["-", "-"]  # the library sets nothing
