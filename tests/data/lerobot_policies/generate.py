"""Generate tiny LeRobot 0.6.1 policy fixtures (pi0, pi05, smolvla) with reference outputs.

Run (from the repository root):
    HF_HUB_OFFLINE=1 /work/lerobot_envs/v3/bin/python tests/data/lerobot_policies/generate.py [pi0 pi05 smolvla]
See README.md beside this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from safetensors.torch import save_file

import lerobot
from lerobot.configs.types import FeatureType, PolicyFeature

OUT = Path(__file__).resolve().parent
SEED = 0
B = 2
STATE_DIM = 4
ACTION_DIM = 3
CAM = "observation.images.cam"
RAW_HW = (24, 40)  # raw camera size; != model resolution so resize-with-pad is exercised
TASKS = ["pick up the red cube", "open the drawer"]

# ----------------------------------------------------------------------------- tokenizer
WORDS = ["pick", "up", "the", "red", "cube", "open", "drawer", "Task", "State", "Action", "blue",
         "put", "in", "box", "<image>", "<fake_token_around_image>", "<global-img>"]


def build_tokenizer(path: Path):
    """Tiny deterministic WordLevel tokenizer (PaliGemma-like: <pad>=0 <eos>=1 <bos>=2, BOS prepended)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab_list = specials + ["\n"] + [str(d) for d in range(10)] + list(",;:.!?-") + WORDS
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast, len(vocab_list)


# ----------------------------------------------------------------------------- helpers
def stats(state_dim=STATE_DIM, action_dim=ACTION_DIM):
    g = torch.Generator().manual_seed(123)
    out = {}
    for key, d in (("observation.state", state_dim), ("action", action_dim)):
        mean = torch.randn(d, generator=g) * 0.2
        std = torch.rand(d, generator=g) * 0.5 + 0.5
        out[key] = {"mean": mean, "std": std, "min": mean - 2 * std, "max": mean + 2 * std,
                    "q01": mean - 1.5 * std, "q99": mean + 1.5 * std}
    return out


def raw_batch():
    g = torch.Generator().manual_seed(7)
    return {
        CAM: torch.rand(B, 3, *RAW_HW, generator=g),
        "observation.state": torch.randn(B, STATE_DIM, generator=g),
        "action": torch.randn(B, 6, ACTION_DIM, generator=g),  # sliced to chunk_size below
        "task": list(TASKS),
    }


def features(res):
    inp = {CAM: PolicyFeature(type=FeatureType.VISUAL, shape=(3, *res)),
           "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))}
    out = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    return inp, out


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def tensors_to_lists(d):
    return {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in d.items()}


def keys_of(policy):
    return {k: list(v.shape) for k, v in policy.state_dict().items()}


def save_keys_full(dest, policy_cls, cfg_cls, extra_cfg=None):
    """Full-size model built on the meta device (no weights), unpatched sizes."""
    inp, out = features((224, 224))
    cfg = cfg_cls(input_features=inp, output_features=out, device="cpu", **(extra_cfg or {}))
    # PreTrainedPolicy.__init__ calls .to(config.device), which meta tensors refuse: make .to a no-op here
    with torch.device("meta"), patched(torch.nn.Module, "to", lambda self, *a, **k: self):
        pol = policy_cls(cfg)
    keys = keys_of(pol)
    (dest / "keys_full.json").write_text(json.dumps(
        {"n_params": int(sum(np.prod(s) for s in keys.values())), "keys": keys}, indent=0))
    return len(keys)


# ----------------------------------------------------------------------------- PaliGemma-based (pi0, pi05)
TINY_GEMMA = {
    # VLM and expert share depth, num_heads (8 is hard-coded), num_kv_heads, head_dim
    "gemma_2b": dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=8),
    "gemma_300m": dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=8),
}
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   patch_size=8)


