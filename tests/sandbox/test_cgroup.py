"""Run cgroups: where the controllers are found, and the groups' life on this machine's real hierarchies.

The parsing tests feed ``find_hierarchies`` the text of /proc/self/mountinfo and /proc/self/cgroup of the layouts
the sandbox meets (cgroup v1 with separate or co-mounted cpu and cpuacct, v2 under a delegated service, hybrid);
the others create, reuse, sweep and remove real groups under this test process's own cgroup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import cgroup, cgroupfs
from sandbox.client import SandboxClient

import kit
import service_user

V1_SEPARATE = """\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
33 25 0:29 / /sys/fs/cgroup/memory rw,relatime shared:12 - cgroup cgroup rw,memory
37 25 0:33 / /sys/fs/cgroup/pids rw,relatime shared:16 - cgroup cgroup rw,pids
39 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:18 - cgroup2 cgroup2 rw
"""
V1_SEPARATE_SELF = "8:pids:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"

V1_COMOUNTED = """\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 25 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
37 25 0:33 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
38 25 0:34 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
"""
V1_COMOUNTED_SELF = (
    "9:pids:/system.slice/botworker.service\n5:memory:/system.slice/botworker.service\n"
    "3:cpu,cpuacct:/system.slice/botworker.service\n1:name=systemd:/system.slice/botworker.service\n"
)


def test_v1_with_cpu_and_cpuacct_apart() -> None:
    found = {h.controllers: h for h in cgroupfs.find_hierarchies(V1_SEPARATE, V1_SEPARATE_SELF)}
    assert set(found) == {frozenset({"cpu"}), frozenset({"cpuacct"}), frozenset({"memory"}), frozenset({"pids"})}
    assert found[frozenset({"memory"})].base == "/sys/fs/cgroup/memory/process_api/abc"
    assert found[frozenset({"pids"})].base == "/sys/fs/cgroup/pids"
    assert all(h.version == 1 for h in found.values())


def test_v1_co_mounted_under_a_systemd_service() -> None:
    found = {h.controllers: h.base for h in cgroupfs.find_hierarchies(V1_COMOUNTED, V1_COMOUNTED_SELF)}
    assert found[frozenset({"cpu", "cpuacct"})] == "/sys/fs/cgroup/cpu,cpuacct/system.slice/botworker.service"
    assert found[frozenset({"memory"})] == "/sys/fs/cgroup/memory/system.slice/botworker.service"


def test_v2_under_a_delegated_service() -> None:
    mount = Path(tempfile.mkdtemp(prefix="fake-cgroup2-"))
    try:
        service = mount / "system.slice" / "botworker.service"
        service.mkdir(parents=True)
        (service / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        mountinfo = f"35 25 0:30 / {mount} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        (found,) = cgroupfs.find_hierarchies(mountinfo, "0::/system.slice/botworker.service\n")
        assert found.version == 2 and found.base == str(service)
        assert found.controllers == frozenset({"cpu", "memory", "pids"})  # v2 reports usage in cpu.stat
        (service / "cgroup.controllers").write_text("cpu io\n")  # memory and pids not handed down to us
        with pytest.raises(cgroup.CgroupUnavailable, match="memory, pids"):
            cgroupfs.find_hierarchies(mountinfo, "0::/system.slice/botworker.service\n")
    finally:
        shutil.rmtree(mount)


def test_no_cgroup_at_all_is_unavailable_with_a_reason() -> None:
    with pytest.raises(cgroup.CgroupUnavailable, match="no cgroup hierarchy gives"):
        cgroupfs.find_hierarchies("22 1 0:21 / /proc rw - proc proc rw\n", "0::/\n")


def test_a_mount_that_shows_only_part_of_the_hierarchy() -> None:
    mountinfo = "33 25 0:29 /docker/x /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    for line in ("pids", "cpu", "cpuacct"):
        mountinfo += f"3{len(line)} 25 0:2 /docker/x /sys/fs/cgroup/{line} rw - cgroup cgroup rw,{line}\n"
    own = "".join(f"{n}:{c}:/docker/x/inner\n" for n, c in enumerate(("memory", "pids", "cpu", "cpuacct")))
    bases = {h.base for h in cgroupfs.find_hierarchies(mountinfo, own)}
    assert "/sys/fs/cgroup/memory/inner" in bases


# ---- real groups ---------------------------------------------------------------------------------------------


@pytest.fixture
def groups() -> Iterator[cgroup.RunGroups]:
    made = cgroup.RunGroups.create()
    yield made
    made.close()


def test_a_slot_is_reused_and_everything_goes_at_close(groups: cgroup.RunGroups) -> None:
    first = groups.acquire()
    directories = [d for _, d in first.dirs]
    assert all(os.path.isdir(d) and f"/sandbox-{os.getpid()}/run-0" in d for d in directories)
    groups.release(first)
    assert groups.acquire() is first  # emptied and reset, not made anew
    groups.release(first)
    groups.close()
    assert not any(os.path.exists(p) for p in groups.parents)


def test_a_group_still_holding_a_process_is_set_aside_and_killed(groups: cgroup.RunGroups) -> None:
    slot = groups.acquire()
    slot.configure(64 << 20, 4)
    child = subprocess.Popen(["sleep", "30"], preexec_fn=slot.enter)
    assert slot.members() == [child.pid]
    slot.kill()
    assert slot.drain(2.0) and child.wait(2) == -9
    groups.release(slot)
    assert groups.acquire() is slot


def test_groups_of_a_dead_sandbox_are_swept(groups: cgroup.RunGroups) -> None:
    pid = _a_dead_pid()
    stale = [f"{h.base}/sandbox-{pid}/run-3" for h in groups.hierarchies]
    for path in stale:
        os.makedirs(path)
    cgroup.RunGroups.create().close()  # a new sandbox process sweeps at start-up
    assert not any(os.path.exists(os.path.dirname(p)) for p in stale)


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_work_directories_of_a_dead_sandbox_are_swept() -> None:
    root = Path(tempfile.mkdtemp(prefix="sandbox-sweep-"))
    root.chmod(0o755)
    stale = root / "runs" / f"{_a_dead_pid()}-0123abcd"
    (stale / "deep" / "er").mkdir(parents=True)
    for n in range(200):
        (stale / "deep" / "er" / f"{n}.txt").write_text("left behind")
    client = SandboxClient(root, kit.JAIL_UID + 3, kit.JAIL_GID + 3)
    try:
        assert client.start()["ok"]
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not stale.exists(), "the stale work directory is still there"
    finally:
        client.close()
        shutil.rmtree(root, ignore_errors=True)


def test_the_sandbox_process_lives_in_its_run_group_so_runs_never_migrate() -> None:
    root = Path(tempfile.mkdtemp(prefix="sandbox-home-"))
    root.chmod(0o755)
    client = SandboxClient(root, kit.JAIL_UID + 3, kit.JAIL_GID + 3)
    try:
        assert client.start()["ok"] and client.proc is not None
        lines = Path(f"/proc/{client.proc.pid}/cgroup").read_text().splitlines()
        homes = [line for line in lines if "memory" in line.split(":")[1] or line.startswith("0::")]
        assert any(line.endswith(f"/sandbox-{client.proc.pid}/run-0") for line in homes), lines
        reply = client.call({"kind": "shell", "command": "echo hi", "params": {}})
        assert reply["ok"] and reply["cpu_ms"] > 0, reply  # the run's CPU was seen in the group it was born in
    finally:
        client.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not kit.ROOT_MODE, reason="needs a user with no delegated cgroup: root's pass makes one")
def test_without_a_cgroup_of_its_own_the_sandbox_refuses_to_run() -> None:
    """A sandbox whose user may not create cgroups (a service without Delegate=yes) fails closed and says why."""
    root = Path(tempfile.mkdtemp(prefix="sandbox-nocgroup-"))
    root.chmod(0o777)
    staging = tempfile.mkdtemp(prefix="service-user-")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - an unprivileged process in root's (not delegated) cgroup
        try:
            service_user.reachable_paths([Path(sys.base_prefix), Path(sys.prefix), service_user.REPO], staging)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            client = SandboxClient(root, 1, 1)
            hello = client.start()
            reply = client.call({"kind": "script", "source": "result = 1", "params": {}}) if hello["ok"] else None
            client.close()
            os.write(write_end, json.dumps({"hello": hello, "reply": reply}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        seen = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    hello = seen["hello"]
    assert hello["ok"] is False and hello["layers"]["cgroup"] is False, hello
    assert "cgroup" in hello["error"] and "Delegate=yes" in hello["error"], hello
