"""visualize_slots.py, visualize_attention.py and plot_logs.py render real PNGs from tiny checkpoints and from
training logs; the baseline head maps are checked against timm's own attention."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image
from test_eval_knn import write_checkpoint
from test_features import SPARO_TINY

import plot_logs
import sparo_vit
import visualize_attention
import visualize_slots

SMALL = ["--resize_size", "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "8"]


@pytest.fixture
def checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "run", SPARO_TINY)
    state = torch.load(path, weights_only=True)
    # Spread the queries so slots differ visibly even without training.
    state["teacher"]["backbone.sparo.query"] = torch.randn_like(state["teacher"]["backbone.sparo.query"]) * 5
    torch.save(state, path)
    return path


def test_attention_grid_png_has_one_row_per_slot_and_one_column_per_image(image_folder, checkpoint, tmp_path):
    out = visualize_slots.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL,
                                "--num_images", "5", "--slots", "0", "2", "3", "--output_dir", str(tmp_path)])
    assert out["slots"] == [0, 2, 3]
    width, height = Image.open(out["grid"]).size
    assert width == pytest.approx(5 * 160, rel=0.05) and height == pytest.approx(3 * 160, rel=0.05)


def test_different_slots_give_different_maps(image_folder, checkpoint):
    args = visualize_slots.build_parser().parse_args(["--pretrained_weights", checkpoint, "--data_path", image_folder,
                                                      *SMALL])
    backbone, _, _ = visualize_slots.weights.load_backbone(args)
    images = visualize_slots.load_images(args)
    maps, cls_share = sparo_vit.slot_attention_maps(backbone, images)
    num_slots = maps.shape[1]
    for a in range(num_slots):
        for b in range(a + 1, num_slots):
            assert not torch.allclose(maps[:, a], maps[:, b], atol=1e-4), (a, b)
    entropy = visualize_slots.attention_entropy(maps, cls_share)
    assert entropy.shape == (num_slots,) and (entropy > 0).all()


def test_selection_by_entropy_and_by_per_slot_knn(image_folder, checkpoint, tmp_path):
    knn_json = tmp_path / "knn.json"
    knn_json.write_text(json.dumps({"per_slot": {"k": 20, "top1": [10.0, 90.0, 50.0, 70.0]}}))
    out = visualize_slots.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL,
                                "--select_by", "knn", "--knn_results", str(knn_json), "--num_slots_shown", "2",
                                "--output_dir", str(tmp_path)])
    assert out["slots"] == [1, 3]
    args = visualize_slots.build_parser().parse_args(["--pretrained_weights", checkpoint, "--data_path", image_folder,
                                                      *SMALL, "--num_slots_shown", "2"])
    backbone, _, _ = visualize_slots.weights.load_backbone(args)
    maps, cls_share = sparo_vit.slot_attention_maps(backbone, visualize_slots.load_images(args))
    chosen = visualize_slots.choose_slots(args, 4, maps, cls_share)
    entropy = visualize_slots.attention_entropy(maps, cls_share)
    assert chosen == entropy.argsort()[:2].tolist() and entropy[chosen[0]] <= entropy.min() + 1e-6


def test_gallery_png_from_image_files(image_folder, checkpoint, tmp_path):
    files = os.path.join(image_folder, "val", "class_1")
    out = visualize_slots.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL,
                                "--images", files, "--num_images", "3", "--slots", "1", "2", "--gallery_query", "0",
                                "--gallery_size", "4", "--output_dir", str(tmp_path)])
    width, height = Image.open(out["gallery"]).size
    assert width > 4 * 100 and height > 2 * 100


def test_bad_visualization_input_names_the_problem(image_folder, checkpoint, tmp_path):
    base = ["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL, "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="out of range: this model has 4 slots"):
        visualize_slots.main(base + ["--slots", "7"])
    with pytest.raises(ValueError, match="needs --knn_results"):
        visualize_slots.main(base + ["--select_by", "knn"])
    with pytest.raises(FileNotFoundError, match="image or folder not found"):
        visualize_slots.main(base + ["--images", str(tmp_path / "nope.png")])
    baseline = write_checkpoint(tmp_path / "base", {"arch": "vit_tiny", "patch_size": 8, "img_size": 32})
    with pytest.raises(ValueError, match="slot maps need a slot read-out"):
        visualize_slots.main(["--pretrained_weights", baseline, "--data_path", image_folder, *SMALL])


@pytest.mark.parametrize("arch, size", [("vit_tiny", 32), ("vit_tiny", 48), ("vit_tiny_sparo", 40)])
def test_cls_attention_maps_are_timms_own_attention_weights(arch, size):
    """Reference: timm's explicit (non-fused) attention of the last block, captured at its attention dropout, in
    the backbone's normal forward pass; also at an image size other than the position-embedding grid."""
    torch.manual_seed(0)
    options = {"num_slots": 4} if arch.endswith("_sparo") else {}
    backbone = sparo_vit.build_backbone(arch, patch_size=8, img_size=32, **options).eval()
    images = torch.randn(2, 3, size, size)
    maps, cls_share = sparo_vit.cls_attention_maps(backbone, images)
    attention = backbone.blocks[-1].attn
    attention.fused_attn = False
    captured = []
    attention.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(output))
    backbone(images)
    reference = captured[0][:, :, 0]  # (B, heads, N): the CLS query's row
    grid = size // 8
    assert maps.shape == (2, 3, grid, grid) and cls_share.shape == (2, 3)
    torch.testing.assert_close(maps.flatten(2), reference[:, :, 1:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_share, reference[:, :, 0], atol=1e-6, rtol=1e-5)


def test_comparison_grid_puts_every_baseline_head_above_the_slots(image_folder, checkpoint, tmp_path):
    """A patch-16 baseline (2 x 2 maps) and a patch-8 SPARO model (4 x 4 maps) on the same 32 px images."""
    baseline = write_checkpoint(tmp_path / "dino", {"arch": "vit_tiny", "patch_size": 16, "img_size": 32})
    out = visualize_slots.main(["--pretrained_weights", checkpoint, "--compare_weights", baseline,
                                "--data_path", image_folder, *SMALL, "--num_images", "4", "--slots", "0", "2",
                                "--output_dir", str(tmp_path)])
    assert out["comparison_rows"] == ["vit_tiny head 0", "vit_tiny head 1", "vit_tiny head 2", "slot 0", "slot 2"]
    assert os.path.basename(out["comparison"]) == "heads_checkpoint_teacher_vs_slots_checkpoint_teacher.png"
    width, height = Image.open(out["comparison"]).size
    assert width == pytest.approx(4 * 160, rel=0.05) and height == pytest.approx(5 * 160, rel=0.05)
    assert Image.open(out["grid"]).size[1] == pytest.approx(2 * 160, rel=0.05)  # the slot grid is unchanged


def test_comparison_with_a_plain_state_dict_needs_its_arch(image_folder, checkpoint, tmp_path):
    torch.save(sparo_vit.build_backbone("vit_tiny").state_dict(), tmp_path / "plain.pth")  # official: 224 px, patch 16
    base = ["--pretrained_weights", checkpoint, "--compare_weights", str(tmp_path / "plain.pth"),
            "--data_path", image_folder, *SMALL, "--num_images", "2", "--slots", "1", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match="plain state dict without a config; give --compare_arch and --compare_patch"):
        visualize_slots.main(base)
    out = visualize_slots.main(base + ["--compare_arch", "vit_tiny", "--compare_patch_size", "16"])
    assert len(out["comparison_rows"]) == 3 + 1
    with pytest.raises(ValueError, match="--compare_weights needs a checkpoint without slots"):
        visualize_slots.main(base[:2] + ["--compare_weights", checkpoint] + base[4:])


def test_plot_logs_draws_every_metric_of_several_runs(tmp_path):
    for name, scale in (("dino", 1.0), ("dino_sparo", 0.8)):
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({"epoch": e, "train_loss": scale * (5 - e), "train_lr": 1e-4 * e, "knn_top1": 50 + e})
                 for e in range(4)]
        (run / "log.txt").write_text("\n".join(lines) + "\n{\"epoch\": 4, \"train_lo")  # last line cut by a kill
    path = plot_logs.main([str(tmp_path / "dino"), str(tmp_path / "dino_sparo"), "--output", str(tmp_path / "c.png")])
    width, height = Image.open(path).size
    assert width > 1000 and height > 300
    with pytest.raises(SystemExit, match="not in any log; logged: knn_top1, train_loss, train_lr"):
        plot_logs.main([str(tmp_path / "dino"), "--keys", "teacher_temp", "--output", str(tmp_path / "d.png")])
    with pytest.raises(FileNotFoundError, match="no log.txt"):
        plot_logs.read_log(str(tmp_path / "missing"))


