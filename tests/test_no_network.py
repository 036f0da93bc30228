"""A run reaches no network: a whole `compress` in a network namespace with no interfaces succeeds, and no
process of it opens an internet socket (ONNX Runtime's telemetry uploader did, about ten seconds in)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from testkit import FAST_VERIFY, lenient_target


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("unshare") or os.geteuid() != 0,
                    reason="needs `unshare -n` (util-linux) run as root to make a namespace without a network")
def test_compress_succeeds_without_a_network_and_opens_no_internet_socket(tmp_path, small_npz, teacher_spec):
    config = tmp_path / "config.toml"
    config.write_text(FAST_VERIFY + "[distill]\nepochs = 1\n")
    command = ["unshare", "-n", sys.executable, "-m", "edgecompress", "compress", "--data", str(small_npz),
               "--teacher", teacher_spec, "--student", "resnet_slim_050", "--config", str(config),
               "--target", str(lenient_target(tmp_path / "target.toml")), "--out", str(tmp_path / "run"), "--quiet"]
    trace = tmp_path / "connect.log"
    traced = shutil.which("strace") is not None
    if traced:  # every connect() of every thread and child process, DNS lookups included
        command = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # the package's own setting
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "verify" / "report.json").is_file()
    if traced:
        internet = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
        assert internet == [], internet[:5]
