"""JSON codecs for V2 REST inference bodies: the stdlib `json`, orjson and msgspec.

Run from the repository root: ``.venv/bin/python -m bench.rest_json``. For three request
bodies (a single-sample MyNet request, an MLP request of 784 floats, and a ~60 MB request),
it times decoding the body (bytes -> Python objects, then the `data` array -> numpy, as the
REST front end does) and encoding a response of the same values (numpy -> list -> JSON
bytes), and the cost of one `asyncio.to_thread` hop, which sets the size under which the
front end decodes on the event loop. Then, for the large body, the event loop's longest
pause while the request is decoded in a worker thread, whole (one msgspec call) and as the
server does it (`decode_request`, slice by slice). Prints tables (median and best of the
repeats, in microseconds) and writes ``bench/results/rest_json.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson

from moduleserve.server.frontends.rest_infer import decode_request

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "rest_json.json"

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "json": lambda body: json.loads(str(body, "utf-8")),
    "orjson": orjson.loads,
    "msgspec": msgspec.json.Decoder().decode,
}
ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "json": lambda value: json.dumps(value, separators=(",", ":")).encode(),
    "orjson": orjson.dumps,
    "msgspec": msgspec.json.Encoder().encode,
}


def request(name: str, shape: list[int]) -> tuple[bytes, np.ndarray]:
    """A V2 JSON request body with seeded float32 values, and the values."""
    values = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    body = {"inputs": [{"name": name, "shape": shape, "datatype": "FP32",
                        "data": values.ravel().tolist()}]}  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode(), values


def bodies(big_mb: float) -> dict[str, tuple[bytes, np.ndarray]]:
    # float32 values print as ~19 characters each in JSON.
    big_count = int(big_mb * 1e6 / 20)
    return {
        "mynet [1,3,8,8]": request("x", [1, 3, 8, 8]),
        "mlp [1,784]": request("x", [1, 784]),
        f"big [{big_count}]": request("x", [big_count]),
    }


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds per call, `repeats` times (more calls per sample for fast functions)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    inner = max(1, int(0.02 / max(once, 1e-9)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return samples


def decode_case(decoder: Callable[[bytes], Any], body: bytes) -> Callable[[], Any]:
    def run() -> Any:
        head = decoder(body)
        return np.asarray(head["inputs"][0]["data"]).astype(np.float32)

    return run


def encode_case(encoder: Callable[[Any], bytes], values: np.ndarray) -> Callable[[], Any]:
    def run() -> Any:
        data = values.ravel().tolist()
        out = {"name": "y", "datatype": "FP32", "shape": list(values.shape), "data": data}
        return encoder({"model_name": "m", "model_version": "1", "outputs": [out]})

    return run


async def hop_cost(repeats: int) -> list[float]:
    """One asyncio.to_thread round trip of a function that does nothing."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(100):
            await asyncio.to_thread(int)
        samples.append((time.perf_counter() - start) / 100)
    return samples


async def loop_pause(decode: Callable[[], Any]) -> tuple[float, float]:
    """(seconds the decode took in a worker thread, the loop's longest pause meanwhile):
    a coroutine asks for 1 ms sleeps and records how late each one wakes."""
    pauses: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            pauses.append(time.perf_counter() - start - 0.001)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    await asyncio.to_thread(decode)
    took = time.perf_counter() - start
    done = True
    await task
    return took, max(pauses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--big-mb", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    cases = bodies(args.big_mb)
    for body_name, (body, values) in cases.items():
        repeats = args.repeats if len(body) < 1e6 else max(3, args.repeats // 2)
        for op, codecs in (("decode", DECODERS), ("encode", ENCODERS)):
            for codec, fn in codecs.items():
                case = decode_case(fn, body) if op == "decode" else encode_case(fn, values)
                samples = timed(case, repeats)
                rows.append({
                    "body": body_name, "bytes": len(body), "op": op, "codec": codec,
                    "median_us": statistics.median(samples) * 1e6, "best_us": min(samples) * 1e6,
                })  # fmt: skip
    hop = asyncio.run(hop_cost(args.repeats))
    big = list(cases.values())[-1][0]
    pauses = []
    for label, decode in (
        ("msgspec, one call", lambda: DECODERS["msgspec"](big)),
        ("decode_request, sliced", lambda: decode_request(big, None)),
    ):
        for _ in range(3):
            took, pause = asyncio.run(loop_pause(decode))
            pauses.append(
                {"decoder": label, "decode_ms": took * 1e3, "longest_pause_ms": pause * 1e3}
            )
    print(f"{'body':<20} {'bytes':>10} {'op':<7} {'codec':<8} {'median µs':>12} {'best µs':>12}")
    for r in rows:
        print(f"{r['body']:<20} {r['bytes']:>10} {r['op']:<7} {r['codec']:<8} "
              f"{r['median_us']:>12.1f} {r['best_us']:>12.1f}")  # fmt: skip
    print(f"asyncio.to_thread hop: median {statistics.median(hop) * 1e6:.1f} µs, "
          f"best {min(hop) * 1e6:.1f} µs")  # fmt: skip
    print(f"\n{len(big)}-byte body decoded in a worker thread:")
    print(f"{'decoder':<24} {'decode ms':>10} {'longest loop pause ms':>22}")
    for p in pauses:
        print(f"{p['decoder']:<24} {p['decode_ms']:>10.0f} {p['longest_pause_ms']:>22.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    hop_us = {"median_us": statistics.median(hop) * 1e6, "best_us": min(hop) * 1e6}
    result = {"rows": rows, "to_thread_hop": hop_us, "loop_pauses": pauses}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
