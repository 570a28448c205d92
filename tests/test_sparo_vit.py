"""Behaviour of the SPARO read-out, the backbones, the DINO head and weight loading."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import sparo_vit
from sparo_dino.eval import extraction
from sparo_dino.io.weights import load_pretrained_trunk
from sparo_vit import SPARO, DINOHead, MultiCropWrapper, build_backbone, slot_attention_maps

torch.manual_seed(0)


def reference_sparo(module: SPARO, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1) slot by slot: y_l = W K_g H^T softmax(H K_g^T q_l / sqrt(D)), g = l // group_size."""
    d = module.attn_dim
    slots, weights = [], []
    for l in range(module.num_slots):  # noqa: E741 (the paper's slot index)
        g = l // module.group_size
        k_weight = module.key.weight[g * d:(g + 1) * d]
        k_bias = module.key.bias[g * d:(g + 1) * d]
        per_image_slots, per_image_weights = [], []
        for h in tokens:  # (N, embed_dim)
            keys = h @ k_weight.T + k_bias  # (N, D) = H K_l^T (with bias)
            attn = torch.softmax(keys @ module.query[l] / math.sqrt(d), dim=0)  # (N,)
            value = keys.T @ attn  # K_l H^T softmax(.)
            per_image_slots.append(module.proj.weight @ value + module.proj.bias)
            per_image_weights.append(attn)
        slots.append(torch.stack(per_image_slots))
        weights.append(torch.stack(per_image_weights))
    return torch.stack(slots, dim=1), torch.stack(weights, dim=1)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_sparo_matches_eq1_on_both_paths(group_size: int) -> None:
    module = SPARO(embed_dim=24, num_slots=8, slot_dim=5, attn_dim=6, group_size=group_size)
    with torch.no_grad():
        module.key.bias.normal_()
        module.proj.bias.normal_()
    tokens = torch.randn(3, 7, 24)
    expected_slots, expected_attn = reference_sparo(module, tokens)
    fast = module(tokens)
    explicit, attention = module(tokens, return_attention=True)
    assert fast.shape == (3, 8, 5) and attention.shape == (3, 8, 7)
    torch.testing.assert_close(fast, expected_slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected_slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, expected_attn, atol=1e-6, rtol=1e-5)


def test_group_size_shares_one_key_between_consecutive_slots() -> None:
    module = SPARO(embed_dim=16, num_slots=6, slot_dim=4, attn_dim=4, group_size=3)
    assert module.key.weight.shape == (2 * 4, 16)
    tokens = torch.randn(2, 5, 16)
    before = module(tokens)
    with torch.no_grad():  # perturb key group 1 only: rows [4:8]
        module.key.weight[4:8] += torch.randn(4, 16)
    after = module(tokens)
    torch.testing.assert_close(after[:, :3], before[:, :3])
    assert (after[:, 3:] - before[:, 3:]).abs().min() > 0


def test_parameter_count_is_d_squared_plus_2d_plus_biases() -> None:
    d = 256
    root = int(math.sqrt(d))
    module = SPARO(embed_dim=d, num_slots=root, slot_dim=root, attn_dim=root)
    weights = module.query.numel() + module.key.weight.numel() + module.proj.weight.numel()
    assert weights == d * d + 2 * d
    biases = module.key.bias.numel() + module.proj.bias.numel()
    assert sum(p.numel() for p in module.parameters()) == weights + biases == d * d + 3 * d + root
    assert {name for name, _ in module.named_parameters()} == {"query", "key.weight", "key.bias", "proj.weight",
                                                                "proj.bias"}
    assert not list(module.buffers())


def test_init_follows_appendix_a() -> None:
    module = SPARO(embed_dim=384)
    assert module.query.shape == (64, 64)
    assert abs(module.query.std().item() - 1.0) < 0.05 and abs(module.query.mean().item()) < 0.05
    bound = math.sqrt(6.0 / (384 + 64 * 64))
    assert module.key.weight.abs().max() <= bound and module.key.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(module.key.bias) == 0 and torch.count_nonzero(module.proj.bias) == 0


def test_token_permutation_invariance() -> None:
    module = SPARO(embed_dim=32, num_slots=4, slot_dim=8, attn_dim=8)
    tokens = torch.randn(2, 9, 32)
    permuted = tokens[:, torch.randperm(9)]
    torch.testing.assert_close(module(permuted), module(tokens), atol=1e-6, rtol=1e-5)