def test_gallery_never_shows_the_query_as_its_own_match() -> None:
    pool = torch.rand(5, 3, 8, 8)
    pool_slots = torch.randn(5, 2, 4)
    captured = {}
    original = visualize_slots.plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        captured["axes"] = axes
        return fig, axes

    visualize_slots.plt.subplots = spy
    try:
        visualize_slots.render_gallery(pool[2], pool, pool_slots[2], pool_slots, [0, 1], 4, "/dev/null", exclude=2)
    finally:
        visualize_slots.plt.subplots = original
    shown = [ax.get_images()[0].get_array() for ax in captured["axes"][0][1:]]
    query = visualize_slots.for_display(pool[2][None])[0].numpy()
    assert len(shown) == 4 and not any((img == query).all() for img in shown)


def _picture(path, width: int = 52, height: int = 40) -> str:
    torch.manual_seed(0)
    Image.fromarray((torch.rand(height, width, 3) * 255).byte().numpy()).save(path)
    return str(path)


def test_official_visualize_attention_command_writes_the_official_files(tmp_path):
    """Official: img.png, attn-head<j>.png per head at the resized image size, mask_th<t>_head<j>.png per head."""
    weights = write_checkpoint(tmp_path / "dino", {"arch": "vit_tiny", "patch_size": 8, "img_size": 32})
    image = _picture(tmp_path / "photo.png")
    written = visualize_attention.main(["--pretrained_weights", weights, "--image_path", image, "--image_size", "48",
                                        "--output_dir", str(tmp_path / "out"), "--threshold", "0.6"])
    names = sorted(os.path.basename(path) for path in written)
    assert names == sorted(["img.png"] + [f"attn-head{j}.png" for j in range(3)]
                           + [f"mask_th0.6_head{j}.png" for j in range(3)])
    # 40 x 52 resized to a shorter side of 48 is 48 x 62, cropped to the patch multiple 48 x 56 (width x height)
    for name in ("img.png", "attn-head0.png", "attn-head2.png"):
        assert Image.open(tmp_path / "out" / name).size == (56, 48), name
    assert Image.open(tmp_path / "out" / "mask_th0.6_head1.png").size == pytest.approx((56, 48), abs=1)


