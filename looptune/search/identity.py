"""What identifies a study: everything that decides its numbers.

The members' content hashes, the search space, the workload (batch, prompt and generated
lengths, latency metric, the stopping rule of a latency measurement), the quality set (and the
content of a JSONL file), its subset (limit, seed), the device fingerprint (hardware, dtype-free
software versions, CPU threads) and the versions of the measuring code. Budgets are not part of
it: they only filter the stored outcomes. A study is named after a hash of its identity unless a
name is given; a named study opened with another identity is refused, saying what changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def plain(value):
    """The JSON form (tuples as lists, paths as strings), as a study's user attrs store it."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def study_identity(checkpoints, work, space, device) -> dict:
    """The identity of a study of `space` on `checkpoints` for the Workload `work`."""
    from looptune import __version__
    from looptune.measure.env import environment, fingerprint
    from looptune.measure.latency import METHOD
    from looptune.model.checkpoint import content_hash
    from looptune.quality.score import CACHE_VERSION

    machine = fingerprint(environment(device, space.dtypes[0]))
    machine.pop("dtype", None)  # the dtypes are in the space
    quality_set = str(work.quality_set)
    set_file = Path(quality_set)
    return plain(
        {
            "members": [
                {"name": Path(c).name, "content_hash": content_hash(c)} for c in checkpoints
            ],
            "space": space.grid(),
            "batch": work.batch,
            "prompt_len": work.prompt_len,
            "gen_len": work.gen_len,
            "metric": work.metric,
            "min_time_s": work.min_time_s,
            "min_repeats": work.min_repeats,
            "quality_set": quality_set,
            "quality_set_sha256": (
                hashlib.sha256(set_file.read_bytes()).hexdigest() if set_file.is_file() else None
            ),
            "limit": work.limit,
            "seed": work.seed,
            "machine": machine,
            "versions": {
                "looptune": __version__,
                "latency_method": METHOD,
                "quality_cache": CACHE_VERSION,
            },
        }
    )


def study_name(identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(plain(identity), sort_keys=True).encode()).hexdigest()
    return f"looptune-{digest[:12]}"


def describe_change(old: dict, new: dict, prefix: str = "") -> str:
    """What differs between two identities, in a few words ("" when they are the same)."""
    changes = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in new, k)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes.append(describe_change(a, b, f"{name}."))
        elif key == "members" and isinstance(a, list) and isinstance(b, list):
            changes.append(_members_change(a, b))
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            changes.append(f"{name} changed")
        else:
            changes.append(f"{name} {a!r} -> {b!r}")
    return ", ".join(changes)


def _members_change(old: list, new: list) -> str:
    names_old, names_new = [m["name"] for m in old], [m["name"] for m in new]
    if names_old != names_new:
        return f"members {', '.join(names_old)} -> {', '.join(names_new)}"
    edited = [m["name"] for m, n in zip(old, new) if m != n]
    return f"the weights of {', '.join(edited)} changed"