def paligemma_patches(mod, vocab_size):
    """Monkeypatch the size helpers of lerobot.policies.<pi0|pi05>.modeling_* at build time."""
    orig_pg = mod.PaliGemmaForConditionalGenerationWithPiGemma
    orig_ex = mod.PiGemmaForCausalLM

    def get_gemma_config(variant):
        return mod.GemmaConfig(**TINY_GEMMA[variant])

    def make_paligemma(config):
        config._vocab_size = vocab_size
        config.image_token_index = vocab_size
        config.text_config.vocab_size = vocab_size
        vc = config.vision_config
        for k, v in TINY_VISION.items():
            setattr(vc, k, v)
        vc.projection_dim = config.text_config.hidden_size
        config.text_config.num_image_tokens = (vc.image_size // vc.patch_size) ** 2
        return orig_pg(config=config)

    def make_expert(config):
        config.vocab_size = vocab_size
        return orig_ex(config=config)

    stack = contextlib.ExitStack()
    stack.enter_context(patched(mod, "get_gemma_config", get_gemma_config))
    stack.enter_context(patched(mod, "PaliGemmaForConditionalGenerationWithPiGemma", make_paligemma))
    stack.enter_context(patched(mod, "PiGemmaForCausalLM", make_expert))
    return stack


def pi_reference(name, policy, preprocessor, postprocessor, tokenizer, cfg, dest, info):
    torch.manual_seed(SEED + 1)
    raw = raw_batch()
    raw["action"] = raw["action"][:, : cfg.chunk_size]
    batch = preprocessor(dict(raw))
    images, img_masks = policy._preprocess_images(batch)
    lang_tokens = batch["observation.language.tokens"]
    lang_masks = batch["observation.language.attention_mask"]
    state = policy.prepare_state(batch) if hasattr(policy, "prepare_state") else None
    actions = policy.prepare_action(batch)
    g = torch.Generator().manual_seed(SEED + 2)
    noise = torch.randn(actions.shape, generator=g)
    time = torch.tensor([0.3, 0.85])[:B]

    policy.train()
    policy.zero_grad()
    if name == "pi0":
        losses = policy.model.forward(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
    else:
        losses = policy.model.forward(images, img_masks, lang_tokens, lang_masks, actions, noise, time)
    loss_sum = losses[:, :, :ACTION_DIM].sum()
    loss_sum.backward()
    named = dict(policy.named_parameters())
    grad_names = [n for n in named if any(s in n for s in (
        "model.action_in_proj.weight", "model.action_out_proj.weight",
        "language_model.layers.0.self_attn.q_proj.weight", "gemma_expert.model.layers.1.self_attn.q_proj.weight",
        "patch_embedding.weight", "multi_modal_projector.linear.weight", "model.state_proj.weight",
        "time_mlp_in.weight", "action_time_mlp_in.weight", "layers.1.input_layernorm.dense.weight"))]
    grads = {f"grad.{n}": named[n].grad.detach().clone() for n in grad_names}

    # policy-level forward with the same noise/time (LeRobot samples them internally; patched here)
    with patched(policy.model, "sample_noise", lambda shape, device: noise.clone()), \
         patched(policy.model, "sample_time", lambda bsize, device: time.clone()):
        with torch.no_grad():
            pol_loss, _ = policy.forward(batch)

    policy.eval()
    snoise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    with torch.no_grad():
        if name == "pi0":
            sampled = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise=snoise.clone())
            sampled2 = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise=snoise.clone())
        else:
            sampled = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, noise=snoise.clone())
            sampled2 = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, noise=snoise.clone())
        chunk = policy.predict_action_chunk(batch, noise=snoise.clone())
        chunk_unnorm = postprocessor(chunk)
    # determinism: repeat forward
    with torch.no_grad():
        if name == "pi0":
            losses2 = policy.model.forward(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
        else:
            losses2 = policy.model.forward(images, img_masks, lang_tokens, lang_masks, actions, noise, time)

    tensors = {
        "raw.image": raw[CAM], "raw.state": raw["observation.state"], "raw.action": raw["action"],
        "batch.image": batch[CAM], "batch.state": batch["observation.state"], "batch.action": batch["action"],
        "model.image": images[0], "model.image_mask": img_masks[0],
        "model.lang_tokens": lang_tokens, "model.lang_masks": lang_masks,
        "model.actions": actions, "noise": noise, "time": time,
        "loss_per_element": losses.detach(), "policy_forward_loss": pol_loss.detach().reshape(1),
        "sample_noise": snoise, "sampled_actions": sampled, "predict_action_chunk": chunk,
        "predict_action_chunk_unnormalized": chunk_unnorm,
    }
    if state is not None:
        tensors["model.state"] = state
    tensors.update(grads)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dest / "reference.safetensors"))
    texts = [tokenizer.decode(t[m.bool()]) for t, m in zip(lang_tokens, lang_masks)]
    info.update({
        "tasks_raw": TASKS,
        "token_ids": lang_tokens.tolist(), "attention_mask": lang_masks.int().tolist(),
        "tokens_as_text": [tokenizer.convert_ids_to_tokens(t.tolist()) for t in lang_tokens],
        "decoded_prompt": texts,
        "loss_definition": "loss_per_element = policy.model.forward(...) (F.mse_loss(u_t, v_t, 'none'), "
                           "shape [B, chunk, max_action_dim]); grads are d/dparam of loss_per_element[:, :, :action_dim].sum(); "
                           "policy_forward_loss = policy.forward(batch)[0] (mean over [:, :, :action_dim]) with the same noise/time",
        "flow_convention": "x_t = time*noise + (1-time)*actions; u_t = noise - actions; sampling integrates from t=1 to t=0",
        "grad_params": grad_names,
        "deterministic_forward": bool(torch.equal(losses.detach(), losses2)),
        "deterministic_sample": bool(torch.equal(sampled, sampled2)),
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
    })
    (dest / "reference.json").write_text(json.dumps(info, indent=1))


