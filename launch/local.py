#!/usr/bin/env python3
"""Runs a multi-process JAX job on this machine, as a pod slice would run it on its hosts.

    python launch/local.py -n 2 -- sdjax train --config configs/demo.py --workdir workdirs/local2

starts N copies of the command, each a separate JAX process with its own emulated CPU devices
(`--devices_per_process`, through XLA_FLAGS), and appends the flags that join them into one run:
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I` (PORT: a free one). Ctrl-C and
SIGTERM are forwarded to every process. `{process_id}` in the command becomes each process's index: with
`--workdir runs/host{process_id}` every process has its own folder, as every host of a pod has its own disk. When one process fails the others are stopped, since they would
wait for it forever at the next collective. Exit code: 0 if every process succeeded, else the exit code of
the first process that failed (128 + signal number for a signal).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

POLL_S = 0.2
STOP_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def process_command(command: list[str], port: int, num_processes: int, process_id: int) -> list[str]:
    command = [arg.replace("{process_id}", str(process_id)) for arg in command]
    return command + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                      f"--process_id={process_id}"]


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def stop(processes: list[subprocess.Popen], sig: int) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(sig)


def run(command: list[str], num_processes: int, devices_per_process: int) -> int:
    port = free_port()
    env = process_env(devices_per_process)
    # Own session per child: a terminal's Ctrl-C reaches them once, forwarded by us, not twice.
    processes = [subprocess.Popen(process_command(command, port, num_processes, i), env=env, start_new_session=True)
                 for i in range(num_processes)]

    def forward(sig, _frame):
        stop(processes, sig)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    first_failure = None
    while None in [p.poll() for p in processes]:  # a list, not any(): every process is polled
        failed = [p for p in processes if p.returncode not in (None, 0)]
        if failed and first_failure is None:
            first_failure = failed[0]
            print(f"launch/local.py: process {processes.index(first_failure)} exited with "
                  f"{exit_code(first_failure.returncode)}; stopping the others.", file=sys.stderr)
            stop(processes, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and None in [p.poll() for p in processes]:
                time.sleep(POLL_S)
            stop(processes, signal.SIGKILL)
        time.sleep(POLL_S)
    if first_failure is None:
        first_failure = next((p for p in processes if p.returncode != 0), None)
    return 0 if first_failure is None else exit_code(first_failure.returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run N local JAX processes (emulated CPU devices) as one multi-process job.",
        usage="%(prog)s -n N [--devices_per_process D] -- COMMAND [ARGS...]")
    parser.add_argument("-n", "--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command every process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: put it after --, e.g. -- sdjax train --config configs/demo.py --workdir DIR")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("-n and --devices_per_process must be positive")
    return run(command, args.num_processes, args.devices_per_process)


if __name__ == "__main__":
    sys.exit(main())
