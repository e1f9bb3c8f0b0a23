"""LeRobot's side of ``benchmarks/vs_lerobot.py``: builds a mid-size pi0 or SmolVLA with LeRobot
0.6.1's own classes and times it on request.

Runs in LeRobot's environment (``benchmarks/vs_lerobot_env.sh``), never in vlablocks'. The driver
starts it and speaks JSON lines: one request on stdin, one answer on stdout (logs go to stderr).

Requests (``op``):
- ``build {policy, dest, compile_mode}``: seeded random policy of the mid configuration, saved
  with its processors to ``dest`` (when given); ``compile_mode`` ``null`` = eager, otherwise
  LeRobot's own ``compile_model=True`` with that ``compile_mode``. Answers the parameter count
  of every block and the prefix / suffix lengths.
- ``actions {noise}``: the observation-to-chunk actions for the saved noise file (parity).
- ``time {what, repeats}``: ``what`` = ``chunk`` (pre-processor + ``predict_action_chunk`` +
  post-processor at batch 1) or ``train`` (``forward`` + ``backward`` at batch 8); answers the
  per-pass seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data" / "lerobot_policies"))
import generate as fixtures  # noqa: E402  (the fixture generator's LeRobot size patches and tokenizer)

SEED = 0
CAM = "observation.images.cam"
STATE_DIM, ACTION_DIM = 8, 7
RESOLUTION = (224, 224)
TASK = "pick up the red cube , open the drawer and put the blue cube in the box"
VOCAB = 1024
# the mid configuration of issue 23: VLM 512 x 8 (8 heads x 64, 1 kv head, MLP 2048), expert 256 (MLP 1024),
# SigLIP 256 x 4 (4 heads) at 224 px with 16-px patches; 48 text tokens, chunk 50, 10 Euler steps.
MID_GEMMA = {
    "gemma_2b": dict(width=512, depth=8, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
    "gemma_300m": dict(width=256, depth=8, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64),
}
MID_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, patch_size=16)
# SmolVLA's mid sibling: a SmolVLM with a 512-wide, 8-layer text model (8 heads x 64, 2 kv heads) and the same
# vision tower size at 224 px (pixel shuffle 2: 49 image tokens); the expert is 0.75 x as wide (LeRobot's rule).
MID_SMOLVLM = dict(
    text_config=dict(model_type="llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=VOCAB,
                     max_position_embeddings=2048, rms_norm_eps=1e-5),
    vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       patch_size=16, image_size=224),
    scale_factor=2, image_token_id=VOCAB - 1, vocab_size=VOCAB,
)


def raw_observation(batch: int, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {CAM: torch.rand(batch, 3, *RESOLUTION, generator=g),
            "observation.state": torch.randn(batch, STATE_DIM, generator=g),
            "task": [TASK] * batch}


def features():
    from lerobot.configs.types import FeatureType, PolicyFeature
    inp = {CAM: PolicyFeature(type=FeatureType.VISUAL, shape=(3, *RESOLUTION)),
           "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))}
    return inp, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}


@contextlib.contextmanager
def tokenizer_step(tokenizer, set_name: bool):
    """LeRobot's processor factories name a Hub tokenizer; give their tokenizer step the local one."""
    from lerobot.processor import tokenizer_processor as tp
    original = tp.TokenizerProcessorStep.__post_init__

    def post_init(self):
        if set_name:
            self.tokenizer_name = "../tokenizer"
        self.tokenizer = tokenizer
        original(self)

    with fixtures.patched(tp.TokenizerProcessorStep, "__post_init__", post_init):
        yield