def build_pi(name):
    if name == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as mod
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Cfg
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as Pol
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make_proc
        extra = dict(tokenizer_max_length=12)
    else:
        from lerobot.policies.pi05 import modeling_pi05 as mod
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Cfg
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as Pol
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make_proc
        extra = dict(tokenizer_max_length=40)
    dest = OUT / name
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = build_tokenizer(OUT / "tokenizer")
    vocab_model = 64
    inp, out = features((32, 32))
    cfg = Cfg(input_features=inp, output_features=out, device="cpu", chunk_size=4, n_action_steps=4,
              num_inference_steps=3, max_state_dim=8, max_action_dim=8, image_resolution=(32, 32),
              dtype="float32", **extra)
    torch.manual_seed(SEED)
    with paligemma_patches(mod, vocab_model):
        policy = Pol(cfg)
    # Released pi0/pi05 checkpoints hold the tied embedding only as paligemma.lm_head.weight and
    # LeRobot's from_pretrained copies it into embed_tokens; HF inits them separately, so tie here.
    pg = policy.model.paligemma_with_expert.paligemma
    with torch.no_grad():
        pg.model.language_model.embed_tokens.weight.copy_(pg.lm_head.weight)
        # pi0.5 zero-initialises its adaRMS dense weights, which would leave the time conditioning out of
        # every output; trained checkpoints have them non-zero, so give them small random values.
        g_dense = torch.Generator().manual_seed(SEED + 3)
        for param_name, param in policy.named_parameters():
            if ".dense.weight" in param_name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g_dense))
    policy.eval()
    st = stats()
    # LeRobot's processor factory hard-codes tokenizer_name="google/paligemma-3b-pt-224" (needs the hub);
    # swap the TokenizerProcessorStep's tokenizer for the tiny local one.
    from lerobot.processor import tokenizer_processor as tp
    orig_post = tp.TokenizerProcessorStep.__post_init__

    def post_init(self):
        self.tokenizer_name = "../tokenizer"
        self.tokenizer = tokenizer
        orig_post(self)

    with patched(tp.TokenizerProcessorStep, "__post_init__", post_init):
        pre, post = make_proc(cfg, dataset_stats=st)
    policy.save_pretrained(dest)
    pre.save_pretrained(dest)
    post.save_pretrained(dest)
    info = {
        "policy": name, "lerobot": lerobot.__version__, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "seed": SEED, "tiny_gemma": TINY_GEMMA, "tiny_vision": TINY_VISION, "vocab_size_model": vocab_model,
        "tokenizer_vocab_size": vocab, "stats": {k: tensors_to_lists(v) for k, v in st.items()},
        "attn_implementation_vlm": policy.model.paligemma_with_expert.paligemma.config.text_config._attn_implementation,
        "n_params": sum(p.numel() for p in policy.parameters()),
    }
    pi_reference(name, policy, pre, post, tokenizer, cfg, dest, info)
    n = save_keys_full(dest, Pol, Cfg)
    print(name, "done; params", info["n_params"], "full keys", n)