def test_gradients_reach_query_key_and_proj() -> None:
    module = SPARO(embed_dim=16, num_slots=4, slot_dim=4, attn_dim=4, group_size=2)
    module(torch.randn(2, 5, 16)).square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sparo_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        SPARO(embed_dim=16, num_slots=6, group_size=4)
    with pytest.raises(ValueError, match=r"\(B, N, embed_dim\)"):
        SPARO(embed_dim=16, num_slots=4)(torch.randn(5, 16))


def test_vit_small_sparo_shapes_at_224_and_96_pixels() -> None:
    model = build_backbone("vit_small_sparo").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 4096)
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 4096)
    assert model.num_features == 4096
    baseline = build_backbone("vit_small").eval()
    with torch.no_grad():
        assert baseline(torch.randn(1, 3, 96, 96)).shape == (1, 384)
    assert baseline.num_features == 384


def test_vit_small_sparo_replaces_the_last_block() -> None:
    sparo_model, baseline = build_backbone("vit_small_sparo"), build_backbone("vit_small")
    assert len(sparo_model.blocks) == 11 and len(baseline.blocks) == 12
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(sparo_model) < count(baseline)
    assert all(not k.startswith("sparo.") for k in baseline.state_dict())


def test_sparo_encoding_is_unnormalized_slots_over_final_norm_tokens() -> None:
    model = build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=8, slot_dim=4).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.norm(model.blocks(model._pos_embed(model.patch_embed(images))))
        expected = reference_sparo(model.sparo, tokens)[0].flatten(1)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(expected.norm(dim=1), torch.ones(2))


def intermediate_cls(model: sparo_vit.DinoVisionTransformer, images: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Reference: the final-norm CLS of the last n blocks (official DINO's baseline linear-probe features), block by
    block, independently of timm's forward_intermediates that the evaluation uses."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    outputs = []
    for index, block in enumerate(model.blocks):
        x = block(x)
        if index >= len(model.blocks) - n:
            outputs.append(model.norm(x)[:, 0])
    return outputs


def test_baseline_returns_final_norm_cls_and_intermediate_cls() -> None:
    model = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last4 = intermediate_cls(model, images, 4)
        assert len(last4) == 4 and all(t.shape == (2, 192) for t in last4)
        torch.testing.assert_close(last4[-1], model(images), atol=1e-5, rtol=1e-5)
        features = extraction.feature_function(model, "cls_last4")(images)  # what eval_linear probes
        torch.testing.assert_close(features, torch.cat(last4, dim=1), atol=1e-5, rtol=1e-5)


def test_build_backbone_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="valid archs: vit_tiny, vit_small, vit_base, vit_tiny_gap, .*vit_base_mhmix$"):
        build_backbone("resnet50")
    with pytest.raises(ValueError, match="cls read-out of vit_small; use vit_small_mhca, vit_small_sparo or "
                                         "vit_small_mhmix"):
        build_backbone("vit_small", num_slots=32)
    with pytest.raises(ValueError, match="^attn_dim, group_size do not apply to the mhca read-out of vit_tiny_mhca; "
                                         "use vit_tiny_sparo$"):
        build_backbone("vit_tiny_mhca", attn_dim=32, group_size=2)
    with pytest.raises(ValueError, match="^slot_norm does not apply to the attpool read-out of vit_tiny_attpool; "
                                         "use vit_tiny_mhca or vit_tiny_sparo$"):
        build_backbone("vit_tiny_attpool", slot_norm=True)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        build_backbone("vit_tiny", patch_size=16, img_size=32)(torch.randn(1, 3, 40, 40))


def test_options_drop_path_and_grad_checkpointing_are_applied() -> None:
    model = build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, drop_path_rate=0.1, grad_checkpointing=True,
                           num_slots=8, slot_dim=8, attn_dim=8, group_size=2)
    assert model.grad_checkpointing
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.sparo.key.weight.shape == (4 * 8, 192)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.sparo.query.grad is not None and model.patch_embed.proj.weight.grad is not None


def test_backbone_kwargs_keeps_sparo_options_off_baselines() -> None:
    config = {"arch": "vit_small", "patch_size": 8, "num_slots": 64, "slot_dim": 64, "attn_dim": 64, "group_size": 1}
    assert sparo_vit.backbone_kwargs(config) == {"arch": "vit_small", "patch_size": 8}
    config["arch"] = "vit_small_sparo"
    assert sparo_vit.backbone_kwargs(config)["num_slots"] == 64


