"""Run by test_training.py under `torchrun --nproc_per_node 2`: one stage-2 step on the CPU
(gloo), then each rank writes a digest of the weights it ends with.

usage: two_ranks.py MODEL DATA IMAGES OUT REPORT_DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from llava_edge.training.train import train


def main() -> None:
    model, data, images, out, report_dir = sys.argv[1:6]
    result = train(
        2,
        model,
        data,
        out,
        images=images,
        max_steps=1,
        warmup_ratio=0.0,
        global_batch_size=4,
        per_device_batch_size=2,
        gradient_checkpointing=False,
        progress=False,
        save_steps=1000,
        force=True,
    )
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    report = {
        "digest": digest.hexdigest(),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "steps": result.steps,
    }
    Path(report_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
