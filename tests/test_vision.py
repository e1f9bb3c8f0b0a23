"""Vision backbones and projectors: token contract, parity with transformers / timm, errors."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import SiglipImageProcessor

from helpers import TINY_SIGLIP, save_tiny_siglip

from vlablocks.encoders.projectors import LinearProjector, Mlp2xGeluProjector, PixelShuffleProjector, llava_projector_state_dict
from vlablocks.encoders.siglip import SIGLIP_SO400M_PATCH14_224, SiglipVision
from vlablocks.encoders.timm_vision import TimmVision, _token_layout
from vlablocks.encoders.vision import ConvNet, PatchViT, VisionBackbone

def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SiglipVisionModel saved with save_pretrained; returns (path, model)."""
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip"))


# ---------------------------------------------------------------- PatchViT


def test_patch_vit_tokens_grid_and_gradients():
    torch.manual_seed(0)
    vit = PatchViT(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    assert isinstance(vit, VisionBackbone)
    assert (vit.out_dim, vit.image_size, vit.patch_size, vit.grid, vit.num_tokens) == (32, 32, 8, (4, 4), 16)
    tokens = vit(images())
    assert tokens.shape == (2, 16, 32) and torch.isfinite(tokens).all()
    tokens.square().mean().backward()
    missing = [name for name, p in vit.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_patch_vit_equals_timm_vit_without_class_token():
    """Same weights (names match timm) -> same tokens as timm's forward_features on (x - 0.5) / 0.5."""
    torch.manual_seed(0)
    ref = timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="", num_classes=0
    ).eval()
    vit = PatchViT(image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    vit.load_state_dict(ref.state_dict())
    x = images()
    torch.testing.assert_close(vit(x), ref.forward_features((x - 0.5) / 0.5), atol=1e-5, rtol=1e-5)


def test_patch_tokens_are_row_major():
    """Token i * gw + j depends only on patch (i, j) after the patch embedding."""
    vit = PatchViT(image_size=32, patch_size=8, width=16, depth=1, num_heads=2)
    x = images(batch=1)
    y = x.clone()
    y[..., 8:16, 16:24] = 1.0 - y[..., 8:16, 16:24]  # patch row 1, column 2
    changed = (vit.patch_embed(vit.normalize(x)) - vit.patch_embed(vit.normalize(y))).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_patch_vit_builds_on_meta_and_checks_sizes():
    vit = PatchViT(device="meta")
    assert vit(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 196, 192)
    with pytest.raises(ValueError, match=r"image_size \(30\) must be a multiple of patch_size \(8\)"):
        PatchViT(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"width \(30\) must be a multiple of num_heads \(4\)"):
        PatchViT(image_size=32, patch_size=8, width=30, num_heads=4)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.rand(3, 32, 32), r"shape \[B, 3, H, W\]; got \(3, 32, 32\)"),
        (torch.rand(2, 1, 32, 32), r"shape \[B, 3, H, W\]; got \(2, 1, 32, 32\)"),
        (torch.rand(2, 3, 64, 64), r"must be 32 x 32 pixels .* got \(64, 64\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"float tensor .* got dtype torch.uint8"),
    ],
)
def test_bad_images_raise(bad, match):
    vit = PatchViT(image_size=32, patch_size=8, width=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=match):
        vit(bad)


# ---------------------------------------------------------------- ConvNet


def conv_net_reference(net, x):
    """ConvNet's documented math written with torch.nn.functional on the module's weights."""
    h = (x - 0.5) / 0.5
    for stage in net.stages:
        for i, (conv, norm, _) in enumerate(stage):
            y = F.conv2d(h, conv.weight, None, conv.stride, conv.padding)
            y = F.gelu(F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps))
            h = y if i == 0 else h + y
    h = F.conv2d(h, net.proj.weight, net.proj.bias)
    tokens = h.permute(0, 2, 3, 1).reshape(x.shape[0], -1, h.shape[1])
    return F.layer_norm(tokens + net.pos_embed, (tokens.shape[-1],), net.norm.weight, net.norm.bias, 1e-6)


