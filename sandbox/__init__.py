"""The sandbox: runs bots' shell commands, custom Python scripts and file operations in confined processes.

Self-contained: standard library + RestrictedPython; imports nothing from ``botworker``. Start reading at
``policy.py`` (every allowlist and limit, as data), then ``jail.py`` (how one run is confined).

Threat model
------------
The attacker writes the tool: the script source, the command's parameters, the file paths and contents, and may
have broken every policy check written in Python. They want to: read the worker's secrets (environment, memory,
files such as ``.env``), read or write host files, reach the network (including cloud metadata), run other
programs, keep processes running after the run, exhaust the machine (CPU, memory, processes, disk, output), or
take the worker down. The kernel is trusted; so is the worker that sends the requests.

Layers (each stops the attack on its own; together they are the boundary)
-----------------------------------------------------------------------------
==========================  =================================================================================
process boundary            The worker execs ``python -I`` with an environment built from nothing and no
                            inherited descriptors (``client.py``): the sandbox never holds a worker secret.
                            It never runs untrusted code itself; it forks one fresh process tree per request.
namespaces                  Each run gets new mount, PID, network, IPC and UTS namespaces (plus a user
                            namespace when the sandbox is not root): no network interface but a downed
                            loopback, no view of host processes, its own hostname.
private root                A tmpfs root holding ``/usr`` (read-only bind), ``/etc`` with four synthetic files,
                            four device nodes, a fresh ``/work`` per run, the bot's ``/files`` and a small
                            ``/tmp``; ``pivot_root`` into it and the host's root is detached. Writable mounts
                            are ``nosuid,nodev,noexec``.
unprivileged identity       As root, the runner switches to a uid/gid of its own (per worker) with no
                            supplementary groups; when the sandbox is not root, uid 0 of the run's own user
                            namespace with every capability set emptied and securebits locked.
no-new-privs                Set before the job starts: no set-uid gain, required by seccomp.
rlimits                     CPU seconds, address space, processes, file size, open files, core 0; soft = hard.
Landlock                    (where the kernel has it) execute/read ``/usr``, read ``/etc``, write only under
                            ``/work``, ``/files``, ``/tmp``; no TCP bind/connect; signals and abstract unix
                            sockets scoped to the run.
seccomp                     Kills foreign-architecture and x32 calls; EPERM for ptrace, mount, namespaces,
                            bpf, keyctl, userfaultfd, io_uring, perf, module and clock calls...; sockets other
                            than AF_UNIX; clone with namespace flags (``seccomp.py`` draws the filter).
wall clock                  The sandbox kills the run's PID-namespace init at the deadline: the kernel then
                            kills every process of the run, including ones that called setsid or forked twice.
output caps                 stdout/stderr/result are read up to their caps; the rest is dropped.
RestrictedPython            Custom scripts also pass a policy layer (``script.py``): no underscore names, no
                            real modules (only proxies listing allowed functions), guarded attribute access,
                            iteration and writes. It is not the boundary: the layers above are.
shell without a shell       Commands become an argv of an allowlisted program at a fixed path; parameters fill
                            single argv elements; environment fixed; stdin /dev/null (``shell.py``).
files without symlinks      File operations walk paths one component at a time with ``O_NOFOLLOW`` from the
                            bot's directory; ``..`` and NUL are refused (``files.py``).
==========================  =================================================================================

Limits (defaults; a request may lower them, never raise them past ``policy.MAX_LIMITS``): see
``policy.DEFAULT_LIMITS``: 5 s wall, 2 s CPU, 256 MiB memory, 16 processes, 8 MiB files, 64 open files,
64 KiB output per stream, 16 MiB /tmp.

What is not defended
--------------------
- Kernel bugs (namespaces and seccomp shrink the attack surface; they do not remove it).
- Disk use of ``/files`` as a whole (each file is capped, the directory is not): use a filesystem quota.
- Timing side channels and CPU contention between runs on the same machine.
- Tool side effects when a message is retried after a crash: a run is not transactional.
- ``SANDBOX_ALLOW_WEAK`` (development only): without namespaces a run still has uid, no-new-privs, rlimits and
  seccomp, but sees the host's file system as its uid may, and background processes can outlive the deadline.

Required layers: ``policy.REQUIRED_LAYERS``. The sandbox probes them at start-up with a real confined run and
refuses every request when one is missing, unless started with ``--allow-weak``.

Running the attack tests: ``./dev test tests/sandbox`` (``test_cant_*`` names one technique each).
"""