def test_timm_registry_round_trip() -> None:
    assert {"vit_tiny_sparo", "vit_small_sparo", "vit_base_sparo"} <= set(timm.list_models("*_sparo"))
    from_timm = timm.create_model("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=16)
    ours = build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=16)
    ours.load_state_dict(from_timm.state_dict())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(ours.eval()(images), from_timm.eval()(images))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("vit_tiny_sparo", pretrained=True)


def test_dino_head_is_official_design() -> None:
    head = DINOHead(in_dim=32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 100)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    bottleneck = F.normalize(head.mlp(torch.randn(3, 32)), dim=-1)
    assert torch.allclose(bottleneck.norm(dim=-1), torch.ones(3))
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3
    assert DINOHead(32, 10, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in DINOHead(32, 10, use_bn=True).mlp)


def test_multicrop_wrapper_runs_backbone_once_per_resolution() -> None:
    backbone = build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=4, slot_dim=4).eval()
    head = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8)
    calls = []
    backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    wrapper = MultiCropWrapper(backbone, head)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        out = wrapper(crops)
        expected = torch.cat([head(backbone(c)) for c in crops])
    assert calls[:2] == [(4, 3, 32, 32), (6, 3, 16, 16)]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert {k.split(".")[0] for k in wrapper.state_dict()} == {"backbone", "head"}


def test_slot_attention_maps_cover_patches_and_report_cls_share() -> None:
    model = build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=6, slot_dim=4).eval()
    maps, cls_share = slot_attention_maps(model, torch.randn(2, 3, 48, 32))
    assert maps.shape == (2, 6, 6, 4) and cls_share.shape == (2, 6)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)) + cls_share, torch.ones(2, 6))
    assert not torch.allclose(maps[:, 0], maps[:, 1])
    with pytest.raises(ValueError, match="need a slot read-out"):
        slot_attention_maps(build_backbone("vit_tiny", patch_size=8, img_size=32), torch.randn(1, 3, 32, 32))


def test_load_pretrained_trunk_from_a_timm_vit_file(tmp_path) -> None:
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)
    path = tmp_path / "vit_tiny.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = build_backbone("vit_tiny_sparo", patch_size=16, img_size=32, num_slots=8, slot_dim=8)
    loaded = load_pretrained_trunk(model, str(path))
    assert loaded.missing == ["sparo.key.bias", "sparo.key.weight", "sparo.proj.bias", "sparo.proj.weight",
                               "sparo.query"]
    torch.testing.assert_close(model.blocks[10].attn.qkv.weight, source.blocks[10].attn.qkv.weight)
    torch.testing.assert_close(model.norm.weight, source.norm.weight)
    assert model.pos_embed.shape == (1, 1 + 4, 192)  # resampled from the 4x4 grid to 2x2
    assert loaded.not_loaded == [f"blocks.11.{name}" for name in sorted(source.blocks[11].state_dict())] + [
        "head.bias", "head.weight"]
    assert loaded.summary() == (
        f"pretrained trunk {path}: {11 * 12 + 6} tensors loaded, pos_embed resampled 4x4 -> 2x2 patches; not loaded: "
        "blocks.11.* (12): the block the sparo read-out replaces, head.* (2); missing (fresh init): sparo.* (5)")


def test_load_pretrained_trunk_rejects_another_arch(tmp_path) -> None:
    path = tmp_path / "small.pth"
    torch.save(build_backbone("vit_small", patch_size=16, img_size=32).state_dict(), path)
    with pytest.raises(ValueError, match="width 384 and depth 12; this backbone has width 192 and depth 12"):
        load_pretrained_trunk(build_backbone("vit_tiny_sparo", patch_size=16, img_size=32), str(path))
    shallow = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=6, num_classes=0)
    with pytest.raises(ValueError, match="width 192 and depth 6; this backbone has width 192 and depth 12"):
        load_pretrained_trunk(build_backbone("vit_tiny_sparo", patch_size=16, img_size=32), shallow.state_dict())
    with pytest.raises(ValueError, match="another patch size"):
        load_pretrained_trunk(build_backbone("vit_tiny", patch_size=8, img_size=32),
                              build_backbone("vit_tiny", patch_size=16, img_size=32).state_dict())
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained_trunk(build_backbone("vit_tiny"), str(tmp_path / "missing.pth"))