def test_conv_net_matches_its_formula_and_every_parameter_learns():
    torch.manual_seed(0)
    net = ConvNet(image_size=32, channels=(8, 16, 16), convs_per_stage=2, width=24, norm_groups=4)
    with torch.no_grad():  # non-trivial affine parameters, so that the reference checks them
        for param in net.parameters():
            param.add_(0.1 * torch.randn_like(param))
    assert isinstance(net, VisionBackbone)
    assert (net.out_dim, net.image_size, net.patch_size, net.grid, net.num_tokens) == (24, 32, 8, (4, 4), 16)
    x = images()
    tokens = net(x)
    assert tokens.shape == (2, 16, 24)
    torch.testing.assert_close(tokens, conv_net_reference(net, x), atol=1e-5, rtol=1e-5)
    tokens.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert sum(len(stage) for stage in net.stages) == 6


def test_conv_net_builds_on_meta_and_checks_its_arguments():
    net = ConvNet(device="meta")
    assert net(torch.empty(2, 3, 96, 96, device="meta")).shape == (2, 36, 128)
    with pytest.raises(ValueError, match=r"image_size \(90\) must be a multiple of 2 \*\* len\(channels\) = 16"):
        ConvNet(image_size=90)
    with pytest.raises(ValueError, match=r"channels \(12\) must be a multiple of norm_groups \(8\)"):
        ConvNet(image_size=32, channels=(12,))
    with pytest.raises(ValueError, match=r"convs_per_stage must be >= 1; got 0"):
        ConvNet(image_size=32, convs_per_stage=0)
    with pytest.raises(ValueError, match=r"channels must name at least one stage"):
        ConvNet(image_size=32, channels=())


# ---------------------------------------------------------------- SigLIP


@pytest.mark.parametrize("select_layer", [None, -1, -2, 0])
def test_siglip_reproduces_transformers(siglip_dir, select_layer):
    path, ref = siglip_dir
    enc = SiglipVision(path, select_layer=select_layer)
    assert (enc.out_dim, enc.patch_size, enc.grid) == (32, 8, (4, 4))
    x = images()
    with torch.no_grad():
        out = ref(pixel_values=(x - 0.5) / 0.5, output_hidden_states=True)
        got = enc(x)
    expected = out.last_hidden_state if select_layer is None else out.hidden_states[select_layer]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == TINY_SIGLIP["num_hidden_layers"] + 1
    if select_layer == -1:  # -1 is the last layer WITHOUT post_layernorm, None is WITH it
        assert not torch.allclose(got, out.last_hidden_state, atol=1e-3)


def test_siglip_drops_unused_weights_so_every_parameter_trains(siglip_dir):
    path, _ = siglip_dir
    enc = SiglipVision(path, select_layer=-2)
    assert len(enc.model.encoder.layers) == 1 and not hasattr(enc.model, "head")
    enc(images()).sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_siglip_reads_pixel_statistics_of_the_preprocessor(siglip_dir, tmp_path):
    path, ref = siglip_dir
    ref.save_pretrained(tmp_path)
    SiglipImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]).save_pretrained(tmp_path)
    enc = SiglipVision(str(tmp_path))
    torch.testing.assert_close(enc.pixel_mean.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(pixel_values=(x - mean) / std).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert SiglipVision(path).pixel_mean.flatten().tolist() == [0.5, 0.5, 0.5]  # no preprocessor file


def test_siglip_loads_a_whole_tower_state_dict_into_a_cut_model(siglip_dir):
    _, ref = siglip_dir
    tower = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}  # LLaVA-style keys, head included
    enc = SiglipVision(config=TINY_SIGLIP, select_layer=-2)
    enc.load_tower_state_dict(tower)
    x = images()
    with torch.no_grad():
        expected = ref(pixel_values=(x - 0.5) / 0.5, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'vision_model.extra.weight' is not a parameter"):
        enc.load_tower_state_dict({**tower, "vision_model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lacks 2 SigLIP tower weights"):
        enc.load_tower_state_dict({k: v for k, v in tower.items() if "layer_norm1" not in k})


def test_siglip_so400m_builds_on_meta():
    enc = SiglipVision(config=SIGLIP_SO400M_PATCH14_224, device="meta")
    assert (enc.out_dim, enc.patch_size, enc.grid, enc.num_tokens) == (1152, 14, (16, 16), 256)
    assert len(enc.model.encoder.layers) == 27
    assert enc(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 256, 1152)
    assert all(p.is_meta for p in enc.parameters())


def test_siglip_argument_errors(siglip_dir):
    path, _ = siglip_dir
    with pytest.raises(ValueError, match="exactly one of path .* or config"):
        SiglipVision()
    with pytest.raises(ValueError, match="exactly one of path .* or config"):
        SiglipVision(path, config=TINY_SIGLIP)
    with pytest.raises(ValueError, match=r"select_layer must .* \[-3, 2\], or be None; got 3"):
        SiglipVision(config=TINY_SIGLIP, select_layer=3)


# ---------------------------------------------------------------- timm


def test_timm_vit_loads_local_weights_and_drops_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()  # with its 1000-class head
    file = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v for k, v in ref.state_dict().items()}, file)  # a DDP-saved state dict
    enc = TimmVision("vit_tiny_patch16_224", image_size=32, weights_path=str(file)).eval()
    assert (enc.out_dim, enc.patch_size, enc.grid) == (192, 16, (2, 2))
    x = images()
    with torch.no_grad():
        expected = ref.forward_features((x - 0.5) / 0.5)[:, ref.num_prefix_tokens :]
        torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=1e-5)


