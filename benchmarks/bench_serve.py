"""Load test of ``torsion serve`` on loopback: 32 concurrent clients against the same requests one at a time.

Target: concurrent (batched) serving has at least 2x the throughput of sequential serving of
the same requests, in the same run, on the embedded Qwen model; every concurrent output
equals the output the same request got alone. Requests: 32 distinct pairs of 16 prompts and
4 steering settings (none, flat, dense at an equal applied norm, ablation; random unit
directions), greedy, ``max_tokens`` 16, through the real ``openai`` client. Bounded: 65
requests in all (one warm-up), each with a timeout. ``os.getloadavg()`` is recorded before
and after, since the machine is shared.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import torch
from common import NEUTRAL_PROMPTS, write_result
from openai import OpenAI

from torsion.models import load_model
from torsion.serve import ServerThread, build_state

N_CLIENTS, MAX_TOKENS, MAX_BATCH, WINDOW_MS, SEED, TIMEOUT_S = 32, 16, 32, 20.0, 0, 900
PROMPTS = NEUTRAL_PROMPTS
STEERINGS = [
    None,
    {"method": "flat", "vector": "random", "layers": [10, 12], "strength": 6.0},
    {"method": "dense", "vector": "random", "strength": 2.0, "scale": "applied_norm"},
    {"method": "ablation", "vector": "random", "strength": 1.0},
]


def ask(client: OpenAI, index: int) -> tuple[str, float]:
    """(content, latency s) of request ``index``: prompt ``index % 16``, steering ``(index + index // 16) % 4``."""
    steering = STEERINGS[(index + index // len(PROMPTS)) % len(STEERINGS)]
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}], temperature=0,
        max_tokens=MAX_TOKENS, extra_body={"steering": steering} if steering else {})
    return reply.choices[0].message.content, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    lm = load_model("embedded:qwen2.5-coder-0.5b")
    state = build_state(lm, max_batch_size=MAX_BATCH, batch_window_ms=WINDOW_MS)
    directions = torch.nn.functional.normalize(
        torch.randn(lm.n_layers, lm.d_model, generator=torch.Generator().manual_seed(SEED)), dim=1)
    state.vectors.add("random", directions, source="bench_serve: random unit per block", meta={"seed": SEED})
    load_before = os.getloadavg()
    with ServerThread(state) as server:
        client = OpenAI(base_url=server.url, api_key="none", timeout=TIMEOUT_S, max_retries=0)
        ask(client, 0)  # warm-up
        start = time.perf_counter()
        alone = [ask(client, i) for i in range(N_CLIENTS)]
        sequential_s = time.perf_counter() - start
        batches_before = dict(state.engine.stats)
        together: list[tuple[str, float] | None] = [None] * N_CLIENTS
        barrier = threading.Barrier(N_CLIENTS)

        def client_thread(i: int) -> None:
            barrier.wait()
            together[i] = ask(client, i)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(N_CLIENTS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        concurrent_s = time.perf_counter() - start
        stats = {k: state.engine.stats[k] - batches_before.get(k, 0) for k in ("batches", "rows")}
    load_after = os.getloadavg()
    mismatched = [i for i in range(N_CLIENTS) if together[i] is None or together[i][0] != alone[i][0]]
    seq_lat = [latency for _, latency in alone]
    con_lat = [latency for _, latency in together if _ is not None]
    write_result("serve", {
        "model": lm.model_id, "clients": N_CLIENTS, "requests_per_arm": N_CLIENTS, "max_tokens": MAX_TOKENS,
        "decoding": "greedy", "steering_settings": STEERINGS, "direction": "random unit per block",
        "seed": SEED, "max_batch_size": MAX_BATCH, "batch_window_ms": WINDOW_MS,
        "batching": "static batches, finished rows leave the batch and its KV cache",
        "concurrent_batches": stats["batches"], "concurrent_rows": stats["rows"],
        "sequential_s": round(sequential_s, 3), "concurrent_s": round(concurrent_s, 3),
        "sequential_requests_per_s": round(N_CLIENTS / sequential_s, 4),
        "concurrent_requests_per_s": round(N_CLIENTS / concurrent_s, 4),
        "throughput_ratio": round(sequential_s / concurrent_s, 3), "target_ratio": 2.0,
        "sequential_latency_s": {"p50": round(percentile(seq_lat, 50), 3), "p95": round(percentile(seq_lat, 95), 3)},
        "concurrent_latency_s": {"p50": round(percentile(con_lat, 50), 3), "p95": round(percentile(con_lat, 95), 3)},
        "outputs_equal_alone": len(mismatched) == 0, "mismatched_requests": mismatched,
        "distinct_outputs": len({text for text, _ in alone}),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    })


if __name__ == "__main__":
    main()