def build(policy: str, dest: str | None, compile_mode: str | None):
    """(policy, pre-processor, post-processor) of the mid configuration, seeded."""
    tokenizer, _ = fixtures.build_tokenizer(Path(dest or "/tmp/vs_lerobot_tokenizer") / "tokenizer")
    inp, out = features()
    common = dict(input_features=inp, output_features=out, device="cpu", chunk_size=50, n_action_steps=50,
                  max_state_dim=32, max_action_dim=32, tokenizer_max_length=48,
                  compile_model=compile_mode is not None, compile_mode=compile_mode or "max-autotune")
    if policy == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as mod
        from lerobot.policies.pi0.configuration_pi0 import PI0Config
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors
        cfg = PI0Config(**common, num_inference_steps=10, image_resolution=RESOLUTION, dtype="float32")
        torch.manual_seed(SEED)
        with fixtures.patched(fixtures, "TINY_GEMMA", MID_GEMMA), fixtures.patched(fixtures, "TINY_VISION", MID_VISION), \
                fixtures.paligemma_patches(mod, VOCAB):
            model = mod.PI0Policy(cfg)
        pg = model.model.paligemma_with_expert.paligemma
        with torch.no_grad():  # released checkpoints tie the embedding to lm_head
            pg.model.language_model.embed_tokens.weight.copy_(pg.lm_head.weight)
        with tokenizer_step(tokenizer, set_name=True):
            pre, post = make_pi0_pre_post_processors(cfg, dataset_stats=fixtures.stats(STATE_DIM, ACTION_DIM))
    elif policy == "smolvla":
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
        from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
        tokenizer.fake_image_token_id = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
        tokenizer.global_image_token_id = tokenizer.convert_tokens_to_ids("<global-img>")
        cfg = SmolVLAConfig(**common, num_steps=10, resize_imgs_with_padding=RESOLUTION, vlm_model_name="../tokenizer",
                            load_vlm_weights=False, num_vlm_layers=8, freeze_vision_encoder=False,
                            train_expert_only=False)
        torch.manual_seed(SEED)
        with fixtures.smolvlm_patches(MID_SMOLVLM, tokenizer):
            model = SmolVLAPolicy(cfg)
        if dest is not None:  # the VLM's config beside its tokenizer: the converter reads its head counts there
            from transformers import SmolVLMConfig
            SmolVLMConfig(**MID_SMOLVLM).save_pretrained(Path(dest) / "tokenizer")
        with tokenizer_step(tokenizer, set_name=False):
            pre, post = make_smolvla_pre_post_processors(cfg, dataset_stats=fixtures.stats(STATE_DIM, ACTION_DIM))
    else:
        raise ValueError(f"policy must be pi0 or smolvla; got {policy!r}")
    model.eval()
    if dest is not None:
        model.save_pretrained(dest)
        pre.save_pretrained(dest)
        post.save_pretrained(dest)
    return model, pre, post


def blocks(model) -> dict[str, int]:
    """Parameter count of every top-level block (the driver compares them with vlablocks')."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[: parts.index("layers") + 2]) if "layers" in parts else ".".join(parts[:-1])
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


class Worker:
    def __init__(self) -> None:
        self.model = self.pre = self.post = None
        self.train_batch = None
        self.optimizer = None

    def build(self, policy: str, dest: str | None = None, compile_mode: str | None = None) -> dict:
        self.model, self.pre, self.post = build(policy, dest, compile_mode)
        raw = raw_observation(1)
        if dest is not None:  # the driver gives vlablocks the same observation
            save_file({"image": raw[CAM], "state": raw["observation.state"]}, str(Path(dest) / "observation.safetensors"))
        batch = self.pre(raw)
        lang = batch["observation.language.tokens"]
        return {"parameters": sum(p.numel() for p in self.model.parameters()), "blocks": blocks(self.model), "task": TASK,
                "text_tokens": lang.shape[1], "real_text_tokens": int(batch["observation.language.attention_mask"].sum())}

    @torch.no_grad()
    def chunk(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        self.model.reset()
        batch = self.pre(raw_observation(1))
        kwargs = {} if noise is None else {"noise": noise}
        return self.post(self.model.predict_action_chunk(batch, **kwargs))

    def actions(self, noise: str, out: str) -> dict:
        noise_t = load_file(noise)["noise"]
        save_file({"actions": self.chunk(noise_t).contiguous()}, out)
        return {"written": out}

    def train_step(self) -> None:
        if self.train_batch is None:
            raw = raw_observation(8, seed=11)
            raw["action"] = torch.randn(8, 50, ACTION_DIM, generator=torch.Generator().manual_seed(12))
            self.train_batch = self.pre(raw)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss, _ = self.model.forward(self.train_batch)
        loss.backward()
        self.model.eval()

    def time(self, what: str, repeats: int = 1) -> dict:
        fn = {"chunk": self.chunk, "train": self.train_step}[what]
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        return {"seconds": seconds}


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr
    torch.set_num_threads(int(os.environ.get("VS_THREADS", torch.get_num_threads())))
    worker = Worker()
    protocol.write(json.dumps({"ready": True, "torch": torch.__version__,
                               "lerobot": __import__("lerobot").__version__}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            answer = getattr(worker, op)(**request)
        except Exception as err:  # the driver reports it and stops
            answer = {"error": f"{type(err).__name__}: {err}"}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__":
    main()
