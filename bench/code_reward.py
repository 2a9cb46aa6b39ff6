"""Code-reward time of one GRPO step's replies: the batched sandbox (CodeEnv.reward_batch: one sandboxed
supervisor, a forked child per reply) against one sandboxed interpreter per reply, 16 at a time from threads
(what the environment did before). The replies: the reference solution of each of `--problems` problems and
`--generations - 1` variants of it (an off-by-one constant, so some fail), distinct as sampled replies are.

    python bench/code_reward.py                      # 32 problems x 8 = 256 replies
"""
from __future__ import annotations

import argparse
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from dsv4.posttrain.envs.code import _HARNESS, _RESULT_PREFIX, CodeEnv
from dsv4.posttrain.sandbox import run_python


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    env = CodeEnv("easy")
    items = []
    for problem in env.heldout(args.problems):
        for g in range(args.generations):
            body = problem.meta["solution"] + ("" if g == 0 else f" + {g - 1}")
            items.append((problem, [{"role": "assistant", "content": f"```python\n{body}\n```"}]))

    def one_process_each() -> list[str]:
        def run(item):
            problem, turns = item
            source = turns[-1]["content"].split("```python\n")[1].split("```")[0]
            spec = {"nonce": secrets.token_hex(8), "prefix": _RESULT_PREFIX, "entry": problem.answer["entry"],
                    "inputs": problem.answer["inputs"], "per_test_s": env.per_test_s}
            return run_python(f"_SOURCE = {source!r}\n" + _HARNESS, stdin=json.dumps(spec), limits=env.limits).stdout
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(run, items))

    timings: dict[str, list[float]] = {"batched": [], "one process each": []}
    for _ in range(args.repeat):
        for name, fn in (("batched", lambda: env.reward_batch(items)), ("one process each", one_process_each)):
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    rewards = env.reward_batch(items)
    print(f"{len(items)} replies; accuracy {sum(r.correct for r in rewards) / len(rewards):.3f}")
    for name, ts in timings.items():
        print(f"{name}: best {min(ts):.3f} s, median {sorted(ts)[len(ts) // 2]:.3f} s over {len(ts)}")


if __name__ == "__main__":
    main()
