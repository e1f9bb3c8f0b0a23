"""LeRobot 0.6.1 loads the policies vlablocks exported to its layout and records the actions it predicts.

Run from the repository root, after writing the exports with the project's environment::

    .venv/bin/python tests/lerobot_roundtrip.py /tmp/vlablocks_exported
    HF_HUB_OFFLINE=1 /work/lerobot_envs/v3/bin/python tests/data/lerobot_policies/roundtrip.py /tmp/vlablocks_exported

For each of pi0, pi05, smolvla: ``<Policy>.from_pretrained(export)`` (under the same size patches as
generate.py: config.json cannot carry the tiny sizes) and the exported pre/post-processors
(``PolicyProcessorPipeline.from_pretrained``, the tiny tokenizer passed as an override) predict a
chunk from the fixture's raw batch and sample noise. Written to ``<name>/roundtrip.json``: the
sha256 of the exported files LeRobot read, whether every weight LeRobot holds equals the export,
the statistics its processors hold and the un-normalised actions.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import generate as g  # the fixtures' generator: size patches, tokenizer, batch (same folder)
import lerobot
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
from lerobot.processor.pipeline import PolicyProcessorPipeline

HERE = Path(__file__).resolve().parent


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(name: str, export: Path, tokenizer):
    if name == "smolvla":
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy as Pol
        with g.smolvlm_patches(g.TINY_SMOLVLM, tokenizer):
            return Pol.from_pretrained(export)
    if name == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as mod
    else:
        from lerobot.policies.pi05 import modeling_pi05 as mod
    with g.paligemma_patches(mod, 64):
        return (mod.PI0Policy if name == "pi0" else mod.PI05Policy).from_pretrained(export)


def roundtrip(name: str, export: Path) -> dict:
    tokenizer, _ = g.build_tokenizer(HERE / "tokenizer")
    if name == "smolvla":
        tokenizer.fake_image_token_id = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        tokenizer.global_image_token_id = tokenizer.convert_tokens_to_ids("<global-img>")
    policy = load(name, export, tokenizer).eval()
    exported = load_file(export / "model.safetensors")
    own = policy.state_dict()
    weights_equal = sorted(own) == sorted(exported) and all(torch.equal(own[k], exported[k]) for k in own)
    overrides = {"tokenizer_processor": {"tokenizer": tokenizer}}
    pre = PolicyProcessorPipeline.from_pretrained(export, config_filename="policy_preprocessor.json", overrides=overrides)
    post = PolicyProcessorPipeline.from_pretrained(export, config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition,
                                                   to_output=transition_to_policy_action)
    ref = load_file(HERE / name / "reference.safetensors")
    raw = {g.CAM: ref["raw.image"], "observation.state": ref["raw.state"], "task": list(g.TASKS)}
    with torch.no_grad():
        batch = pre(dict(raw))
        if hasattr(policy, "reset"):
            policy.reset()
        chunk = policy.predict_action_chunk(batch, noise=ref["sample_noise"].clone())
        actions = post(chunk)
    normalizer = next(s for s in pre.steps if type(s).__name__ == "NormalizerProcessorStep")
    stats = {f"{feature}.{stat}": value.tolist() for feature, values in normalizer._tensor_stats.items()
             for stat, value in values.items() if stat in ("mean", "std", "q01", "q99")}
    return {
        "lerobot": lerobot.__version__, "torch": torch.__version__,
        "files_sha256": {p.name: sha256(p) for p in sorted(export.iterdir()) if p.is_file()},
        "weights_equal_export": bool(weights_equal), "n_weights": len(own),
        "normalizer_stats": stats,
        "batch_state": batch["observation.state"].tolist(),
        "actions": actions.tolist(),
    }


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for name in ("pi0", "pi05", "smolvla"):
        result = roundtrip(name, root / name / "exported")
        (HERE / name / "roundtrip.json").write_text(json.dumps(result, indent=1))
        print(name, "weights equal:", result["weights_equal_export"])
