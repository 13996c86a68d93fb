"""The trusted side of a check, run as `python -I -S -c <this file> SOCKET_FD NON_DUMPABLE`
(never imported by looptune), outside the candidate's sandbox: it runs the problem's own tests
against a stand-in for the candidate's function that forwards each call to the candidate's
process (`sandbox_candidate`) and returns what comes back, decoded as plain data only.

It serves one check after another. Each arrives on a private socket as a per-check nonce with
four descriptors (the job as JSON, the output file, the pipes to and from the candidate); the
verdict goes back on that socket: `<nonce> passed`, only after the tests returned, or `<nonce>
failed <why>`. The candidate never holds the socket, never sees the nonce, and without the OS
boundary cannot read this process's memory or descriptors (it is made non-dumpable first), so
nothing it writes anywhere can count as a pass.
"""

import json
import os
import resource
import signal
import socket
import sys

MAX_ANSWER_BYTES = 16 << 20  # a longer answer from the candidate fails the check
MEMORY_BYTES = 2 << 30  # RLIMIT_AS: the tests hold at most a few answers


STARTED = b'{"started": true}\n'  # the candidate's first line, said before the program runs


class CandidateFailed(Exception):
    """The candidate raised, returned something other than plain data, or stopped answering."""


class NotStarted(Exception):
    """The candidate's process ended before its own code said it started: the sandbox (bwrap,
    Python) failed to start it, which no program can bring about, since none has run yet."""


def decode(x):
    """Tagged JSON from the candidate as plain data; ValueError for anything else."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if t is dict and len(x) == 1:
        ((tag, v),) = x.items()
        if tag in ("list", "tuple", "set", "frozenset") and type(v) is list:
            kind = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag]
            return kind(decode(e) for e in v)
        if tag == "dict" and type(v) is list and all(type(p) is list and len(p) == 2 for p in v):
            return {decode(k): decode(e) for k, e in v}
        if tag == "bytes" and type(v) is str:
            return bytes.fromhex(v)
        if (
            tag == "complex"
            and type(v) is list
            and len(v) == 2
            and all(type(p) in (int, float) for p in v)
        ):
            return complex(v[0], v[1])
    raise ValueError("a malformed answer")


def encode(x):
    """Arguments for the candidate, tagged as the candidate's `decode` expects."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    tags = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}
    if t in tags:
        return {tags[t]: [encode(v) for v in x]}
    if t is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in x.items()]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t is complex:
        return {"complex": [x.real, x.imag]}
    raise TypeError(f"the tests passed a {t.__name__} to the candidate; only plain data crosses")


def non_dumpable():
    """No /proc/<pid>/mem, fd or environ access, and no ptrace, for processes of the same user
    that lack CAP_SYS_PTRACE: the candidate without the OS boundary."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def run(job, to_candidate, from_candidate):
    """Run the tests; raises on failure, returns when they pass."""

    def ask(message):
        to_candidate.write(json.dumps(message).encode() + b"\n")
        to_candidate.flush()
        line = from_candidate.readline(MAX_ANSWER_BYTES + 1)
        if not line.endswith(b"\n"):
            raise CandidateFailed(
                "the candidate's process ended before answering"
                if not line
                else f"an answer longer than {MAX_ANSWER_BYTES} bytes"
            )
        answer = json.loads(line)
        if type(answer) is not dict or len(answer) != 1:
            raise CandidateFailed("a malformed answer")
        if "error" in answer:
            raise CandidateFailed(str(answer["error"])[:300])
        return answer

    if from_candidate.readline(len(STARTED)) != STARTED:
        raise NotStarted
    if "ready" not in ask({"program": job["program"], "entry_point": job["entry_point"]}):
        raise CandidateFailed("a malformed answer")

    def candidate(*args, **kwargs):
        answer = ask({"args": encode(list(args)), "kwargs": encode(kwargs)})
        if "result" not in answer:
            raise CandidateFailed("a malformed answer")
        return decode(answer["result"])

    namespace = {"__name__": "__check__"}
    exec(compile(job["tests"], "<tests>", "exec"), namespace)  # noqa: S102 - the set's own tests
    namespace[job["entry_point"]] = candidate  # helpers of the tests that call it by name
    namespace[job["call"]](candidate)


def check(job, to_candidate, from_candidate):
    """The outcome of one job: "passed", "failed <why>", or "unstarted" (`NotStarted`)."""
    try:
        run(job, to_candidate, from_candidate)
        return "passed"
    except NotStarted:
        return "unstarted"
    except CandidateFailed as e:
        return f"failed {e}"
    except BrokenPipeError:
        return "failed the candidate's process ended before answering"
    except AssertionError as e:
        return f"failed AssertionError{': ' + str(e) if str(e) else ''}"
    except Exception as e:  # noqa: BLE001 - a test that raised: the check failed
        return f"failed {type(e).__name__}: {e}"


def main():
    control = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the parent's socket ends it
    if sys.argv[2] == "1":
        try:
            non_dumpable()
        except (ImportError, OSError, AttributeError):  # a second layer: the tripwire refuses
            pass  # reading other processes' /proc entries too
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    null = os.open(os.devnull, os.O_RDWR)
    while True:
        message, fds, _, _ = socket.recv_fds(control, 256, 4)
        if not message:
            os._exit(0)  # the parent closed its end
        job_fd, log_fd, to_fd, from_fd = fds
        with open(job_fd, "rb") as f:
            job = json.loads(f.read())
        os.dup2(log_fd, 1)  # what the tests print goes to this check's output
        os.dup2(log_fd, 2)
        os.close(log_fd)
        try:
            with open(to_fd, "wb") as to_candidate, open(from_fd, "rb") as from_candidate:
                outcome = check(job, to_candidate, from_candidate)  # never raises
        except OSError:  # closing flushes a call it never read: it closed its end, and failed
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(null, 1)
        os.dup2(null, 2)
        verdict = f"{message.decode()} {' '.join(outcome.split())[:400]}"
        # an error's text may hold lone surrogates (JSON's "\ud800"): shown, not fatal
        control.sendall(verdict.encode(errors="backslashreplace"))


if __name__ == "__main__":
    main()
