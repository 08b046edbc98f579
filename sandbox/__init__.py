"""The sandbox: runs bots' shell commands, custom Python scripts and file operations in confined processes.

Self-contained: standard library + RestrictedPython; imports nothing from ``botworker``. Start reading at
``policy.py`` (every allowlist, option and limit, as data), then ``jail.py`` and ``jail_child.py`` (how one run is
confined: watched from outside, and what its process does), ``cgroup.py`` (how everything a run starts is held
as a whole) and ``lanes.py`` (how one sandbox process holds several runs at once, kept apart). ``python -m sandbox
check`` (or ``botworker sandbox-check``) tries every layer below from inside real runs on the machine it is run on.

Threat model
------------
The attacker writes the tool: the script source, the command line and its parameters (so do end users and the
LLM, through parameter values), the file paths and contents, and may have broken every policy check written in
Python. They want to: read the worker's secrets (environment, memory, files such as ``.env``), read or write host
files, reach the network (including cloud metadata), run other programs, keep processes running after the run,
exhaust the machine (CPU, memory, processes, disk, output), or take the worker down. The kernel is trusted; so is
the worker that sends the requests.

Modes. Production runs the sandbox unprivileged (the systemd unit's ``User=botworker``): each lane (lanes.py)
has a user namespace of its own, where its runs are uid 0 with no capability. Started as root, each lane's runs get
a host uid of their own instead. Both modes build the same jail and pass the same test suite (CI runs it twice).

Layers (each stops the attack on its own; together they are the boundary)
-----------------------------------------------------------------------------
==========================  =================================================================================
process boundary            The worker execs ``python -I`` with an environment built from nothing and no
                            inherited descriptors (``client.py``): the sandbox never holds a worker secret.
                            It never runs untrusted code itself: it hands each request to a lane
                            (``lanes.py``: a process forked from it after start-up, confined the same way,
                            dying with it), which clones one fresh process per run. Up to ``--lanes``
                            runs at once; each lane has a run cgroup of its own and, as root, a uid of its own.
                            It is non-dumpable: not even the worker's uid can read its memory or environment.
cgroup (per run)            Every run, and all it forks, is in a cgroup of its own (``cgroup.py``, v2 or
                            v1): memory (no swap; its tmpfs pages count), processes and CPU rate are held for
                            the tree as a whole, the sandbox kills it at its CPU-time budget, and a kill at
                            the deadline reaches every member. The sandbox process lives in the group (runs are
                            born in it) under no limit between runs. Required: no cgroup, no runs.
namespaces                  Each run is cloned into new mount, PID and UTS namespaces (the sandbox
                            never enters them), in its lane's network namespace (no interface but a downed
                            loopback) and, when the sandbox is not root, the lane's user namespace: no view of
                            host processes, no network, its own hostname. The run is pid 1 there: when it
                            exits, the kernel kills all it left behind, so the next run of the lane finds
                            nothing of it in the shared namespaces (``jail.share_namespaces``).
private root                A tmpfs root holding ``/usr`` (read-only bind), ``/etc`` with five synthetic
                            files, four device nodes, a ``/work`` and a ``/tmp`` that are tmpfs of capped size
                            and inode count of their own, and the bot's ``/files`` (writable in file
                            operations only; read-only in shell runs; absent in script runs); ``pivot_root``
                            into it and the host's root is detached. Writable mounts are ``nosuid,nodev,noexec``.
unprivileged identity       As root, the run switches to a uid/gid of its own (per lane) with no
                            supplementary groups; when the sandbox is not root, uid 0 of the run's own user
                            namespace. Either way the bounding and ambient sets are emptied and securebits
                            locked first, then every other capability set.
no-new-privs                Set before the job starts: no set-uid gain, required by seccomp and Landlock.
rlimits                     Per process, on top of the run's cgroup: CPU seconds, address space, processes,
                            file size, open files, core 0; soft = hard.
Landlock                    (where the kernel has it) read ``/usr`` and ``/etc``, write only the run's scratch
                            space (and ``/files`` in file operations), **execute only the shell run's one
                            program and its ELF interpreter** (nothing in script and file runs); no TCP
                            bind/connect; signals and abstract unix sockets scoped to the run. Also applied in
                            weak mode, on host paths.
seccomp                     Kills foreign-architecture and x32 calls; EPERM for ptrace, mount, namespaces,
                            bpf, keyctl, userfaultfd, io_uring, perf, module and clock calls, System V IPC
                            and POSIX message queues...; no socket of any family (``socket`` fails,
                            ``socketpair`` is denied: a unix socket holding descriptors in flight could
                            outlive its run); clone with namespace flags (``seccomp.py`` draws the filter).
wall clock                  The sandbox kills the run's process, pid 1 of its PID namespace, at the deadline:
                            the kernel then kills every process of the run, including ones that called setsid
                            or forked twice.
output caps                 stdout/stderr/result are read up to their caps; the rest is dropped.
RestrictedPython            Custom scripts also pass a policy layer (``script.py``, ``script_guards.py``): no
                            underscore names, no real modules (only proxies listing allowed functions), no class
                            whose Python methods take any ``self``, guarded attribute access, iteration and
                            writes. It is not the boundary: the layers above are.
shell without a shell       Commands become an argv of an allowlisted program at a fixed path, read the way the
                            program reads it: only the options ``policy.py`` lists for that program (long ones
                            in full), parameters as operands or option arguments only, one option per
                            element and ``--`` before the operands; environment fixed; stdin /dev/null
                            (``shell.py``).
files without symlinks      File operations walk paths one component at a time with ``O_NOFOLLOW`` from the
                            bot's directory; ``..`` and NUL are refused; only regular files, opened
                            non-blocking; every write checked against the bot's quota (``files.py``).
==========================  =================================================================================

Limits (defaults; a request may lower them, never raise them past ``policy.MAX_LIMITS``): see
``policy.DEFAULT_LIMITS``. Per run, as a whole: 5 s wall, 2 s CPU (and at most one core at a time), 256 MiB
memory, 16 processes, 16 MiB ``/work`` and 16 MiB ``/tmp`` (4096 inodes each). Per process: 8 MiB per file written,
64 open files, and the same CPU, memory and process numbers as rlimits. Per stream: 64 KiB of output. Per bot:
64 MiB and 10,000 entries in ``/files``. The CPU budget is checked by the sandbox every few milliseconds as it
runs out: a run may overrun it by a few milliseconds of CPU before it is killed.

What is not defended
--------------------
- Kernel bugs (namespaces, seccomp and Landlock shrink the attack surface; they do not remove it).
- A secret given to a shell command can come back in its output transformed (reversed, encoded, cut up): the
  worker redacts only the encodings it lists (``botworker/tools/secrets.py``). A run that holds a secret has no
  writable ``/files`` (no shell run has), so it cannot keep the secret for a later read.
- A program compromised by its input (a memory-corruption bug in an allowlisted program) runs native code inside
  the jail, as a broken RestrictedPython would: the OS layers above hold it. Landlock lets it execute only its own
  program and the ELF interpreter, which can still load other programs from ``/usr``: once native code runs, that
  gives nothing the layers do not already contain.
- Timing side channels and CPU contention between runs on the same machine (the CPU rate cap bounds a run to one
  core).
- Tool side effects when a message is retried after a crash: a run is not transactional.
- Concurrent writes of one bot may overshoot its ``/files`` quota by one file each (each write checks the quota on
  its own). File operation paths are at most 16 directories deep and 1024 characters long.
- ``SANDBOX_ALLOW_WEAK`` (development only): without namespaces a run still has its cgroup (where the machine has
  one), uid, no-new-privs, rlimits, seccomp and, where the kernel has it, Landlock on host paths (the run's own
  work directory and bot directory; ``/usr`` to read). It loses the private root (without Landlock it sees the
  host as its uid may, so file operations are refused then), the tmpfs caps of ``/work`` and ``/tmp`` (its work
  directory is on the host disk), the PID and network namespaces (seccomp still refuses network sockets), and
  without a cgroup, background processes can outlive the deadline.

Required layers: ``policy.REQUIRED_LAYERS``. The sandbox probes them at start-up with a real confined run and
refuses every request when one is missing, unless started with ``--allow-weak``.

Running the attack tests: ``./dev test tests/sandbox`` (``test_cant_*`` names one technique each; both modes).
"""