# ----------------------------------------------------------------------------- SmolVLA
TINY_SMOLVLM = dict(
    text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64,
                     max_position_embeddings=256, rms_norm_eps=1e-5),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       patch_size=8, image_size=32),
    scale_factor=2, image_token_id=63, vocab_size=64,
)
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct sizes (written from its published config.json, not
# downloaded here: offline); used only for keys_full.json.
FULL_SMOLVLM = dict(
    text_config=dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                     num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49280),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, image_size=512),
    scale_factor=4, image_token_id=49190, vocab_size=49280,
)


def smolvlm_patches(sizes, tokenizer):
    from transformers import SmolVLMConfig

    from lerobot.policies.smolvla import smolvlm_with_expert as swe

    class _AutoConfig:
        @staticmethod
        def from_pretrained(model_id, **kw):
            return SmolVLMConfig(**sizes)

    class _Proc:
        pass

    class _AutoProcessor:
        @staticmethod
        def from_pretrained(model_id, **kw):
            p = _Proc()
            p.tokenizer = tokenizer
            return p

    stack = contextlib.ExitStack()
    stack.enter_context(patched(swe, "AutoConfig", _AutoConfig))
    stack.enter_context(patched(swe, "AutoProcessor", _AutoProcessor))
    return stack


def build_smolvla():
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig as Cfg
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy as Pol
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors as make_proc

    name = "smolvla"
    dest = OUT / name
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = build_tokenizer(OUT / "tokenizer")
    tokenizer.fake_image_token_id = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    tokenizer.global_image_token_id = tokenizer.convert_tokens_to_ids("<global-img>")
    inp, out = features((32, 32))
    cfg = Cfg(input_features=inp, output_features=out, device="cpu", chunk_size=4, n_action_steps=4,
              num_steps=3, max_state_dim=8, max_action_dim=8, resize_imgs_with_padding=(32, 32),
              tokenizer_max_length=12, vlm_model_name="../tokenizer", load_vlm_weights=False,
              num_vlm_layers=2, freeze_vision_encoder=False, train_expert_only=False)
    torch.manual_seed(SEED)
    with smolvlm_patches(TINY_SMOLVLM, tokenizer):
        policy = Pol(cfg)
    policy.eval()
    from lerobot.processor import tokenizer_processor as tp
    orig_post = tp.TokenizerProcessorStep.__post_init__

    def post_init(self):
        self.tokenizer = tokenizer
        orig_post(self)

    st = stats()
    with patched(tp.TokenizerProcessorStep, "__post_init__", post_init):
        pre, post = make_proc(cfg, dataset_stats=st)
    policy.save_pretrained(dest)
    pre.save_pretrained(dest)
    post.save_pretrained(dest)

    torch.manual_seed(SEED + 1)
    raw = raw_batch()
    raw["action"] = raw["action"][:, : cfg.chunk_size]
    batch = pre(dict(raw))
    images, img_masks = policy.prepare_images(batch)
    state = policy.prepare_state(batch)
    actions = policy.prepare_action(batch)
    lang_tokens = batch["observation.language.tokens"]
    lang_masks = batch["observation.language.attention_mask"]
    g = torch.Generator().manual_seed(SEED + 2)
    noise = torch.randn(actions.shape, generator=g)
    time = torch.tensor([0.3, 0.85])[:B]
    policy.train()
    policy.zero_grad()
    losses = policy.model.forward(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
    losses[:, :, :ACTION_DIM].sum().backward()
    named = dict(policy.named_parameters())
    grad_names = [n for n in named if named[n].grad is not None and any(s in n for s in (
        "model.action_in_proj.weight", "model.action_out_proj.weight", "model.state_proj.weight",
        "text_model.layers.0.self_attn.q_proj.weight", "lm_expert.layers.1.self_attn.q_proj.weight",
        "lm_expert.layers.1.self_attn.k_proj.weight", "patch_embedding.weight", "connector.modality_projection.proj.weight",
        "action_time_mlp_in.weight"))]
    grads = {f"grad.{n}": named[n].grad.detach().clone() for n in grad_names}
    with torch.no_grad():
        pol_loss, _ = policy.forward(batch, noise=noise.clone(), time=time.clone())
        losses2 = policy.model.forward(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)
    policy.eval()
    snoise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    with torch.no_grad():
        sampled = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise=snoise.clone())
        sampled2 = policy.model.sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise=snoise.clone())
        policy.reset()
        chunk = policy.predict_action_chunk(dict(batch), noise=snoise.clone())
        chunk_unnorm = post(chunk)
    tensors = {
        "raw.image": raw[CAM], "raw.state": raw["observation.state"], "raw.action": raw["action"],
        "batch.image": batch[CAM], "batch.state": batch["observation.state"], "batch.action": batch["action"],
        "model.image": images[0], "model.image_mask": img_masks[0], "model.state": state,
        "model.lang_tokens": lang_tokens, "model.lang_masks": lang_masks,
        "model.actions": actions, "noise": noise, "time": time,
        "loss_per_element": losses.detach(), "policy_forward_loss": pol_loss.detach().reshape(1),
        "sample_noise": snoise, "sampled_actions": sampled, "predict_action_chunk": chunk,
        "predict_action_chunk_unnormalized": chunk_unnorm,
    }
    tensors.update(grads)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dest / "reference.safetensors"))
    info = {
        "policy": name, "lerobot": lerobot.__version__, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "seed": SEED,
        "tiny_smolvlm": TINY_SMOLVLM, "tokenizer_vocab_size": vocab,
        "stats": {k: tensors_to_lists(v) for k, v in st.items()},
        "n_params": sum(p.numel() for p in policy.parameters()),
        "tasks_raw": TASKS, "token_ids": lang_tokens.tolist(), "attention_mask": lang_masks.int().tolist(),
        "tokens_as_text": [tokenizer.convert_ids_to_tokens(t.tolist()) for t in lang_tokens],
        "loss_definition": "loss_per_element = policy.model.forward(images, img_masks, lang_tokens, lang_masks, state, "
                           "actions, noise, time) [B, chunk, max_action_dim]; grads of loss_per_element[:, :, :action_dim].sum(); "
                           "policy_forward_loss = policy.forward(batch, noise=, time=)[0]",
        "flow_convention": "x_t = time*noise + (1-time)*actions; u_t = noise - actions; sampling from t=1 to t=0",
        "grad_params": grad_names,
        "deterministic_forward": bool(torch.equal(losses.detach(), losses2)),
        "deterministic_sample": bool(torch.equal(sampled, sampled2)),
        "tensor_shapes": {k: list(v.shape) for k, v in tensors.items()},
    }
    (dest / "reference.json").write_text(json.dumps(info, indent=1))
    # full-size keys on the meta device
    finp, fout = features((512, 512))
    fcfg = Cfg(input_features=finp, output_features=fout, device="cpu", load_vlm_weights=False)
    with smolvlm_patches(FULL_SMOLVLM, tokenizer), torch.device("meta"), \
            patched(torch.nn.Module, "to", lambda self, *a, **k: self):
        fpol = Pol(fcfg)
    keys = keys_of(fpol)
    (dest / "keys_full.json").write_text(json.dumps(
        {"n_params": int(sum(np.prod(s) for s in keys.values())), "keys": keys,
         "note": "SmolVLM2-500M sizes reconstructed locally (FULL_SMOLVLM in generate.py), not downloaded"}, indent=0))
    print(name, "done; params", info["n_params"], "full keys", len(keys))


if __name__ == "__main__":
    which = sys.argv[1:] or ["pi0", "pi05", "smolvla"]
    for w in which:
        if w in ("pi0", "pi05"):
            build_pi(w)
        elif w == "smolvla":
            build_smolvla()
