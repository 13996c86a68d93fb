"""How many measurements does the study need, against an exhaustive grid of the same space, to
find the same Pareto front and the same choice?

Runs the exhaustive grid once (every setting measured), then sampled studies of N trials over
the same space with several seeds. Both read the same latency and quality caches, so every study
sees identical numbers for a setting and only the search differs. Prints, per N, how much of the
exhaustive front each sampled study found and whether it made the same choice.

    python benchmarks/study_efficiency.py --budget-ms 30 --trials 12,24,36
"""

from __future__ import annotations

import argparse
from pathlib import Path

from looptune.bundled import family_members
from looptune.search.choice import Budgets
from looptune.search.pareto import Workload, run_pareto


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-ms", type=float, required=True)
    ap.add_argument("--trials", default="12,24,36")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--windows", default="16,32,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    args = ap.parse_args()

    members = family_members()
    budgets = Budgets(args.budget_ms)
    windows = [int(w) for w in args.windows.split(",")]
    dtypes = args.dtypes.split(",")
    work = Workload(
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        limit=args.limit,
        min_time_s=0.3,
        min_repeats=3,
    )
    # Studies in memory (run_pareto writes nothing without a path); the caches are shared.
    grid = run_pareto(members, budgets, work, windows=windows, dtypes=dtypes, trials=10**6)
    grid_front = {o.knobs for o in grid.front}
    grid_best = grid.choice.best.knobs if grid.choice.best else None
    print(
        f"space: {len(members)} members x 4 loops x {len(windows)} windows x "
        f"{len(dtypes)} dtypes = {grid.grid_size} settings"
    )
    print(
        f"exhaustive grid: {grid.grid_size} measurements, front of {len(grid_front)}, "
        f"choice {_name(grid_best)}"
    )
    print("trials  share_of_grid  front_found(mean)  same_choice")
    for n in [int(t) for t in args.trials.split(",")]:
        found, same = [], 0
        for seed in range(args.seeds):
            res = run_pareto(
                members,
                budgets,
                work,
                windows=windows,
                dtypes=dtypes,
                trials=n,
                sampler_seed=seed,
            )
            measured = {o.knobs for o in res.outcomes}
            found.append(len(grid_front & measured) / len(grid_front))
            same += (res.choice.best.knobs if res.choice.best else None) == grid_best
        print(
            f"{n:6d}  {n / grid.grid_size:13.2f}  {sum(found) / len(found):17.2f}  "
            f"{same}/{args.seeds}"
        )


def _name(knobs) -> str:
    if knobs is None:
        return "none"
    return f"{Path(knobs.checkpoint).name} R={knobs.loops} W={knobs.window} {knobs.dtype}"


if __name__ == "__main__":
    main()
