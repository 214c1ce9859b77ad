"""The hand-written peer: the official `replicate` client's `async_run` under an asyncio semaphore.

What a user would write instead of this project: a bounded asyncio loop, its own retry of 429s
(the official client does not retry a throttled create), the output bytes written to files.
Prints one JSON line (a child of benchmarks.run).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import httpx
import replicate
from replicate.exceptions import ReplicateError

REPO = Path(__file__).resolve().parents[1]


async def main(n: int, out: Path, concurrency: int) -> dict:
    images = sorted((REPO / "examples" / "images").glob("*.jpg"))
    uris = [f"data:image/jpeg;base64,{base64.b64encode(p.read_bytes()).decode()}" for p in images]
    client = replicate.Client(
        api_token=os.environ["REPLICATE_API_TOKEN"], base_url=os.environ["REPLICATE_BASE_URL"]
    )
    out.mkdir(parents=True, exist_ok=True)
    semaphore = asyncio.Semaphore(concurrency)
    throttled = 0

    async def one(i: int) -> None:
        nonlocal throttled
        async with semaphore:
            while True:
                try:
                    output = await client.async_run(
                        "black-forest-labs/flux-kontext-dev",
                        input={
                            "prompt": "studio shot",
                            "input_image": uris[i % len(uris)],
                            "aspect_ratio": "1:1",
                            "output_format": "jpg",
                        },
                    )
                    break
                except ReplicateError as exc:
                    if exc.status != 429:
                        raise
                    throttled += 1
                    await asyncio.sleep(1.0)  # the body says retry_after=1 in the sandbox's answers
            if isinstance(output, str):  # FileOutput only wraps https URLs; the sandbox serves http
                data = (await downloads.get(output)).raise_for_status().content
            else:
                data = await output.aread()
            (out / f"{i}.jpg").write_bytes(data)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as downloads:
        await asyncio.gather(*(one(i) for i in range(n)))
    return {"seconds": time.perf_counter() - started, "throttled": throttled}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))), flush=True)