def test_visualize_attention_on_a_sparo_checkpoint_draws_its_slots(tmp_path, checkpoint):
    image = _picture(tmp_path / "a.png")
    written = visualize_attention.main(["--pretrained_weights", checkpoint, "--image_path", image,
                                        "--image_size", "32", "32", "--output_dir", str(tmp_path)])
    assert sorted(os.path.basename(path) for path in written) == ["attn-slot0.png", "attn-slot1.png",
                                                                  "attn-slot2.png", "attn-slot3.png", "img.png"]
    assert Image.open(written[1]).size == (32, 32)


def test_mass_masks_keep_the_largest_weights_holding_the_threshold():
    torch.manual_seed(0)
    weights = torch.rand(5, 30, dtype=torch.float64) ** 3
    for threshold in (0.1, 0.6, 0.95):
        masks = visualize_attention.mass_masks(weights, threshold)
        for row, mask in zip(weights, masks):
            expected, mass_above = torch.zeros_like(mask), 0.0
            for index in row.argsort(descending=True).tolist():  # brute force, largest first
                expected[index] = mass_above < threshold
                mass_above += (row[index] / row.sum()).item()
            assert torch.equal(mask, expected), threshold


def test_visualize_attention_bad_input_names_the_problem(tmp_path):
    image = _picture(tmp_path / "a.png")
    with pytest.raises(ValueError, match="--pretrained_weights is required: no reference weights are downloaded"):
        visualize_attention.main(["--image_path", image])
    plain = tmp_path / "plain.pth"
    torch.save(sparo_vit.build_backbone("vit_tiny", patch_size=16).state_dict(), plain)
    with pytest.raises(ValueError, match="--image_path is required"):
        visualize_attention.main(["--pretrained_weights", str(plain)])
    with pytest.raises(ValueError, match="do not fit {'arch': 'vit_small', 'patch_size': 8}"):  # official defaults
        visualize_attention.main(["--pretrained_weights", str(plain), "--image_path", image])
    written = visualize_attention.main(["--pretrained_weights", str(plain), "--image_path", image, "--arch",
                                        "vit_tiny", "--patch_size", "16", "--output_dir", str(tmp_path / "out")])
    assert len(written) == 1 + 3
    with pytest.raises(FileNotFoundError, match="image not found"):
        visualize_attention.main(["--pretrained_weights", str(plain), "--image_path", str(tmp_path / "nope.png"),
                                  "--arch", "vit_tiny", "--patch_size", "16"])


def test_plot_logs_starts_the_knn_curve_at_the_random_init(tmp_path):
    records = [{"epoch": 0, "train_loss": 5.0, "knn_top1": 60.0, "knn_top1_init": 54.0},
               {"epoch": 1, "train_loss": 4.0, "knn_top1": 62.0}]
    assert plot_logs.curve(records, "knn_top1") == [(-1, 54.0), (0, 60.0), (1, 62.0)]
    assert plot_logs.curve(records, "train_loss") == [(0, 5.0), (1, 4.0)]
    assert plot_logs.numeric_keys({"run": records}) == ["knn_top1", "train_loss"]  # no separate init panel


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b"", b"hello\nnot json\n"], ids=["binary", "empty", "text"])
def test_plot_logs_on_a_file_that_is_not_a_log_is_one_line(tmp_path, content):
    """Before: a UnicodeDecodeError traceback for a binary file, a ValueError traceback for a text file."""
    path = tmp_path / "log.txt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        plot_logs.main([str(path), "--output", str(tmp_path / "c.png")])
    assert str(info.value) == f"error: {path} holds no epoch records (JSON lines of main_dino.py's log.txt)"
    with pytest.raises(SystemExit, match=f"error: no log.txt in {tmp_path / 'missing'}"):
        plot_logs.main([str(tmp_path / "missing"), "--output", str(tmp_path / "c.png")])
