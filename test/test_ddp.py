"""DDP on CPU: two gloo processes started by torchrun see disjoint data and end with identical weights."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from rgbt_seg_ros.training.trainer import Trainer

    out = sys.argv[1]
    text = torch.nn.functional.normalize(torch.randn(8, 384, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = {
        "dataset": "synthetic", "dataset_options": {"count": 8, "size": [64, 96]}, "val_dataset_options": {"count": 4},
        "epochs": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
        "model": {"input_size": [64, 96]},
    }
    tr = Trainer("models/sartm_micro.yaml", cfg, out, text_embeddings=text)
    summary = tr.fit()
    digest = hashlib.sha256()
    for k, v in sorted(tr.model.state_dict().items()):
        digest.update(k.encode()); digest.update(v.detach().contiguous().numpy().tobytes())
    res = {"rank": tr.dist.rank, "world": tr.dist.world_size, "seen": tr.seen_indices, "steps": tr.step,
           "sha": digest.hexdigest(), "best_miou": summary["best_miou"]}
    with open(os.path.join(out, f"rank{tr.dist.rank}.json"), "w") as f:
        json.dump(res, f)
    tr.close()
    """
)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this interpreter")
def test_two_gloo_ranks_see_disjoint_data_and_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    out.mkdir()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["world"] == r1["world"] == 2
    # 8 items, 2 ranks, batch 2: 2 steps per epoch, 4 in all, each rank 4 items per epoch
    assert r0["steps"] == r1["steps"] == 4
    for epoch in range(2):
        a, b = r0["seen"][4 * epoch : 4 * epoch + 4], r1["seen"][4 * epoch : 4 * epoch + 4]
        assert not set(a) & set(b) and sorted(a + b) == list(range(8))
    assert r0["seen"][:4] != r0["seen"][4:]  # reshuffled per epoch
    assert r0["sha"] == r1["sha"]
    assert r0["best_miou"] == r1["best_miou"]  # validation shards summed over both ranks
    # only rank 0 writes the run directory
    assert (out / "last" / "model.safetensors").is_file() and (out / "best" / "metrics.json").is_file()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows if '"train"' in r] == [1, 2, 3, 4]
    assert hashlib.sha256((out / "last" / "model.safetensors").read_bytes()).hexdigest()