def test_timm_conv_net_flattens_the_feature_map():
    torch.manual_seed(0)
    enc = TimmVision("resnet18", image_size=64).eval()
    assert (enc.out_dim, enc.patch_size, enc.grid, enc.num_tokens) == (512, 32, (2, 2), 4)
    torch.testing.assert_close(enc.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    x = images(size=64)
    with torch.no_grad():
        features = enc.model.forward_features(enc.normalize(x))  # [B, 512, 2, 2]
        tokens = enc(x)
    assert tokens.shape == (2, 4, 512)
    torch.testing.assert_close(tokens[:, 1], features[:, :, 0, 1])  # row 0, column 1


def test_timm_meta_build_and_errors(tmp_path):
    enc = TimmVision("vit_tiny_patch16_224", image_size=32, device="meta")
    assert enc(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 4, 192)
    with pytest.raises(ValueError, match="'no_such_net' is not a timm model"):
        TimmVision("no_such_net", image_size=32)
    with pytest.raises(ValueError, match="never downloads"):
        TimmVision("hf-hub:timm/vit_tiny_patch16_224", image_size=32)
    with pytest.raises(ValueError, match="weights_path must be an existing local file"):
        TimmVision("resnet18", image_size=32, weights_path=str(tmp_path / "missing.safetensors"))
    pickled = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet18").state_dict(), pickled)
    with pytest.raises(ValueError, match=r"weights_path must be a .safetensors file \(vlablocks reads no pickled"):
        TimmVision("resnet18", image_size=32, weights_path=str(pickled))
    file = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), file)
    with pytest.raises(ValueError, match="does not fit timm model 'resnet18'"):
        TimmVision("resnet18", image_size=32, weights_path=str(file))


# ---------------------------------------------------------------- projectors


def test_projectors_shapes_and_structure():
    tokens = torch.randn(2, 5, 12)
    assert LinearProjector(12, 20)(tokens).shape == (2, 5, 20)
    mlp = Mlp2xGeluProjector(12, 20)
    assert mlp(tokens).shape == (2, 5, 20)
    assert (mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features) == (12, 20, 20)
    assert type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
    assert next(Mlp2xGeluProjector(1152, 2048, device="meta").parameters()).is_meta


def test_llava_projector_checkpoint_maps_onto_the_projectors():
    torch.manual_seed(0)
    llava = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 20))  # LLaVA's mlp2x_gelu
    checkpoint = {f"model.mm_projector.{k}": v for k, v in llava.state_dict().items()}
    checkpoint["model.layers.0.mlp.up_proj.weight"] = torch.zeros(1)  # other keys are ignored
    renamed = llava_projector_state_dict(checkpoint, prefix="model.mm_projector.")
    assert renamed.keys() == llava_projector_state_dict(llava.state_dict()).keys()  # keys without prefix
    assert sorted(renamed) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    projector = Mlp2xGeluProjector(12, 20)
    projector.load_state_dict(renamed)
    tokens = torch.randn(2, 5, 12)
    torch.testing.assert_close(projector(tokens), llava(tokens))

    linear = nn.Linear(12, 20)
    projector = LinearProjector(12, 20)
    projector.load_state_dict(llava_projector_state_dict(linear.state_dict()))
    torch.testing.assert_close(projector(tokens), linear(tokens))

    with pytest.raises(ValueError, match=r"'model.mm_projector.4.weight' is not a mlp2x_gelu"):
        llava_projector_state_dict({"model.mm_projector.4.weight": torch.zeros(1)}, prefix="model.mm_projector.")
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is not a mlp2x_gelu"):
        llava_projector_state_dict({"model.embed_tokens.weight": torch.zeros(1)})  # no prefix: all keys count
    with pytest.raises(ValueError, match="no key starting with prefix 'model.mm_projector.'"):
        llava_projector_state_dict({"model.embed_tokens.weight": torch.zeros(1)}, prefix="model.mm_projector.")


