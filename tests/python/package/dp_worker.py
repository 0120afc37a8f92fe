"""One process of the data-parallel recording test: `python dp_worker.py
OUT RANK WORLD PORT`. Records 4 fixed batches of a tiny random LLaMA — all of
them with WORLD=1, else batch k on rank k % WORLD under torch.distributed
(gloo on 127.0.0.1) — and saves the statistics (rank 0 writes)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from helpers import padded, tiny_llama  # noqa: E402

from flatmerge.torch import Recording  # noqa: E402

BATCHES = [
    [[1, 5, 9, 33, 2], [1, 7, 3]],
    [[1, 60, 61, 62, 10, 11, 12], [1, 4]],
    [[1, 8, 8], [1, 2, 3, 4, 5, 6, 7, 8]],
    [[1, 30], [1, 31, 32, 33]],
]


def main():
    out, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    # One thread: the same batch gives the same activations in every process.
    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = tiny_llama(seed=5)
    with torch.no_grad(), Recording(model, gram=True, rows=True, source="dp") as rec:
        for k, seqs in enumerate(BATCHES):
            if k % world != rank:
                continue
            ids, mask = padded(seqs)
            with rec.batch(example_ids=[2 * k, 2 * k + 1]):
                model(input_ids=ids, attention_mask=mask)
    rec.save(out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
