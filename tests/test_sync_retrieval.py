"""CAV-MAE Sync retrieval strategies: the batched similarities and metrics equal the released script's on the same
per-frame features (tests/data/cavmae_sync_ref.npz, made by tests/make_sync_reference.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae.train.retrieve import STRATEGIES, frame_retrieval, frame_similarity, recall_metrics

REF = np.load(Path(__file__).parent / "data" / "cavmae_sync_ref.npz", allow_pickle=False)
AUDIO = torch.from_numpy(REF["retrieval/audio"])
VISUAL = torch.from_numpy(REF["retrieval/visual"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_similarities_and_metrics_equal_the_released_script(strategy):
    for direction, (rows, cols) in (("audio", (AUDIO, VISUAL)), ("video", (VISUAL, AUDIO))):
        sim = frame_similarity(rows, cols, strategy)
        ref = torch.from_numpy(REF[f"retrieval/{strategy}/{direction}/sim"])
        torch.testing.assert_close(sim.double(), ref, atol=1e-6, rtol=0)  # released: float32 cosines, one by one
        r1, r5, r10, mr = REF[f"retrieval/{strategy}/{direction}/metrics"]
        assert recall_metrics(sim) == {"R@1": r1, "R@5": r5, "R@10": r10, "MR": mr}
    result = frame_retrieval(AUDIO, VISUAL, strategy)
    assert result["audio_to_video"]["R@1"] == REF[f"retrieval/{strategy}/audio/metrics"][0]
    assert result["video_to_audio"]["MR"] == REF[f"retrieval/{strategy}/video/metrics"][3]
    assert result["samples"] == 40 and result["strategy"] == strategy


def test_max_by_blocks_equals_all_at_once():
    whole = frame_similarity(AUDIO, VISUAL, "max")
    for block in (1, 16 * 40, 16 * 40 * 7):  # one query clip per block, then several, then a ragged last block
        assert torch.equal(frame_similarity(AUDIO, VISUAL, "max", block_elements=block), whole)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy must be one of"):
        frame_similarity(AUDIO, VISUAL, "median")