def test_pixel_shuffle_matches_smolvlm_layout():
    from vlablocks.encoders.projectors import PixelShuffleProjector, pixel_shuffle

    b, side, d, r = 2, 4, 3, 2
    tokens = torch.randn(b, side * side, d)
    out = pixel_shuffle(tokens, r)
    assert out.shape == (b, (side // r) ** 2, d * r * r)
    grid = tokens.view(b, side, side, d)
    for i in range(side):
        for j in range(side):
            token = (i // r) * (side // r) + (j // r)
            block = (i % r) * r + (j % r)
            assert torch.equal(out[:, token, block * d : (block + 1) * d], grid[:, i, j])
    projector = PixelShuffleProjector(d, 5, scale_factor=r)
    assert projector(tokens).shape == (b, 4, 5) and projector.proj.bias is None
    with pytest.raises(ValueError, match="square token grid whose side is a multiple of scale_factor=2; got 12 tokens"):
        pixel_shuffle(torch.randn(1, 12, d), 2)


@pytest.mark.parametrize("backbone", ["patch_vit", "conv_net", "siglip", "timm_vit"])
def test_gradient_checkpointing_gives_identical_tokens_and_gradients(backbone):
    def make():
        torch.manual_seed(0)
        return {
            "patch_vit": lambda: PatchViT(image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
            "conv_net": lambda: ConvNet(image_size=32, channels=(8, 16), convs_per_stage=2, width=24, norm_groups=4),
            "siglip": lambda: SiglipVision(config=TINY_SIGLIP, select_layer=-1),
            "timm_vit": lambda: TimmVision("vit_tiny_patch16_224", image_size=32),
        }[backbone]().train()

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = []
    for enabled in (False, True):
        enc = make()
        enc.set_gradient_checkpointing(enabled)
        saved = []  # bytes the autograd graph keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nelement() * t.element_size()) or t,
                                                      lambda t: t):
            tokens = enc(images)
        tokens.square().mean().backward()
        assert enc.gradient_checkpointing is enabled
        results.append(sum(saved))
        results.append((tokens.detach(), {n: p.grad for n, p in enc.named_parameters()}))
    saved0, (tokens0, grads0), saved1, (tokens1, grads1) = results
    assert saved1 < 0.7 * saved0, f"checkpointing kept {saved1} of {saved0} activation bytes"
    torch.testing.assert_close(tokens1, tokens0, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_one_conv_per_stage_and_no_bias_in_the_pixel_shuffle_projection_are_valid_settings():
    net = ConvNet(image_size=32, channels=(8, 16), convs_per_stage=1, width=16, norm_groups=4)
    assert net.pos_embed.shape == (1, 64, 16)  # [1, tokens, width]: one table shared by the batch
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 64, 16)
    projector = PixelShuffleProjector(8, 12, scale_factor=1)  # no merging: a plain projection
    assert projector.proj.bias is None and projector(torch.randn(2, 16, 8)).shape == (2, 16, 12)
    with pytest.raises(ValueError, match=r"scale_factor must be >= 1; got 0"):
        PixelShuffleProjector(8, 12, scale_factor=0)


def test_timm_vision_saves_its_recipe_without_the_weights_path(tmp_path):
    node = {"type": "timm", "model_name": "resnet18", "image_size": 64, "weights_path": "/data/resnet.safetensors"}
    exported = TimmVision("resnet18", image_size=64).export_recipe(node, tmp_path)
    assert exported == {"type": "timm", "model_name": "resnet18", "image_size": 64}


def test_siglip_select_layer_bounds_and_no_pooling_head(siglip_dir):
    path, _ = siglip_dir  # 2 layers: 3 hidden states, indices -3..2
    for select_layer in (-3, 2):
        enc = SiglipVision(path, select_layer=select_layer)
        assert enc.model.use_head is False and enc.model.config.vision_use_head is False
    for select_layer in (-4, 3):
        with pytest.raises(ValueError, match=rf"select_layer must index the 3 hidden states .* lie in \[-3, 2\], or be None; "
                                             rf"got {select_layer}"):
            SiglipVision(path, select_layer=select_layer)


# ---------------------------------------------------------------- devices, dtypes, token layouts


class _CpuAllocations(TorchDispatchMode):
    """Counts the bytes of every CPU tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self.bytes += tensor.numel() * tensor.element_size()
        return out


def test_siglip_is_built_on_its_device_and_never_reads_pickled_weights(siglip_dir, tmp_path):
    with _CpuAllocations() as allocations:
        built = SiglipVision(config=TINY_SIGLIP, device="meta")
    assert all(p.is_meta for p in built.parameters())
    weights = sum(p.numel() * p.element_size() for p in built.parameters())
    assert allocations.bytes < weights / 10, f"{allocations.bytes} B allocated on the CPU for {weights} B of meta weights"

    path, ref = siglip_dir
    moved = SiglipVision(path, device="meta")
    assert all(t.is_meta for t in [*moved.parameters(), *moved.buffers()])

    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        SiglipVision(str(tmp_path))


class WideViT(nn.Module):
    """Stands in for a timm model in the token-layout rules: only its attributes matter."""

    def __init__(self, **attributes) -> None:
        super().__init__()
        for name, value in attributes.items():
            setattr(self, name, value)


def test_timm_token_layouts_follow_the_model_s_declared_grid_and_format():
    features = torch.arange(1 * 7 * 5, dtype=torch.float32).view(1, 7, 5)  # 1 prefix + 2 x 3 patches
    declared = WideViT(patch_embed=WideViT(grid_size=(2, 3)), num_prefix_tokens=1)
    to_tokens, grid, out_dim = _token_layout(declared, features)
    assert (grid, out_dim) == ((2, 3), 5) and torch.equal(to_tokens(features), features[:, 1:])

    square = torch.zeros(1, 9, 4)  # no declared grid: a square one is inferred
    assert _token_layout(WideViT(), square)[1:] == ((3, 3), 4)
    with pytest.raises(ValueError, match=r"cannot infer the patch grid of WideViT: 5 tokens after 0 prefix tokens, "
                                         r"grid guess \(2, 2\)"):
        _token_layout(WideViT(), torch.zeros(1, 5, 4))

    nhwc = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)  # [B, h, w, C]
    to_tokens, grid, out_dim = _token_layout(WideViT(output_fmt="NHWC"), nhwc)
    assert (grid, out_dim) == ((2, 3), 4)
    assert torch.equal(to_tokens(nhwc)[0, 1], nhwc[0, 0, 1])  # row 0, column 1
    to_tokens, grid, out_dim = _token_layout(WideViT(), nhwc)  # the same tensor read as [B, C, h, w]
    assert (grid, out_dim) == ((3, 4), 2)
    with pytest.raises(ValueError, match=r"forward_features of WideViT returned shape \(2, 3\)"):
        _token_layout(WideViT(), torch.zeros(2, 3))


def test_timm_nhwc_backbone_tokens_are_its_feature_map_row_major():
    torch.manual_seed(0)
    enc = TimmVision("mambaout_femto", image_size=64).eval()  # timm's output_fmt "NHWC"
    assert (enc.out_dim, enc.grid, enc.patch_size) == (288, (2, 2), 32)
    assert enc.extra_repr() == "model_name='mambaout_femto', out_dim=288, image_size=64, patch_size=32, grid=(2, 2)"
    x = images(size=64)
    with torch.no_grad():
        features = enc.model.forward_features(enc.normalize(x))  # [B, 2, 2, 288]
        tokens = enc(x)
    assert features.shape == (2, 2, 2, 288) and tokens.shape == (2, 4, 288)
    torch.testing.assert_close(tokens[:, 1], features[:, 0, 1])
    torch.testing.assert_close(tokens[:, 2], features[:, 1, 0])
    with pytest.raises(ValueError, match="never downloads"):
        TimmVision("hf_hub:timm/mambaout_femto", image_size=64)
