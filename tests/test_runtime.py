"""Process-wide settings belong to the commands: `tune_process` caps oneDNN's kernel caches and puts inductor's
beside ftcli's unless the user set them, and importing the library sets nothing."""

import os
import subprocess
import sys

from ftcli.runtime import KERNEL_CACHE

VARS = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "TORCHINDUCTOR_CACHE_DIR")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(extra)
    return env


def _python(code: str, env: dict) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_tune_process_caps_the_kernel_caches_unless_the_user_sized_them(tmp_path):
    show = "import os; print(*(os.environ.get(v, '-') for v in %r))" % (VARS,)
    tune = f"from ftcli.runtime import tune_process; tune_process(); {show}"
    inductor = str(tmp_path / "inductor")
    assert _python(tune, _env(FTCLI_CACHE=str(tmp_path))) == [str(KERNEL_CACHE)] * 2 + [inductor]
    assert _python(tune, _env(LRU_CACHE_CAPACITY="7", TORCHINDUCTOR_CACHE_DIR="/x")) == ["7", str(KERNEL_CACHE), "/x"]
    assert _python(f"import ftcli.train, ftcli.scoring; {show}", _env()) == ["-"] * 3  # the library sets nothing