def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for a fractional position t."""
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _official_resize_matrix(side: int, target: int) -> torch.Tensor:
    """(target, side) bicubic resampling matrix of official DINO's interpolation along one axis, from its
    definition: scale = (target + 0.1) / side, source x = (i + 0.5) / scale - 0.5, taps clamped at the borders."""
    scale = (target + 0.1) / side
    matrix = torch.zeros(target, side, dtype=torch.float64)
    for i in range(target):
        x = (i + 0.5) / scale - 0.5
        x0 = math.floor(x)
        for offset, weight in zip(range(-1, 3), _cubic_weights(x - x0)):
            matrix[i, min(max(x0 + offset, 0), side - 1)] += weight
    return matrix


def _official_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    side = math.isqrt(pos_embed.shape[1] - 1)
    patches = pos_embed[0, 1:].double().reshape(side, side, -1)
    rows, cols = _official_resize_matrix(side, grid[0]), _official_resize_matrix(side, grid[1])
    resized = torch.einsum("is,jt,std->ijd", rows, cols, patches).reshape(-1, patches.shape[-1])
    return torch.cat([pos_embed[0, :1].double(), resized]).float()[None]


@pytest.mark.parametrize("arch", ["vit_tiny", "vit_tiny_sparo"])
def test_local_crops_get_official_dino_position_embeddings(arch: str) -> None:
    """A 96 px crop of a 224 px ViT/16 sees the 14x14 grid resized to 6x6 as official DINO resizes it; 224 px sees
    the stored grid unchanged. timm's resampling (the alternative) gives another grid at 96 px."""
    model = build_backbone(arch, patch_size=16, img_size=224, **({"num_slots": 4} if "sparo" in arch else {})).eval()
    with torch.no_grad():
        model.pos_embed.normal_()  # a rough grid: interpolation differences become visible
        for size, grid in ((96, (6, 6)), (224, (14, 14)), (64, (4, 4)), (96 + 32, (8, 8))):
            images = torch.randn(2, 3, size, size)
            patches = model.patch_embed(images)
            tokens = model._pos_embed(patches)
            expected = torch.cat([model.cls_token.expand(2, -1, -1), patches.flatten(1, 2)], dim=1)
            expected = expected + (_official_pos_embed(model.pos_embed, grid) if size != 224 else model.pos_embed)
            torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
        timm_model = build_backbone(arch, patch_size=16, img_size=224, pos_embed_interpolation="timm",
                                    **({"num_slots": 4} if "sparo" in arch else {})).eval()
        timm_model.load_state_dict(model.state_dict())
        small, full = torch.randn(2, 3, 96, 96), torch.randn(2, 3, 224, 224)
        assert (model(small) - timm_model(small)).norm() > 1e-3 * model(small).norm()
        torch.testing.assert_close(model(full), timm_model(full))


def test_non_square_crops_and_bad_interpolation_names() -> None:
    model = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()  # 4x4 grid
    with torch.no_grad():
        model.pos_embed.normal_()
        patches = model.patch_embed(torch.ones(1, 3, 16, 48))  # a 2x6 grid
        expected = _official_pos_embed(model.pos_embed, (2, 6))
        torch.testing.assert_close(model._pos_embed(patches)[:, 1:] - patches.flatten(1, 2), expected[:, 1:],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown pos_embed_interpolation 'bilinear'; valid: dino, timm"):
        build_backbone("vit_tiny", pos_embed_interpolation="bilinear")


def _probabilities(logits: torch.Tensor, temperature: float = 0.04) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def test_head_cosines_stay_fp32_under_bf16_autocast() -> None:
    """Teacher targets of a trained-like head (prototypes near its outputs: cosines close to 1, sharp targets at
    temperature 0.04) under CPU bf16 autocast agree with fp32. Rounding the cosines to bf16 (spacing 2**-8 near 1)
    would cost ~4e-4 nats of KL and 1e-3 of probability here; only the MLP's bf16 rounding may remain."""
    torch.manual_seed(0)
    head = DINOHead(384, 65536)
    features = torch.randn(64, 384)
    with torch.no_grad():
        bottleneck = torch.nn.functional.normalize(head.mlp(features), dim=-1)
        prototypes = head.last_layer.parametrizations.weight.original1
        prototypes[:4096] = bottleneck.repeat(64, 1) + 0.3 * torch.randn(4096, 256) / 16
        reference = _probabilities(bottleneck @ torch.nn.functional.normalize(prototypes, dim=-1).T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)
    assert logits.dtype == torch.float32
    mixed = _probabilities(logits)
    kl = (reference * (reference.clamp_min(1e-30).log() - mixed.clamp_min(1e-30).log())).sum(-1)
    assert kl.mean() < 2e-5 and (reference - mixed).abs().max() < 4e-4
