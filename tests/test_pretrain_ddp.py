"""MoCoV2 under real DDP: 2 CPU processes, gloo, Lightning's ``strategy="ddp"`` launcher.

The test runs this file as a script (the way ``torchrun``/``srun`` start ranks: Lightning re-executes
the same command for rank 1). Each rank dumps its queue, its last local keys, the indices it saw and
a shuffle-BN round trip; the test then checks that

* both ranks hold the *same* queue and pointer after enqueueing all-gathered keys,
* the rows written by the last step are rank 0's keys followed by rank 1's (keys from both ranks),
* the ranks trained on disjoint patches (per-rank slices of one shared order),
* MoCo's cross-rank batch shuffle really mixes ranks and unshuffles exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~16 s: two ranks start and gather
def test_ddp_two_cpu_ranks_share_one_queue_of_gathered_keys(small_corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, __file__, str(small_corpus), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == 3 * 2 * 8
    assert int(r0["n_enqueued"]) == 48
    last_rows = r0["queue"][32:48]
    assert torch.equal(last_rows, torch.cat([r0["keys"], r1["keys"]])), "queue must hold both ranks' keys, rank order"
    assert not torch.equal(r0["keys"], r1["keys"])
    for a, b in zip(r0["seen"], r1["seen"]):
        assert not set(a) & set(b), "ranks must train on disjoint patches"
    assert r0["unshuffled_ok"] and r1["unshuffled_ok"] and (r0["mixed"] or r1["mixed"])


def _worker(corpus_path: str, out: str) -> None:
    import pytorch_lightning as pl

    from cemnet.data.augment import AugmentConfig
    from cemnet.data.datamodule import EMPatchDataModule
    from lightly.models.utils import batch_shuffle, batch_unshuffle
    from cemnet.methods.mocov2 import MoCoV2

    class Dump(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[list[int]] = []
            self.shuffle: dict[str, bool] = {}

        def on_train_start(self, trainer, pl_module):
            x = torch.arange(8, dtype=torch.float32)[:, None] + 100 * trainer.global_rank
            shuffled, idx = batch_shuffle(x, distributed=True)
            self.shuffle = {
                "unshuffled_ok": bool(torch.equal(batch_unshuffle(shuffled, idx, distributed=True), x)),
                "mixed": bool((shuffled >= 100).any() and (shuffled < 100).any()),
            }

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            self.keys = outputs["keys"].detach().clone()

        def on_train_end(self, trainer, pl_module):
            mb = pl_module.memory_bank
            torch.save({"queue": mb.keys.clone(), "ptr": mb.ptr.clone(), "n_enqueued": mb.n_enqueued.clone(),
                        "keys": self.keys, "seen": self.seen, "world_size": trainer.world_size, **self.shuffle},
                       Path(out) / f"rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    dm = EMPatchDataModule(corpus_path, batch_size=8, num_workers=0, augment=AugmentConfig(crop_size=32))
    model = MoCoV2(arch="resnet18", queue_size=64, lr_batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Dump()])
    trainer.fit(model, dm)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
