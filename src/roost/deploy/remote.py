"""Small Python programs the controller runs on hosts with ``python3 -c`` before the runtime.

They are the first stage of the bootstrap (as in mitogen): check the host's
Python and whether it already caches this exact runtime bundle, install the
bundle from stdin (checked by hash, written atomically), and stop roost's own
stray processes by the process ids they recorded. Standard library only,
Python 3.9+, and kept tiny because they travel on every command line.
"""

from __future__ import annotations

CACHE_DIR = "~/.cache/roost"
MIN_PYTHON = (3, 9)

# argv: bundle file name, bundle sha256.  Prints one JSON line.
PROBE = """
import hashlib, json, os, sys
cache = os.path.expanduser("~/.cache/roost/runtime")
path = os.path.join(cache, sys.argv[1])
has = False
if os.path.isfile(path):
    with open(path, "rb") as f:
        has = hashlib.sha256(f.read()).hexdigest() == sys.argv[2]
print(json.dumps({"python": list(sys.version_info[:3]), "runtime": path, "has_runtime": has,
                  "ssh_connection": os.environ.get("SSH_CONNECTION", "")}))
"""

# argv: bundle path, bundle sha256; stdin: the bundle.  Atomic, hash-checked.  Removes the
# temporary files of installs that died (their pid is gone), never those of one running now.
INSTALL = """
import hashlib, os, sys
path, digest = sys.argv[1], sys.argv[2]
data = sys.stdin.buffer.read()
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit("roost: runtime bundle damaged in transit (sha256 mismatch)")
cache = os.path.dirname(path)
os.makedirs(cache, mode=0o700, exist_ok=True)
for old in os.listdir(cache):
    pid = old.rsplit(".", 2)[-2] if old.endswith(".tmp") else ""
    if pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(cache, old))
            except OSError:
                pass
        except OSError:
            pass
tmp = "%s.%d.tmp" % (path, os.getpid())
with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, path)
"""

# No argv.  Stops roost processes listed in ~/.cache/roost/run/ whose command line is
# still exactly the recorded one (so a recycled pid is never touched).  Prints JSON.
CLEANUP = """
import json, os, signal, time
run = os.path.expanduser("~/.cache/roost/run")
stopped, stale = [], 0
for name in (os.listdir(run) if os.path.isdir(run) else []):
    path = os.path.join(run, name)
    try:
        with open(path) as f:
            record = json.load(f)
        pid, argv = int(record["pid"]), record["argv"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            os.unlink(path)
        except OSError:
            pass
        continue
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            alive = f.read().split(b"\\0")[:-1] == [
                a.encode("utf-8", "surrogateescape") for a in argv
            ]
    except (OSError, UnicodeError):
        alive = False
    if alive:
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not os.path.exists("/proc/%d" % pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
            stopped.append(pid)
        except ProcessLookupError:
            stale += 1
    else:
        stale += 1
    try:
        os.unlink(path)
    except OSError:
        pass
print(json.dumps({"stopped": stopped, "stale_records": stale}))
"""
