import os

import pytest
import torch

# Tests are small: one thread per process keeps them fast and deterministic on 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "esft")


@pytest.fixture
def shared_esft_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"ESFT task data not found at {SHARED_DATA} (only present in this workplace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def esft_run(tmp_path_factory):
    """An ESFT artifact (experts 3, 7 of layer 1) on tiny:deepseek_v2, written by the ESFT method as `train` does."""
    import json
    from types import SimpleNamespace

    from moecraft.artifacts import base_fingerprint, write_manifest
    from moecraft.methods import get_method
    from moecraft.models import load_model

    tmp = tmp_path_factory.mktemp("esft")
    experts = tmp / "experts.json"
    experts.write_text(json.dumps({"family": "deepseek_v2", "num_experts": 16, "experts": {"1": [3, 7]}}))
    model, _ = load_model("tiny:deepseek_v2")
    fingerprint = base_fingerprint(model)
    method = get_method("esft")
    cfg = SimpleNamespace(experts=str(experts), train_shared_experts=None, train_non_expert_modules=None)
    model = method.prepare(model, cfg)
    with torch.no_grad():  # a visible change, as training would make
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    run = tmp / "run"
    run.mkdir()
    method.save(model, run, cfg)
    write_manifest(run, method="esft", base="tiny:deepseek_v2", fingerprint=fingerprint)
    return run
