"""The Valkey container's start script against a real server: any password from the Secret
(spaces, quotes, backslashes) must become exactly that password."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import valkey
from lmcache_operator.render.valkey import AUTH_FILE, _command
from lmcache_operator.spec import parse

from lmcache.storage.remote.devserver import RedisServer

PASSWORDS = ["plain", 'with "quotes"', "sp ace", "back\\slash", "mix 'of' \"all\" \\ $HOME"]


@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="needs redis-server (.ci/run installs Debian's)",
)
@pytest.mark.parametrize("password", PASSWORDS)
def test_start_script_sets_the_exact_password(tmp_path: Path, password: str) -> None:
    spec = parse({"model": "m", "valkey": {"enabled": True, "auth": {"enabled": True}}})
    auth_file = tmp_path / "auth.conf"
    script = _command(spec)[2].replace(AUTH_FILE, str(auth_file))
    script = script.replace("&& exec valkey-server /etc/valkey/valkey.conf", "")
    env = {"VALKEY_PASSWORD": password, "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-c", script], env=env, check=True)
    server = RedisServer(tmp_path, None, "--include", str(auth_file))
    server.start()
    try:
        assert valkey.Valkey(port=server.port, password=password).ping()
        with pytest.raises(valkey.AuthenticationError):
            valkey.Valkey(port=server.port, password=password + "x").ping()
    finally:
        server.stop()
