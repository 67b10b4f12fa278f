"""Export: a version written as a PEFT directory loads in PEFT as it is, with exactly the materialised θ."""

from __future__ import annotations

import json

import pytest
import torch
from store_helpers import assert_theta_equal, mezo_applier, run_steps

from adapters_store import AdapterState
from scheduler.models.tiny import ensure_model
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir


@pytest.fixture(scope="module")
def tiny_opt():
    return ensure_model("tiny-opt")


async def test_exported_version_loads_in_peft(store, tiny_opt, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    layout = layout_for_model_dir(tiny_opt, LoraShape(4, 8.0, ("q_proj", "v_proj")))
    live = initial_state(layout, seed=3)
    await store.create_adapter("exp", base_model=str(tiny_opt), rank=4, alpha=8.0,
                               target_modules=("q_proj", "v_proj"), initial=AdapterState({k: v.clone() for k, v in live.items()}))
    await run_steps(store, "exp", layout, live, 6)
    apply = mezo_applier(layout)

    out_dir = await store.export_peft("exp", 6, tmp_path / "export" / "exp@6", apply)
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])

    base = AutoModelForCausalLM.from_pretrained(tiny_opt, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out_dir)
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert_theta_equal(loaded, (await store.materialize("exp", 6, apply)).theta)
    assert_theta_equal(loaded, live)

    # The adapter is live in the model: B ≠ 0 after training steps, so outputs move.
    input_ids = torch.tensor([[2, 10, 20, 30, 40]])
    with torch.no_grad():
        tuned = model(input_ids=input_ids).logits
        with model.disable_adapter():
            plain = model(input_ids=input_ids).logits
    assert not torch.equal(tuned, plain)
